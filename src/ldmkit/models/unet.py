"""The denoising UNet of (latent) diffusion models, configured by one dataclass.

Sources: Ho et al. 2020 (DDPM UNet), Dhariwal & Nichol 2021 (ADM: attention at several
resolutions, scale-shift time injection, class embedding), Rombach et al. 2022 (LDM: cross-attention
to a context sequence), Ho & Salimans 2022 (classifier-free guidance: learned null label / context).

The network is laid out like diffusers' `UNet2DModel` (self-attention variant) and
`UNet2DConditionModel` (cross-attention variant, when `context_dim` is set): same operations in the
same order, same norms and eps, `num_res_blocks` resnets per down level and `num_res_blocks + 1` per
up level, skips concatenated as cat([h, skip]). `ldmkit.interop.unet_names` maps their parameter
names onto ours. The UNet does not interpret its output; `config.prediction_type` tells the
diffusion code whether it is eps, x0 or v.

Shapes: x (B, in_channels, H, W), t (B,) or scalar, class_labels long (B,), context (B, L, D).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldmkit.checkpoint import ModelFolder
from ldmkit.config import ConfigError, check_int
from ldmkit.diffusion.process import PredictionType
from ldmkit.models.layers import (
    AttentionBlock,
    Downsample,
    ResnetBlock,
    SpatialTransformer,
    TimeInjection,
    TimestepMLP,
    Upsample,
    timestep_embedding,
    zero_module,
)

logger = logging.getLogger(__name__)


GUIDANCE_EMBED_SCALE = 100.0  # w in 1..10 -> 100..1000: the range of t's embedding


@dataclass
class UNetConfig:
    """Architecture of a `UNet`. The defaults are the UNet `ldmkit train` trains (ldmkit.recipe)
    on 16x16x4 latents: 3 levels (16, 8, 4), one res block each, attention at 4 and in the middle.

    Chosen for quality per CPU-minute (issue notes): one res block per level runs 1.5x the
    images/s of two (the small latent UNet is bound by per-op overhead); scale-shift time and class
    injection (AdaGN, Dhariwal & Nichol 2021) doubled the share of samples a classifier assigns to
    the requested class in 10 CPU-minutes (0.21 -> 0.41 without guidance) at no cost in speed;
    v-prediction (Salimans & Ho 2022): 500 steps of eps-prediction gave noise-like samples (its x0
    estimate at high noise amplifies eps errors by 1/sqrt(alpha_bar)), v clean objects. Widths
    (32, 64, 64), not (32, 64, 128) (issue 25, bench/unet_recipe.py): in the same 430 CPU-seconds
    on the shapes the thinner UNet ran 1.4x the steps and drew the class asked for in 95-97 % of
    samples against 92-94 %, FID-cnn 1.7-2.1 against 3.7-4.5; wider or deeper UNets lost.

    `out_channels` and `time_embed_dim` left as None are filled in on construction, so they are
    explicit in config.json; `dataclasses.replace(cfg, in_channels=1)` therefore keeps the old
    out_channels: pass out_channels too.
    """

    sample_size: int = 16  # H = W of the inputs; places attention and checks divisibility
    in_channels: int = 4  # 4 for SD-style latents, 1 or 3 for pixels (f = 1)
    out_channels: int | None = None  # None: same as in_channels (filled in)
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # channels per level (LDM: ch * mult)
    num_res_blocks: int = 1  # resnets per down level, up levels get one more (layers_per_block)
    attention_resolutions: tuple[int, ...] = (4,)  # spatial sizes with attention (<= sample_size)
    mid_attention: bool = True  # attention between the two middle resnets
    head_dim: int | None = 32  # channels per head; exactly one of head_dim and num_heads is set
    num_heads: int | None = None  # fixed number of heads at every resolution (LDM num_heads)
    context_dim: int | None = None  # D of a context (B, L, D): attention becomes cross-attention
    # also add the context's masked mean, projected, to the time embedding (Imagen, Saharia et al.
    # 2022, Sec. 2.4): a global path for the prompt beside cross-attention (no diffusers twin)
    pooled_context: bool = False
    transformer_depth: int = 1  # BasicTransformerBlocks per SpatialTransformer (context only)
    use_linear_projection: bool = False  # transformer proj_in/out: Linear (SD 2), not 1x1 conv
    num_classes: int | None = None  # class-conditional; label num_classes is the learned null label
    time_embed_dim: int | None = None  # None: 4 * block_out_channels[0] (filled in)
    time_injection: TimeInjection = "scale_shift"  # ADM's GN(h)(1 + s) + b; "add": DDPM/LDM
    dropout: float = 0.0  # in every resnet, before its second conv
    norm_num_groups: int = 16  # GroupNorm groups everywhere
    norm_eps: float = 1e-5  # GroupNorm eps of resnets and self-attention (diffusers norm_eps)
    flip_sin_to_cos: bool = True  # time embedding [cos, sin] (LDM, diffusers); DDPM: [sin, cos]
    freq_shift: int = 0  # frequencies max_period ** (-i / (half - freq_shift)); DDPM uses 1
    downsample_padding: int = 1  # 1: symmetric; 0: pad right/bottom only (DDPM); see Downsample
    zero_init_residual: bool = True  # LDM: residual convs / attention outputs start at zero
    prediction_type: PredictionType = "v"  # what the network predicts; not used by the UNet
    # the classifier-free guidance scale w as an input (`forward(..., guidance=)`), embedded like
    # t and added to the time embedding (Meng et al. 2023): a distilled student that serves every
    # scale in one call. Its last layer starts at zero: the UNet starts as the one without it
    guidance_input: bool = False

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        self.attention_resolutions = tuple(self.attention_resolutions)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.time_embed_dim is None and self.block_out_channels:
            self.time_embed_dim = 4 * self.block_out_channels[0]
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(msg)

        if not self.block_out_channels:
            fail("block_out_channels is empty; give at least one level, e.g. (128, 256, 256)")
        for name in ("sample_size", "in_channels", "out_channels", "num_res_blocks"):
            if getattr(self, name) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.transformer_depth < 1 or self.time_embed_dim < 1:
            fail("transformer_depth and time_embed_dim must be >= 1")
        check_int("norm_num_groups", self.norm_num_groups, 1, 1024)
        for i, ch in enumerate(self.block_out_channels):
            check_int(f"block_out_channels[{i}]", ch, 1, 16384)
            if ch % self.norm_num_groups:
                fail(
                    f"norm_num_groups={self.norm_num_groups} does not divide block channel count "
                    f"{ch}; use channels that are multiples of it or fewer groups"
                )
        if self.prediction_type not in ("eps", "x0", "v"):
            fail(f"prediction_type must be 'eps', 'x0' or 'v', got {self.prediction_type!r}")
        if self.time_injection not in ("add", "scale_shift"):
            fail(f"time_injection must be 'add' or 'scale_shift', got {self.time_injection!r}")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            fail(f"norm_eps must be positive, got {self.norm_eps}")
        if self.downsample_padding not in (0, 1):
            fail(f"downsample_padding must be 0 or 1, got {self.downsample_padding}")
        if self.num_classes is not None and self.num_classes < 1:
            fail(f"num_classes must be >= 1 or None, got {self.num_classes}")
        if self.context_dim is not None and self.context_dim < 1:
            fail(f"context_dim must be >= 1 or None, got {self.context_dim}")
        if self.pooled_context and self.context_dim is None:
            fail("pooled_context needs a context_dim (a text-conditional UNet)")
        # upper bounds: a typo such as 10**12 blocks would hang or exhaust memory; the largest
        # diffusers UNets (SDXL: 1280 channels, transformer depth 10, context 2048) fit inside
        limits = {"sample_size": 1024, "in_channels": 1024, "out_channels": 1024,
                  "num_res_blocks": 16, "transformer_depth": 64, "time_embed_dim": 65536,
                  "num_classes": 1_000_000, "context_dim": 65536, "head_dim": 4096,
                  "num_heads": 4096}  # fmt: skip
        for name, hi in limits.items():
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1, hi)
        check_int("levels (len(block_out_channels))", len(self.block_out_channels), 1, 8)
        check_int("freq_shift", self.freq_shift, 0, 1)

        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.sample_size % factor:
            fail(
                f"sample_size {self.sample_size} is not divisible by 2**(levels-1) = {factor}; "
                "use a multiple of it or fewer levels"
            )
        reached = self.resolutions
        for r in self.attention_resolutions:
            if r not in reached:
                fail(
                    f"attention resolution {r} is not a resolution the UNet reaches; "
                    f"it reaches {', '.join(map(str, reached))}"
                )

        if (self.head_dim is None) == (self.num_heads is None):
            fail("set exactly one of head_dim and num_heads (the other to None)")
        attn_channels = [
            (ch, res)
            for ch, res in zip(self.block_out_channels, reached)
            if res in self.attention_resolutions
        ]
        if self.mid_attention:
            attn_channels.append((self.block_out_channels[-1], "mid"))
        for ch, where in attn_channels:
            per = self.head_dim if self.head_dim is not None else self.num_heads
            name = "head_dim" if self.head_dim is not None else "num_heads"
            if per < 1 or ch % per:
                fail(
                    f"{name} {per} does not divide the {ch} channels of the attention at "
                    f"resolution {where}; choose a divisor of {ch}"
                )

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Spatial size of each level for inputs of sample_size, e.g. (32, 16, 8)."""
        return tuple(self.sample_size // 2**i for i in range(len(self.block_out_channels)))

    def heads(self, channels: int) -> int:
        """Number of attention heads at a level of `channels` channels."""
        return self.num_heads if self.num_heads is not None else channels // self.head_dim


def _attention(cfg: UNetConfig, channels: int) -> nn.Module:
    """Self-attention block, or a cross-attention SpatialTransformer when context_dim is set."""
    if cfg.context_dim is None:
        return AttentionBlock(
            channels,
            heads=cfg.heads(channels),
            norm_groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            zero_init=cfg.zero_init_residual,
        )
    return SpatialTransformer(
        channels,
        heads=cfg.heads(channels),
        context_dim=cfg.context_dim,
        depth=cfg.transformer_depth,
        norm_groups=cfg.norm_num_groups,
        linear_projection=cfg.use_linear_projection,
        zero_init=cfg.zero_init_residual,
    )


def _resnet(cfg: UNetConfig, in_ch: int, out_ch: int) -> ResnetBlock:
    return ResnetBlock(
        in_ch,
        out_ch,
        cfg.time_embed_dim,
        norm_groups=cfg.norm_num_groups,
        eps=cfg.norm_eps,
        dropout=cfg.dropout,
        time_injection=cfg.time_injection,
        zero_init=cfg.zero_init_residual,
    )


def pool_context(context: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of the context tokens (B, L, D) -> (B, D), over the unmasked ones when a mask is given."""
    if mask is None:
        return context.mean(dim=1)
    w = mask.to(context.dtype)[..., None]  # (B, L, 1)
    return (context * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)


def _attend(block: nn.Module, h: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
    # Route the context only to the blocks that take it (LDM's TimestepEmbedSequential).
    return block(h, context, mask) if isinstance(block, SpatialTransformer) else block(h)


class DownLevel(nn.Module):
    """num_res_blocks x (resnet [-> attention]), then an optional downsample.

    diffusers: DownBlock2D / AttnDownBlock2D / CrossAttnDownBlock2D.
    """

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, *, attn: bool, down: bool):
        super().__init__()
        n = cfg.num_res_blocks
        self.resnets = nn.ModuleList(
            _resnet(cfg, in_ch if i == 0 else out_ch, out_ch) for i in range(n)
        )
        self.attentions = nn.ModuleList(_attention(cfg, out_ch) for _ in range(n) if attn)
        self.downsample = Downsample(out_ch, padding=cfg.downsample_padding) if down else None

    def forward(
        self, h: Tensor, temb: Tensor, context: Tensor | None, mask: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, temb)
            if self.attentions:
                h = _attend(self.attentions[i], h, context, mask)
            skips.append(h)
        if self.downsample is not None:
            h = self.downsample(h)
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """resnet -> [attention] -> resnet at the lowest resolution (diffusers UNetMidBlock2D*)."""

    def __init__(self, cfg: UNetConfig, channels: int):
        super().__init__()
        self.resnet_1 = _resnet(cfg, channels, channels)
        self.attention = _attention(cfg, channels) if cfg.mid_attention else None
        self.resnet_2 = _resnet(cfg, channels, channels)

    def forward(
        self, h: Tensor, temb: Tensor, context: Tensor | None, mask: Tensor | None = None
    ) -> Tensor:
        h = self.resnet_1(h, temb)
        if self.attention is not None:
            h = _attend(self.attention, h, context, mask)
        return self.resnet_2(h, temb)


class UpLevel(nn.Module):
    """(num_res_blocks + 1) x (cat skip -> resnet [-> attention]), then an optional upsample.

    diffusers: UpBlock2D / AttnUpBlock2D / CrossAttnUpBlock2D.
    """

    def __init__(
        self, cfg: UNetConfig, in_ch: int, skip_chs: list[int], out_ch: int, *, attn: bool, up: bool
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(cfg, (in_ch if i == 0 else out_ch) + s, out_ch) for i, s in enumerate(skip_chs)
        )
        self.attentions = nn.ModuleList(_attention(cfg, out_ch) for _ in skip_chs if attn)
        self.upsample = Upsample(out_ch) if up else None

    def forward(
        self,
        h: Tensor,
        skips: list[Tensor],
        temb: Tensor,
        context: Tensor | None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Consumes len(self.resnets) tensors from the end of `skips` (in place)."""
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C_h + C_skip, H, W)
            h = resnet(h, temb)
            if self.attentions:
                h = _attend(self.attentions[i], h, context, mask)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class UNet(ModelFolder, nn.Module):
    """Denoising UNet: `forward(x, t, *, class_labels=None, context=None) -> (B, out_channels, H, W)`.

    - `t`: integer or fractional timesteps, a number, a 0-d tensor or a (B,) tensor.
    - `class_labels`: long (B,) in [0, num_classes]; num_classes (or None for the whole batch)
      selects the learned null label for classifier-free guidance.
    - `context`: (B, L, context_dim); None selects the learned null context. The null context is
      one token: attending to L copies of it gives the same result, see `get_null_context`.
    - `context_mask`: bool (B, L), True for the context tokens to attend to (False for padding);
      None attends to all. With it, padding a prompt further leaves the output unchanged.
    """

    config_class = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet takes a UNetConfig, got {type(config).__name__}")
        self.config = cfg = config
        chs = cfg.block_out_channels
        levels = len(chs)

        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embed = TimestepMLP(chs[0], cfg.time_embed_dim)
        self.class_embed = (
            nn.Embedding(cfg.num_classes + 1, cfg.time_embed_dim) if cfg.num_classes else None
        )
        self.null_context = (
            nn.Parameter(torch.randn(1, cfg.context_dim)) if cfg.context_dim is not None else None
        )
        self.context_embed = (
            nn.Linear(cfg.context_dim, cfg.time_embed_dim) if cfg.pooled_context else None
        )
        self.guidance_embed = None
        if cfg.guidance_input:
            self.guidance_embed = TimestepMLP(chs[0], cfg.time_embed_dim)
            zero_module(self.guidance_embed.linear_2)

        # Down path: record the channels of every tensor pushed on the skip stack.
        skip_chs = [chs[0]]
        self.down_levels = nn.ModuleList()
        ch = chs[0]
        for i, (out_ch, res) in enumerate(zip(chs, cfg.resolutions)):
            down = i < levels - 1
            level = DownLevel(cfg, ch, out_ch, attn=res in cfg.attention_resolutions, down=down)
            self.down_levels.append(level)
            skip_chs += [out_ch] * (cfg.num_res_blocks + down)
            ch = out_ch

        self.mid = MidBlock(cfg, ch)

        # Up path: the mirror image, popping num_res_blocks + 1 skips per level.
        self.up_levels = nn.ModuleList()
        for i in reversed(range(levels)):
            out_ch, res = chs[i], cfg.resolutions[i]
            pops = [skip_chs.pop() for _ in range(cfg.num_res_blocks + 1)]
            level = UpLevel(cfg, ch, pops, out_ch, attn=res in cfg.attention_resolutions, up=i > 0)
            self.up_levels.append(level)
            ch = out_ch
        assert not skip_chs, "every skip connection must be consumed"

        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, ch, eps=cfg.norm_eps)
        self.conv_out = zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    # ---------------------------------------------------------------- forward

    def forward(
        self,
        x: Tensor,
        t: Tensor | float | int,
        *,
        class_labels: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        cfg = self.config
        B, _, H, W = x.shape
        self._check_inputs(x, class_labels, context, context_mask)
        if (guidance is None) == (self.guidance_embed is not None):
            raise ValueError(
                "this UNet takes the guidance scale as an input: pass guidance=(B,) scales"
                if guidance is None
                else "this UNet has no guidance input; guide it with classifier-free guidance"
            )

        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or of shape ({B},), got {tuple(t.shape)}")
        temb = timestep_embedding(
            t,
            cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        )
        temb = self.time_embed(temb.to(x.dtype))  # (B, time_embed_dim)
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((B,), cfg.num_classes, dtype=torch.long, device=x.device)
            temb = temb + self.class_embed(class_labels)
        if self.null_context is not None and context is None:
            context, context_mask = self.get_null_context(B), None
        if self.context_embed is not None:
            temb = temb + self.context_embed(pool_context(context, context_mask))
        if self.guidance_embed is not None:
            g = torch.as_tensor(guidance, device=x.device, dtype=torch.float32).expand(B)
            gemb = timestep_embedding(
                g * GUIDANCE_EMBED_SCALE, cfg.block_out_channels[0],
                flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
            )  # fmt: skip
            temb = temb + self.guidance_embed(gemb.to(x.dtype))

        h = self.conv_in(x)
        skips = [h]
        for level in self.down_levels:
            h, level_skips = level(h, temb, context, context_mask)
            skips += level_skips
        h = self.mid(h, temb, context, context_mask)
        for level in self.up_levels:
            h = level(h, skips, temb, context, context_mask)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))  # (B, out_channels, H, W)

    def _check_inputs(
        self, x: Tensor, class_labels: Tensor | None, context: Tensor | None, mask: Tensor | None
    ) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"x must be (B, {cfg.in_channels}, H, W) for this UNet, got {tuple(x.shape)}"
            )
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"H and W must be multiples of {factor} for {len(cfg.block_out_channels)} levels, "
                f"got {x.shape[2]}x{x.shape[3]}"
            )
        B = x.shape[0]
        if class_labels is not None:
            if self.class_embed is None:
                raise ValueError("class_labels given but the UNet has no num_classes; drop them")
            if class_labels.shape != (B,) or class_labels.dtype != torch.long:
                raise ValueError(
                    f"class_labels must be a long tensor of shape ({B},), got "
                    f"{class_labels.dtype} {tuple(class_labels.shape)}"
                )
        if context is not None:
            if cfg.context_dim is None:
                raise ValueError("context given but the UNet has no context_dim; drop it")
            if context.ndim != 3 or context.shape[0] != B or context.shape[2] != cfg.context_dim:
                raise ValueError(
                    f"context must be ({B}, L, {cfg.context_dim}), got {tuple(context.shape)}"
                )
        if mask is not None:
            if context is None or mask.shape != context.shape[:2] or mask.dtype != torch.bool:
                raise ValueError(
                    "context_mask must be a bool tensor (B, L) matching the context (True = attend), "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )

    def get_null_context(self, batch_size: int, length: int = 1) -> Tensor:
        """The learned null context as (batch_size, length, context_dim), e.g. for CFG dropout."""
        if self.null_context is None:
            raise ValueError("this UNet has no cross-attention (context_dim is None)")
        return self.null_context[None].expand(batch_size, length, -1)

    # ---------------------------------------------------------------- info

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def summary(self) -> str:
        """One line: parameters, levels, attention and conditioning."""
        cfg = self.config
        attn = ", ".join(str(r) for r in cfg.attention_resolutions) or "none"
        if cfg.mid_attention:
            attn += " + mid"
        cond = []
        if cfg.num_classes:
            cond.append(f"{cfg.num_classes} classes")
        if cfg.context_dim is not None:
            cond.append(f"context dim {cfg.context_dim}")
        heads = f"head_dim {cfg.head_dim}" if cfg.head_dim else f"{cfg.num_heads} heads"
        return (
            f"UNet: {self.num_parameters() / 1e6:.2f} M params, {cfg.in_channels}->{cfg.out_channels} "
            f"channels at {cfg.sample_size}x{cfg.sample_size}, {len(cfg.block_out_channels)} levels "
            f"{cfg.block_out_channels} x {cfg.num_res_blocks} res blocks, "
            f"{'cross-' if cfg.context_dim else 'self-'}attention at {attn} ({heads}), "
            f"conditioning: {', '.join(cond) or 'none'}, predicts {cfg.prediction_type}"
        )

    # ---------------------------------------------------------------- persistence


def widen_input(unet: UNet, extra: int) -> UNet:
    """A copy of `unet` that takes `extra` more input channels (appended after the latent), with
    zero weights on them: before any training it computes exactly what `unet` does, whatever
    the extra channels hold. How a generation model becomes the start of an inpainting model
    (the mask and the masked latent as extra inputs, Rombach et al. 2022 Sec. 4.5)."""
    cfg = dataclasses.replace(
        unet.config,
        in_channels=unet.config.in_channels + extra,
        out_channels=unet.config.out_channels,
    )
    wide = UNet(cfg).to(unet.conv_in.weight.device)
    state = unet.state_dict()
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat(
        [weight, weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])], dim=1
    )
    wide.load_state_dict(state)
    return wide
