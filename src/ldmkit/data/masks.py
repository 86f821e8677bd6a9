"""Inpainting masks: checked user masks, masks at latent resolution, feathered paste-back edges,
automatically detected holes, and the random masks an inpainting model trains on.

A mask is a float tensor (B, 1, H, W) with 1 = regenerate (white in a mask PNG) and 0 = keep.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def mask_from_array(array: np.ndarray) -> tuple[Tensor, list[str]]:
    """A mask image (H, W) or (H, W, C) uint8/bool -> ((1, 1, H, W) float in {0, 1}, notes).

    Colour masks are read through their luminance (an alpha channel is ignored), and values other
    than black and white are cut at mid-grey; each conversion is stated in the notes.
    """
    notes: list[str] = []
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 3:
        if a.shape[2] in (2, 4):  # grey + alpha or RGBA: drop the alpha
            a = a[..., :-1]
        if a.shape[2] == 3:
            notes.append("the mask has colour channels; it was read as grey (luminance)")
            a = a.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        else:
            a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"a mask must be a 2-D image, got an array of shape {a.shape}")
    a = a.astype(np.float64)
    binary = a >= 128
    if not np.isin(a, (0, 255)).all():
        notes.append("the mask has grey values; those at or above mid-grey count as white")
    return torch.from_numpy(binary).float()[None, None], notes


def to_latent(mask: Tensor, factor: int, dilate: int = 0) -> Tensor:
    """A pixel mask (B, 1, H, W) -> latent mask (B, 1, H / factor, W / factor) in {0, 1}.

    Max pooling: a latent cell is regenerated when any of its pixels is, so a 1-pixel stroke
    survives the downsampling (area averaging would dilute it below any threshold). `dilate`
    widens the latent mask by that many cells on every side.
    """
    if mask.shape[-1] % factor or mask.shape[-2] % factor:
        raise ValueError(
            f"the mask's size {tuple(mask.shape[-2:])} is not a multiple of the autoencoder's "
            f"downsampling factor {factor}"
        )
    m = F.max_pool2d(mask.float(), factor) if factor > 1 else mask.float()
    return grow(m, dilate)


def grow(mask: Tensor, cells: int) -> Tensor:
    """Dilate a {0, 1} mask by `cells` in every direction (a square structuring element)."""
    if cells <= 0:
        return mask
    return F.max_pool2d(mask, 2 * cells + 1, stride=1, padding=cells)


def feather(mask: Tensor, radius: int) -> Tensor:
    """A soft paste-back weight: 1 on the mask, falling linearly to 0 over `radius` pixels
    outside it (steps of 1 / (radius + 1) per pixel of chessboard distance), exactly 0 beyond.

    The known region further than `radius` pixels from the mask is therefore kept bit for bit.
    """
    if radius <= 0:
        return mask.float()
    out = mask.float()
    for k in range(1, radius + 1):
        ring = grow(mask.float(), k)
        out = torch.maximum(out, ring * (1 - k / (radius + 1)))
    return out


def detect_holes(image: Tensor, colour: Tensor, tolerance: float = 1 / 255) -> Tensor:
    """Pixels of `image` (B, C, H, W) in [-1, 1] that equal `colour` (C,) in every channel to
    within `tolerance` (in [-1, 1] units): the mask (B, 1, H, W) of a hole painted in one colour."""
    diff = (image - colour.view(1, -1, 1, 1).to(image)).abs().amax(dim=1, keepdim=True)
    return (diff <= tolerance * 2).float()


# ---------------------------------------------------------------------------- training masks
MASK_KINDS = ("box", "strokes", "border", "full")


def random_masks(
    b: int, size: int, generators: list[torch.Generator], *, full_share: float = 0.1
) -> Tensor:
    """b random masks (b, 1, size, size) for training an inpainting model, one per generator:
    a box, brush strokes or an outpainting border (a third each), and with probability
    `full_share` everything (so the model also learns to sample from nothing)."""
    if len(generators) != b:
        raise ValueError(f"need one generator per mask, got {len(generators)} for {b}")
    out = torch.zeros(b, 1, size, size)
    for i, g in enumerate(generators):
        u = torch.rand(2, generator=g).tolist()
        if u[0] < full_share:
            out[i] = 1
            continue
        out[i, 0] = make_mask(MASK_KINDS[min(int(u[1] * 3), 2)], size, g)
    return out


def make_mask(kind: str, size: int, generator: torch.Generator) -> Tensor:
    """One random (size, size) mask of a kind: "box" (20-60 % of each side), "strokes" (1-3
    brush strokes), "border" (one side or all four, 1/8 to 1/2 deep), "full", or "centre" (the
    middle half of each side)."""
    if kind == "full":
        return torch.ones(size, size)
    if kind == "centre":
        m = torch.zeros(size, size)
        m[size // 4 : size - size // 4, size // 4 : size - size // 4] = 1
        return m
    makers = {"box": _box, "strokes": _strokes, "border": _border}
    if kind not in makers:
        raise ValueError(
            f"unknown mask kind {kind!r}; choose one of box, strokes, border, full, centre"
        )
    return makers[kind](size, generator)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=g))


def _box(size: int, g: torch.Generator) -> Tensor:
    h, w = (max(1, round(size * _uniform(g, 0.2, 0.6))) for _ in range(2))
    top = int(torch.randint(0, size - h + 1, (1,), generator=g))
    left = int(torch.randint(0, size - w + 1, (1,), generator=g))
    m = torch.zeros(size, size)
    m[top : top + h, left : left + w] = 1
    return m


def _strokes(size: int, g: torch.Generator) -> Tensor:
    """1-3 brush strokes: random walks of discs of radius 1 .. size / 10."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    m = torch.zeros(size, size)
    for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
        y, x = _uniform(g, 0, size), _uniform(g, 0, size)
        radius = _uniform(g, 1, max(1.5, size / 10))
        angle = _uniform(g, 0, 2 * math.pi)
        for _ in range(int(torch.randint(3, 9, (1,), generator=g))):
            m = torch.maximum(m, (((yy - y) ** 2 + (xx - x) ** 2) <= radius**2).float())
            angle += _uniform(g, -1.0, 1.0)
            step = _uniform(g, size / 16, size / 6)
            y = min(max(y + step * math.sin(angle), 0.0), size - 1.0)
            x = min(max(x + step * math.cos(angle), 0.0), size - 1.0)
    return m


def _border(size: int, g: torch.Generator) -> Tensor:
    """Outpainting: one side (or all four) regenerated over 1/8 .. 1/2 of the image."""
    m = torch.zeros(size, size)
    k = max(1, round(size * _uniform(g, 0.125, 0.5)))
    side = int(torch.randint(0, 5, (1,), generator=g))
    if side in (0, 4):
        m[:k] = 1
    if side in (1, 4):
        m[-k:] = 1
    if side in (2, 4):
        m[:, :k] = 1
    if side in (3, 4):
        m[:, -k:] = 1
    return m
