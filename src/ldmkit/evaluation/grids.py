"""Image grids: tile (N, C, H, W) images into one picture, optionally with captions and row labels.

Images are float in [-1, 1] or uint8 in [0, 255] (the ldmkit convention), C = 1 or 3. Text is
drawn with Pillow's default font; no torchvision.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ldmkit.data.transforms import pil_image, to_uint8

FONT_SIZE = 12
MIN_CAPTIONED_CELL = 96  # px: captioned cells are upscaled (nearest) to at least this width
# px: with row labels, cells are upscaled (nearest) to at least this height, so that the grid is
# looked at as it is (1 image pixel : 1 screen pixel) and its labels, drawn after the upscaling
# at FONT_SIZE, are never enlarged with the images (a label drawn on 16 px cells and shown
# enlarged comes out pixelated)
MIN_LABELLED_CELL = 64
MAX_CAPTION_LINES = 3


def as_uint8(images: Tensor | np.ndarray) -> Tensor:
    """(N, C, H, W) float in [-1, 1] or uint8 -> uint8 tensor (N, C, H, W) on the CPU."""
    x = torch.as_tensor(images).detach().cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ValueError(f"images must be float in [-1, 1] or uint8, got {x.dtype}")
        x = to_uint8(x)
    return x


def to_uint8_hwc(images: Tensor | np.ndarray) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] or uint8 -> uint8 numpy (N, H, W, C)."""
    return as_uint8(images).permute(0, 2, 3, 1).numpy()


def make_grid(
    images: Tensor | np.ndarray,
    nrow: int | None = None,
    padding: int = 2,
    pad_value: int = 0,
) -> np.ndarray:
    """Tile images into a grid with `nrow` images per row (default ceil(sqrt(N))).

    Image i sits in row i // nrow, column i % nrow, with its top-left pixel at
    (padding + row * (H + padding), padding + col * (W + padding)); unused cells keep pad_value.

    Returns:
        uint8 numpy array (rows * (H + padding) + padding, nrow * (W + padding) + padding, C).
    """
    cells = to_uint8_hwc(images)
    n, h, w, c = cells.shape
    if n == 0:
        raise ValueError("make_grid got no images")
    nrow = math.ceil(math.sqrt(n)) if nrow is None else nrow
    if nrow < 1 or padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError(
            f"need nrow >= 1, padding >= 0, pad_value in [0, 255]; got {nrow}, {padding}, {pad_value}"
        )
    nrow = min(nrow, n)
    rows = math.ceil(n / nrow)
    grid = np.full(
        (rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8
    )
    for i in range(n):
        y = padding + (i // nrow) * (h + padding)
        x = padding + (i % nrow) * (w + padding)
        grid[y : y + h, x : x + w] = cells[i]
    return grid


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _text_width(font, text: str) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else font.getbbox(text)[2]


def _wrap(text: str, font, width: int, max_lines: int = MAX_CAPTION_LINES) -> list[str]:
    """Greedy word wrap to `width` px; long words are cut, and overflow ends in an ellipsis."""
    lines: list[str] = []
    for word in text.split():
        if lines and _text_width(font, lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
            continue
        while _text_width(font, word) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and _text_width(font, word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and _text_width(font, last + "...") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def _image_format(path: Path) -> str:
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image suffix; use .png (or .jpg, .webp)")
    return fmt


def save_image(array: np.ndarray, path: str | os.PathLike) -> None:
    """Save a uint8 (H, W, C) array with Pillow, atomically (temp file + os.replace)."""
    from ldmkit.checkpoint import atomic_write

    path = Path(path)
    fmt = _image_format(path)
    img = pil_image(array)
    atomic_write(path, lambda tmp: img.save(tmp, format=fmt))


def save_grid(
    images: Tensor | np.ndarray,
    path: str | os.PathLike,
    nrow: int | None = None,
    captions: list[str] | None = None,
    row_labels: list[str] | None = None,
    padding: int = 2,
    scale: int | None = None,
    row_counts: list[int] | None = None,
) -> np.ndarray:
    """Save images as a grid PNG (or any Pillow format by suffix), atomically.

    Args:
        captions: one string per image, word-wrapped below its cell (up to 3 lines).
        row_labels: one string per grid row, drawn left of the row (e.g. class names).
        scale: integer nearest-neighbour upscaling of every cell; None means 1 without
            text, with captions the smallest factor giving cells >= 96 px wide so the text
            fits, and with row labels cells >= 64 px high. Text is drawn after the upscaling,
            at its size (FONT_SIZE px): the grid is meant to be shown 1:1.
        row_counts: images in each row, when the rows are uneven (one row per class of a count
            that is no multiple of the classes): a short row's end is left blank (the background).

    Returns:
        the saved uint8 (H', W', C) array. Without text it equals `make_grid(images, nrow,
        padding)` (black padding); with text the background is white and the text black.
    """
    cells = to_uint8_hwc(images)
    n, h, w, c = cells.shape
    if row_counts is not None:  # uneven rows: blank cells at the short rows' ends
        if captions is not None or nrow is None or sum(row_counts) != n or max(row_counts) > nrow:
            raise ValueError(
                f"row_counts {row_counts} must add up to the {n} images, each at most nrow "
                f"({nrow}), without captions"
            )
        blank = 255 if row_labels is not None else 0  # the background: white under text
        full = np.full((len(row_counts) * nrow, h, w, c), blank, np.uint8)
        start = 0
        for r, count in enumerate(row_counts):
            full[r * nrow : r * nrow + count] = cells[start : start + count]
            start += count
        cells, n = full, len(full)
    nrow = min(math.ceil(math.sqrt(n)) if nrow is None else nrow, n)
    rows = math.ceil(n / max(nrow, 1))
    if captions is not None and len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} images; pass one per image")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"got {len(row_labels)} row labels for {rows} grid rows; pass one per row")
    if scale is None:
        scale = math.ceil(MIN_CAPTIONED_CELL / w) if captions is not None else 1
        if row_labels is not None:
            scale = max(scale, math.ceil(MIN_LABELLED_CELL / h))
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if scale > 1:
        cells = cells.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale

    if captions is None and row_labels is None:
        grid = make_grid(cells.transpose(0, 3, 1, 2), nrow, padding)
        save_image(grid, path)
        return grid

    font = _font()
    line_h = FONT_SIZE + 3
    wrapped = [_wrap(t, font, w) for t in captions] if captions is not None else None
    cap_h = line_h * max((len(lines) for lines in wrapped), default=0) if wrapped else 0
    label_w = 0
    if row_labels is not None:
        label_w = int(max(_text_width(font, t) for t in row_labels)) + 2 * padding + 4
    cell_h = h + cap_h + (2 if cap_h else 0)
    width = label_w + nrow * (w + padding) + padding
    height = rows * (cell_h + padding) + padding
    mode = "L" if c == 1 else "RGB"
    canvas = Image.new(mode, (width, height), 255 if mode == "L" else (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    black = 0 if mode == "L" else (0, 0, 0)
    for i in range(n):
        y = padding + (i // nrow) * (cell_h + padding)
        x = label_w + padding + (i % nrow) * (w + padding)
        canvas.paste(pil_image(cells[i]), (x, y))
        if wrapped is not None:
            for j, line in enumerate(wrapped[i]):
                tx = x + (w - _text_width(font, line)) / 2
                draw.text((tx, y + h + 2 + j * line_h), line, fill=black, font=font)
    if row_labels is not None:
        for r, label in enumerate(row_labels):
            y = padding + r * (cell_h + padding) + (h - FONT_SIZE) / 2
            draw.text((padding, y), label, fill=black, font=font)
    grid = np.asarray(canvas)
    grid = grid[..., None] if grid.ndim == 2 else grid
    save_image(grid, path)
    return grid


__all__ = ["as_uint8", "make_grid", "save_grid", "save_image", "to_uint8_hwc"]
