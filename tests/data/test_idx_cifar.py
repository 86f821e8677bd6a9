"""IDX (MNIST / Fashion-MNIST) and CIFAR binary readers on small files written in those formats."""

import gzip

import numpy as np
import pytest

from ldmkit.data import DataError, load_dataset, read_cifar, read_idx, write_cifar_bin, write_idx
from ldmkit.data.formats import CIFAR10_CLASSES, CIFAR100_FINE_CLASSES, parse_idx


def _digits(n, size=28, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, size, size), dtype=np.uint8), rng.integers(0, 10, n)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    images, _ = _digits(5)
    path = tmp_path / "x.idx"  # no .gz suffix even when gzipped: detection is by magic bytes
    write_idx(path, images, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    out = read_idx(path)
    assert out.dtype == np.uint8 and np.array_equal(out, images)


def test_idx_big_endian_types(tmp_path):
    x = np.arange(6, dtype=np.int32).reshape(2, 3) - 3
    write_idx(tmp_path / "i", x)
    raw = (tmp_path / "i").read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 2]) and raw[4:12] == bytes([0, 0, 0, 2, 0, 0, 0, 3])
    assert np.array_equal(read_idx(tmp_path / "i"), x)


def test_idx_bad_magic_and_truncated(tmp_path):
    with pytest.raises(DataError, match="not an IDX file"):
        parse_idx(b"\x89PNG....")
    write_idx(tmp_path / "x", np.zeros((3, 4, 4), np.uint8))
    raw = (tmp_path / "x").read_bytes()
    (tmp_path / "t").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated or damaged"):
        read_idx(tmp_path / "t")
    (tmp_path / "g").write_bytes(gzip.compress(raw)[:-10])
    with pytest.raises(DataError, match="damaged gzip"):
        read_idx(tmp_path / "g")


def _mnist_folder(root, n_train=6, n_test=4, gz=True):
    root.mkdir(exist_ok=True)
    sfx = ".gz" if gz else ""
    tx, ty = _digits(n_train, seed=1)
    sx, sy = _digits(n_test, seed=2)
    write_idx(root / f"train-images-idx3-ubyte{sfx}", tx, compress=gz)
    write_idx(root / f"train-labels-idx1-ubyte{sfx}", ty.astype(np.uint8), compress=gz)
    write_idx(root / f"t10k-images-idx3-ubyte{sfx}", sx, compress=gz)
    write_idx(root / f"t10k-labels-idx1-ubyte{sfx}", sy.astype(np.uint8), compress=gz)
    return tx, ty, sx, sy


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_folder_spec(tmp_path, gz):
    tx, ty, sx, sy = _mnist_folder(tmp_path / "m", gz=gz)
    ds = load_dataset(f"mnist:{tmp_path / 'm'}")
    assert ds.images.shape == (6, 1, 32, 32) and ds.class_names == [str(i) for i in range(10)]
    # 28x28 is framed by 2 px of zeros, not resized.
    assert np.array_equal(ds.images[:, 0, 2:30, 2:30].numpy(), tx)
    assert ds.images[:, :, :2].sum() == 0 and ds.images[:, :, :, 30:].sum() == 0
    assert ds.labels.tolist() == ty.tolist()
    test = load_dataset(f"fashion-mnist:{tmp_path / 'm'}?split=test")
    assert test.labels.tolist() == sy.tolist() and test.class_names[0] == "T-shirt/top"
    assert len(load_dataset(f"mnist:{tmp_path / 'm'}?split=all")) == 10


def test_mnist_single_file_and_missing(tmp_path):
    tx, ty, _, _ = _mnist_folder(tmp_path / "m")
    ds = load_dataset(f"mnist:{tmp_path / 'm' / 'train-images-idx3-ubyte.gz'}", image_size=16)
    assert ds.images.shape == (6, 1, 16, 16) and ds.labels.tolist() == ty.tolist()
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="no train-images-idx3-ubyte"):
        load_dataset(f"mnist:{tmp_path / 'e'}")
    with pytest.raises(DataError, match="not images"):
        load_dataset(f"mnist:{tmp_path / 'm' / 'train-labels-idx1-ubyte.gz'}")


def _cifar_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def test_cifar10_round_trip(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    x1, x2, xt = _cifar_images(3, 1), _cifar_images(2, 2), _cifar_images(2, 3)
    write_cifar_bin(root / "data_batch_1.bin", x1, [0, 1, 9])
    write_cifar_bin(root / "data_batch_2.bin", x2, [3, 4])
    write_cifar_bin(root / "test_batch.bin", xt, [5, 6])
    # the record layout: 1 label byte then R, G, B planes row-major
    raw = (root / "data_batch_1.bin").read_bytes()
    assert len(raw) == 3 * 3073 and raw[0] == 0 and raw[1:3073] == x1[0].tobytes()
    images, labels, names = read_cifar(tmp_path, variant="cifar10")  # the parent folder works too
    assert np.array_equal(images, np.concatenate([x1, x2])) and labels.tolist() == [0, 1, 9, 3, 4]
    assert names == CIFAR10_CLASSES
    ds = load_dataset(f"cifar10:{root}?split=test")
    assert np.array_equal(ds.images.numpy(), xt) and ds.labels.tolist() == [5, 6]


def test_cifar100_round_trip(tmp_path):
    x = _cifar_images(3)
    coarse_fine = np.array([[0, 4], [19, 99], [7, 30]])
    write_cifar_bin(tmp_path / "train.bin", x, coarse_fine)
    ds = load_dataset(f"cifar100:{tmp_path}")
    assert np.array_equal(ds.images.numpy(), x) and ds.labels.tolist() == [4, 99, 30]
    assert ds.class_names == CIFAR100_FINE_CLASSES and ds.class_names[99] == "worm"
    coarse = load_dataset(f"cifar100:{tmp_path}?labels=coarse", image_size=16)
    assert coarse.labels.tolist() == [0, 19, 7] and coarse.images.shape == (3, 3, 16, 16)


def test_cifar_truncated_file(tmp_path):
    write_cifar_bin(tmp_path / "data_batch_1.bin", _cifar_images(2), [1, 2])
    raw = (tmp_path / "data_batch_1.bin").read_bytes()
    (tmp_path / "data_batch_1.bin").write_bytes(raw[:-100])
    with pytest.raises(DataError, match=r"not a multiple of the CIFAR-10 record size 3073"):
        load_dataset(f"cifar10:{tmp_path}")


def test_cifar_python_version_refused(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"\x80\x02}q\x00.")  # a pickle: never opened
    (tmp_path / "batches.meta").write_bytes(b"")
    with pytest.raises(DataError, match="python \\(pickled\\) version.*binary version"):
        load_dataset(f"cifar10:{tmp_path}")
    with pytest.raises(DataError, match="no CIFAR-100 binary files"):
        load_dataset(f"cifar100:{tmp_path}")
    (tmp_path / "train").write_bytes(b"")
    with pytest.raises(DataError, match="python \\(pickled\\) version of CIFAR-100"):
        load_dataset(f"cifar100:{tmp_path}")
    with pytest.raises(DataError, match="is an archive; extract it"):
        (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
        load_dataset(f"cifar10:{tmp_path / 'cifar-10-python.tar.gz'}")
