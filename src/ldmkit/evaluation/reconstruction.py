"""What the autoencoder keeps: its reconstructions measured on a fixed batch while it trains.

Every figure ldmkit reports downstream (sample quality, class accuracy, editing) is capped by
the first stage, so the autoencoder stage measures itself, every few seconds of training, on a
fixed batch of the data (held out of its training where the data is large enough,
`probe_split`):

    psnr         10 log10(4 / MSE) in dB, images in [-1, 1] (data range 2), mean over images
    ssim         single-scale SSIM (Wang et al. 2004) with a 7-pixel Gaussian window
                 (`models.losses.ms_ssim` with one scale), mean over images
    readability  the share of reconstructions that the run's domain classifier reads as the same
                 class as their originals (1 = the autoencoder loses nothing the classes need);
                 labelled data of at most 64 px only
    latent_std   std of the posterior means over the batch (all latent elements): a collapsed
                 latent is near 0; the diffusion model sees it times the scaling factor
    latent_mean  their mean
    kl           the KL to N(0, I) per latent element (nats)

`QualityVerdict` turns the history of those rows into the stage's decisions: whether it has
reached its target (the stage may end, `target_reached`), and, at the end, whether the
autoencoder is usable at all (`usable`), with the message a run prints when it is not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ldmkit.data.transforms import to_float
from ldmkit.models.losses import ms_ssim
from ldmkit.models.vae import SSIM_WINDOW, Autoencoder

PROBE_IMAGES = 128  # images in the fixed measurement batch
PROBE_HOLD_OUT_MIN_DATA = 1000  # data of at least this many images: the batch is held out
# The stage's target (with a time budget it may end once reached): this share of readable
# reconstructions where the data has labels, else a PSNR plateau (below), and always at least
# TARGET_PSNR dB
TARGET_READABILITY = 0.97
TARGET_PSNR = 20.0
# A plateau: the last PLATEAU_CHECKS measurements gained less than PLATEAU_DB over the one before
PLATEAU_CHECKS, PLATEAU_DB = 3, 0.2
# Below these the autoencoder is not usable: the run, `sample`, `eval` and `serve` say so
USABLE_READABILITY = 0.90
USABLE_PSNR = 16.0


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """PSNR in dB per image (B,) of two (B, C, H, W) batches; identical images give inf."""
    mse = (x.double() - y.double()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0, window_size: int = SSIM_WINDOW) -> Tensor:
    """Single-scale SSIM per image (B,), Gaussian window (sigma 1.5; 7 pixels by default, so
    that 28-32 px images keep most of their windows; Wang et al. use 11), valid windows."""
    return ms_ssim(
        x.double(), y.double(), data_range=data_range, window_size=window_size, max_scales=1
    )


def probe_split(num_images: int, seed: int, n: int = PROBE_IMAGES) -> tuple[Tensor, Tensor | None]:
    """(the measurement batch's indices, the indices the autoencoder trains on or None for all).

    Data of at least PROBE_HOLD_OUT_MIN_DATA images: a seeded batch of n held out of the
    autoencoder's training (the UNet still sees every image). Smaller data: its first n images,
    which the autoencoder also trains on (the figures are then training-set figures)."""
    n = min(n, num_images)
    if num_images < PROBE_HOLD_OUT_MIN_DATA:
        return torch.arange(n), None
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed + 7919))
    return perm[:n].sort().values, perm[n:].sort().values


class ReconstructionProbe:
    """A fixed batch of images (uint8 or [-1, 1] floats) and, optionally, a classifier with
    `logits(images)`: `measure(vae)` returns the figures of the module docstring."""

    def __init__(self, images: Tensor, classifier: Any | None = None, *, held_out: bool = False,
                 batch_size: int = 64) -> None:  # fmt: skip
        if len(images) == 0:
            raise ValueError("the reconstruction probe needs at least one image")
        self.images = images
        self.classifier = classifier
        self.held_out = held_out
        self.batch_size = batch_size
        self._reads: Tensor | None = None  # the classifier's reading of the originals

    @torch.no_grad()
    def measure(self, vae: Autoencoder) -> dict[str, float]:
        was_training = vae.training
        vae.eval()
        device = next(vae.parameters()).device
        p, s, means, kls, reads = [], [], [], [], []
        try:
            for i in range(0, len(self.images), self.batch_size):
                x = to_float(self.images[i : i + self.batch_size]).to(device)
                post = vae.encode(x)
                recon = vae.decode(post.mode()).float().clamp(-1, 1)
                p.append(psnr(x, recon).clamp(max=100.0))
                s.append(ssim(x, recon))
                means.append(post.mean.float().flatten(1))
                kls.append(post.kl().double() / post.mean[0].numel())
                if self.classifier is not None:
                    reads.append(self.classifier.logits(recon.cpu()).argmax(1))
        finally:
            vae.train(was_training)
        z = torch.cat(means)
        out = {
            "psnr": float(torch.cat(p).mean()),
            "ssim": float(torch.cat(s).mean()),
            "latent_mean": float(z.mean()),
            "latent_std": float(z.std()),
            "kl": float(torch.cat(kls).mean()),
        }
        if self.classifier is not None:
            out["readability"] = float((torch.cat(reads) == self._originals()).double().mean())
        return out

    @torch.no_grad()
    def _originals(self) -> Tensor:
        if self._reads is None:
            assert self.classifier is not None
            self._reads = torch.cat([
                self.classifier.logits(to_float(self.images[i : i + self.batch_size])).argmax(1)
                for i in range(0, len(self.images), self.batch_size)
            ])  # fmt: skip
        return self._reads


@dataclass
class QualityVerdict:
    """Decisions from a stage's measurement rows (each a `ReconstructionProbe.measure` dict)."""

    target_readability: float = TARGET_READABILITY
    target_psnr: float = TARGET_PSNR

    def target_reached(self, rows: Sequence[dict[str, float]]) -> str | None:
        """Why the stage may end now ("readability target", "plateau"), or None."""
        if not rows or rows[-1]["psnr"] < self.target_psnr:
            return None
        last = rows[-1]
        if "readability" in last:
            return "readability target" if last["readability"] >= self.target_readability else None
        if len(rows) > PLATEAU_CHECKS:
            gain = last["psnr"] - rows[-1 - PLATEAU_CHECKS]["psnr"]
            if gain < PLATEAU_DB:
                return "plateau"
        return None

    @staticmethod
    def problems(last: dict[str, float]) -> list[str]:
        """What makes the autoencoder unusable (empty: usable)."""
        out = []
        if "readability" in last and last["readability"] < USABLE_READABILITY:
            out.append(
                f"only {last['readability']:.0%} of its reconstructions keep their class "
                f"(usable from {USABLE_READABILITY:.0%})"
            )
        if not math.isfinite(last["psnr"]) or last["psnr"] < USABLE_PSNR:
            out.append(f"reconstruction PSNR {last['psnr']:.1f} dB (usable from {USABLE_PSNR:g})")
        if not last["latent_std"] > 1e-3:
            out.append(f"its latents have collapsed (std {last['latent_std']:.2g})")
        return out


def describe(row: dict[str, float]) -> str:
    """One line of figures: 'PSNR 24.1 dB, SSIM 0.912, readability 98 %, latent std 0.81'."""
    parts = [f"PSNR {row['psnr']:.1f} dB", f"SSIM {row['ssim']:.3f}"]
    if "readability" in row:
        parts.append(f"readability {row['readability']:.0%}")
    parts.append(f"latent std {row['latent_std']:.2f}")
    return ", ".join(parts)
