"""The one table between diffusers' `AutoencoderKL` and ldmkit's `Autoencoder` (issue 7).

ldmkit's autoencoder has diffusers' modules in diffusers' order, so every weight keeps its name
except four fragments: diffusers wraps the mid-block attention, the resampling convs and the
attention output projection in lists (`attentions.0`, `downsamplers.0`, `upsamplers.0`,
`to_out.0` whose `to_out.1` is a parameter-free dropout); ldmkit holds the single module.

    encoder.mid_block.attentions.0.to_out.0.weight  <->  encoder.mid_block.attention.to_out.weight
    encoder.down_blocks.0.downsamplers.0.conv.bias  <->  encoder.down_blocks.0.downsample.conv.bias

The config translation covers diffusers' plain KL autoencoder: DownEncoderBlock2D /
UpDecoderBlock2D blocks, SiLU, quant and post-quant convs, no latent shift or per-channel
statistics. Anything else is refused with a ConfigError that names the option.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ldmkit.config import ConfigError
from ldmkit.models.vae import AutoencoderConfig

# (diffusers fragment, ldmkit fragment); names are rewritten by plain substring replacement.
NAME_TABLE: tuple[tuple[str, str], ...] = (
    (".mid_block.attentions.0.", ".mid_block.attention."),
    (".to_out.0.", ".to_out."),
    (".downsamplers.0.conv.", ".downsample.conv."),
    (".upsamplers.0.conv.", ".upsample.conv."),
)

# The only GroupNorm eps diffusers' AutoencoderKL builds.
DIFFUSERS_NORM_EPS = 1e-6


def from_diffusers_name(name: str) -> str:
    """The ldmkit name of the diffusers AutoencoderKL parameter `name`."""
    for theirs, ours in NAME_TABLE:
        name = name.replace(theirs, ours)
    return name


def to_diffusers_name(name: str) -> str:
    """The diffusers name of the ldmkit Autoencoder parameter `name`."""
    for theirs, ours in NAME_TABLE:
        name = name.replace(ours, theirs)
    return name


def state_dict_from_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers AutoencoderKL state_dict to ldmkit names (tensors are not copied)."""
    return {from_diffusers_name(k): v for k, v in state.items()}


def state_dict_to_diffusers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an ldmkit Autoencoder state_dict to diffusers names (tensors are not copied)."""
    return {to_diffusers_name(k): v for k, v in state.items()}


def diffusers_vae_config(config: AutoencoderConfig) -> dict[str, Any]:
    """Keyword arguments of diffusers' AutoencoderKL for the same network."""
    if config.norm_eps != DIFFUSERS_NORM_EPS:
        raise ConfigError(
            f"norm_eps {config.norm_eps} cannot be expressed in diffusers' AutoencoderKL, which "
            f"always uses {DIFFUSERS_NORM_EPS}; set norm_eps = {DIFFUSERS_NORM_EPS}"
        )
    levels = len(config.block_out_channels)
    return {
        "in_channels": config.image_channels,
        "out_channels": config.image_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "act_fn": "silu",
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.norm_groups,
        "sample_size": config.image_size,
        "scaling_factor": config.scaling_factor,
        "mid_block_add_attention": config.mid_attention,
    }


# diffusers options and the only values ldmkit can reproduce.
_FIXED = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}
# force_upcast only tells diffusers' pipelines to decode fp16 latents in fp32; keys starting
# with "_" are diffusers' bookkeeping (_class_name, _diffusers_version, _use_default_values, ...).
_IGNORED = {"force_upcast"}


def vae_config_from_diffusers(cfg: dict[str, Any]) -> AutoencoderConfig:
    """AutoencoderConfig for a diffusers AutoencoderKL `config.json` dict.

    Architecture and scaling_factor are taken over; the loss fields keep ldmkit's defaults.
    """
    known = set(diffusers_vae_config(AutoencoderConfig())) | set(_FIXED) | _IGNORED
    unknown = sorted(k for k in cfg if k not in known and not k.startswith("_"))
    if unknown:
        raise ConfigError(f"diffusers AutoencoderKL option {unknown[0]!r} is not supported")
    for key, value in _FIXED.items():
        if key in cfg and cfg[key] != value:
            raise ConfigError(
                f"diffusers AutoencoderKL option {key}={cfg[key]!r} is not supported; "
                f"ldmkit supports only {key}={value!r}"
            )
    channels = tuple(cfg.get("block_out_channels", (64,)))
    for key, block in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        types = list(cfg.get(key, [block]))
        if types != [block] * len(channels):
            raise ConfigError(
                f"diffusers {key} {types} is not supported; ldmkit needs {block} at each of the "
                f"{len(channels)} levels"
            )
    in_ch, out_ch = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if in_ch != out_ch:
        raise ConfigError(
            f"diffusers in_channels {in_ch} != out_channels {out_ch}; ldmkit decodes to the "
            "encoder's channel count"
        )
    return AutoencoderConfig(
        image_channels=in_ch,
        latent_channels=cfg.get("latent_channels", 4),
        block_out_channels=channels,
        layers_per_block=cfg.get("layers_per_block", 1),
        norm_groups=cfg.get("norm_num_groups", 32),
        norm_eps=DIFFUSERS_NORM_EPS,
        mid_attention=cfg.get("mid_block_add_attention", True),
        image_size=cfg.get("sample_size", 32),
        scaling_factor=cfg.get("scaling_factor", 0.18215),
    )
