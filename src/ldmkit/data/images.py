"""Single images in and out: reading an image or a mask a user gives (checked, one-line errors),
and PNGs that carry the parameters that made them in a text chunk.

    image, notes = read_image("in.png", channels=3)            # (1, C, H, W) in [-1, 1]
    write_png(image, "out.png", {"method": "inpaint", ...})
    read_png_params("out.png")                                  # -> the same dict
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ..checkpoint import atomic_write
from .masks import mask_from_array
from .transforms import pil_image, to_float, to_uint8

PNG_KEY = "ldmkit"  # the PNG text chunk holding the JSON parameters


class ImageFileError(ValueError):
    """An image or mask file that cannot be used, with what to do about it."""


class ImageTooLargeError(ImageFileError):
    """An image whose header claims more pixels than the limit (a decompression bomb)."""


def describe(source: str | os.PathLike | IO[bytes], what: str = "image") -> str:
    """How a message names an image: its path, or "the image" for bytes (an upload)."""
    return str(source) if isinstance(source, (str, os.PathLike)) else f"the {what}"


def too_large(name: str, pixels: str, limit: int) -> ImageTooLargeError:
    """The one message of an image over the pixel limit (`pixels`: "WxH = N pixels" or "N
    pixels")."""
    return ImageTooLargeError(
        f"{name} is {pixels}, over the limit of {limit} pixels (a decompression-bomb guard); "
        "use a smaller image"
    )


def open_image(
    source: str | os.PathLike | IO[bytes], what: str = "image", *, limit: int | None = None
) -> Image.Image:
    """An image file opened lazily (the header only: nothing is decoded yet), or a one-line
    ImageFileError: no such file, not an image, unreadable, or over `limit` pixels (default and
    at most Pillow's MAX_IMAGE_PIXELS; ImageTooLargeError). The one door every image a user
    gives comes in by (the CLI's files, the web page's uploads)."""
    name = describe(source, what)
    pillow = Image.MAX_IMAGE_PIXELS
    limit = pillow if limit is None else limit if pillow is None else min(limit, pillow)
    with warnings.catch_warnings():  # Pillow warns from its limit on: the check below refuses
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(source)
        except Image.DecompressionBombError as e:  # over twice Pillow's limit: no size given
            found = re.search(r"\((\d+) pixels\)", str(e))
            pixels = f"{found[1]} pixels" if found else f"over {2 * (pillow or 0)} pixels"
            raise too_large(name, pixels, limit or 0) from None
        except FileNotFoundError:
            raise ImageFileError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise ImageFileError(f"{name} is a folder; give an image file") from None
        except Image.UnidentifiedImageError:
            raise ImageFileError(f"{name}: not an image file (PNG, JPEG, ... expected)") from None
        except OSError as e:
            why = (e.strerror or str(e) or type(e).__name__).lower()
            raise ImageFileError(f"{name}: cannot read it ({why})") from None
        except (SyntaxError, ValueError, EOFError) as e:
            raise ImageFileError(
                f"{name}: unreadable image ({e or type(e).__name__}); give a PNG or JPEG"
            ) from None
    w, h = im.size
    if limit is not None and w * h > limit:
        im.close()
        raise too_large(name, f"{w}x{h} = {w * h} pixels", limit)
    return im


def image_size(source: str | os.PathLike | IO[bytes], what: str = "image",
               *, limit: int | None = None) -> tuple[int, int]:  # fmt: skip
    """(W, H) from an image file's header (nothing decoded), with `open_image`'s checks."""
    with open_image(source, what, limit=limit) as im:
        return im.size


def load_image(source: str | os.PathLike | IO[bytes], what: str = "image",
               *, limit: int | None = None) -> Image.Image:  # fmt: skip
    """An image file checked by `open_image`, then decoded (a truncated or damaged file is a
    one-line ImageFileError too)."""
    im = open_image(source, what, limit=limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e or type(e).__name__
        raise ImageFileError(
            f"{describe(source, what)}: the image data is damaged ({why}); save the image "
            "again or use another file"
        ) from None
    return im


def _resized(
    im: Image.Image, size: tuple[int, int] | None, resize: bool, what: str, resample: int
) -> Image.Image:
    if size is None or im.size == size:
        return im
    if not resize:
        raise ImageFileError(
            f"the {what} is {im.size[0]}x{im.size[1]} but {size[0]}x{size[1]} is needed; pass "
            "--resize to resize it, or crop it"
        )
    return im.resize(size, resample)


def read_image(
    source: str | os.PathLike | IO[bytes],
    *,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    resize: bool = False,
) -> tuple[torch.Tensor, list[str]]:
    """An image file -> ((1, C, H, W) float in [-1, 1], notes). Transparency is composited on
    white; `channels` (1 or 3) converts with a note; `size` (W, H) is checked, or resized
    (Lanczos) when `resize` is set."""
    notes: list[str] = []
    im = load_image(source, "image")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        notes.append("the image has transparency; it was put on a white background")
    gray = im.mode in ("L", "1", "I", "I;16", "F")
    want = channels or (1 if gray else 3)
    if channels is not None and (1 if gray else 3) != channels:
        notes.append(
            f"the image is {'greyscale' if gray else 'colour'}; it was converted to "
            f"{'greyscale' if channels == 1 else 'RGB'} for the model"
        )
    im = im.convert("L" if want == 1 else "RGB")
    if size is not None and im.size != size and resize:
        notes.append(f"the image was resized from {im.size[0]}x{im.size[1]} to {size[0]}x{size[1]}")
    im = _resized(im, size, resize, "image", Image.Resampling.LANCZOS)
    arr = np.asarray(im)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return to_float(torch.from_numpy(arr.copy()).permute(2, 0, 1))[None], notes


def read_mask(
    source: str | os.PathLike | IO[bytes],
    *,
    size: tuple[int, int] | None = None,
    resize: bool = False,
) -> tuple[torch.Tensor, list[str]]:
    """A mask file (white = regenerate) -> ((1, 1, H, W) in {0, 1}, notes); colour or grey
    masks are converted with a note; `size` (W, H) is checked or resized (nearest)."""
    im = load_image(source, "mask")
    if im.mode in ("RGBA", "LA"):
        im = im.convert(im.mode[:-1])
    if im.mode not in ("L", "RGB", "1"):
        im = im.convert("RGB")
    im = _resized(im, size, resize, "mask", Image.Resampling.NEAREST)
    return mask_from_array(np.asarray(im))


def png_info(params: dict[str, Any] | None) -> PngImagePlugin.PngInfo:
    """The PNG text chunk "ldmkit" (PNG_KEY) holding `params` as JSON (empty for None): the one
    place that writes a PNG's parameters."""
    info = PngImagePlugin.PngInfo()
    if params is not None:
        info.add_text(PNG_KEY, json.dumps(params, sort_keys=True))
    return info


def write_png(
    images: torch.Tensor,
    target: str | os.PathLike | IO[bytes],
    params: dict[str, Any] | None = None,
) -> None:
    """One image (1, C, H, W) or (C, H, W) in [-1, 1] -> PNG, with `params` as JSON in the text
    chunk "ldmkit" (written atomically when `target` is a path; a missing folder is created)."""
    x = images[0] if images.ndim == 4 else images
    if images.ndim == 4 and images.shape[0] != 1:
        raise ValueError(f"write_png writes one image, got a batch of {images.shape[0]}")
    arr = to_uint8(x).permute(1, 2, 0).cpu().numpy()
    im = pil_image(arr)
    info = png_info(params)
    if not isinstance(target, (str, os.PathLike)):
        im.save(target, format="PNG", pnginfo=info)
        return
    # atomically, creating a missing folder as every other output of ldmkit does
    atomic_write(Path(target), lambda tmp: im.save(tmp, format="PNG", pnginfo=info))


def read_png_params(source: str | os.PathLike | IO[bytes]) -> dict[str, Any]:
    """The parameters ldmkit wrote into a PNG, or a one-line error when it has none."""
    im = load_image(source, "image")
    name = describe(source, "image")
    text = getattr(im, "text", {}) or {}
    if PNG_KEY not in text:
        raise ImageFileError(
            f"{name}: this PNG carries no ldmkit parameters (only PNGs written by ldmkit's "
            "editing verbs do)"
        )
    try:
        params = json.loads(text[PNG_KEY])
    except json.JSONDecodeError as e:
        raise ImageFileError(f"{name}: its ldmkit parameters are not valid JSON ({e})") from e
    if not isinstance(params, dict):
        raise ImageFileError(f"{name}: its ldmkit parameters are not a JSON object")
    return params
