"""The two training stages of a latent diffusion model, as `Stage`s for the shared loop.

Stage 1 trains the autoencoder (reconstruction + KL, optionally a PatchGAN; Esser et al. 2021,
Rombach et al. 2022). Stage 2 trains the UNet on latents drawn from the cached posterior
moments of the training images, with `ldmkit.diffusion.losses.training_loss`: the loss a reader
finds in the maths file is the one that runs.

Every random draw of a loss comes from the micro-batch's per-sample generators
(`step.MicroBatch`), so a sample's noise is the same whether 1 or N processes train. A stage's
loss calls its model through `wrap` (DistributedDataParallel with several processes,
training/distributed.py), and the Stage keeps the unwrapped model for EMA and checkpoints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..data.masks import random_masks, to_latent
from ..data.transforms import to_float
from ..diffusion.losses import training_loss
from ..models.conditioning import ClassConditioner, TextConditioner
from ..models.distributions import DiagonalGaussian
from ..models.layers import set_gradient_checkpointing
from ..models.losses import autoencoder_loss, discriminator_loss, make_discriminator
from ..models.text import MiniLMEncoder, TextEncoder
from ..models.unet import UNet
from ..models.vae import Autoencoder
from ..recipe import DiffusionConfig, TrainConfig
from .step import MicroBatch, Stage

Wrap = Callable[[nn.Module], nn.Module]  # World.wrap: DistributedDataParallel, or the identity


def _unwrapped(module: nn.Module) -> nn.Module:
    return module


def autocast(device: torch.device, enabled: bool | None) -> contextlib.AbstractContextManager:
    """bf16 autocast of the forward pass (a no-op when disabled)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(enabled))


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The training-time modes of a model: gradient checkpointing when asked, and on a CUDA
    device the channels-last memory format (cuDNN's fastest convolutions under autocast)."""
    if cfg.gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def _layout(x: Tensor, device: torch.device) -> Tensor:
    """A batch in the model's memory format (channels-last on CUDA, see `prepare_model`)."""
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def autoencoder_stage(
    vae: Autoencoder, images: Tensor, cfg: TrainConfig, device: torch.device,
    wrap: Wrap = _unwrapped, activations: Callable[[Tensor], list[Tensor]] | None = None,
) -> Stage:  # fmt: skip
    """Stage 1: train the autoencoder on uint8 images (N, C, H, W).

    With `vae.config.disc_weight > 0` a PatchGAN discriminator trains beside it from
    `disc_start` on (hinge loss, adaptive weight; Esser et al. 2021). `activations`: a frozen
    network's (the run's domain classifier), for the feature-matching term
    (`vae.config.feature_weight`).
    """
    # GAN-style betas only when a discriminator trains beside it (Esser et al. 2021)
    betas = (0.5, 0.9) if vae.config.disc_weight > 0 else (0.9, 0.999)
    prepare_model(vae, cfg, device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas)
    disc = make_discriminator(vae.config)
    pending: list[tuple[int, Tensor, Tensor]] = []  # (step, x, reconstruction) for the disc
    net = wrap(vae)

    def loss(mb: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        step = mb.step
        x = _layout(to_float(images[mb.indices]).to(device), device)
        noise = mb.randn(*vae.latent_shape(tuple(x.shape[-2:])))  # one posterior sample each
        with autocast(device, cfg.bf16):
            recon, post = net(x, noise=noise)  # reparameterised z
        value, parts = autoencoder_loss(
            x, recon.float(), post, vae.config, step=step, discriminator=disc,
            last_layer=vae.last_layer if disc is not None else None, activations=activations,
        )  # fmt: skip
        if disc is not None:
            pending[:] = [p for p in pending if p[0] == step]  # drop those of a skipped step
            pending.append((step, x, recon.detach().float()))
        return value, parts

    if disc is None:
        return Stage("autoencoder", vae, opt, loss, wrapped=net)

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
        extra_modules={"discriminator": disc}, extra_optimizers={"disc": disc_opt}, wrapped=net,
    )  # fmt: skip


class TextUNet(nn.Module):
    """What a text-conditional run trains: the text encoder and the UNet as one module, so that
    one optimizer, one EMA and (under torchrun) one DistributedDataParallel cover both.

    forward(x_t, t, text_ids=(B, L)) encodes the token ids (padding masked out) and runs the UNet
    on them; its state_dict keys are "unet.*" and "text_encoder.*". A frozen pretrained encoder
    (`MiniLMEncoder`) is held aside, not as a sub-module: it is no part of the state, the
    optimizer, the EMA or the checkpoints, and its states need no gradient.
    """

    def __init__(self, unet: UNet, text_encoder: TextEncoder | MiniLMEncoder) -> None:
        super().__init__()
        self.unet = unet
        if isinstance(text_encoder, MiniLMEncoder):
            object.__setattr__(self, "text_encoder", text_encoder)  # not registered
        else:
            self.text_encoder = text_encoder

    def forward(self, x_t: Tensor, t: Tensor, *, text_ids: Tensor) -> Tensor:
        return self.unet(x_t, t, **self.text_encoder.context(text_ids))


def split_model(model: nn.Module) -> tuple[nn.Module, TextEncoder | MiniLMEncoder | None]:
    """The UNet and text encoder of a diffusion stage's model (a UNet, or a `TextUNet`)."""
    if isinstance(model, TextUNet):
        return model.unet, model.text_encoder
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
    wrap: Wrap = _unwrapped,
    inpaint_factor: int | None = None,
) -> Stage:
    """Stage 2: train the UNet (or a `TextUNet`) on latents drawn from cached posterior moments
    (N, 2*zc, h, w). `cond_data` holds each image's condition: class labels (N,) or caption
    token ids (N, L); the conditioner drops a share of them to the null condition, per sample.

    With `inpaint_factor` (the autoencoder's downsampling factor) the UNet learns inpainting:
    each sample draws a random mask at image resolution (`data.masks.random_masks`), brought to
    the latent by max pooling as at inference, and the network sees [x_t, mask, z0 * (1 - mask)].
    """
    schedule = diff.make_schedule()
    unet, _ = split_model(model)
    prepare_model(unet, cfg, device)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    net = wrap(model)
    forward = torch.compile(net) if cfg.compile else net  # Stage keeps `net` (EMA, no_sync)

    def network(x_t: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        with autocast(device, cfg.bf16):
            return forward(_layout(x_t, device), t, **cond)

    def loss(mb: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        # each sample draws from its own generator: posterior noise, t, eps, condition dropout
        post = DiagonalGaussian.from_moments(moments[mb.indices])
        z0 = post.sample(noise=mb.randn(*post.shape[1:])) * scaling_factor
        t = mb.timesteps(schedule.num_timesteps, diff.timestep_sampling)
        eps = mb.randn(*z0.shape[1:])
        y = cond_data[mb.indices] if cond_data is not None else None
        cond = mb.per_sample(
            lambda rows, g: conditioner.training_kwargs(None if y is None else y[rows], g, device)
        )
        net_fn = network
        if inpaint_factor is not None:
            size = z0.shape[-1] * inpaint_factor
            mask = to_latent(random_masks(len(mb), size, mb.generators), inpaint_factor)
            extra = torch.cat([mask, z0 * (1 - mask)], 1).to(device)

            def net_fn(x_t: Tensor, t: Tensor, **c: Tensor) -> Tensor:
                return network(torch.cat([x_t, extra], 1), t, **c)

        value = training_loss(
            net_fn, schedule, z0.to(device), prediction_type=unet.config.prediction_type,
            weighting=diff.loss_weighting, gamma=diff.min_snr_gamma, t=t, eps=eps, cond=cond,
        )  # fmt: skip
        return value, {}

    return Stage("diffusion", model, opt, loss, wrapped=net)


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
