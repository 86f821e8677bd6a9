"""KL-regularised autoencoder (the "first stage" of latent diffusion), its config and its blocks.

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3.1 and
Appendix G: an encoder maps x (B, C, H, W) to a diagonal Gaussian posterior over latents
z (B, latent_channels, H/f, W/f), a decoder maps z back, and a small KL penalty towards N(0, I)
keeps the latent space well behaved. The diffusion model is trained on `z * scaling_factor`.

Layout. The network is laid out exactly like diffusers' `AutoencoderKL` (Encoder / Decoder in
`diffusers/models/autoencoders/vae.py`): the same modules in the same order, GroupNorm eps 1e-6,
asymmetric (0, 1, 0, 1) padding before each stride-2 downsampling conv, nearest upsampling + conv,
single-head self-attention over channels with its own GroupNorm and a residual, and 1x1
`quant_conv` / `post_quant_conv`. Module names mostly match too; the few that differ are listed in
`ldmkit.interop.vae_names`, which maps diffusers weights onto ours.

Notation: f = 2 ** (len(block_out_channels) - 1) is the downsampling factor; B batch; C image
channels; z latent channels; h, w = H / f, W / f.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldmkit.checkpoint import ModelFolder
from ldmkit.config import ConfigError, check_int
from ldmkit.models.distributions import DiagonalGaussian

logger = logging.getLogger(__name__)

# Side of the Gaussian SSIM window of the perceptual loss: +-2 sigma of Wang's sigma = 1.5, smaller
# than Wang's 11 so that 28x28 and 32x32 images keep three scales.
SSIM_WINDOW = 7


@dataclass
class AutoencoderConfig:
    """Architecture, latent scaling and training-loss switches of a KL autoencoder.

    The defaults are the autoencoder `ldmkit train` trains (ldmkit.recipe): f2, 32 px -> 16x16x4
    latents, small enough to train on a CPU. Chosen by measurement on the built-in shapes (issue
    notes): f4 (8x8 latents) reconstructed small shapes as blobs after 2.5 CPU-minutes, and a UNet
    trained on them drew blobs; f2 reconstructs them crisply in the same time and keeps shape as a
    spatial pattern in the latent. At equal CPU time a thin network that takes more steps
    reconstructs better than a wide one that takes fewer. Loss fields are read by
    `ldmkit.models.losses`; the network itself ignores them.
    """

    # --- architecture ---
    image_channels: int = 3  # 1 (grayscale) or 3 (RGB); the decoder outputs the same number
    latent_channels: int = 4  # z channels; the encoder outputs 2 * latent_channels (mean, logvar)
    block_out_channels: tuple[int, ...] = (16, 32)  # one level each; f = 2 ** (levels - 1)
    layers_per_block: int = 1  # resnets per encoder level (the decoder has one more, as diffusers)
    norm_groups: int = 8  # GroupNorm groups; must divide every entry of block_out_channels
    norm_eps: float = 1e-6  # GroupNorm eps everywhere (diffusers' AutoencoderKL hard-codes 1e-6)
    mid_attention: bool = True  # self-attention between the two mid-block resnets
    image_size: int = 32  # training resolution; used for validation and the summary only
    # 1 / std of latents on the training data, so the diffusion model sees unit variance (LDM
    # Sec. 4.3.2 and Appendix G). Measure it with `measure_scaling_factor` after training.
    scaling_factor: float = 1.0

    # --- loss switches, for the trainer (ldmkit.models.losses) ---
    reconstruction: Literal["l1", "l2"] = "l1"  # per-pixel reconstruction error
    kl_weight: float = 1e-6  # weight of KL(q(z|x) || N(0, I)); 1e-6 in LDM's KL-f4/f8 models
    perceptual_weight: float = 0.0  # weight of the MS-SSIM loss (losses.perceptual_loss); 0 = off
    # weight of the feature-matching loss in the run's domain classifier's activations
    # (losses.feature_matching_loss; labelled data, else it is off); 0 = off.
    # 0.3: on the built-in shapes 1.0 read a little better and 0.3 kept 1.5 dB more PSNR
    feature_weight: float = 0.3
    disc_weight: float = 0.0  # weight of the PatchGAN hinge loss (Esser et al. 2021); 0 = off
    disc_start: int = 50001  # step at which the discriminator switches on (LDM's value)
    disc_layers: int = 3  # stride-2 conv layers of the PatchGAN discriminator
    disc_channels: int = 64  # channels of the first discriminator layer (doubled per layer, max 8x)

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        if self.image_channels not in (1, 3):
            raise ConfigError(
                f"image_channels must be 1 (grayscale) or 3 (RGB), got {self.image_channels}"
            )
        if self.latent_channels < 1:
            raise ConfigError(f"latent_channels must be at least 1, got {self.latent_channels}")
        if not self.block_out_channels:
            raise ConfigError("block_out_channels is empty; give one channel count per level")
        if self.norm_groups < 1:
            raise ConfigError(f"norm_groups must be at least 1, got {self.norm_groups}")
        for i, ch in enumerate(self.block_out_channels):
            if ch < 1 or ch % self.norm_groups:
                raise ConfigError(
                    f"block_out_channels[{i}] = {ch} is not a positive multiple of norm_groups "
                    f"{self.norm_groups}; change the channels or norm_groups"
                )
        if self.layers_per_block < 1:
            raise ConfigError(f"layers_per_block must be at least 1, got {self.layers_per_block}")
        # upper bounds: a typo such as 10**12 layers would hang or exhaust memory
        for name, hi in (("latent_channels", 1024), ("layers_per_block", 16),
                         ("disc_layers", 8), ("disc_channels", 4096)):  # fmt: skip
            check_int(name, getattr(self, name), 1, hi)
        check_int("levels (len(block_out_channels))", len(self.block_out_channels), 1, 8)
        for i, ch in enumerate(self.block_out_channels):
            check_int(f"block_out_channels[{i}]", ch, 1, 16384)
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        f = self.downsample_factor
        if self.image_size < 1 or self.image_size % f:
            lower, upper = (self.image_size // f) * f, (self.image_size // f + 1) * f
            fix = f"use {lower} or {upper}" if lower > 0 else f"use {upper}"
            raise ConfigError(
                f"image_size {self.image_size} is not a multiple of the downsampling factor {f}; "
                f"{fix}"
            )
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ConfigError(
                f"scaling_factor must be a positive number (1 / std of the latents), "
                f"got {self.scaling_factor}"
            )
        for name in ("kl_weight", "perceptual_weight", "feature_weight", "disc_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a number >= 0 (0 switches it off), got {value}")
        if self.disc_start < 0:
            raise ConfigError(f"disc_start must be a step >= 0, got {self.disc_start}")
        if self.disc_layers < 1 or self.disc_channels < 1:
            raise ConfigError(
                f"disc_layers and disc_channels must be at least 1, got {self.disc_layers} and "
                f"{self.disc_channels}"
            )
        # Each stride-2 layer halves the side; the two stride-1 4x4 convs take 1 off each.
        if self.disc_weight > 0 and self.image_size // 2**self.disc_layers - 2 < 1:
            most = int(math.log2(self.image_size / 3)) if self.image_size >= 6 else 0
            fix = f"use disc_layers <= {most} or disc_weight = 0" if most else "use disc_weight = 0"
            raise ConfigError(
                f"disc_layers {self.disc_layers} shrinks a {self.image_size}x{self.image_size} "
                f"image to no patch at all; {fix}"
            )
        if self.perceptual_weight > 0 and self.image_size < SSIM_WINDOW:
            raise ConfigError(
                f"the MS-SSIM perceptual loss needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, "
                f"got image_size {self.image_size}; use perceptual_weight = 0"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


# ----------------------------------------------------------------------------------------------
# Blocks (no time embedding; the UNet has its own in layers.py)


def _group_norm(config: AutoencoderConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(config.norm_groups, channels, eps=config.norm_eps)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 shortcut when the channel count changes.

    Order as diffusers' ResnetBlock2D without time embedding and with dropout 0.
    """

    def __init__(self, config: AutoencoderConfig, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(config, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(config, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    checkpointing = False  # layers.set_gradient_checkpointing: recompute in the backward pass

    def forward(self, x: Tensor) -> Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Single-head self-attention over the h*w positions, with a GroupNorm in front and a residual.

    The channels are the head: softmax(Q K^T / sqrt(C)) V with Q, K, V linear maps of the
    normalised (B, h*w, C) tokens, as diffusers' Attention with `heads=1`, `dim_head=C`.
    """

    def __init__(self, config: AutoencoderConfig, channels: int) -> None:
        super().__init__()
        self.group_norm = _group_norm(config, channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.group_norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        q = self.to_q(tokens).unsqueeze(1)  # (B, 1, HW, C): one head
        k = self.to_k(tokens).unsqueeze(1)
        v = self.to_v(tokens).unsqueeze(1)
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C)
        out = self.to_out(a).transpose(1, 2).reshape(B, C, H, W)
        return x + out


class Downsample(nn.Module):
    """3x3 conv with stride 2 after padding one row/column at the bottom/right only.

    The asymmetric pad is LDM's (and diffusers' `padding=0` Downsample2D), so even sides halve
    exactly.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """One encoder level: `num_layers` resnets, then a downsampling conv unless it is the last."""

    def __init__(
        self,
        config: AutoencoderConfig,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        downsample: bool,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(config, in_channels if i == 0 else out_channels, out_channels)
            for i in range(num_layers)
        )
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class UpBlock(nn.Module):
    """One decoder level: `num_layers` resnets, then an upsampling conv unless it is the last."""

    def __init__(
        self,
        config: AutoencoderConfig,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        upsample: bool,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(config, in_channels if i == 0 else out_channels, out_channels)
            for i in range(num_layers)
        )
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsample is None else self.upsample(x)


class MidBlock(nn.Module):
    """resnet -> self-attention (optional) -> resnet, at the lowest resolution."""

    def __init__(self, config: AutoencoderConfig, channels: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(config, channels, channels) for _ in range(2))
        self.attention = Attention(config, channels) if config.mid_attention else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """x (B, C, H, W) -> moments (B, 2z, H/f, W/f), before `quant_conv`."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch = config.block_out_channels
        self.conv_in = nn.Conv2d(config.image_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(
                config,
                ch[max(i - 1, 0)],
                ch[i],
                num_layers=config.layers_per_block,
                downsample=i < len(ch) - 1,
            )
            for i in range(len(ch))
        )
        self.mid_block = MidBlock(config, ch[-1])
        self.conv_norm_out = _group_norm(config, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch[0], H, W)
        for block in self.down_blocks:
            h = block(h)  # (B, ch[-1], H/f, W/f) after the last level
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2z, H/f, W/f)


class Decoder(nn.Module):
    """z (B, z, h, w) -> x (B, C, h*f, w*f), after `post_quant_conv`."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        ch = tuple(reversed(config.block_out_channels))
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(config, ch[0])
        self.up_blocks = nn.ModuleList(
            UpBlock(
                config,
                ch[max(i - 1, 0)],
                ch[i],
                num_layers=config.layers_per_block + 1,
                upsample=i < len(ch) - 1,
            )
            for i in range(len(ch))
        )
        self.conv_norm_out = _group_norm(config, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], config.image_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, ch[-1], h, w)
        for block in self.up_blocks:
            h = block(h)  # (B, ch[0], H, W) after the last level
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, C, H, W)


# ----------------------------------------------------------------------------------------------
# The autoencoder


class Autoencoder(ModelFolder, nn.Module):
    """KL autoencoder: `encode(x) -> DiagonalGaussian`, `decode(z) -> x`.

    Images are in [-1, 1], (B, image_channels, H, W) with H and W multiples of f. Latents are the
    raw z; multiply by `config.scaling_factor` before handing them to the diffusion model, and
    divide before decoding its output.
    """

    config_class = AutoencoderConfig

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        if not isinstance(config, AutoencoderConfig):
            raise TypeError(
                f"Autoencoder takes an AutoencoderConfig, got {type(config).__name__}; "
                "build one with AutoencoderConfig(...) or ldmkit.config.from_dict"
            )
        self.config = config
        z = config.latent_channels
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.decoder = Decoder(config)

    # --- shapes ---

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def latent_shape(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int, int]:
        """(z, H/f, W/f) for an image of side `image_size` (default: config.image_size)."""
        size = self.config.image_size if image_size is None else image_size
        H, W = (size, size) if isinstance(size, int) else size
        f = self.downsample_factor
        if H % f or W % f:
            raise ValueError(
                f"image size {H}x{W} is not a multiple of the downsampling factor {f}; "
                f"crop or resize to {H // f * f or f}x{W // f * f or f}"
            )
        return (self.config.latent_channels, H // f, W // f)

    def _check_images(self, x: Tensor) -> None:
        C = self.config.image_channels
        if x.ndim != 4 or x.shape[1] != C:
            raise ValueError(f"encode expects images (B, {C}, H, W), got shape {tuple(x.shape)}")
        self.latent_shape((x.shape[2], x.shape[3]))

    # --- the model ---

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Posterior q(z | x) for images x (B, C, H, W) in [-1, 1]."""
        self._check_images(x)
        moments = self.quant_conv(self.encoder(x))  # (B, 2z, h, w)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: Tensor) -> Tensor:
        """Images (B, C, h*f, w*f) from unscaled latents z (B, z, h, w)."""
        zc = self.config.latent_channels
        if z.ndim != 4 or z.shape[1] != zc:
            raise ValueError(f"decode expects latents (B, {zc}, h, w), got shape {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self,
        x: Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct x through a posterior sample (or its mode); returns (recon, posterior).

        The sample's noise is drawn from `generator`, or is `noise` (latent-shaped) when given.
        """
        posterior = self.encode(x)
        z = posterior.sample(generator, noise=noise) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output conv weight: where Esser et al. 2021 balance the GAN gradient."""
        return self.decoder.conv_out.weight

    # --- bookkeeping ---

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def summary(self) -> str:
        c = self.config
        z, h, w = self.latent_shape()
        attention = "mid attention" if c.mid_attention else "no attention"
        return (
            f"Autoencoder f{self.downsample_factor}: {c.image_channels}x{c.image_size}x"
            f"{c.image_size} -> {z}x{h}x{w}, channels {list(c.block_out_channels)}, "
            f"{c.layers_per_block} layers/block, {attention}, "
            f"{self.num_parameters() / 1e6:.2f} M params, scaling_factor {c.scaling_factor:.5g}"
        )


# ----------------------------------------------------------------------------------------------
# Latent scaling


@torch.no_grad()
def measure_scaling_factor(
    autoencoder: Autoencoder,
    batches: Iterable[Tensor | Mapping[str, Any]],
    *,
    use: Literal["sample", "mode"] = "sample",
    generator: torch.Generator | None = None,
) -> float:
    """1 / std of the latents over `batches`: the value for `config.scaling_factor`.

    By default the std is taken over posterior *samples*, which are what latent diffusion trains
    on (LDM's `scale_by_std` encodes with `get_first_stage_encoding`, i.e. `.sample()`); with
    `use="mode"` it is over the posterior means. It is one scalar: the std of every latent
    element pooled together (around their common mean), accumulated in float64.

    Args:
        batches: images (B, C, H, W) in [-1, 1], or dicts with an "image" entry (as a DataLoader
            over an ldmkit ImageDataset yields). Each batch is moved to the autoencoder's device.
    """
    if use not in ("sample", "mode"):
        raise ValueError(f"use must be 'sample' or 'mode', got {use!r}")
    device = next(autoencoder.parameters()).device
    # Running count, mean and sum of squared deviations, merged batch by batch (Chan et al. 1979).
    n, mean, m2 = 0, 0.0, 0.0
    for batch in batches:
        x = batch["image"] if isinstance(batch, Mapping) else batch
        posterior = autoencoder.encode(x.to(device))
        z = (posterior.sample(generator) if use == "sample" else posterior.mode()).double()
        if z.numel() == 0:
            continue
        n_b, mean_b = z.numel(), z.mean().item()
        m2_b = (z - mean_b).square().sum().item()
        delta, n_new = mean_b - mean, n + n_b
        mean += delta * n_b / n_new
        m2 += m2_b + delta**2 * n * n_b / n_new
        n = n_new
    if n < 2:
        raise ValueError("measure_scaling_factor needs at least one non-empty batch of images")
    var = m2 / (n - 1)
    if not var > 0:
        raise ValueError("the latents have zero variance; is the autoencoder trained?")
    return 1.0 / math.sqrt(var)
