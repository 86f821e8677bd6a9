"""The correspondence between ldmkit's UNet and diffusers' UNet2DModel / UNet2DConditionModel.

Two tables: `UNET_NAME_RULES` rewrites an ldmkit parameter name into the diffusers name of the
same tensor (shapes and values are identical, nothing is transposed or split), and
`diffusers_unet_config` gives the diffusers constructor arguments of an ldmkit `UNetConfig`.
ldmkit-only tensors (`null_context`, the learned null context of classifier-free guidance) are
listed in `LDMKIT_ONLY`; diffusers has no counterpart for them.

This module imports nothing from diffusers; tests and converters do that themselves.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from ldmkit.checkpoint import CheckpointError
from ldmkit.config import ConfigError
from ldmkit.models.unet import UNetConfig

# (ldmkit regex, diffusers replacement), applied in this order to every parameter name.
UNET_NAME_RULES: tuple[tuple[str, str], ...] = (
    # UNet level
    (r"^time_embed\.", "time_embedding."),
    (r"^class_embed\.", "class_embedding."),
    (r"^down_levels\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0."),
    (r"^down_levels\.", "down_blocks."),
    (r"^mid\.resnet_1\.", "mid_block.resnets.0."),
    (r"^mid\.resnet_2\.", "mid_block.resnets.1."),
    (r"^mid\.attention\.", "mid_block.attentions.0."),
    (r"^up_levels\.(\d+)\.upsample\.", r"up_blocks.\1.upsamplers.0."),
    (r"^up_levels\.", "up_blocks."),
    (r"^norm_out\.", "conv_norm_out."),
    # ResnetBlock -> ResnetBlock2D
    (r"\.time_proj\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    # AttentionBlock (group_norm + attn) -> one Attention with group_norm; to_out is [Linear, Dropout]
    (r"\.attn\.to_out\.", ".to_out.0."),
    (r"\.attn\.", "."),
    # SpatialTransformer -> Transformer2DModel, BasicTransformerBlock, FeedForward(GEGLU)
    (r"\.blocks\.", ".transformer_blocks."),
    (r"\.(attn[12])\.to_out\.", r".\1.to_out.0."),
    (r"\.ff\.proj_in\.", ".ff.net.0.proj."),
    (r"\.ff\.proj_out\.", ".ff.net.2."),
)

LDMKIT_ONLY: tuple[str, ...] = ("null_context",)


def to_diffusers_name(name: str) -> str:
    """The diffusers name of the ldmkit UNet parameter `name`."""
    for pattern, replacement in UNET_NAME_RULES:
        name = re.sub(pattern, replacement, name)
    return name


def load_diffusers_unet_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy a diffusers UNet state_dict into an ldmkit `UNet`, refusing any name or shape mismatch.

    ldmkit-only tensors keep their current values.
    """
    own = model.state_dict()
    names = {to_diffusers_name(k): k for k in own if k not in LDMKIT_ONLY}
    missing = sorted(set(names) - set(state))
    unexpected = sorted(set(state) - set(names))
    if missing or unexpected:
        raise CheckpointError(
            f"diffusers UNet weights do not match the ldmkit config: {len(missing)} missing "
            f"(e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})"
        )
    ours = {names[k]: v for k, v in state.items()}
    for k in LDMKIT_ONLY:
        if k in own:
            ours[k] = own[k]
    for k, v in ours.items():
        if v.shape != own[k].shape:
            raise CheckpointError(
                f"{k}: diffusers shape {tuple(v.shape)} != ldmkit {tuple(own[k].shape)}"
            )
    model.load_state_dict(ours, strict=True)


def diffusers_unet_config(cfg: UNetConfig) -> tuple[str, dict[str, Any]]:
    """(diffusers class name, constructor kwargs) of the diffusers UNet equal to `cfg`."""
    attn = [r in cfg.attention_resolutions for r in cfg.resolutions]
    kwargs: dict[str, Any] = dict(
        sample_size=cfg.sample_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_num_groups,
        norm_eps=cfg.norm_eps,
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=cfg.freq_shift,
        downsample_padding=cfg.downsample_padding,
        dropout=cfg.dropout,
        act_fn="silu",
        time_embedding_dim=cfg.time_embed_dim,
        resnet_time_scale_shift="scale_shift" if cfg.time_injection == "scale_shift" else "default",
        num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None,
    )
    if cfg.context_dim is None:
        kwargs["down_block_types"] = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
        kwargs["up_block_types"] = tuple(
            "AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)
        )
        kwargs["add_attention"] = cfg.mid_attention
        # diffusers drops the mid attention's GroupNorm under scale_shift unless this is set.
        kwargs["attn_norm_num_groups"] = cfg.norm_num_groups
        if cfg.head_dim is not None:
            kwargs["attention_head_dim"] = cfg.head_dim
        elif cfg.num_heads == 1:
            kwargs["attention_head_dim"] = None  # one head of all channels
        else:
            chs = {c for c, a in zip(cfg.block_out_channels, attn) if a}
            if cfg.mid_attention:
                chs.add(cfg.block_out_channels[-1])
            if len(chs) > 1:
                raise ConfigError(
                    f"UNet2DModel has one head_dim for all levels; num_heads={cfg.num_heads} over "
                    f"channels {sorted(chs)} has none; use head_dim instead"
                )
            kwargs["attention_head_dim"] = chs.pop() // cfg.num_heads if chs else None
        return "UNet2DModel", kwargs

    kwargs["down_block_types"] = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    kwargs["up_block_types"] = tuple(
        "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)
    )
    kwargs["mid_block_type"] = "UNetMidBlock2DCrossAttn" if cfg.mid_attention else "UNetMidBlock2D"
    kwargs["cross_attention_dim"] = cfg.context_dim
    kwargs["transformer_layers_per_block"] = cfg.transformer_depth
    kwargs["use_linear_projection"] = cfg.use_linear_projection
    # UNet2DConditionModel's `attention_head_dim` is, for legacy reasons, the number of heads.
    kwargs["attention_head_dim"] = tuple(max(1, cfg.heads(c)) for c in cfg.block_out_channels)
    return "UNet2DConditionModel", kwargs
