"""Readers for the standard binary files of MNIST-like (IDX) and CIFAR (binary version) data sets.

IDX (http://yann.lecun.com/exdb/mnist/, also Fashion-MNIST): a 4-byte magic number
`0x00 0x00 <type> <ndim>`, then `ndim` big-endian uint32 sizes, then the values in C order,
big-endian. Files may be gzipped; gzip is detected from the magic bytes `1f 8b`, never from the
file name.

CIFAR binary (https://www.cs.toronto.edu/~kriz/cifar.html, "binary version"): fixed-size records
of 1 label byte (CIFAR-10) or 2 label bytes, coarse then fine (CIFAR-100), followed by
3072 pixel bytes: the 1024 red, then 1024 green, then 1024 blue values of a 32x32 image,
row-major. The python version of CIFAR is a pickle and is refused by `find_cifar_files`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .errors import DataError

# IDX type byte -> big-endian numpy dtype.
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

CIFAR100_COARSE_CLASSES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
]  # fmt: skip

CIFAR100_FINE_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle",
    "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

CIFAR_PIXELS = 3 * 32 * 32


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path} is a damaged gzip file ({e}); download it again") from e
    return raw


# ---------------------------------------------------------------------------------------------
# IDX


def parse_idx(raw: bytes, where: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an (uncompressed) IDX file into a native-endian numpy array."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(
            f"{where} is not an IDX file (magic bytes {raw[:4].hex() or 'missing'}, expected "
            "00 00 <type> <ndim>); give the MNIST-style idx3-ubyte / idx1-ubyte files"
        )
    dtype = _IDX_TYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{where} is truncated inside its IDX header; download it again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    expected = header + count * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{where} has {len(raw)} bytes but its IDX header {shape} needs {expected}; "
            "the file is truncated or damaged, download it again"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array of its shape and type."""
    path = Path(path)
    return parse_idx(_read_maybe_gzip(path), str(path))


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool = False) -> None:
    """Write `array` as an IDX file (used by tests and for exporting); gzip it if `compress`."""
    codes = {v.newbyteorder("="): k for k, v in _IDX_TYPES.items()}
    native = np.dtype(array.dtype).newbyteorder("=")
    if native not in codes:
        raise DataError(f"IDX cannot store dtype {array.dtype}; use uint8, int8/16/32, float32/64")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw = header + np.ascontiguousarray(array, dtype=_IDX_TYPES[codes[native]]).tobytes()
    Path(path).write_bytes(gzip.compress(raw, mtime=0) if compress else raw)


# IDX file names as distributed (train-images-idx3-ubyte.gz) and as re-packaged elsewhere
# (train-images.idx3-ubyte).
_IDX_STEMS = {
    ("train", "images"): ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    ("train", "labels"): ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ("test", "images"): ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_idx(folder: Path, split: str, kind: str) -> Path | None:
    for stem in _IDX_STEMS[(split, kind)]:
        for suffix in ("", ".gz"):
            p = folder / (stem + suffix)
            if p.is_file():
                return p
    return None


def read_mnist_folder(
    path: str | Path, split: str = "train"
) -> tuple[np.ndarray, np.ndarray | None]:
    """Images (N, H, W) uint8 and labels (N,) int64 (or None) from MNIST-style IDX files.

    `path` is a folder with `train-images-idx3-ubyte[.gz]` and friends, or one IDX image file
    (its labels are read from the matching `...labels-idx1-ubyte` file beside it, if any).
    `split` is "train", "test" or "all" (train followed by test).
    """
    path = Path(path)
    if path.is_file():
        images = read_idx(path)
        labels = None
        name = path.name
        if "images" in name and "idx3" in name:
            sibling = path.with_name(name.replace("images", "labels").replace("idx3", "idx1"))
            candidates = [sibling, sibling.with_name(sibling.name.removesuffix(".gz"))]
            candidates.append(sibling.with_name(sibling.name + ".gz"))
            for c in candidates:
                if c.is_file():
                    labels = read_idx(c)
                    break
        return _check_idx_pair(images, labels, str(path))
    if not path.is_dir():
        raise DataError(f"MNIST path {path} does not exist; give a folder with the IDX files")
    splits = ["train", "test"] if split == "all" else [split]
    if split not in ("train", "test", "all"):
        raise DataError(f"unknown split {split!r} for MNIST-style data; use train, test or all")
    all_images, all_labels = [], []
    for s in splits:
        img_path = _find_idx(path, s, "images")
        if img_path is None:
            wanted = " or ".join(f"{stem}[.gz]" for stem in _IDX_STEMS[(s, "images")])
            raise DataError(f"no {wanted} in {path}; give the folder holding the IDX files")
        lab_path = _find_idx(path, s, "labels")
        images, labels = _check_idx_pair(
            read_idx(img_path), read_idx(lab_path) if lab_path else None, str(img_path)
        )
        all_images.append(images)
        all_labels.append(labels)
    if any(lab is None for lab in all_labels):
        return np.concatenate(all_images), None
    return np.concatenate(all_images), np.concatenate(all_labels)


def _check_idx_pair(
    images: np.ndarray, labels: np.ndarray | None, where: str
) -> tuple[np.ndarray, np.ndarray | None]:
    if images.ndim != 3:
        raise DataError(
            f"{where} holds an array of shape {images.shape}, not images (N, H, W); "
            "give the images file (idx3), not the labels file (idx1)"
        )
    if images.dtype != np.uint8:
        raise DataError(f"{where} holds {images.dtype} values; ldmkit reads uint8 IDX images")
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(
                f"the labels beside {where} have shape {labels.shape}, expected ({len(images)},); "
                "the images and labels files do not belong together"
            )
        labels = labels.astype(np.int64)
    return images, labels


# ---------------------------------------------------------------------------------------------
# CIFAR binary


def read_cifar_bin(path: str | Path, *, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N, label_bytes) int64 from one CIFAR .bin file."""
    path = Path(path)
    raw = _read_maybe_gzip(path)
    record = label_bytes + CIFAR_PIXELS
    if len(raw) == 0 or len(raw) % record != 0:
        kind = "CIFAR-10" if label_bytes == 1 else "CIFAR-100"
        raise DataError(
            f"{path} has {len(raw)} bytes, not a multiple of the {kind} record size {record} "
            f"({label_bytes} label byte(s) + 3072 pixels); the file is truncated or is not "
            f"{kind} binary data, download it again"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    labels = records[:, :label_bytes].astype(np.int64)
    images = records[:, label_bytes:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def write_cifar_bin(path: str | Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write CIFAR binary records; `labels` is (N,) for CIFAR-10 or (N, 2) coarse+fine."""
    labels = np.asarray(labels, dtype=np.uint8).reshape(len(images), -1)
    pixels = np.asarray(images, dtype=np.uint8).reshape(len(images), CIFAR_PIXELS)
    Path(path).write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())


# File names of the pickled python versions, which are refused.
_PYTHON_CIFAR_NAMES = {
    "cifar10": {"data_batch_1", "test_batch", "batches.meta"},
    "cifar100": {"train", "test", "meta"},
}


def find_cifar_files(path: str | Path, *, variant: str, split: str) -> list[Path]:
    """The .bin files of CIFAR-10 (`variant="cifar10"`) or CIFAR-100 for `split`.

    `path` is the extracted folder (or its parent, e.g. the folder holding
    `cifar-10-batches-bin/`) or one .bin file. The pickled python version is refused.
    """
    path = Path(path)
    url = "https://www.cs.toronto.edu/~kriz/cifar.html"
    label = "CIFAR-10" if variant == "cifar10" else "CIFAR-100"
    if path.is_file():
        if path.suffix == ".bin":
            return [path]
        if path.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise DataError(
                f"{path} is an archive; extract it (tar xzf {path.name}) and give the folder. "
                f"ldmkit reads the binary version of {label} ({label.lower()}-binary.tar.gz)"
            )
        raise DataError(f"{path} is not a {label} .bin file; give the extracted binary folder")
    if not path.is_dir():
        raise DataError(f"{label} path {path} does not exist; give the extracted binary folder")
    if split not in ("train", "test", "all"):
        raise DataError(f"unknown split {split!r} for {label}; use train, test or all")
    folders = [path] + sorted(p for p in path.iterdir() if p.is_dir())
    for folder in folders:
        if variant == "cifar10":
            train = sorted(folder.glob("data_batch_*.bin"))
            test = sorted(folder.glob("test_batch.bin"))
        else:
            train = sorted(folder.glob("train.bin"))
            test = sorted(folder.glob("test.bin"))
        if train or test:
            chosen = {"train": train, "test": test, "all": train + test}[split]
            if not chosen:
                raise DataError(f"{folder} has no {split} files of {label}; try split=all")
            return chosen
        if _PYTHON_CIFAR_NAMES[variant] & {p.name for p in folder.iterdir()}:
            raise DataError(
                f"{folder} holds the python (pickled) version of {label}, which ldmkit never "
                f"unpickles; download the binary version ({label.lower()}-binary.tar.gz) from "
                f"{url} and extract it"
            )
    wanted = "data_batch_*.bin / test_batch.bin" if variant == "cifar10" else "train.bin / test.bin"
    raise DataError(f"no {label} binary files ({wanted}) in {path}; download them from {url}")


def read_cifar(
    path: str | Path, *, variant: str, split: str = "train", label_kind: str = "fine"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N, 3, 32, 32) uint8, labels (N,) int64 and class names of CIFAR-10 / CIFAR-100.

    For CIFAR-100, `label_kind` picks the 100 "fine" (default) or the 20 "coarse" labels.
    """
    if variant not in ("cifar10", "cifar100"):
        raise DataError(f"unknown CIFAR variant {variant!r}; use cifar10 or cifar100")
    if label_kind not in ("fine", "coarse"):
        raise DataError(f"unknown CIFAR-100 label kind {label_kind!r}; use fine or coarse")
    label_bytes = 1 if variant == "cifar10" else 2
    images, labels = [], []
    for f in find_cifar_files(path, variant=variant, split=split):
        x, y = read_cifar_bin(f, label_bytes=label_bytes)
        images.append(x)
        labels.append(y)
    x = np.concatenate(images)
    y = np.concatenate(labels)
    if variant == "cifar10":
        names, y = CIFAR10_CLASSES, y[:, 0]
    elif label_kind == "fine":
        names, y = CIFAR100_FINE_CLASSES, y[:, 1]
    else:
        names, y = CIFAR100_COARSE_CLASSES, y[:, 0]
    if len(y) and y.max() >= len(names):
        raise DataError(
            f"{path} has label {int(y.max())} but {variant} has {len(names)} classes; "
            "is this the other CIFAR variant?"
        )
    return x, y, list(names)
