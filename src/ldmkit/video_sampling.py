"""Sampling clips from a video UNet and the image autoencoder, through the image samplers.

The samplers (`diffusion.samplers`) are plain functions of a denoiser on a state x of any shape
(their per-sample noise levels broadcast with `append_dims`), so a video is sampled in its own
shape: the state is the clip latents (B, F, zc, h, w) and the network is the `VideoUNet`, which
takes clips and one t per clip. This keeps a clip one sample for everything per-sample in the
samplers (noise levels, guidance, non-finite checks, x_T drawn per clip) without reshaping
frames into channels or batch. The latents are then decoded frame by frame.
"""

from __future__ import annotations

from collections.abc import Sequence

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
