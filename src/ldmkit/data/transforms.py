"""Pixel conversions and the cheap per-batch train-time augmentation (random crop, flip).

Stored images are uint8 (N, C, H, W) at the training resolution; models see float in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1] (a new tensor)."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255], rounded and clamped (a new tensor)."""
    return ((images.detach().to(torch.float32) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def crop_padding(image_size: int) -> int:
    """How far a random crop may shift the image: 1/16 of its side (2 px at 32), at least 1."""
    return max(1, image_size // 16)


def augment(
    batch: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    crop: str = "random",
    flip: bool = True,
) -> torch.Tensor:
    """Random-crop and/or horizontally flip each image of a batch (B, C, H, W); returns a new tensor.

    "random" crop = reflect-pad each side by `crop_padding(H)` pixels, then take a random H x W
    window (the classic CIFAR augmentation); it keeps the stored images at the training size.
    Works for any dtype and device; the random numbers come from `generator` on the CPU.
    """
    if crop not in ("center", "random"):
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    b, _, h, w = batch.shape
    rows = torch.arange(h).expand(b, h)  # (B, H)
    cols = torch.arange(w).expand(b, w)  # (B, W)
    if crop == "random":
        pad = crop_padding(min(h, w))
        dy = torch.randint(-pad, pad + 1, (b, 1), generator=generator)
        dx = torch.randint(-pad, pad + 1, (b, 1), generator=generator)
        rows = _reflect(rows + dy, h)
        cols = _reflect(cols + dx, w)
    if flip:
        flipped = torch.rand(b, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(-1), cols)
    if crop == "center" and not flip:
        return batch.clone()
    rows, cols = rows.to(batch.device), cols.to(batch.device)
    bi = torch.arange(b, device=batch.device)[:, None, None, None]
    ci = torch.arange(batch.shape[1], device=batch.device)[None, :, None, None]
    return batch[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect out-of-range indices back into [0, n) without repeating the edge (like np 'reflect')."""
    idx = idx.abs()
    return torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` and center-crop to size x size, in one Pillow call.

    LANCZOS when shrinking (sharp, little aliasing), BICUBIC when enlarging.
    """
    w, h = image.size
    if (w, h) == (size, size):
        return image
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    resample = Image.Resampling.LANCZOS if side > size else Image.Resampling.BICUBIC
    return image.resize((size, size), resample, box=(left, top, left + side, top + side))


def pil_image(hwc: np.ndarray) -> Image.Image:
    """A uint8 (H, W, C) array, C in {1, 3}, as a PIL image: mode "L" for one channel, else RGB."""
    return Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)


def resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 images (N, C, H, W) to (N, C, size, size) with `resize_square`, per image."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    out = np.empty((n, c, size, size), dtype=np.uint8)
    for i in range(n):
        arr = np.asarray(resize_square(pil_image(images[i].transpose(1, 2, 0)), size))
        out[i] = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    return out


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (N, C, H, W) with C in {1, 3} -> `channels` channels.

    Gray -> RGB repeats the channel; RGB -> gray uses ITU-R 601-2 luma, as Pillow's convert("L").
    """
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return np.repeat(images, 3, axis=1)
    if c == 3 and channels == 1:
        weights = np.array([299, 587, 114], dtype=np.uint32)[None, :, None, None]
        luma = (images.astype(np.uint32) * weights).sum(axis=1, keepdims=True)
        return ((luma + 500) // 1000).astype(np.uint8)
    raise ValueError(f"cannot convert {c} channels to {channels}; use 1 or 3")
