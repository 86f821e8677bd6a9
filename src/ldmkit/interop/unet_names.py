"""The correspondence between ldmkit's UNet and diffusers' UNet2DModel / UNet2DConditionModel.

Two tables: `UNET_NAME_RULES` rewrites an ldmkit parameter name into the diffusers name of the
same tensor (shapes and values are identical, nothing is transposed or split), and
`diffusers_unet_config` gives the diffusers constructor arguments of an ldmkit `UNetConfig`;
`unet_config_from_diffusers` reads a diffusers `config.json` back, refusing every option it
cannot reproduce. ldmkit-only tensors (`null_context`, the learned null context of
classifier-free guidance) are listed in `LDMKIT_ONLY`; diffusers has no counterpart for them.

This module imports nothing from diffusers; tests and converters do that themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NoReturn

from torch import Tensor, nn

from ldmkit.checkpoint import CheckpointError
from ldmkit.config import ConfigError
from ldmkit.diffusion.process import PredictionType
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


def state_dict_to_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an ldmkit UNet state_dict to diffusers names, leaving out `LDMKIT_ONLY` tensors."""
    return {to_diffusers_name(k): v for k, v in state.items() if k not in LDMKIT_ONLY}


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
    if cfg.pooled_context:
        raise ConfigError(
            "pooled_context (the prompt's mean added to the time embedding) has no diffusers "
            "equivalent; a text-conditional run cannot be exported"
        )
    if cfg.guidance_input:
        raise ConfigError(
            "guidance_input (a distilled student's guidance-scale embedding) has no diffusers "
            "equivalent; export the teacher, or a student distilled at a fixed scale"
        )
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


# ---------------------------------------------------------------- diffusers config -> UNetConfig

# Constructor defaults of the diffusers classes (0.30 - 0.42): a key missing from a config.json
# takes these values, as diffusers' own from_pretrained does.
_UNET2D_DEFAULTS: dict[str, Any] = dict(
    sample_size=None,
    in_channels=3,
    out_channels=3,
    center_input_sample=False,
    time_embedding_type="positional",
    time_embedding_dim=None,
    freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896),
    layers_per_block=2,
    mid_block_scale_factor=1,
    downsample_padding=1,
    downsample_type="conv",
    upsample_type="conv",
    dropout=0.0,
    act_fn="silu",
    attention_head_dim=8,
    norm_num_groups=32,
    attn_norm_num_groups=None,
    norm_eps=1e-5,
    resnet_time_scale_shift="default",
    add_attention=True,
    class_embed_type=None,
    num_class_embeds=None,
    num_train_timesteps=None,
)
_UNET2D_CONDITION_DEFAULTS: dict[str, Any] = dict(
    sample_size=None,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    dropout=0.0,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=1280,
    transformer_layers_per_block=1,
    reverse_transformer_layers_per_block=None,
    encoder_hid_dim=None,
    encoder_hid_dim_type=None,
    attention_head_dim=8,
    num_attention_heads=None,
    dual_cross_attention=False,
    use_linear_projection=False,
    class_embed_type=None,
    addition_embed_type=None,
    addition_time_embed_dim=None,
    num_class_embeds=None,
    upcast_attention=False,
    resnet_time_scale_shift="default",
    resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0,
    time_embedding_type="positional",
    time_embedding_dim=None,
    time_embedding_act_fn=None,
    timestep_post_act=None,
    time_cond_proj_dim=None,
    conv_in_kernel=3,
    conv_out_kernel=3,
    projection_class_embeddings_input_dim=None,
    attention_type="default",
    class_embeddings_concat=False,
    mid_block_only_cross_attention=None,
    cross_attention_norm=None,
    addition_embed_type_num_heads=64,
)

# Options whose only value ldmkit reproduces (one tuple lists every accepted spelling).
_UNET_FIXED: dict[str, tuple[Any, ...]] = dict(
    center_input_sample=(False,),
    time_embedding_type=("positional",),
    mid_block_scale_factor=(1,),
    downsample_type=("conv",),
    upsample_type=("conv",),
    act_fn=("silu",),
    class_embed_type=(None,),
    only_cross_attention=(False,),
    reverse_transformer_layers_per_block=(None,),
    encoder_hid_dim=(None,),
    encoder_hid_dim_type=(None,),
    dual_cross_attention=(False,),
    addition_embed_type=(None,),
    addition_time_embed_dim=(None,),
    resnet_skip_time_act=(False,),
    resnet_out_scale_factor=(1.0,),
    time_embedding_act_fn=(None,),
    timestep_post_act=(None,),
    time_cond_proj_dim=(None,),
    conv_in_kernel=(3,),
    conv_out_kernel=(3,),
    projection_class_embeddings_input_dim=(None,),
    attention_type=("default",),
    class_embeddings_concat=(False,),
    mid_block_only_cross_attention=(None, False),
    cross_attention_norm=(None,),
)
# Read but without effect on the network ldmkit builds:
#   num_train_timesteps            only sizes the "learned" time embedding, refused above
#   upcast_attention               fp16 precision hint; float32 attention is the same maths
#   addition_embed_type_num_heads  only used with addition_embed_type, refused above
_UNET_NO_EFFECT = {"num_train_timesteps", "upcast_attention", "addition_embed_type_num_heads"}


def _fail(option: str, value: Any, supported: str) -> NoReturn:
    raise ConfigError(f"diffusers UNet option {option}={value!r} is not supported; {supported}")


def _all_equal(option: str, value: Any, levels: int) -> Any:
    """A per-level option given as one value or a list of equal values -> the one value."""
    if isinstance(value, (list, tuple)):
        if len(value) != levels or len(set(map(str, value))) != 1:
            _fail(option, value, "ldmkit needs one value for every level")
        return value[0]
    return value


def unet_config_from_diffusers(
    cfg: dict[str, Any],
    *,
    sample_size: int | None = None,
    prediction_type: PredictionType = "eps",
) -> UNetConfig:
    """UNetConfig of a diffusers UNet2DModel / UNet2DConditionModel `config.json` dict.

    Args:
        cfg: the config dict; keys starting with "_" are bookkeeping and ignored.
        sample_size: used when the config has no sample_size (it places attention by resolution).
        prediction_type: "eps", "x0" or "v" (diffusers keeps it in the scheduler, not the UNet).

    Every architecture field is set from the diffusers config (or diffusers' constructor
    default): ldmkit's own defaults are its training recipe's UNet, not diffusers'. A class
    embedding of K rows becomes num_classes = K plus a zero null row (diffusers has no "no
    label"), so every diffusers label keeps its meaning. Raises ConfigError naming the first
    option ldmkit cannot reproduce.
    """
    cls = _unet_class(cfg.get("_class_name"))
    opts = _options_with_defaults(cfg, cls)
    channels = tuple(opts["block_out_channels"])
    attn = _attention_levels(opts, cls, len(channels))
    size = _side_length(opts["sample_size"], sample_size, cls.name)
    resolutions = [size // 2**i for i in range(len(channels))]
    fields: dict[str, Any] = dict(
        sample_size=size,
        in_channels=opts["in_channels"],
        out_channels=opts["out_channels"],
        block_out_channels=channels,
        attention_resolutions=tuple(r for r, a in zip(resolutions, attn) if a),
        **_resnet_fields(opts),
        **_time_and_class_fields(opts),
        prediction_type=prediction_type,
        guidance_input=False,  # diffusers has no guidance-scale input (ldmkit's students)
    )
    if cls.name == "UNet2DModel":
        fields.update(_self_attention_fields(opts))
    else:
        fields.update(_cross_attention_fields(opts, channels, attn))
    try:
        return UNetConfig(**fields)
    except ConfigError as e:
        raise ConfigError(
            f"diffusers {cls.name} config gives an invalid ldmkit UNet: {e}"
        ) from None


@dataclass(frozen=True)
class _UNetClass:
    """What ldmkit reads differently in the two diffusers UNet classes."""

    name: str
    defaults: dict[str, Any]  # constructor defaults
    attn_down: str  # the down block type with attention; the plain one is DownBlock2D
    attn_up: str  # the up block type with attention; the plain one is UpBlock2D


_UNET_CLASSES = {
    "UNet2DModel": _UNetClass("UNet2DModel", _UNET2D_DEFAULTS, "AttnDownBlock2D", "AttnUpBlock2D"),
    "UNet2DConditionModel": _UNetClass(
        "UNet2DConditionModel",
        _UNET2D_CONDITION_DEFAULTS,
        "CrossAttnDownBlock2D",
        "CrossAttnUpBlock2D",
    ),
}


def _unet_class(name: Any) -> _UNetClass:
    if name not in _UNET_CLASSES:
        raise ConfigError(
            f"diffusers UNet class {name!r} is not supported; ldmkit reads UNet2DModel and "
            "UNet2DConditionModel folders"
        )
    return _UNET_CLASSES[name]


def _options_with_defaults(cfg: dict[str, Any], cls: _UNetClass) -> dict[str, Any]:
    """Every constructor argument of `cls`: the config's value, else diffusers' default.

    Refuses keys the class does not know and options set to a value ldmkit cannot reproduce.
    """
    unknown = sorted(k for k in cfg if k not in cls.defaults and not k.startswith("_"))
    if unknown:
        raise ConfigError(f"diffusers {cls.name} option {unknown[0]!r} is not supported")
    opts = {**cls.defaults, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
    for key, allowed in _UNET_FIXED.items():
        if key not in opts:
            continue
        value = opts[key]
        if key == "only_cross_attention" and isinstance(value, (list, tuple)):
            value = any(value)
        if value not in allowed:
            _fail(key, value, f"ldmkit supports only {key}={allowed[0]!r}")
    return opts


def _attention_levels(opts: dict[str, Any], cls: _UNetClass, levels: int) -> list[bool]:
    """Whether each level (from the top) has attention, from the down and up block types."""
    down, up = list(opts["down_block_types"]), list(opts["up_block_types"])
    if len(down) != levels or len(up) != levels:
        raise ConfigError(
            f"diffusers {cls.name} has {levels} block_out_channels but {len(down)} down and "
            f"{len(up)} up block types; the config is inconsistent"
        )
    for key, types, plain, attn in (
        ("down_block_types", down, "DownBlock2D", cls.attn_down),
        ("up_block_types", up, "UpBlock2D", cls.attn_up),
    ):
        for t in types:
            if t not in (plain, attn):
                _fail(key, types, f"{cls.name} levels must be {plain} or {attn}")
    attn = [t == cls.attn_down for t in down]
    if [t == cls.attn_up for t in reversed(up)] != attn:
        _fail(
            "up_block_types",
            up,
            f"ldmkit needs attention at the same levels on the way up as down ({down})",
        )
    return attn


def _side_length(size: Any, fallback: int | None, cls_name: str) -> int:
    """The config's sample_size (one side, or a square [H, W]), else `fallback`."""
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            _fail("sample_size", size, "ldmkit UNets are square; use one side length")
        size = size[0]
    if size is None:
        size = fallback
    if size is None:
        raise ConfigError(
            f"diffusers {cls_name} config has no sample_size; pass sample_size= (the latent or "
            "image side length the UNet was trained on)"
        )
    return size


def _resnet_fields(opts: dict[str, Any]) -> dict[str, Any]:
    """The resnets, norms and resampling convs, which both classes share."""
    if opts["norm_num_groups"] is None:
        _fail("norm_num_groups", None, "ldmkit needs a GroupNorm group count")
    return dict(
        num_res_blocks=opts["layers_per_block"],
        norm_num_groups=opts["norm_num_groups"],
        norm_eps=opts["norm_eps"],
        dropout=opts["dropout"],
        downsample_padding=opts["downsample_padding"],
    )


def _time_and_class_fields(opts: dict[str, Any]) -> dict[str, Any]:
    """The sinusoidal time embedding, how it enters the resnets, and the class embedding."""
    scale_shift = opts["resnet_time_scale_shift"]
    if scale_shift not in ("default", "scale_shift"):
        _fail("resnet_time_scale_shift", scale_shift, "use 'default' or 'scale_shift'")
    return dict(
        flip_sin_to_cos=opts["flip_sin_to_cos"],
        freq_shift=opts["freq_shift"],
        time_embed_dim=opts["time_embedding_dim"],  # None: 4 * block_out_channels[0], as diffusers
        time_injection="scale_shift" if scale_shift == "scale_shift" else "add",
        num_classes=opts["num_class_embeds"],
    )


def _self_attention_fields(opts: dict[str, Any]) -> dict[str, Any]:
    """UNet2DModel's attention: self-attention with one head width (or one head) everywhere."""
    mid = opts["mid_block_type"]
    if mid != "UNetMidBlock2D":
        _fail("mid_block_type", mid, "ldmkit needs 'UNetMidBlock2D'")
    mid_attention = bool(opts["add_attention"])
    norm_groups, attn_groups = opts["norm_num_groups"], opts["attn_norm_num_groups"]
    if mid_attention and opts["resnet_time_scale_shift"] == "scale_shift" and attn_groups is None:
        _fail(
            "attn_norm_num_groups",
            None,
            "with resnet_time_scale_shift='scale_shift' the diffusers mid attention has no "
            "GroupNorm; ldmkit needs attn_norm_num_groups = norm_num_groups",
        )
    if attn_groups is not None and attn_groups != norm_groups:
        _fail("attn_norm_num_groups", attn_groups, f"ldmkit needs norm_num_groups={norm_groups}")
    head_dim = opts["attention_head_dim"]
    return dict(
        mid_attention=mid_attention,
        # None: one head of all channels at every level
        head_dim=head_dim,
        num_heads=1 if head_dim is None else None,
        context_dim=None,
        pooled_context=False,
        transformer_depth=1,
        use_linear_projection=False,
    )


def _cross_attention_fields(
    opts: dict[str, Any], channels: tuple[int, ...], attn: list[bool]
) -> dict[str, Any]:
    """UNet2DConditionModel's attention: transformers attending to one context sequence."""
    mid = opts["mid_block_type"]
    if mid not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
        _fail("mid_block_type", mid, "use 'UNetMidBlock2DCrossAttn' or 'UNetMidBlock2D'")
    mid_attention = mid == "UNetMidBlock2DCrossAttn"
    levels = len(channels)
    return dict(
        mid_attention=mid_attention,
        context_dim=_all_equal("cross_attention_dim", opts["cross_attention_dim"], levels),
        transformer_depth=_all_equal(
            "transformer_layers_per_block", opts["transformer_layers_per_block"], levels
        ),
        use_linear_projection=bool(opts["use_linear_projection"]),
        pooled_context=False,  # diffusers has no such path
        **_cross_attention_heads(opts, channels, attn, mid_attention),
    )


def _cross_attention_heads(
    opts: dict[str, Any], channels: tuple[int, ...], attn: list[bool], mid_attention: bool
) -> dict[str, Any]:
    """head_dim / num_heads from diffusers' per-level head counts, if they fit either."""
    # Legacy naming: attention_head_dim is the number of heads unless num_attention_heads is set.
    heads = opts["num_attention_heads"] or opts["attention_head_dim"]
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    used = [(c, h) for c, h, a in zip(channels, heads, attn) if a]
    if mid_attention:
        used.append((channels[-1], heads[-1]))
    if not used or len({h for _, h in used}) == 1:
        # Without attention the head count is never used; 1 is as good as any.
        return dict(head_dim=None, num_heads=used[0][1] if used else 1)
    if all(c % h == 0 for c, h in used) and len({c // h for c, h in used}) == 1:
        return dict(head_dim=used[0][0] // used[0][1], num_heads=None)
    _fail(
        "attention_head_dim",
        heads,
        "ldmkit needs the same number of heads, or the same channels per head, at every "
        "attention level",
    )
