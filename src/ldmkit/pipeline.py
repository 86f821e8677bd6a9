"""LatentDiffusion: a trained autoencoder + denoising UNet + noise schedule, ready to sample.

    ldm = LatentDiffusion.from_run("runs/shapes")
    images = ldm.sample(16, sampler="dpm++2m-sde", steps=20, seed=0)   # (16, C, H, W) in [-1, 1]
    ldm.to_pil(images)[0].save("first.png")

A run folder holds `run.json` (the RunConfig), `vae/` and `unet/` (config.json +
model.safetensors each; unet/ holds the EMA weights) and `data.json` (class names, channels).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoint import CheckpointError, read_json
from .diffusion.samplers import DEFAULT_SAMPLER, SAMPLERS, sample
from .diffusion.schedules import NoiseSchedule, schedule_from_fields
from .models.unet import UNet
from .models.vae import Autoencoder

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class LatentDiffusion:
    """Autoencoder + UNet + schedule. Images are (B, C, H, W) float tensors in [-1, 1]."""

    def __init__(
        self,
        vae: Autoencoder,
        unet: UNet,
        schedule: NoiseSchedule,
        *,
        class_names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        guidance_scale: float = 1.0,
    ) -> None:
        self.default_guidance = float(guidance_scale)  # used when sample() is given labels only
        self.device = torch.device(device) if device is not None else default_device()
        self.vae = vae.to(self.device).eval()
        self.unet = unet.to(self.device).eval()
        self.schedule = schedule
        self.class_names = list(class_names) if class_names else None
        if self.unet.config.in_channels != self.vae.config.latent_channels:
            raise ValueError(
                f"the UNet takes {self.unet.config.in_channels} channels but the autoencoder makes "
                f"{self.vae.config.latent_channels}-channel latents; they are not from the same run"
            )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_run(
        cls, run_dir: str | os.PathLike, device: str | torch.device | None = None
    ) -> LatentDiffusion:
        """Load a trained run folder (as written by `ldmkit train`)."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise CheckpointError(
                f"run folder {run_dir} does not exist; train one with `ldmkit train --out {run_dir}`"
            )
        for part in ("vae", "unet"):
            if not (run_dir / part / "model.safetensors").is_file():
                raise CheckpointError(
                    f"{run_dir} has no trained {part} ({run_dir / part / 'model.safetensors'} is missing); "
                    "finish or resume the training with `ldmkit train --resume`"
                )
        run = read_json(run_dir / "run.json")
        diff = run.get("diffusion", {})
        schedule = schedule_from_fields({"schedule": "linear", "num_timesteps": 1000, **diff})
        data = read_json(run_dir / "data.json") if (run_dir / "data.json").is_file() else {}
        dev = torch.device(device) if device is not None else default_device()
        vae = Autoencoder.from_pretrained(run_dir / "vae", device=dev)
        unet = UNet.from_pretrained(run_dir / "unet", device=dev)
        return cls(
            vae, unet, schedule, class_names=data.get("class_names"), device=dev,
            guidance_scale=float(run.get("guidance_scale", 1.0)),
        )  # fmt: skip

    # ------------------------------------------------------------------ latents
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @torch.no_grad()
    def encode(
        self, images: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images in [-1, 1] -> scaled latents (what the UNet sees)."""
        post = self.vae.encode(images.to(self.device, torch.float32))
        z = post.sample(generator=generator) if sample else post.mode()
        return z * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images clamped to [-1, 1]."""
        x = self.vae.decode(latents.to(self.device, torch.float32) / self.vae.config.scaling_factor)
        return x.clamp(-1, 1)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        sampler: str = DEFAULT_SAMPLER,
        steps: int = 20,
        seed: int | None = 0,
        class_labels: Sequence[int] | Tensor | None = None,
        guidance_scale: float | None = None,
        batch_size: int = 64,
        return_latents: bool = False,
        callback: Callable[..., Any] | None = None,
        **sampler_options: Any,
    ) -> Tensor:
        """Draw n images (B, C, H, W) in [-1, 1] on the CPU.

        The same seed gives the same images whatever the batch size: each image's starting
        noise and per-step noise come from one generator seeded by (seed, image index).
        `guidance_scale` (classifier-free guidance; 1 = none) applies with class labels only;
        None takes the run's default (`default_guidance`).
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        labels = None
        if class_labels is not None:
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if labels.numel() == 1:
                labels = labels.expand(n)
            if labels.numel() != n:
                raise ValueError(f"got {labels.numel()} class labels for {n} images; give one or n")
            nc = self.unet.config.num_classes or 0
            if nc and (labels.min() < 0 or labels.max() >= nc):
                raise ValueError(f"class labels must be in 0..{nc - 1}")
        if guidance_scale is None:
            guidance_scale = self.default_guidance if labels is not None else 1.0
        seed = int(torch.randint(0, 2**31, (1,)).item()) if seed is None else seed
        out = []
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
            y = labels[start : start + b].to(self.device) if labels is not None else None
            cond, uncond = self._conditions(y, b, guidance_scale)
            z = sample(
                self.unet,
                self.schedule,
                (b, *self.latent_shape),
                sampler=sampler,
                steps=steps,
                prediction_type=self.unet.config.prediction_type,
                generator=gen,
                callback=callback,
                cond=cond,
                uncond=uncond,
                guidance_scale=guidance_scale,
                device=self.device,
                **sampler_options,
            )
            out.append((z if return_latents else self.decode(z)).float().cpu())
        return torch.cat(out)

    def _conditions(
        self, labels: Tensor | None, b: int, guidance_scale: float
    ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
        """Network kwargs for the conditional and (with guidance) the unconditional half."""
        num_classes = self.unet.config.num_classes
        if not num_classes:
            if labels is not None:
                raise ValueError("this model was trained without class labels; do not pass any")
            return {}, None
        null = torch.full((b,), num_classes, dtype=torch.long, device=self.device)
        if labels is None:
            return {"class_labels": null}, None
        if guidance_scale == 1.0:
            return {"class_labels": labels}, None
        return {"class_labels": labels}, {"class_labels": null}

    @staticmethod
    def to_pil(images: Tensor) -> list[Any]:
        """(B, C, H, W) in [-1, 1] -> list of PIL images."""
        from PIL import Image

        arr = (
            ((images.clamp(-1, 1) + 1) * 127.5)
            .round()
            .to(torch.uint8)
            .permute(0, 2, 3, 1)
            .cpu()
            .numpy()
        )
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def images_to_uint8(images: Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
