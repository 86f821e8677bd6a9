"""The diffusion math of editing: image-to-image start levels, deterministic (DDIM) inversion,
spherical interpolation of noise, and inpainting by blending the known region into every step,
with RePaint's resampling (Lugmayr et al. 2022).

Plain functions of a denoiser `denoise(x, sigma) -> x0` and tensors, in the VE convention of
`samplers.py` (x = x0 + sigma * noise; sigmas descending and ending in 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .denoiser import Denoiser
from .samplers import Callback, check_sigmas, ddim_step

Noise = Callable[[], Tensor]  # a fresh unit-Gaussian draw shaped like the state


def strength_start(steps: int, strength: float) -> int:
    """Index into `get_sigmas(..., steps)` where image-to-image starts: round(steps * strength)
    steps remain (SDEdit, Meng et al. 2022). Strength 1 starts at the top (a fresh sample)."""
    if not 0 < strength <= 1:
        raise ValueError(
            f"strength must lie in (0, 1], got {strength}: 1 redraws the image, small values "
            "keep more of it"
        )
    remaining = round(steps * strength)
    if remaining < 1:
        raise ValueError(
            f"strength {strength} with {steps} steps leaves no step to run (round({steps} x "
            f"{strength}) = 0); raise the strength to at least {0.5 / steps:.3g} or the steps"
        )
    return steps - remaining


def slerp(a: Tensor, b: Tensor, w: float) -> Tensor:
    """Spherical interpolation between a and b (per sample, over all but the batch dimension).

    For two independent Gaussian noises it keeps the norm a noise of that size has, where the
    straight line (lerp) shrinks it to about 0.71 of it halfway and the sampler sees an
    unlikely, too-quiet start. Parallel inputs fall back to lerp.
    """
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-30)
    theta = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(theta)
    lerp = sin.abs() < 1e-6
    wa = torch.where(lerp, torch.full_like(theta, 1 - w), torch.sin((1 - w) * theta) / sin)
    wb = torch.where(lerp, torch.full_like(theta, w), torch.sin(w * theta) / sin)
    out = wa[:, None] * fa + wb[:, None] * fb
    return out.view_as(a).to(a.dtype)


@torch.no_grad()
def invert_ddim(
    denoise: Denoiser,
    x0: Tensor,
    sigmas: Tensor,
    *,
    refine: int = 0,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """DDIM (ODE) inversion: the VP x_T from which DDIM with eta = 0 on `sigmas` returns x0.

    The DDIM step from sigma_next down to sigma is x = x_next + (sigma - sigma_next) eps(x_next,
    sigma_next). Run upwards it needs eps at the unknown x_next; as in Mokady et al. 2023 the
    first guess evaluates the network on the current state seen at sigma_next (the VP state
    rescaled), and `refine` fixed-point iterations x_next <- x - (sigma - sigma_next)
    eps(x_next, sigma_next) make the step an exact inverse of the sampler's (each costs a call).
    Returns VP x_T: the state divided by sqrt(1 + sigmas[0]^2), or eps itself when sigmas[0] = inf.
    """
    check_sigmas(sigmas)
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    up = sigmas.flip(0).tolist()  # 0, sigma_1, ..., sigma_max
    x = x0
    for i in range(len(up) - 1):
        s, s_next = up[i], up[i + 1]
        if math.isinf(s_next):  # zero terminal SNR: x_T is the noise itself
            return (x - denoise(x, sigmas.new_tensor(s))) / s
        seen = x * math.sqrt((1 + s_next**2) / (1 + s**2))  # the VP state, at sigma_next
        eps = (seen - denoise(seen, sigmas.new_tensor(s_next))) / s_next
        x_next = x + (s_next - s) * eps
        for _ in range(refine):
            eps = (x_next - denoise(x_next, sigmas.new_tensor(s_next))) / s_next
            x_next = x + (s_next - s) * eps
        x = x_next
        if callback is not None:
            callback(i, x)
    return x / math.sqrt(1 + up[-1] ** 2)


def blend_known(
    known: Tensor,
    mask: Tensor,
    noise: Callable[[Tensor, Tensor], Tensor],
    callback: Callback | None,
) -> Callback:
    """A sampler callback for inpainting without retraining: after every step the region to keep
    (mask 0) is replaced by the known latent noised to the step's new level, known + sigma_next
    * z with fresh z, so at the last step (sigma 0) it is the known latent exactly. `mask` (B, 1,
    h, w) is 1 where the sampler regenerates."""

    def step(i: int, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
        s = float(sigma)
        kept = known if s == 0 else known + s * noise(sigma, sigma)
        x = mask * x + (1 - mask) * kept
        if callback is not None:
            out = callback(i, x, sigma, x0)
            x = x if out is None else out
        return x

    return step


def repaint_path(steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The order of noise levels RePaint visits, as indices into sigmas (0 = the noisiest,
    `steps` = clean): down one step at a time, and every `jump_length` steps back up
    `jump_length` steps, `jump_n_sample - 1` times, before going on (Lugmayr et al. 2022 Alg. 1
    with the jumps of their code). jump_n_sample = 1 is the plain path 0, 1, ..., steps."""
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(
            f"RePaint needs jump_length >= 1 and jump_n_sample >= 1, got {jump_length} and "
            f"{jump_n_sample}"
        )
    path, p = [0], 0
    jumps_left = {k: jump_n_sample - 1 for k in range(jump_length, steps, jump_length)}
    while p < steps:
        p += 1
        path.append(p)
        if jumps_left.get(p, 0) > 0:
            jumps_left[p] -= 1
            for _ in range(jump_length):
                p -= 1
                path.append(p)
    return path


@torch.no_grad()
def sample_repaint(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    known: Tensor,
    mask: Tensor,
    noise: Callable[[Tensor, Tensor], Tensor],
    jump_length: int = 10,
    jump_n_sample: int = 1,
    eta: float = 1.0,
    callback: Callback | None = None,
) -> Tensor:
    """RePaint: inpainting with the known region blended in after every denoising step, along
    `repaint_path`; a step back up re-noises the whole state, x + sqrt(sigma_up^2 - sigma^2) z,
    which lets the generated region harmonise with what is kept. Denoising steps are DDIM steps
    with `eta` (1 = DDPM's ancestral steps, as in the paper). `x` is the VE start at sigmas[0];
    `callback(i, x, sigma, x0)` runs after each downward step (i = the step's position on the
    path). Returns x0-space samples."""
    check_sigmas(sigmas)
    if math.isinf(float(sigmas[0])) and jump_n_sample > 1:
        raise ValueError(
            "RePaint cannot jump back to sigma = inf (zero terminal SNR); use jump_n_sample = 1"
        )
    s = sigmas.tolist()
    path = repaint_path(len(s) - 1, jump_length, jump_n_sample)
    blend = blend_known(known, mask, noise, callback)
    for i, (p, q) in enumerate(zip(path, path[1:], strict=False)):
        if q == p + 1:
            x0 = denoise(x, sigmas[p])
            x = ddim_step(x, x0, s[p], s[q], eta, lambda p=p, q=q: noise(sigmas[p], sigmas[q]))
            x = blend(i, x, sigmas[q], x0)
        else:
            x = x + math.sqrt(s[q] ** 2 - s[p] ** 2) * noise(sigmas[p], sigmas[q])
    return x
