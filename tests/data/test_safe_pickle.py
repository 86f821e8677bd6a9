"""The one restricted unpickler: numpy arrays load, everything else is refused before it runs."""

import gzip
import os
import pickle
import subprocess

import numpy as np
import pytest

from ldmkit.data import DataError, load_numpy_pickle
from ldmkit.data.safe_pickle import loads_numpy_pickle


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loads_numpy_arrays(tmp_path):
    data = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])), {"k": [np.uint8(3)]})
    # Python 3 writes bytes in protocol 2 via _codecs.encode, which is refused; mnist.pkl.gz is a
    # Python 2 pickle (str, not bytes) and needs only the numpy globals (tested in builtin tests).
    for proto in (3, 4):  # protocol 5 pickles arrays via _frombuffer: not admitted, not needed
        out = loads_numpy_pickle(pickle.dumps(data[0], protocol=proto))
        assert np.array_equal(out[0], data[0][0]) and out[0].dtype == np.float32
    (tmp_path / "a.pkl.gz").write_bytes(gzip.compress(pickle.dumps(data[0][0], protocol=4)))
    assert np.array_equal(load_numpy_pickle(tmp_path / "a.pkl.gz"), data[0][0])


def test_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker), protocol=2)
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|nt|os)\.system"):
        loads_numpy_pickle(payload)
    assert not marker.exists()  # nothing ran
    payload = pickle.dumps([np.zeros(2), _Evil(marker)])  # hidden inside innocent data
    with pytest.raises(DataError, match="refusing to unpickle"):
        loads_numpy_pickle(payload)
    assert not marker.exists()


@pytest.mark.parametrize(
    "obj, name",
    [
        (subprocess.Popen, "subprocess.Popen"),
        (np.load, "numpy.load"),
        (
            np.float64(1.0),
            "numpy",
        ),  # numpy scalars need numpy._core.multiarray.scalar: not admitted
        (_Evil, "_Evil"),
        (eval, "builtins.eval"),
    ],
)
def test_refuses_other_globals(obj, name):
    with pytest.raises(DataError, match=f"refusing to unpickle .*{name}"):
        loads_numpy_pickle(pickle.dumps(obj))


def test_garbage_is_a_clear_error():
    with pytest.raises(DataError, match="cannot read numpy pickle"):
        loads_numpy_pickle(pickle.dumps(np.zeros(3))[:-8])


def test_only_one_unpickler_in_the_package():
    import pathlib
    import re

    import ldmkit

    root = pathlib.Path(ldmkit.__file__).parent
    pattern = re.compile(
        r"^\s*(import pickle|from pickle |import dill|import cloudpickle)|Unpickler", re.M
    )
    users = [
        p.relative_to(root).as_posix() for p in root.rglob("*.py") if pattern.search(p.read_text())
    ]
    assert users == ["data/safe_pickle.py"], users
    assert sum("def find_class" in p.read_text() for p in root.rglob("*.py")) == 1
