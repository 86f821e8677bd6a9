"""Animations in and out: clips (F, C, H, W) uint8 <-> animated GIF / WebP files, with Pillow.

`save_animation` writes one clip, looping, at `fps`, atomically; a GIF carries the sampling
parameters as JSON in its comment (as a PNG of ldmkit carries them in a text chunk), read back
by `read_animation_params`. `read_animation` reads any animation Pillow opens (GIF, animated
WebP, APNG) into a clip; one frame is refused, since a clip needs motion.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from ldmkit.checkpoint import atomic_write

from .errors import DataError

ANIMATION_EXTENSIONS = (".gif", ".webp", ".png", ".apng")
PARAMS_KEY = "ldmkit"  # the comment of a GIF is {"ldmkit": params}


def save_animation(
    path: str | Path, clip: np.ndarray, *, fps: float = 8.0, params: dict | None = None
) -> Path:
    """Write `clip` (F, C, H, W) uint8, C in {1, 3}, as a looping GIF (or WebP by suffix)."""
    path = Path(path)
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.dtype != np.uint8 or clip.shape[1] not in (1, 3):
        raise ValueError(f"a clip is uint8 (F, 1 or 3, H, W), got {clip.dtype} {clip.shape}")
    if clip.shape[0] < 2:
        raise ValueError(f"an animation needs at least 2 frames, got {clip.shape[0]}")
    if not 0 < fps <= 100:
        raise ValueError(f"fps must be in (0, 100], got {fps}")
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".webp"):
        raise ValueError(f"write animations as .gif or .webp, got {path.name}")
    mode = "L" if clip.shape[1] == 1 else "RGB"
    frames = [Image.fromarray(f[0] if mode == "L" else f.transpose(1, 2, 0), mode) for f in clip]
    duration = int(round(1000 / fps))

    def write(tmp: str) -> None:
        options: dict = {"save_all": True, "append_images": frames[1:], "duration": duration,
                         "loop": 0}  # fmt: skip
        if suffix == ".gif":
            # an adaptive palette per frame; no dithering, so flat colours stay flat
            if params is not None:
                options["comment"] = json.dumps({PARAMS_KEY: params}, sort_keys=True)
            first = [im.convert("P", palette=Image.Palette.ADAPTIVE, dither=Image.Dither.NONE)
                     for im in frames]  # fmt: skip
            options["append_images"] = first[1:]
            first[0].save(tmp, format="GIF", disposal=1, optimize=False, **options)
        else:
            frames[0].save(tmp, format="WEBP", lossless=True, **options)

    atomic_write(path, write)
    return path


def read_animation(path: str | Path) -> np.ndarray:
    """The frames of an animation file as a clip (F, 3, H, W) uint8 (RGB)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read animation {path}: {e}; give a GIF, WebP or APNG") from None
    if len(frames) < 2:
        raise DataError(
            f"{path} has {len(frames)} frame; an animation needs at least 2 (a still image "
            "belongs in an image data set)"
        )
    sizes = sorted({f.shape[:2] for f in frames})
    if len(sizes) > 1:
        (h0, w0), (h1, w1) = sizes[0], sizes[-1]
        raise DataError(
            f"{path} has frames of different sizes ({w0}x{h0} and {w1}x{h1}); a clip's frames "
            "must share one size: re-export it with one canvas size"
        )
    return np.stack(frames).transpose(0, 3, 1, 2).copy()


def read_animation_params(path: str | Path) -> dict | None:
    """The parameters `save_animation` wrote into a GIF's comment, or None."""
    with Image.open(path) as im:
        comment = im.info.get("comment")
    if not comment:
        return None
    try:
        data = json.loads(comment)
    except (ValueError, UnicodeDecodeError):
        return None
    return data.get(PARAMS_KEY) if isinstance(data, dict) else None


def tile(images: np.ndarray, nrow: int, padding: int = 2) -> np.ndarray:
    """uint8 images (N, C, H, W) tiled `nrow` a row with `padding` px of black -> (C, GH, GW)."""
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    out = np.zeros((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        out[:, top : top + h, left : left + w] = im
    return out


def clips_grid(clips: np.ndarray, nrow: int | None = None) -> np.ndarray:
    """Clips (B, F, C, H, W) -> one clip (F, C, GH, GW) whose every frame tiles the B clips'
    frames, `nrow` clips a row (default ceil(sqrt(B))): all clips in one animation."""
    clips = np.asarray(clips)
    nrow = nrow or max(1, int(np.ceil(np.sqrt(len(clips)))))
    return np.stack([tile(clips[:, f], nrow) for f in range(clips.shape[1])])


def frames_strip(clips: np.ndarray) -> np.ndarray:
    """Clips (B, F, C, H, W) -> one image (C, GH, GW): a row per clip, its frames left to right."""
    clips = np.asarray(clips)
    b, f = clips.shape[:2]
    return tile(clips.reshape(b * f, *clips.shape[2:]), f)
