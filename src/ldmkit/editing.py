"""Editing and restoration with a trained `LatentDiffusion`: inpainting (blended, RePaint),
image-to-image, inversion, interpolation and denoising.

    from ldmkit import LatentDiffusion, editing
    ldm = LatentDiffusion.from_run("runs/shapes")
    out = editing.inpaint(ldm, images, masks, steps=20, seed=0)     # masks: 1 = regenerate
    out.images, out.notes, out.network_calls, out.params

Edits run in float32 (not the sampling fast path's bf16), so that a batch of edits is exactly the
same edits one by one. Images are (B, C, H, W) float tensors in [-1, 1] at the model's size (`ldm.image_shape`; a
channel count that differs is converted, with a note); masks (B or 1, 1, H, W) in {0, 1}. Image
i of a batch draws all its noise from one generator seeded `seed + i`, so a batch of edits
equals the same edits one by one. Every function returns an `EditResult` whose `params` hold
what reproduces it (the front adds the run, its weights and the input files); the sampling ones
take the samplers' `callback(i, x, sigma, x0)` for progress. Edits run in float32, not under the
sampling fast path's bf16 (whose use depends on the batch size), so that this stays exact.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import masks as masklib
from .diffusion.edit_math import (
    blend_known,
    invert_ddim,
    sample_repaint,
    slerp,
    strength_start,
)
from .diffusion.samplers import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    SAMPLERS,
    Callback,
    check_sampler,
    run_sampler,
)
from .pipeline import LatentDiffusion

log = logging.getLogger(__name__)

# Samplers whose steps RePaint can replace by its own (single-step, no history to keep).
REPAINT_SAMPLERS = ("ddpm", "ddim")
# Deterministic samplers, whose runs an inversion can retrace.
ODE_SAMPLERS = ("ddim", "euler", "heun", "dpm++2m")


@dataclass
class EditResult:
    """Edited images (B, C, H, W) in [-1, 1] on the CPU, the parameters that reproduce them,
    notes for the user (conversions, shortcuts taken), and the UNet calls made per batch."""

    images: Tensor
    params: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    network_calls: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. inversion's noise and errors


class _Counted:
    """The UNet, counting its calls (a guided step's batched [cond, uncond] call counts once)."""

    def __init__(self, network: Callable[..., Tensor]) -> None:
        self.network, self.calls = network, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        return self.network(*args, **kwargs)


class _ImageNoise:
    """Unit Gaussian noise for a batch, image i drawn from its own generator seeded seed + i."""

    def __init__(self, seed: int, b: int, shape: Sequence[int], device: torch.device) -> None:
        self.gens = [torch.Generator().manual_seed(seed + i) for i in range(b)]
        self.shape, self.device = tuple(shape), device

    def __call__(self, *_: Any) -> Tensor:
        draws = [torch.randn((1, *self.shape), generator=g) for g in self.gens]
        return torch.cat(draws).to(self.device)


def _sampler_noise(sampler: str, noise: _ImageNoise) -> dict[str, Any]:
    """The per-image noise for samplers that draw any (deterministic ones take none)."""
    takes = "noise_sampler" in inspect.signature(SAMPLERS[sampler]).parameters
    return {"noise_sampler": noise} if takes else {}


# ---------------------------------------------------------------------------------- inputs
def check_images(
    ldm: LatentDiffusion, images: Tensor, name: str = "image"
) -> tuple[Tensor, list[str]]:
    """Images as the model takes them: (B, C, H, W) in [-1, 1] at its size, with the channel
    count converted (grey <-> RGB, stated in a note). A different size is an error naming both."""
    notes: list[str] = []
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"the {name} must be (B, C, H, W), got shape {tuple(images.shape)}")
    c, h, w = ldm.image_shape
    if images.shape[-2:] != (h, w):
        raise ValueError(
            f"the {name} is {images.shape[-1]}x{images.shape[-2]} but the model makes {w}x{h} "
            "images; resize it (--resize) or crop it"
        )
    if images.shape[1] != c:
        if images.shape[1] == 3 and c == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images * weights).sum(1, keepdim=True)
            notes.append(f"the {name} is RGB and the model greyscale; it was converted to grey")
        elif images.shape[1] == 1 and c == 3:
            images = images.expand(-1, 3, -1, -1)
            notes.append(f"the {name} is greyscale and the model RGB; it was converted to RGB")
        else:
            raise ValueError(
                f"the {name} has {images.shape[1]} channels; the model takes {c} (1 or 3 work)"
            )
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"the {name} holds NaN or inf values")
    return images.float().clamp(-1, 1).contiguous(), notes


def check_masks(ldm: LatentDiffusion, masks: Tensor, b: int) -> Tensor:
    """Masks (b, 1, H, W) in {0, 1} at the model's image size (one mask serves every image)."""
    if masks.ndim == 2:
        masks = masks[None, None]
    elif masks.ndim == 3:
        masks = masks[:, None]
    _, h, w = ldm.image_shape
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"a mask must be (B, 1, H, W), got shape {tuple(masks.shape)}")
    if masks.shape[-2:] != (h, w):
        raise ValueError(
            f"the mask is {masks.shape[-1]}x{masks.shape[-2]} but the image is {w}x{h}; they "
            "must be the same size (or pass --resize)"
        )
    if masks.shape[0] not in (1, b):
        raise ValueError(f"need 1 or {b} masks for {b} images, got {masks.shape[0]}")
    if not bool(((masks == 0) | (masks == 1)).all()):
        raise ValueError("a mask must hold only 0 (keep) and 1 (regenerate)")
    return masks.float().expand(b, -1, -1, -1)


def _conditioned(
    ldm: LatentDiffusion, b: int, kw: dict[str, Any], network: Callable[..., Tensor]
) -> Callable[..., Tensor]:
    """The denoiser of b images with the user's condition (class_labels, prompt,
    negative_prompt, guidance_scale, guidance_rescale)."""
    rescale = kw.pop("guidance_rescale", 0.0)
    conditions = ldm.conditions(
        b, kw.pop("class_labels", None), kw.pop("prompt", None), kw.pop("negative_prompt", None),
        kw.pop("guidance_scale", None),
    )  # fmt: skip
    if kw:
        raise TypeError(f"unexpected argument(s): {', '.join(sorted(kw))}")
    return ldm.denoiser(conditions, guidance_rescale=rescale, network=network)


def _condition_params(kw: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in ("class_labels", "prompt", "negative_prompt", "guidance_scale", "guidance_rescale"):
        value = kw.get(key)
        if value is not None:
            out[key] = value.tolist() if isinstance(value, Tensor) else value
    return out


def _start_state(noise: Tensor, known: Tensor | None, sigma0: float) -> Tensor:
    """VP x_T: the noise, or the known latent noised to sigma0 with that same noise."""
    if known is None or math.isinf(sigma0):
        return noise
    return (known + sigma0 * noise) / math.sqrt(1 + sigma0**2)


# ---------------------------------------------------------------------------------- inpainting
def inpaint(
    ldm: LatentDiffusion,
    images: Tensor,
    masks: Tensor,
    *,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    mask_blur: int = 0,
    mask_dilate: int = 0,
    repaint_jump: int = 10,
    repaint_resample: int = 1,
    blend: bool | None = None,
    callback: Callback | None = None,
    **condition: Any,
) -> EditResult:
    """Regenerate the masked pixels (mask 1) of `images` with any trained model.

    After every sampler step the kept region (mask 0) of the latent is replaced by the input's
    latent noised to the step's new level (blended inpainting), so the last step ends on the
    input's latent there. The mask reaches latent resolution by max pooling (a 1-pixel stroke
    still marks its cell) and `mask_dilate` more cells. The decoded result is pasted into the
    input in pixel space, with a linear edge of `mask_blur` pixels outside the mask: every pixel
    further than that from the mask is the input's, bit for bit (the autoencoder is lossy, so
    without it the kept region would drift). `repaint_resample` > 1 turns on RePaint's
    resampling (jumps of `repaint_jump` steps, that many times; samplers ddpm and ddim).
    A model trained with task=inpaint is given the mask and the known latent as inputs; it
    does not blend unless `blend` is set (None: blend with any other model).
    Condition (class_labels, prompt, negative_prompt, guidance_scale) as in `sample`.
    """
    check_sampler(sampler)
    images, notes = check_images(ldm, images)
    b = images.shape[0]
    masks = check_masks(ldm, masks, b)
    assert mask_blur >= 0 and mask_dilate >= 0, (mask_blur, mask_dilate)  # ldmkit.options
    if repaint_resample > 1 and sampler not in REPAINT_SAMPLERS:
        raise ValueError(
            f"RePaint resampling runs its own steps, which sampler {sampler} cannot take part "
            f"in (it keeps a history); use --sampler {' or '.join(REPAINT_SAMPLERS)}"
        )
    blend = not ldm.is_inpainting_model if blend is None else blend
    params = {
        "method": "inpaint", "sampler": sampler, "steps": steps, "seed": seed,
        "mask_blur": mask_blur, "mask_dilate": mask_dilate, "repaint_jump": repaint_jump,
        "repaint_resample": repaint_resample, "blend": blend, **_condition_params(condition),
    }  # fmt: skip
    if not bool(masks.any()):
        notes.append(
            "the mask is all black (nothing to regenerate): the input is returned as it is"
        )
        return EditResult(images.clone(), params, notes, 0)
    if bool(masks.all()):
        notes.append("the mask is all white: the result is a fresh sample (nothing is kept)")
    known = ldm.encode(images)
    lat_mask = masklib.to_latent(masks, ldm.downsampling, mask_dilate).to(ldm.device)
    network = _Counted(ldm.network(lat_mask, known))
    denoise = _conditioned(ldm, b, dict(condition), network)
    sigmas = ldm.sigmas(sampler, steps)
    noise = _ImageNoise(seed, b, ldm.latent_shape, ldm.device)
    z_T = noise()
    x_T = z_T
    if blend:
        x_T = lat_mask * z_T + (1 - lat_mask) * _start_state(z_T, known, float(sigmas[0]))
    if repaint_resample > 1:
        scale = 1.0 if torch.isinf(sigmas[0]) else math.sqrt(1 + float(sigmas[0]) ** 2)
        z = sample_repaint(
            denoise, x_T * scale, sigmas, known=known, mask=lat_mask, noise=noise,
            jump_length=repaint_jump, jump_n_sample=repaint_resample,
            eta=1.0 if sampler == "ddpm" else 0.0, callback=callback,
        )  # fmt: skip
    else:
        z = run_sampler(
            denoise, x_T, sigmas, sampler=sampler,
            callback=blend_known(known, lat_mask, noise, callback) if blend else callback,
            **_sampler_noise(sampler, noise),
        )  # fmt: skip
    decoded = ldm.decode(z, fast=False).float().cpu()
    weight = masklib.feather(masks, mask_blur)
    out = images * (1 - weight) + decoded * weight
    return EditResult(out, params, notes, network.calls)


# ---------------------------------------------------------------------------------- img2img
def img2img(
    ldm: LatentDiffusion,
    images: Tensor,
    *,
    strength: float = 0.6,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    callback: Callback | None = None,
    **condition: Any,
) -> EditResult:
    """SDEdit (Meng et al. 2022): noise the images' latents to the level of the last
    round(steps * strength) of `steps` sampler steps and denoise from there. Strength 1 is a
    fresh sample, independent of the input; a strength that leaves no step is an error. The
    UNet calls made are in `network_calls` (one per step for single-call samplers)."""
    check_sampler(sampler)
    images, notes = check_images(ldm, images)
    b = images.shape[0]
    start = strength_start(steps, strength)
    params = {
        "method": "img2img", "strength": strength, "sampler": sampler, "steps": steps,
        "seed": seed, **_condition_params(condition),
    }  # fmt: skip
    network = _Counted(ldm.network())
    denoise = _conditioned(ldm, b, dict(condition), network)
    sigmas = ldm.sigmas(sampler, steps)[start:]
    noise = _ImageNoise(seed, b, ldm.latent_shape, ldm.device)
    known = None if start == 0 else ldm.encode(images)
    x_T = _start_state(noise(), known, float(sigmas[0]))
    z = run_sampler(
        denoise, x_T, sigmas, sampler=sampler, callback=callback, **_sampler_noise(sampler, noise)
    )
    notes.append(f"{steps - start} of {steps} steps ran ({network.calls} UNet calls)")
    return EditResult(ldm.decode(z, fast=False).float().cpu(), params, notes, network.calls)


# ---------------------------------------------------------------------------------- inversion
def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio (dB) per image of two batches in [-1, 1] (peak-to-peak 2)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp_min(1e-20))


def invert(
    ldm: LatentDiffusion,
    images: Tensor,
    *,
    steps: int = 50,
    refine: int = 0,
    **condition: Any,
) -> EditResult:
    """DDIM inversion: the noise x_T (in `extra["noise"]`, VP, unit variance) from which DDIM
    (eta 0) on `steps` steps returns the images' latents, and that reconstruction (`images`).

    `extra` also holds the PSNR of the reconstruction against the input and of the
    autoencoder alone (its ceiling), per image. Exact only without guidance: with a scale above
    1 the result says so in its notes. `refine` fixed-point iterations per step make each step
    an exact inverse of the sampler's step (one more UNet call each).
    """
    images, notes = check_images(ldm, images)
    params = {"method": "invert", "steps": steps, "refine": refine, **_condition_params(condition)}
    network = _Counted(ldm.network())
    x_T, known, denoise, sigmas = _ddim_noise(ldm, images, steps, refine, condition, network, notes)
    z = run_sampler(denoise, x_T, sigmas, sampler="ddim")
    recon = ldm.decode(z, fast=False).float().cpu()
    ceiling = ldm.decode(known, fast=False).float().cpu()
    extra = {
        "noise": x_T.float().cpu(),
        "psnr": psnr(recon, images).tolist(),
        "autoencoder_psnr": psnr(ceiling, images).tolist(),
        "latent_rmse": (z - known).pow(2).flatten(1).mean(1).sqrt().tolist(),
    }
    return EditResult(recon, params, notes, network.calls, extra)


def _ddim_noise(
    ldm: LatentDiffusion, images: Tensor, steps: int, refine: int, condition: dict[str, Any],
    network: _Counted, notes: list[str],
) -> tuple[Tensor, Tensor, Callable[..., Tensor], Tensor]:  # fmt: skip
    """The DDIM inversion of checked `images`: (x_T, their latents, the denoiser, sigmas)."""
    guidance = condition.get("guidance_scale")
    if guidance is not None and guidance > 1:
        notes.append(
            f"inversion is exact only without guidance; at guidance {guidance} the noise found "
            "does not reproduce the image (use --guidance 1)"
        )
        log.warning(notes[-1])
    denoise = _conditioned(ldm, images.shape[0], dict(condition), network)
    sigmas = ldm.sigmas("ddim", steps)
    known = ldm.encode(images)
    return invert_ddim(denoise, known, sigmas, refine=refine), known, denoise, sigmas


# ---------------------------------------------------------------------------------- interpolation
def interpolate(
    ldm: LatentDiffusion,
    *,
    seeds: tuple[int, int] | None = None,
    images: Tensor | None = None,
    frames: int = 8,
    sampler: str = "ddim",
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    callback: Callback | None = None,
    **condition: Any,
) -> EditResult:
    """`frames` images along a path between two endpoints (both included):
    - `seeds=(a, b)`: the starting noises of seeds a and b, joined by `slerp`;
    - `images` (2, C, H, W): both inverted (DDIM, no guidance) and their noises joined by slerp;
    - two conditions (`class_labels=(i, j)` or `prompt=(p, q)`) with one `seed`: the denoiser
      of each frame mixes the two conditions' predictions, (1 - w) D_p + w D_q.
    Sampled with an ODE sampler by default, so neighbouring frames differ smoothly."""
    check_sampler(sampler)
    assert frames >= 2, frames  # the two ends (ldmkit.options checks a user's)
    weights = [k / (frames - 1) for k in range(frames)]
    pair = [k for k in ("class_labels", "prompt") if _is_pair(condition.get(k))]
    given = [seeds is not None, images is not None, bool(pair)]
    if sum(given) != 1:
        raise ValueError(
            "interpolate between exactly one kind of endpoint: two seeds, two images, or two "
            "conditions (two class labels or two prompts)"
        )
    params: dict[str, Any] = {
        "method": "interpolate", "frames": frames, "sampler": sampler, "steps": steps,
        "seed": seed, **_condition_params(condition),
    }  # fmt: skip
    notes: list[str] = []
    network = _Counted(ldm.network())
    sigmas = ldm.sigmas(sampler, steps)
    shape = ldm.latent_shape
    if pair:
        key = pair[0]
        ends = list(condition.pop(key))
        d_a = _conditioned(ldm, frames, {**condition, key: [ends[0]] * frames}, network)
        d_b = _conditioned(ldm, frames, {**condition, key: [ends[1]] * frames}, network)
        w = torch.tensor(weights, device=ldm.device).view(-1, 1, 1, 1)

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            return (1 - w) * d_a(x, sigma) + w * d_b(x, sigma)

        x_T = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
        x_T = x_T.expand(frames, -1, -1, -1).to(ldm.device)
    else:
        if seeds is not None:
            params["seeds"] = list(seeds)
            ends_T = [
                torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds
            ]
            ends_T = [e.to(ldm.device) for e in ends_T]
        else:
            assert images is not None
            if images.shape[0] != 2:
                raise ValueError(f"interpolating images needs 2 of them, got {images.shape[0]}")
            images, notes = check_images(ldm, images)
            # the noises only (no reconstruction): the network calls count into `network`
            x_ends = _ddim_noise(ldm, images, steps, 0, {}, network, notes)[0]
            ends_T = list(x_ends.split(1))
        x_T = torch.cat([slerp(ends_T[0], ends_T[1], w) for w in weights])
        denoise = _conditioned(ldm, frames, dict(condition), network)
    noise = _ImageNoise(seed, 1, shape, ldm.device)  # every frame sees the same noise
    same = _SameNoise(noise, frames)
    z = run_sampler(
        denoise, x_T, sigmas, sampler=sampler, callback=callback, **_sampler_noise(sampler, same)
    )
    return EditResult(ldm.decode(z, fast=False).float().cpu(), params, notes, network.calls)


def _is_pair(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple, Tensor)) and len(value) == 2 and not isinstance(value, str)
    )


class _SameNoise:
    """One image's noise, repeated for every frame of an interpolation."""

    def __init__(self, noise: _ImageNoise, frames: int) -> None:
        self.noise, self.frames = noise, frames

    def __call__(self, *_: Any) -> Tensor:
        return self.noise().expand(self.frames, -1, -1, -1).contiguous()


# ---------------------------------------------------------------------------------- restoration
def estimate_noise_std(images: Tensor) -> Tensor:
    """Standard deviation of additive Gaussian noise in images (B, C, H, W) (same units),
    per image, by Immerkaer's method (1996): the mean absolute response to a Laplacian
    difference mask that cancels smooth image content, times sqrt(pi / 2) / 6."""
    kernel = torch.tensor([[1.0, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=torch.float64)
    x = images.double()
    c = x.shape[1]
    response = F.conv2d(x, kernel.expand(c, 1, 3, 3).contiguous(), groups=c)
    return math.sqrt(math.pi / 2) / 6 * response.abs().flatten(1).mean(1)


def denoise(
    ldm: LatentDiffusion,
    images: Tensor,
    *,
    noise_std: float | None = None,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    callback: Callback | None = None,
    **condition: Any,
) -> EditResult:
    """Remove additive Gaussian noise: start the reverse process at the noise level that matches
    the input's and denoise from there.

    `noise_std` is the pixel noise's standard deviation on the [0, 1] scale (estimated from the
    image when None, `estimate_noise_std`). Pixel noise reaches the latent through the encoder,
    so its latent level is measured: the RMS change of the latent when that much noise is added
    once more. The sampler starts at the first of its levels at or above it, topping the noise
    up to that level."""
    check_sampler(sampler)
    images, notes = check_images(ldm, images)
    b = images.shape[0]
    if noise_std is None:
        std = estimate_noise_std(images) / 2  # [-1, 1] -> [0, 1] units
        notes.append(
            "estimated noise std (0..1 scale): " + ", ".join(f"{v:.3f}" for v in std.tolist())
        )
    else:
        assert 0 <= noise_std <= 1, noise_std  # the 0..1 pixel scale (ldmkit.options)
        std = torch.full((b,), float(noise_std), dtype=torch.float64)
    params = {
        "method": "denoise", "noise_std": noise_std, "sampler": sampler, "steps": steps,
        "seed": seed, **_condition_params(condition),
    }  # fmt: skip
    noise = _ImageNoise(seed, b, ldm.latent_shape, ldm.device)
    known = ldm.encode(images)
    probe_gen = torch.Generator().manual_seed(seed)
    probe = torch.randn(images.shape, generator=probe_gen, dtype=torch.float64)
    probed = ldm.encode((images + 2 * std.view(-1, 1, 1, 1) * probe).float())
    level = (probed - known).pow(2).flatten(1).mean(1).sqrt().max().item()
    sigmas = ldm.sigmas(sampler, steps)
    above = [i for i in range(steps) if float(sigmas[i]) >= level]
    start = above[-1] if above else 0
    sigmas = sigmas[start:]
    notes.append(
        f"latent noise level {level:.3g}: starting at step {start + 1} of {steps} "
        f"(sigma {float(sigmas[0]):.3g})"
    )
    if math.isinf(float(sigmas[0])):
        x_T = noise()  # zero terminal SNR: the top level is pure noise
    else:
        top_up = math.sqrt(max(float(sigmas[0]) ** 2 - level**2, 0.0))
        x_T = (known + top_up * noise()) / math.sqrt(1 + float(sigmas[0]) ** 2)
    network = _Counted(ldm.network())
    den = _conditioned(ldm, b, dict(condition), network)
    z = run_sampler(
        den, x_T, sigmas, sampler=sampler, callback=callback, **_sampler_noise(sampler, noise)
    )
    return EditResult(ldm.decode(z, fast=False).float().cpu(), params, notes, network.calls)


def fill(
    ldm: LatentDiffusion,
    images: Tensor,
    masks: Tensor | None = None,
    *,
    hole_colour: Sequence[float] = (1.0, 1.0, 1.0),
    **inpaint_options: Any,
) -> EditResult:
    """Fill holes and scratches: inpaint the given masks, or the pixels painted exactly in
    `hole_colour` (in [-1, 1] per channel; white by default) when no mask is given."""
    images, notes = check_images(ldm, images)
    if masks is None:
        colour = torch.tensor(list(hole_colour), dtype=torch.float32)
        if colour.numel() != images.shape[1]:
            colour = colour[:1] if images.shape[1] == 1 else colour.expand(images.shape[1])
        masks = masklib.detect_holes(images, colour)
        notes.append(f"detected {int(masks.sum())} hole pixels of the colour {colour.tolist()}")
    result = inpaint(ldm, images, masks, **inpaint_options)
    result.params["method"] = "fill"
    result.notes = notes + result.notes
    return result


def _starts(length: int, size: int) -> list[int]:
    """Window starts covering 0..length with windows of `size`, half overlapping."""
    stride = max(size // 2, 1)
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def inpaint_large(
    ldm: LatentDiffusion, image: Tensor, mask: Tensor, *, seed: int = 0, **options: Any
) -> EditResult:
    """Inpaint an image larger than the model's (1, C, H, W) with H, W >= its size, crop by crop:
    windows of the model's size, half overlapping, in reading order, are inpainted wherever they
    hold masked pixels (window k with seed + k), and each result goes back into the image before
    the next window is cut, so later windows see the earlier fills. Pixels outside the mask are
    never changed. `options` as for `inpaint`."""
    _, size, _ = ldm.image_shape
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError("inpaint_large takes one image (1, C, H, W)")
    h, w = image.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"the image is {w}x{h}, smaller than the model's {size}x{size}")
    out, notes, calls, k = image.clone(), [], 0, 0
    for top in _starts(h, size):
        for left in _starts(w, size):
            window = (..., slice(top, top + size), slice(left, left + size))
            crop_mask = mask[window]
            if not bool(crop_mask.any()):
                continue
            result = inpaint(ldm, out[window], crop_mask, seed=seed + k, **options)
            out[window] = result.images
            calls += result.network_calls
            k += 1
    notes.append(f"the image is {w}x{h}: inpainted in {k} crops of {size}x{size}")
    params = {"method": "inpaint", "tiled": True, "seed": seed, **options}
    params = {key: (v.tolist() if isinstance(v, Tensor) else v) for key, v in params.items()}
    return EditResult(out, params, notes, calls)
