"""The two training stages of a latent diffusion model, as `Stage`s for the shared loop.

Stage 1 trains the autoencoder (reconstruction + KL, optionally a PatchGAN; Esser et al. 2021,
Rombach et al. 2022). Stage 2 trains the UNet on latents drawn from the cached posterior
moments of the training images, with `ldmkit.diffusion.losses.training_loss`: the loss a reader
finds in the maths file is the one that runs.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..data.transforms import to_float
from ..diffusion.losses import training_loss
from ..models.conditioning import ClassConditioner, TextConditioner
from ..models.distributions import DiagonalGaussian
from ..models.losses import autoencoder_loss, discriminator_loss, make_discriminator
from ..models.text import TextEncoder
from ..models.unet import UNet
from ..models.vae import Autoencoder
from ..recipe import DiffusionConfig, TrainConfig
from .step import Stage

# seeds of the stages' own generators (the autoencoder's noise, the diffusion draws)
AUTOENCODER_SEED, DIFFUSION_SEED = 1, 2


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast of the forward pass (a no-op when disabled)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def autoencoder_stage(
    vae: Autoencoder, images: Tensor, cfg: TrainConfig, device: torch.device
) -> Stage:
    """Stage 1: train the autoencoder on uint8 images (N, C, H, W).

    With `vae.config.disc_weight > 0` a PatchGAN discriminator trains beside it from
    `disc_start` on (hinge loss, adaptive weight; Esser et al. 2021).
    """
    # GAN-style betas only when a discriminator trains beside it (Esser et al. 2021)
    betas = (0.5, 0.9) if vae.config.disc_weight > 0 else (0.9, 0.999)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas)
    gen = torch.Generator().manual_seed(AUTOENCODER_SEED)
    disc = make_discriminator(vae.config)
    pending: list[tuple[int, Tensor, Tensor]] = []  # (step, x, reconstruction) for the disc

    def loss(idx: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        x = to_float(images[idx]).to(device)
        with autocast(device, cfg.bf16):
            post = vae.encode(x)
            recon = vae.decode(post.sample(gen))  # reparameterised z
        value, parts = autoencoder_loss(
            x, recon.float(), post, vae.config, step=step, discriminator=disc,
            last_layer=vae.last_layer if disc is not None else None,
        )  # fmt: skip
        if disc is not None:
            pending[:] = [p for p in pending if p[0] == step]  # drop those of a skipped step
            pending.append((step, x, recon.detach().float()))
        return value, parts

    if disc is None:
        return Stage("autoencoder", vae, opt, loss, generators={"noise": gen})

    disc = disc.to(device)
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=betas)

    def discriminator_step(step: int) -> dict[str, float]:
        disc_opt.zero_grad(set_to_none=True)  # the generator's GAN term reached it too
        logs: dict[str, float] = {}
        batches = [(x, r) for s, x, r in pending if s == step]
        for x, recon in batches:
            d_loss, d_logs = discriminator_loss(disc, x, recon, vae.config, step=step)
            (d_loss / len(batches)).backward()
            for k, v in d_logs.items():
                logs[k] = logs.get(k, 0.0) + v / len(batches)
        disc_opt.step()
        pending.clear()
        return logs

    return Stage(
        "autoencoder", vae, opt, loss, after_update=discriminator_step,
        extra_modules={"discriminator": disc}, extra_optimizers={"disc": disc_opt},
        generators={"noise": gen},
    )  # fmt: skip


def split_model(model: nn.Module) -> tuple[UNet, TextEncoder | None]:
    """The UNet and text encoder of a diffusion stage's model (a UNet, or a text run's
    ModuleDict {"unet", "text_encoder"})."""
    if isinstance(model, nn.ModuleDict):
        return model["unet"], model["text_encoder"]
    return model, None


def diffusion_stage(
    model: nn.Module,
    moments: Tensor,
    conditioner: ClassConditioner | TextConditioner,
    cond_data: Tensor | None,
    scaling_factor: float,
    diff: DiffusionConfig,
    cfg: TrainConfig,
    device: torch.device,
) -> Stage:
    """Stage 2: train the UNet (and a text encoder) on latents drawn from cached posterior
    moments (N, 2*zc, h, w). `cond_data` holds each image's condition: class labels (N,) or
    caption token ids (N, L); the conditioner turns a batch of it into the UNet's kwargs, with
    dropout to the null condition."""
    schedule = diff.make_schedule()
    unet, _ = split_model(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(DIFFUSION_SEED)

    def network(x_t: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        with autocast(device, cfg.bf16):
            return unet(x_t, t, **cond)

    def loss(idx: Tensor, step: int) -> tuple[Tensor, dict[str, float]]:
        z0 = DiagonalGaussian.from_moments(moments[idx]).sample(gen) * scaling_factor
        c = cond_data[idx] if cond_data is not None else None
        value = training_loss(
            network, schedule, z0.to(device), prediction_type=unet.config.prediction_type,
            weighting=diff.loss_weighting, gamma=diff.min_snr_gamma, generator=gen,
            timesteps=diff.timestep_sampling,
            cond=lambda: conditioner.training_kwargs(c, gen, device),
        )  # fmt: skip
        return value, {}

    return Stage("diffusion", model, opt, loss, generators={"noise": gen})


@torch.no_grad()
def encode_moments(
    vae: Autoencoder, images: Tensor, device: torch.device, batch: int = 256
) -> Tensor:
    """Posterior (mean, logvar) of every image, concatenated on channels, float32 on the CPU."""
    vae.eval()
    out = []
    for s in range(0, images.shape[0], batch):
        post = vae.encode(to_float(images[s : s + batch]).to(device))
        out.append(torch.cat([post.mean, post.logvar], 1).float().cpu())
    return torch.cat(out)
