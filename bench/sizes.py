"""What each image size gets (issue 26): the models `recipe.size_settings` gives it, their
parameters, the latent, the batch, seconds per training step of each model and the peak memory
of a step, on this machine. Each size runs in its own process (so that its peak memory is its
own), one after the other; run it alone (a neighbour's load skews every figure).

    python bench/sizes.py                      # 32 64 128 256 512 px on this device
    python bench/sizes.py --sizes 32 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from benchlib import machine_line


def measure(size: int, device: str, repeats: int) -> dict:
    from ldmkit.models.unet import UNet
    from ldmkit.models.vae import Autoencoder
    from ldmkit.recipe import resolve_config, run_config_from_dict
    from ldmkit.training.sizing import estimate_step_time

    dev = torch.device(device)
    cfg = resolve_config(run_config_from_dict({"image_size": size}), 3, None)
    vae, unet = Autoencoder(cfg.vae).to(dev), UNet(cfg.unet).to(dev)
    vb, ub = cfg.vae_train.batch_size, cfg.unet_train.batch_size
    x = torch.rand(vb, 3, size, size, device=dev) * 2 - 1
    z = torch.randn(ub, *vae.latent_shape(), device=dev)
    t = torch.randint(0, 1000, (ub,), device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    vae_s = estimate_step_time(vae, lambda m: m(x)[0].square().mean(), dev, repeats=repeats)
    unet_s = estimate_step_time(unet, lambda m: m(z, t).square().mean(), dev, repeats=repeats)
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    )
    return {
        "size": size,
        "f": cfg.vae.downsample_factor,
        "latent": "x".join(str(d) for d in vae.latent_shape()),
        "vae_channels": list(cfg.vae.block_out_channels),
        "vae_params_m": vae.num_parameters() / 1e6,
        "unet_channels": list(cfg.unet.block_out_channels),
        "attention": list(cfg.unet.attention_resolutions),
        "unet_params_m": unet.num_parameters() / 1e6,
        "vae_batch": vb,
        "unet_batch": ub,
        "vae_s": vae_s,
        "unet_s": unet_s,
        "peak_gib": peak,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps after a warm-up one")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: one size
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one, args.device, args.repeats)))
        return
    print(machine_line())
    mem = "peak GiB (CUDA allocated)" if args.device.startswith("cuda") else "peak RSS GiB"
    print(
        f"| size | f | latent | autoencoder (M params) | UNet (M params), attention | batch AE / UNet "
        f"| s/step AE | s/step UNet | AE img/s | {mem} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(size), "--device", args.device,
               "--threads", str(args.threads), "--repeats", str(args.repeats)]  # fmt: skip
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(
            f"| {r['size']} | {r['f']} | {r['latent']} | {r['vae_channels']} ({r['vae_params_m']:.2f}) "
            f"| {r['unet_channels']} ({r['unet_params_m']:.2f}), {r['attention']} "
            f"| {r['vae_batch']} / {r['unet_batch']} | {r['vae_s']:.3f} | {r['unet_s']:.3f} "
            f"| {r['vae_batch'] / r['vae_s']:.0f} | {r['peak_gib']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
