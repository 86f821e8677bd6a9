"""Building blocks shared by ldmkit's UNet (and usable by the autoencoder).

Sources: Ho et al. 2020 (DDPM UNet: sinusoidal time embedding, residual blocks with GroupNorm),
Dhariwal & Nichol 2021 (scale-shift time injection, "adaptive group norm"), Rombach et al. 2022
(Latent Diffusion: cross-attention SpatialTransformer, zero-initialised residual outputs) and
Vaswani et al. 2017 (attention). The order of operations, norms and eps values follow diffusers'
`ResnetBlock2D`, `Attention`, `Transformer2DModel` and `BasicTransformerBlock`, so that their
weights map onto these modules by renaming alone (see `ldmkit.interop.unet_names`).

Notation and shapes:

    B batch, C channels, H x W spatial size, N = H * W pixels as tokens,
    L context length, D context_dim, h heads, d head_dim (C = h * d).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

TimeInjection = Literal["add", "scale_shift"]

# GroupNorm eps of the cross-attention transformer: fixed at 1e-6 in both LDM (`Normalize`) and
# diffusers (`Transformer2DModel`), independent of the UNet's norm_eps.
TRANSFORMER_NORM_EPS = 1e-6
# LayerNorm eps inside BasicTransformerBlock (torch and diffusers default).
LAYER_NORM_EPS = 1e-5


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it (LDM `util.zero_module`)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(
    t: Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, sec. 3.5).

    With half = dim // 2 and frequencies w_i = max_period ** (-i / (half - freq_shift)),
    i = 0 .. half - 1, the embedding is [sin(t w), cos(t w)], or [cos(t w), sin(t w)] when
    `flip_sin_to_cos` (LDM and diffusers' default); an odd `dim` is padded with one zero.

    Args:
        t: (B,) integer or float timesteps.
    Returns:
        (B, dim) float32.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor (B,), got shape {tuple(t.shape)}")
    half = dim // 2
    # Same float32 op order as diffusers' get_timestep_embedding, so outputs agree bit for bit.
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None].float() * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb  # (B, dim)


class TimestepMLP(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal embedding (diffusers `TimestepEmbedding`)."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """Pre-activation residual block with time-embedding injection (DDPM; ADM for scale-shift).

    h = conv1(SiLU(GN(x))); then either h = GN(h + W t_emb)            ("add"), or
    h = GN(h) * (1 + scale) + shift with (scale, shift) = W t_emb        ("scale_shift");
    out = skip(x) + conv2(dropout(SiLU(h))), skip being a 1x1 conv when channels change.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_dim: int,
        *,
        norm_groups: int = 32,
        eps: float = 1e-5,
        dropout: float = 0.0,
        time_injection: TimeInjection = "add",
        zero_init: bool = True,
    ):
        super().__init__()
        self.time_injection = time_injection
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        n_time = 2 * out_channels if time_injection == "scale_shift" else out_channels
        self.time_proj = nn.Linear(temb_dim, n_time)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if zero_init:  # LDM: every residual branch starts at zero, so the block is the identity
            zero_module(self.conv2)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    checkpointing = False  # set_gradient_checkpointing: recompute in the backward pass

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """x: (B, C_in, H, W), temb: (B, temb_dim) -> (B, C_out, H, W)."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, temb, use_reentrant=False)
        return self._forward(x, temb)

    def _forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        t = self.time_proj(F.silu(temb))[:, :, None, None]  # (B, C_out or 2 C_out, 1, 1)
        if self.time_injection == "scale_shift":
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, cross-attention otherwise.

    softmax(Q K^T / sqrt(d)) V per head via `F.scaled_dot_product_attention`, then an output
    projection (LDM `CrossAttention`, diffusers `Attention` with `AttnProcessor2_0`).
    """

    def __init__(
        self,
        query_dim: int,
        *,
        context_dim: int | None = None,
        heads: int = 1,
        head_dim: int = 64,
        qkv_bias: bool = False,
        zero_init: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim if context_dim is not None else query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, query_dim)
        if zero_init:
            zero_module(self.to_out)

    def forward(
        self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """x: (B, N, query_dim), context: (B, L, context_dim) or None -> (B, N, query_dim).

        mask: bool (B, L), True for the keys to attend to (padding tokens False); None: all.
        """
        context = x if context is None else context
        B, N, _ = x.shape
        q = self.to_q(x).view(B, N, self.heads, -1).transpose(1, 2)  # (B, h, N, d)
        k = self.to_k(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, -1)  # (B, N, h d)
        return self.to_out(out)


class AttentionBlock(nn.Module):
    """Residual self-attention over the pixels of a feature map: x + Attn(GN(x)).

    The DDPM / ADM attention block, laid out like diffusers' `Attention` with a group norm
    (q, k and v carry biases there).
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        norm_groups: int = 32,
        eps: float = 1e-5,
        zero_init: bool = True,
    ):
        super().__init__()
        self.group_norm = nn.GroupNorm(norm_groups, channels, eps=eps)
        self.attn = Attention(
            channels, heads=heads, head_dim=channels // heads, qkv_bias=True, zero_init=zero_init
        )

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, N, C)
        h = self.attn(h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class FeedForward(nn.Module):
    """GEGLU feed-forward of the transformer block (Shazeer 2020): W2 (a * GELU(g)), [a, g] = W1 x."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.proj_in = nn.Linear(dim, 2 * inner)
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(a * F.gelu(gate))


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to context, GEGLU MLP.

    x = x + Attn1(LN(x)); x = x + Attn2(LN(x), context); x = x + FF(LN(x)) (LDM `attention.py`).
    """

    def __init__(self, dim: int, *, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn1 = Attention(dim, heads=heads, head_dim=head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn2 = Attention(dim, context_dim=context_dim, heads=heads, head_dim=head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """x: (B, N, dim), context: (B, L, context_dim), context_mask (B, L) -> (B, N, dim)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_mask)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """Cross-attention transformer on a feature map (LDM `SpatialTransformer`).

    GN -> proj_in -> `depth` BasicTransformerBlocks over the N = H * W pixel tokens -> proj_out,
    plus the input (diffusers `Transformer2DModel`). The projections are 1x1 convolutions, or
    linear layers on the tokens when `linear_projection` (Stable Diffusion 2).
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        context_dim: int,
        depth: int = 1,
        norm_groups: int = 32,
        linear_projection: bool = False,
        zero_init: bool = True,
    ):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(norm_groups, channels, eps=TRANSFORMER_NORM_EPS)
        if linear_projection:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        if zero_init:  # LDM: the whole transformer starts as the identity
            zero_module(self.proj_out)
        self.blocks = nn.ModuleList(
            BasicTransformerBlock(
                channels, heads=heads, head_dim=channels // heads, context_dim=context_dim
            )
            for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W), context: (B, L, context_dim), context_mask (B, L) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, N, C)
        if self.linear_projection:
            h = self.proj_in(h)
        for block in self.blocks:
            h = block(h, context, context_mask)
        if self.linear_projection:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
        if not self.linear_projection:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    """Strided 3x3 convolution halving H and W.

    `padding=1` pads symmetrically (LDM, diffusers' default); `padding=0` pads one pixel on the
    right and bottom only (the original DDPM/TF layout, diffusers `downsample_padding=0`).
    """

    def __init__(self, channels: int, *, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling by 2 followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def set_gradient_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Make every residual block of `model` (the UNet's and the autoencoder's) recompute its
    activations in the backward pass instead of keeping them (Chen et al. 2016): the memory of
    a training step drops to about that of the blocks' inputs, for one more forward of each.
    The outputs and gradients are the same. Returns the number of blocks switched."""
    blocks = [m for m in model.modules() if hasattr(type(m), "checkpointing")]
    for m in blocks:
        m.checkpointing = enabled
    return len(blocks)
