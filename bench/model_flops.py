"""Parameter counts and forward FLOPs of ldmkit's models beside diffusers' equivalents.

For each reference config of /work/shared/PERF_ANCHORS.md, builds the ldmkit model and the
diffusers model with the same settings, counts parameters and forward FLOPs per image
(`torch.utils.flop_counter.FlopCounterMode`, 2 FLOPs per multiply-accumulate), and prints them
with their ratio and the anchor figure. Attention runs under the MATH SDPA backend in both models,
because FlopCounterMode does not count the fused CPU flash-attention op.

Usage:
    python bench/model_flops.py                 # every model family
    python bench/model_flops.py --family unet   # one family

Adding a family: write `<family>_rows() -> list[Row]` and register it in FAMILIES.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Row:
    family: str
    name: str
    input_shape: tuple[int, ...]  # per image, (C, H, W)
    params: int  # ldmkit
    gflop: float  # ldmkit, forward, per image
    ref_params: int | None  # diffusers
    ref_gflop: float | None
    anchor: str  # the figure PERF_ANCHORS.md gives for diffusers


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def forward_gflop(model: nn.Module, *inputs: torch.Tensor) -> float:
    """GFLOP of `model(*inputs)`, attention decomposed so that its matmuls count."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() / 1e9


# ---------------------------------------------------------------- UNet

# (name, UNetConfig kwargs, anchor). latent8/16: PERF_ANCHORS "latent8 / latent16 UNet";
# pixel: DDPM's CIFAR-10 UNet (google/ddpm-cifar10-32 switches).
UNET_REFERENCES = [
    (
        "latent8",
        dict(sample_size=8, attention_resolutions=(4, 2)),
        "27.16 M, 0.767 GFLOP",
    ),
    (
        "latent16",
        dict(sample_size=16, attention_resolutions=(8, 4)),
        "27.16 M, 3.07 GFLOP",
    ),
    (
        "pixel32 (DDPM CIFAR-10)",
        dict(
            sample_size=32,
            in_channels=3,
            block_out_channels=(128, 256, 256, 256),
            attention_resolutions=(16,),
            head_dim=None,
            num_heads=1,
            downsample_padding=0,
            freq_shift=1,
            flip_sin_to_cos=False,
            norm_eps=1e-6,
        ),
        "35.75 M, 12.44 GFLOP",
    ),
]
# Shared by all references (diffusers' UNet2DModel defaults, not ldmkit's recipe): block channels
# (128, 256, 256), 2 resnets per level, 32 norm groups, additive time embedding, head_dim 32.
UNET_BASE = dict(block_out_channels=(128, 256, 256), num_res_blocks=2, norm_num_groups=32,
                 time_injection="add", head_dim=32)  # fmt: skip


def unet_rows() -> list[Row]:
    from ldmkit.interop.unet_names import diffusers_unet_config
    from ldmkit.models.unet import UNet, UNetConfig

    rows = []
    for name, overrides, anchor in UNET_REFERENCES:
        cfg = UNetConfig(**{**UNET_BASE, **overrides})
        model = UNet(cfg).eval()
        x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        t = torch.tensor([500])
        gflop = forward_gflop(model, x, t)
        ref_params = ref_gflop = None
        try:
            import diffusers

            cls_name, kwargs = diffusers_unet_config(cfg)
            ref = getattr(diffusers, cls_name)(**kwargs).eval()
            ref_params = count_params(ref)
            ref_gflop = forward_gflop(ref, x, t)
        except ImportError:
            pass
        shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        rows.append(
            Row("unet", name, shape, count_params(model), gflop, ref_params, ref_gflop, anchor)
        )
    return rows


# ---------------------------------------------------------------- VAE

# (name, AutoencoderConfig kwargs, anchor encode, anchor decode): PERF_ANCHORS "VAE f4" / "VAE f2",
# 2 layers per block, 4 latent channels, 3x32x32 images.
VAE_REFERENCES = [
    (
        "f4",
        dict(block_out_channels=(64, 128, 128)),
        "(64,128,128), 5.12 M: enc 2.12 M, 0.774 GFLOP",
        "(64,128,128), 5.12 M: dec 3.00 M, 1.579 GFLOP",
    ),
    (
        "f2",
        dict(block_out_channels=(64, 128)),
        "(64,128), 3.35 M: enc 0.967 GFLOP",
        "(64,128), 3.35 M: dec 1.675 GFLOP",
    ),
]


def vae_rows() -> list[Row]:
    """Two rows per config: encode (encoder + quant_conv) and decode (post_quant_conv + decoder)."""
    from ldmkit.interop.vae_names import diffusers_vae_config
    from ldmkit.models.vae import Autoencoder, AutoencoderConfig

    rows = []
    for name, overrides, enc_anchor, dec_anchor in VAE_REFERENCES:
        cfg = AutoencoderConfig(layers_per_block=2, latent_channels=4, norm_groups=32, **overrides)
        model = Autoencoder(cfg).eval()
        parts = {
            "encode": nn.Sequential(model.encoder, model.quant_conv),
            "decode": nn.Sequential(model.post_quant_conv, model.decoder),
        }
        ref_parts = {}
        try:
            from diffusers import AutoencoderKL

            ref = AutoencoderKL(**diffusers_vae_config(cfg)).eval()
            ref_parts = {
                "encode": nn.Sequential(ref.encoder, ref.quant_conv),
                "decode": nn.Sequential(ref.post_quant_conv, ref.decoder),
            }
        except ImportError:
            pass
        inputs = {
            "encode": (cfg.image_channels, cfg.image_size, cfg.image_size),
            "decode": model.latent_shape(),
        }
        for part, anchor in (("encode", enc_anchor), ("decode", dec_anchor)):
            x = torch.randn(1, *inputs[part])
            ref = ref_parts.get(part)
            rows.append(
                Row(
                    "vae",
                    f"{name} {part}",
                    inputs[part],
                    count_params(parts[part]),
                    forward_gflop(parts[part], x),
                    count_params(ref) if ref is not None else None,
                    forward_gflop(ref, x) if ref is not None else None,
                    anchor,
                )
            )
    return rows


FAMILIES: dict[str, Callable[[], list[Row]]] = {
    "unet": unet_rows,
    "vae": vae_rows,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), nargs="*", default=sorted(FAMILIES))
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, FlopCounterMode, batch 1")
    header = (
        f"{'model':<30} {'input':<11} {'ldmkit M':>9} {'diffusers M':>11} {'ratio':>6} "
        f"{'ldmkit GF':>10} {'diffusers GF':>12} {'ratio':>6}  anchor (diffusers)"
    )
    print(header)
    print("-" * len(header))
    for family in args.family:
        for r in FAMILIES[family]():
            ref_p = f"{r.ref_params / 1e6:11.3f}" if r.ref_params else f"{'n/a':>11}"
            ref_g = f"{r.ref_gflop:12.3f}" if r.ref_gflop else f"{'n/a':>12}"
            p_ratio = f"{r.params / r.ref_params:6.3f}" if r.ref_params else f"{'':>6}"
            g_ratio = f"{r.gflop / r.ref_gflop:6.3f}" if r.ref_gflop else f"{'':>6}"
            shape = "x".join(map(str, r.input_shape))
            print(
                f"{r.family + ':' + r.name:<30} {shape:<11} {r.params / 1e6:9.3f} {ref_p} {p_ratio} "
                f"{r.gflop:10.3f} {ref_g} {g_ratio}  {r.anchor}"
            )
    print(f"reproduce: python bench/model_flops.py {' '.join(sys.argv[1:])}".rstrip())


if __name__ == "__main__":
    main()
