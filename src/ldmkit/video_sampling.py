"""Sampling clips from a video UNet and the image autoencoder, through the image samplers.

The samplers (`diffusion.samplers`) are plain functions of a denoiser on a state x of any shape
(their per-sample noise levels broadcast with `append_dims`), so a video is sampled in its own
shape: the state is the clip latents (B, F, zc, h, w) and the network is the `VideoUNet`, which
takes clips and one t per clip. This keeps a clip one sample for everything per-sample in the
samplers (noise levels, guidance, non-finite checks, x_T drawn per clip) without reshaping
frames into channels or batch. The latents are then decoded frame by frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ldmkit.data.transforms import to_uint8
from ldmkit.diffusion.sampler_names import DEFAULT_SAMPLER, DEFAULT_STEPS
from ldmkit.diffusion.samplers import sample
from ldmkit.diffusion.schedules import NoiseSchedule
from ldmkit.models.vae import Autoencoder
from ldmkit.models.video import VideoUNet


@torch.no_grad()
def decode_clips(vae: Autoencoder, latents: Tensor, scaling_factor: float) -> Tensor:
    """Clip latents (B, F, zc, h, w), scaled -> uint8 clips (B, F, C, H, W), frame by frame."""
    b, f = latents.shape[:2]
    images = vae.decode(latents.reshape(b * f, *latents.shape[2:]) / scaling_factor)
    return to_uint8(images).view(b, f, *images.shape[1:]).cpu()


@torch.no_grad()
def sample_clips(
    model: VideoUNet,
    vae: Autoencoder,
    schedule: NoiseSchedule,
    *,
    n: int,
    scaling_factor: float,
    frames: int | None = None,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    class_labels: Sequence[int] | Tensor | None = None,
    guidance_scale: float = 1.0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """`n` clips of `frames` (the model's own count by default) as uint8 (n, F, C, H, W).

    `class_labels` (one per clip) condition a class-conditional model; with `guidance_scale`
    other than 1, classifier-free guidance against the null label. The same `seed` gives the
    same clips (x_T and any sampler noise come from one CPU generator).
    """
    cfg = model.config
    frames = cfg.frames if frames is None else frames
    shape = (n, frames, cfg.unet.in_channels, cfg.unet.sample_size, cfg.unet.sample_size)
    cond = uncond = None
    if class_labels is not None:
        y = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        y = y.expand(n) if y.numel() == 1 else y
        cond = {"class_labels": y}
        if guidance_scale != 1.0:
            uncond = {"class_labels": torch.full_like(y, cfg.unet.num_classes)}
    latents = sample(
        model, schedule, shape, sampler=sampler, steps=steps,
        prediction_type=cfg.unet.prediction_type, generator=torch.Generator().manual_seed(seed),
        cond=cond, uncond=uncond, guidance_scale=guidance_scale, device=device,
    )  # fmt: skip
    return decode_clips(vae, latents, scaling_factor)


# ------------------------------------------------------------------ a video run's sampler (issue 30)
def start_state(
    shape: tuple[int, ...], sigma0: float, generator: torch.Generator, known: Tensor | None,
    noise_mixing: float = 0.0,
) -> Tensor:  # fmt: skip
    """x_T (VP scale) for clips of `shape`, drawn from `generator`; with `known` latents
    (B, G, zc, h, w), the first G frames start as those latents noised to sigma0 (the samplers
    scale x_T by sqrt(1 + sigma0^2) into the VE state x0 + sigma0 * noise). `noise_mixing`
    alpha > 0: the frames share part of their noise, (alpha * shared + own) / sqrt(1 + alpha^2)
    (the mixed prior a model trained with it expects; Ge et al. 2023)."""
    x = torch.randn(shape, generator=generator)
    if noise_mixing:
        shared = torch.randn((shape[0], 1, *shape[2:]), generator=generator)
        x = (noise_mixing * shared + x) / math.sqrt(1.0 + noise_mixing**2)
    if known is not None and math.isfinite(sigma0):
        g = known.shape[1]
        x[:, :g] = (known.cpu().float() + sigma0 * x[:, :g]) / math.sqrt(1 + sigma0**2)
    return x


def impose_known(known: Tensor, generator: torch.Generator) -> Callable:
    """A sampler callback that keeps the first G frames on the given latents `known`
    (B, G, zc, h, w), as inpainting keeps pixels with a mask over frames: after every step they
    become the known latents noised to the new level (known + sigma * fresh noise), so at the
    last step (sigma 0) they are the known latents exactly (`diffusion.edit_math.blend_known`)."""
    g = known.shape[1]

    def step(i: int, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
        s = float(sigma)
        k = known.to(x.device, x.dtype)
        if s > 0:
            noise = torch.randn(known.shape, generator=generator).to(x.device, x.dtype)
            k = k + s * noise
        x = x.clone()
        x[:, :g] = k
        return x

    return step


@torch.no_grad()
def encode_frames(vae: Autoencoder, frames: Tensor, scaling_factor: float) -> Tensor:
    """uint8 frames (B, G, C, H, W) -> their scaled latents (B, G, zc, h, w) (posterior means)."""
    from ldmkit.data.transforms import to_float

    b, g = frames.shape[:2]
    device = next(vae.parameters()).device
    x = to_float(frames.reshape(b * g, *frames.shape[2:])).to(device)
    z = vae.encode(x).mean * scaling_factor
    return z.view(b, g, *z.shape[1:])


@torch.no_grad()
def sample_video_latents(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    prediction_type: str,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    cond: dict | None = None,
    uncond: dict | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    known: Tensor | None = None,
    callback: Callable | None = None,
    device: torch.device | str = "cpu",
    noise_mixing: float = 0.0,
) -> Tensor:
    """Clip latents (B, F, zc, h, w) = `shape` from a network on clip latents (x_T with the
    frames' shared noise of `noise_mixing`, see `start_state`). With `known`
    scaled latents (B or 1, G, zc, h, w), G < F, the first G frames are given: they start as
    `known` noised to the first level and are imposed after every step (`impose_known`), so
    they end exactly as given and the other frames are sampled to continue them."""
    from ldmkit.diffusion.samplers import DEFAULT_SPACING, get_sigmas, make_denoiser, run_sampler

    generator = torch.Generator().manual_seed(seed)
    if known is not None:
        if known.ndim != 5 or known.shape[1] >= shape[1] or known.shape[2:] != shape[2:]:
            raise ValueError(
                f"known latents {tuple(known.shape)} do not fit clips {tuple(shape)} (give fewer "
                "frames than the clip, of its latent shape)"
            )
        known = known.expand(shape[0], *known.shape[1:]) if known.shape[0] == 1 else known
    sigmas = get_sigmas(schedule, steps, DEFAULT_SPACING[sampler])
    x_T = start_state(tuple(shape), float(sigmas[0]), generator, known, noise_mixing).to(device)
    step = callback
    if known is not None:
        keep = impose_known(known, torch.Generator().manual_seed(seed + 1))

        def step(i: int, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
            x = keep(i, x, sigma, x0)
            out = None if callback is None else callback(i, x, sigma, x0)
            return x if out is None else out

    denoise = make_denoiser(
        model, schedule, prediction_type, cond=cond, uncond=uncond,
        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
    )  # fmt: skip
    return run_sampler(denoise, x_T, sigmas, sampler=sampler, generator=generator, callback=step)


@torch.no_grad()
def sample_video(
    model: torch.nn.Module,
    vae: Autoencoder,
    schedule: NoiseSchedule,
    *,
    n: int,
    frames: int,
    latent_shape: tuple[int, int, int],
    scaling_factor: float,
    prediction_type: str,
    first_frames: Tensor | None = None,
    device: torch.device | str = "cpu",
    **options,
) -> Tensor:
    """`n` clips as uint8 (n, F, C, H, W) from `model` (a network on clip latents (B, F, zc, h,
    w)) and the image autoencoder; `options` as `sample_video_latents` takes them (sampler,
    steps, seed, cond, uncond, guidance_scale, guidance_rescale, callback). With
    `first_frames` (uint8 (n or 1, G, C, H, W), G < F) those frames are given (their latents,
    the posterior means, are imposed at every step) and the clips continue them; the given
    frames come back as the autoencoder reconstructs them. The same seed gives the same clips."""
    known = None
    if first_frames is not None:
        known = encode_frames(vae, first_frames.to(device), scaling_factor)
    # a model trained on the mixed noise prior (VideoUNetConfig.noise_mixing, where it has it)
    options.setdefault("noise_mixing", float(getattr(_video_config(model), "noise_mixing", 0.0)))
    latents = sample_video_latents(
        model, schedule, (n, frames, *latent_shape), prediction_type=prediction_type,
        known=known, device=device, **options,
    )  # fmt: skip
    return decode_clips(vae, latents, scaling_factor)


def _video_config(model: torch.nn.Module) -> object:
    """The VideoUNet's config of `model` (a VideoUNet, or a module holding one as `.unet`)."""
    inner = model.unet if not isinstance(model, VideoUNet) and hasattr(model, "unet") else model
    return getattr(inner, "config", None)
