"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around any denoiser.

Notation: D(x, sigma, c) -> x0 is the denoiser (denoiser.py), c the condition, null the
unconditional input (a learned null label or context), w the guidance scale:

    x0_cfg = x0_uncond + w * (x0_cond - x0_uncond)

For a fixed state x and noise level sigma, x0, eps and v are affine in one another, so guiding
x0 equals guiding eps or v. w = 1 is the conditional denoiser and w = 0 the unconditional one.
Guidance rescale (Lin et al. 2024, Sec. 3.4, eq. 15-16) pulls the per-sample standard deviation
of the guided prediction back toward that of the conditional one; ldmkit applies it to x0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ldmkit.diffusion.denoiser import Denoiser


def classifier_free_guidance(
    denoise: Denoiser,
    scale: float,
    *,
    cond: dict[str, Tensor],
    uncond: dict[str, Tensor],
    rescale: float = 0.0,
) -> Denoiser:
    """Guided denoiser `(x, sigma) -> x0`, evaluating cond and uncond in one batched call.

    Args:
        denoise: `denoise(x, sigma, **kwargs) -> x0`.
        scale: guidance scale w (1 = conditional, 0 = unconditional, > 1 = stronger).
        cond, uncond: keyword arguments for the conditional and unconditional halves, with the
            same keys, each value batched along dim 0 like x (e.g. class_labels (B,), context
            (B, L, D)). They are concatenated as [cond, uncond] for one call on 2B samples.
        rescale: guidance rescale factor phi in [0, 1] (Lin et al. 2024 eq. 16); 0 disables it.
    """
    if set(cond) != set(uncond):
        raise ValueError(
            f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}"
        )
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale must lie in [0, 1], got {rescale}")
    kwargs = {k: torch.cat([cond[k], uncond[k]]) for k in cond}

    def guided(x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        out = denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), **kwargs)  # (2B, ...)
        x0_cond, x0_uncond = out.chunk(2)
        x0 = x0_uncond + scale * (x0_cond - x0_uncond)
        if rescale > 0:
            dims = tuple(range(1, x.ndim))
            factor = x0_cond.std(dim=dims, keepdim=True) / x0.std(dim=dims, keepdim=True)
            x0 = x0 * (rescale * factor + (1 - rescale))  # Lin et al. 2024 eq. 15-16
        return x0

    return guided
