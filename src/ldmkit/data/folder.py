"""An image folder as a data set: decode, convert and resize every image once, in parallel.

Images are found at any depth (hidden files and folders, whose names start with ".", are
ignored), in sorted order of their path relative to the root. Every supported mode is converted:
grayscale, 16-bit, palette, CMYK, and anything with alpha (composited on white). Unreadable
files (zero bytes, truncated, not an image, over Pillow's decompression-bomb limit) are
reported by name and skipped or fatal, as asked.

Captions come from a `.txt` file beside an image (same stem) or from `captions.jsonl` at the root
(one `{"file": "<path relative to the root>", "caption": "..."}` per line); the `.txt` wins.
Class labels come from the first-level sub-folder names (sorted), when asked, or with "auto" when
every image sits in a sub-folder and there are at least two (`animals/cat/*.png`,
`animals/dog/*.png`). Sub-folders that a caller's `skip_folder` marks (ldmkit passes "holds an
ldmkit run", whose sample grids are no training data) are left out, with one warning.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from .errors import DataError
from .transforms import resize_square

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_EXT_TEXT = "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)

_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


@dataclass
class FolderData:
    images: np.ndarray  # (N, C, S, S) uint8
    labels: np.ndarray | None  # (N,) int64
    captions: list[str] | None
    class_names: list[str] | None
    files: list[str]  # relative paths of the images kept, in order


class _Unreadable(Exception):
    """One file could not be used; the message is the reason, for the log."""


def scan_folder(
    root: Path, skip_folder: Callable[[Path], bool] | None = None
) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under `root`, sorted, skipping hidden names and the
    sub-folders for which `skip_folder` is true (one warning lists them)."""
    if skip_folder is not None and skip_folder(root):
        raise DataError(f"{root} holds an ldmkit run, not data; give the folder of images")
    images, others, skipped = [], [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if skip_folder is not None:
            skipped += [Path(dirpath) / d for d in dirnames if skip_folder(Path(dirpath) / d)]
            dirnames[:] = [d for d in dirnames if Path(dirpath) / d not in skipped]
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            (images if p.suffix.lower() in IMAGE_EXTENSIONS else others).append(p)
    if skipped:
        logger.warning(
            "skipped %d sub-folder(s) of %s that hold an ldmkit run (%s): their images are a "
            "run's output, not data", len(skipped), root,
            ", ".join(p.relative_to(root).as_posix() for p in skipped[:5]),
        )  # fmt: skip
    key = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    return sorted(images, key=key), sorted(others, key=key)


def survey_sides(
    root: Path, skip_folder: Callable[[Path], bool] | None = None, sample: int = 256
) -> tuple[list[int], int]:
    """(the short sides of up to `sample` images spread evenly over the folder, read from their
    headers only; the number of image files). Unreadable files are left out (the loader reports
    them); a missing or empty folder gives ([], 0) (the loader reports that too)."""
    if not root.is_dir():
        return [], 0
    files, _ = scan_folder(root, skip_folder)
    if not files:
        return [], 0
    picks = sorted({round(i * (len(files) - 1) / max(1, sample - 1)) for i in range(sample)})
    sides = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for path in (files[i] for i in picks if i < len(files)):
            try:
                with Image.open(path) as im:
                    sides.append(min(im.size))
            except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
                continue
    return sides, len(files)


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float grayscale -> 8-bit "L", scaling rather than clipping.

    (Pillow's own convert("L") clips 16-bit values at 255, which turns most 16-bit images white.)
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        arr8 = arr.astype(np.float64) / 257.0
    elif im.mode == "I":
        arr8 = arr / 257.0 if arr.max(initial=0) > 255 else arr.astype(np.float64)
    else:  # "F": [0, 1] floats or 0..255 floats
        arr8 = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr.astype(np.float64)
    return Image.fromarray(np.clip(np.rint(arr8), 0, 255).astype(np.uint8), "L")


def _decode(path: Path, image_size: int, channels: int | None) -> tuple[np.ndarray, bool, bool]:
    """(pixels (S, S, C) uint8, is grayscale, was upscaled) of one file, or raise _Unreadable."""
    try:
        if path.stat().st_size == 0:
            raise _Unreadable("zero-byte file")
        with Image.open(path) as im:
            w, h = im.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and w * h > limit:
                raise _Unreadable(
                    f"{w}x{h} = {w * h} pixels is over Pillow's decompression-bomb limit of "
                    f"{limit} (PIL.Image.MAX_IMAGE_PIXELS); raise that limit only if you trust "
                    "this file"
                )
            im.draft(None, (image_size, image_size))  # JPEG: decode at a reduced scale, cheaply
            if im.format in ("JPEG", "MPO", "TIFF", "WEBP") or "exif" in im.info:
                im = ImageOps.exif_transpose(
                    im
                )  # camera orientation (costly: only if it can apply)
            gray = _is_gray(im)
            if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba).convert("RGB")
            if im.mode not in ("L", "RGB"):
                im = _to_8bit_gray(im) if im.mode in _GRAY_MODES else im.convert("RGB")
            want = channels if channels is not None else (1 if gray else 3)
            im = im.convert("L" if want == 1 else "RGB")
            upscaled = min(w, h) < image_size
            arr = np.asarray(resize_square(im, image_size))
    except _Unreadable:
        raise
    except Image.DecompressionBombError as e:
        raise _Unreadable(f"refused by Pillow's decompression-bomb limit: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise _Unreadable("not an image Pillow can read (despite its extension)") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg:
            msg = f"truncated file ({msg})"
        raise _Unreadable(msg) from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr, gray, upscaled


def _is_gray(im: Image.Image) -> bool:
    if im.mode in _GRAY_MODES:
        return True
    if im.mode == "P":  # gray if every palette entry has r == g == b
        pal = np.asarray(im.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
        return bool((pal[:, 0] == pal[:, 1]).all() and (pal[:, 1] == pal[:, 2]).all())
    return False


def _read_captions(root: Path, files: list[Path], on_error: str) -> list[str] | None:
    by_file: dict[str, str] = {}
    jsonl = root / "captions.jsonl"
    if jsonl.is_file():
        for lineno, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                by_file[Path(entry["file"]).as_posix()] = " ".join(str(entry["caption"]).split())
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                msg = (
                    f"{jsonl}:{lineno} is not a JSON object with 'file' and 'caption' "
                    f"({type(e).__name__}: {e})"
                )
                if on_error == "fatal":
                    raise DataError(msg + "; fix the line or pass on_error='skip'") from e
                logger.warning("skipping %s", msg)
    captions = []
    for f in files:
        rel = f.relative_to(root).as_posix()
        txt = f.with_suffix(".txt")
        if txt.is_file():
            captions.append(" ".join(txt.read_text(encoding="utf-8", errors="replace").split()))
        else:
            captions.append(by_file.get(rel, ""))
    found = sum(bool(c) for c in captions)
    if found == 0:
        return None
    if found < len(files):
        logger.warning(
            "%d of %d images have no caption (they get '')", len(files) - found, len(files)
        )
    return captions


def _list_images(
    root: Path, labels_from_folders: bool | str, skip_folder: Callable[[Path], bool] | None
) -> tuple[list[Path], bool]:
    """(the image files under `root`, sorted; whether labels come from the sub-folders), or a
    clear error if there are none or, with folder labels asked for, if one is not inside a class
    sub-folder. "auto" takes folder labels when every image sits in one of 2 or more."""
    if not root.exists():
        raise DataError(
            f"data folder {root} does not exist; give a folder of images ({_EXT_TEXT}) "
            "or a built-in data set such as builtin:shapes"
        )
    if not root.is_dir():
        raise DataError(f"data path {root} is a file, not a folder; give the folder of images")
    files, others = scan_folder(root, skip_folder)
    if not files:
        if not others:
            raise DataError(
                f"data folder {root} is empty; put images ({_EXT_TEXT}) in it, at any depth"
            )
        examples = ", ".join(p.relative_to(root).as_posix() for p in others[:3])
        raise DataError(
            f"no images ({_EXT_TEXT}) in {root}: found {len(others)} other file(s) such as "
            f"{examples}; put images in the folder or give the right path"
        )
    loose = [f for f in files if len(f.relative_to(root).parts) < 2]
    if labels_from_folders == "auto":
        classes = {f.relative_to(root).parts[0] for f in files}
        return files, not loose and len(classes) >= 2
    if labels_from_folders and loose:
        raise DataError(
            f"{loose[0]} is not inside a class sub-folder, but labels from folders need every "
            f"image in {root}/<class name>/ (e.g. {root}/cat/1.png, {root}/dog/2.png); move the "
            "loose images into class folders, or turn labels off (conditioning=none)"
        )
    return files, bool(labels_from_folders)


def _decode_all(
    files: list[Path], image_size: int, channels: int | None, workers: int | None
) -> list[tuple[np.ndarray, bool, bool] | str]:
    """`_decode` every file in threads, in order; an unreadable file gives its reason instead."""

    def work(path: Path):
        try:
            return _decode(path, image_size, channels)
        except _Unreadable as e:
            return str(e)

    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    with warnings.catch_warnings():  # refused in _decode with a clearer message
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(work, files))


def _keep_readable(
    root: Path, files: list[Path], results: list, on_error: str
) -> tuple[list[Path], list[np.ndarray], list[bool], int]:
    """(kept files, their pixels, is-grayscale flags, number upscaled) of the decoded files;
    unreadable ones are logged and skipped, or fatal."""
    kept, arrays, grays, bad = [], [], [], []
    upscaled = 0
    for path, res in zip(files, results):
        rel = path.relative_to(root).as_posix()
        if isinstance(res, str):
            if on_error == "fatal":
                raise DataError(
                    f"cannot read image {path}: {res}; fix or remove the file, or pass "
                    "on_error='skip' to skip unreadable files"
                )
            logger.warning("skipping %s: %s", path, res)
            bad.append(f"{rel} ({res})")
            continue
        arr, gray, up = res
        kept.append(path)
        arrays.append(arr)
        grays.append(gray)
        upscaled += up
    if bad:
        shown = ", ".join(bad[:10]) + (f", and {len(bad) - 10} more" if len(bad) > 10 else "")
        logger.warning("skipped %d of %d files: %s", len(bad), len(files), shown)
    if not arrays:
        raise DataError(
            f"none of the {len(files)} image files in {root} could be read (first: {bad[0]}); "
            "check the files"
        )
    return kept, arrays, grays, upscaled


def _folder_labels(root: Path, files: list[Path]) -> tuple[np.ndarray, list[str]]:
    """(labels (N,) int64, class names): class = first-level sub-folder, names sorted."""
    folders = [p.relative_to(root).parts[0] for p in files]
    class_names = sorted(set(folders))
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[f] for f in folders], dtype=np.int64), class_names


def load_folder(
    root: str | Path,
    *,
    image_size: int,
    channels: int | None = None,
    labels_from_folders: bool | Literal["auto"] = False,
    on_error: str = "skip",
    limit: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    skip_folder: Callable[[Path], bool] | None = None,
) -> FolderData:
    """Read every image under `root` into memory at image_size x image_size (see module doc).

    `channels=None` gives 1 channel if every image is grayscale, else 3. `limit` keeps a seeded
    random subset of that many files (chosen before decoding). `workers` threads decode in
    parallel (Pillow releases the GIL while decoding and resizing). `labels_from_folders`:
    True, False or "auto" (see the module doc); `skip_folder(path)` leaves sub-folders out.
    """
    root = Path(root)
    if on_error not in ("skip", "fatal"):
        raise DataError(f"on_error must be 'skip' or 'fatal', got {on_error!r}")
    files, folder_labels = _list_images(root, labels_from_folders, skip_folder)
    if limit is not None and limit < len(files):
        keep = np.sort(np.random.default_rng(seed).choice(len(files), size=limit, replace=False))
        files = [files[i] for i in keep]

    results = _decode_all(files, image_size, channels, workers)
    kept, arrays, grays, upscaled = _keep_readable(root, files, results, on_error)
    if upscaled:
        logger.warning(
            "upscaled %d of %d images smaller than %dx%d; they will look soft",
            upscaled, len(arrays), image_size, image_size,
        )  # fmt: skip
    if channels is None and not all(grays):
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    images = np.stack(arrays).transpose(0, 3, 1, 2).copy()  # (N, C, S, S)

    labels = class_names = None
    if folder_labels:
        labels, class_names = _folder_labels(root, kept)
    return FolderData(
        images=images,
        labels=labels,
        captions=_read_captions(root, kept, on_error),
        class_names=class_names,
        files=[p.relative_to(root).as_posix() for p in kept],
    )
