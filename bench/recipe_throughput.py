"""Training throughput (images/s) of candidate default recipes, fwd + bwd + AdamW, on this machine.

    python bench/recipe_throughput.py [--threads 2] [--batch 64]

Prints one row per candidate autoencoder / UNet config. Used to choose the CPU defaults in
the recipe (AutoencoderConfig(), UNetConfig() defaults); compare rows measured in the same run only.
"""

from __future__ import annotations

import argparse
import time

import torch

from ldmkit.config import to_dict
from ldmkit.models import Autoencoder, AutoencoderConfig, UNet, UNetConfig
from ldmkit.models.losses import autoencoder_loss

# the candidate rows below were written against diffusers-like field defaults; spelled out here
VAE_BASE = dict(layers_per_block=2, norm_groups=32)
UNET_BASE = dict(
    num_res_blocks=2, norm_num_groups=32, time_injection="add", attention_resolutions=(8, 4)
)

VAES = {
    "vae f2 (16,32) x1, 4 latent ch [default]": to_dict(AutoencoderConfig()),
    "vae (16,32,32) x1": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_groups=8),
    "vae (32,64,64) x1": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_groups=16),
    "vae (32,64,128) x1": dict(
        block_out_channels=(32, 64, 128), layers_per_block=1, norm_groups=16
    ),
    "vae (64,128,128) x2 [anchor]": dict(block_out_channels=(64, 128, 128), layers_per_block=2),
}
UNETS = {
    "unet16 (32,64,64) x1 att 4 adagn [default]": to_dict(UNetConfig()),
    "unet16 (32,64,128) x1 att 4 adagn [default before issue 25]": to_dict(
        UNetConfig(block_out_channels=(32, 64, 128))
    ),
    "unet16 (32,64,128) x2 att 4": dict(
        sample_size=16,
        block_out_channels=(32, 64, 128),
        attention_resolutions=(4,),
        head_dim=32,
        norm_num_groups=16,
    ),
    "unet16 (64,128,128) x1 att 4": dict(
        sample_size=16,
        block_out_channels=(64, 128, 128),
        num_res_blocks=1,
        attention_resolutions=(4,),
        head_dim=32,
    ),
    "unet (32,64,64) att 4,2": dict(
        block_out_channels=(32, 64, 64),
        attention_resolutions=(4, 2),
        head_dim=32,
        norm_num_groups=16,
    ),
    "unet (64,128,128) att 4,2": dict(
        block_out_channels=(64, 128, 128), attention_resolutions=(4, 2), head_dim=32
    ),
    "unet (64,128,256) att 4,2": dict(
        block_out_channels=(64, 128, 256), attention_resolutions=(4, 2), head_dim=32
    ),
    "unet (128,256,256) att 4,2 [anchor]": dict(
        block_out_channels=(128, 256, 256), attention_resolutions=(4, 2), head_dim=32
    ),
}


def timeit(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", choices=["vae", "unet"], default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(
        f"threads={a.threads} batch={a.batch} (best of {a.repeats}); command: python bench/recipe_throughput.py --threads {a.threads} --batch {a.batch}"
    )
    if a.only in (None, "vae"):
        x = torch.rand(a.batch, 3, 32, 32) * 2 - 1
        for name, kw in VAES.items():
            m = Autoencoder(AutoencoderConfig(**{**VAE_BASE, **kw}))
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

            def step():
                recon, post = m(x)
                loss, _ = autoencoder_loss(x, recon, post, m.config)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            s = timeit(step, a.repeats)
            print(f"{name:40s} {m.num_parameters() / 1e6:6.2f} M  {a.batch / s:8.1f} img/s train")
    if a.only in (None, "unet"):
        t = torch.randint(0, 1000, (a.batch,))
        y = torch.randint(0, 5, (a.batch,))
        for name, kw in UNETS.items():
            kw = {"sample_size": 8, **kw, "num_classes": 5}
            x = torch.randn(a.batch, 4, kw["sample_size"], kw["sample_size"])
            m = UNet(UNetConfig(**{**UNET_BASE, **kw}))
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

            def step():
                loss = (m(x, t, class_labels=y) - x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            s = timeit(step, a.repeats)
            print(f"{name:40s} {m.num_parameters() / 1e6:6.2f} M  {a.batch / s:8.1f} img/s train")


if __name__ == "__main__":
    main()
