"""The GPU path, measured (issue 26): train a few hundred steps of each stage at 64 and 256 px
through `ldmkit train` (the recipe's models for each size, bf16 autocast where the GPU runs it,
TF32, channels-last, fused attention), then sample, and print per size and stage the images per
second, the peak GPU memory and the share of the GPU's practical bf16 peak that the training
step reaches (its FLOPs counted with FlopCounterMode, the peak measured with a large matmul).

    python bench/gpu_check.py --out /tmp/gpu_check              # on a CUDA machine, ~5 min
    python bench/gpu_check.py --out /tmp/gpu_check --checkpointing   # gradient checkpointing too
    python bench/gpu_check.py --out /tmp/q --quick --device cpu     # the code path, tiny, on a CPU

Every figure names the device; run it alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from benchlib import machine_line
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def device_line(device: torch.device) -> str:
    if device.type != "cuda":
        return machine_line()
    p = torch.cuda.get_device_properties(device)
    return (
        f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}, "
        f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'} | torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}"
    )


def practical_peak_tflops(device: torch.device) -> float | None:
    """The best bf16 TFLOP/s of an 8192^3 matmul on a CUDA device (None elsewhere)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    best = 0.0
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * 8192**3 / (time.perf_counter() - t0) / 1e12)
    return best


def step_flops(cfg, stage: str) -> tuple[float, int]:
    """(training FLOPs of one optimizer step of `stage` (forward + backward), its batch), counted
    on the CPU at batch 2 and scaled (FlopCounterMode counts the MATH attention backend)."""
    from ldmkit.models.unet import UNet
    from ldmkit.models.vae import Autoencoder

    b = 2
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if stage == "autoencoder":
            model = Autoencoder(cfg.vae)
            x = torch.randn(b, cfg.vae.image_channels, cfg.image_size, cfg.image_size)
            model(x)[0].square().mean().backward()
            batch = cfg.vae_train.batch_size
        else:
            model = UNet(cfg.unet)
            z = torch.randn(b, cfg.unet.in_channels, cfg.unet.sample_size, cfg.unet.sample_size)
            kwargs = (
                {"class_labels": torch.zeros(b, dtype=torch.long)} if cfg.unet.num_classes else {}
            )
            model(z, torch.full((b,), 500), **kwargs).square().mean().backward()
            batch = cfg.unet_train.batch_size
    return counter.get_total_flops() / b * batch, batch


def stage_speed(run: Path, stage: str) -> tuple[int, float]:
    """(steps, median images per second) of a stage from the run's log.jsonl rows (each row's
    speed over its logging interval), the first 20 % (warm-up) left out."""
    rows = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r.get("stage") == stage and "images_per_s" in r]
    speeds = sorted(r["images_per_s"] for r in rows[len(rows) // 5 :])
    return (rows[-1]["step"] if rows else 0), (speeds[len(speeds) // 2] if speeds else float("nan"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the runs")
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--steps", type=int, default=300, help="steps of each stage")
    p.add_argument("--checkpointing", action="store_true", help="also with gradient checkpointing")
    p.add_argument("--quick", action="store_true",
                   help="tiny: 4 steps at 32 and 64 px, unconditional, the code path only")  # fmt: skip
    args = p.parse_args(argv)
    from ldmkit import api
    from ldmkit.runs import RunFolder

    device = torch.device(args.device)
    steps = 4 if args.quick else args.steps
    sizes = [32, 64] if args.quick else args.sizes
    print(device_line(device))
    peak = practical_peak_tflops(device)
    if peak:
        print(f"practical bf16 peak: {peak:.0f} TFLOP/s (8192^3 matmul)")
    print("| size | checkpointing | stage | steps | batch | s/step | img/s | peak GiB | TFLOP/s "
          "| share of peak | sample 64 imgs (s) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        for ckpt in (False, True) if args.checkpointing else (False,):
            run = args.out / f"{size}px{'-ckpt' if ckpt else ''}"
            sets = [
                f"vae_train.steps={steps}", f"unet_train.steps={steps}", "vae_train.log_every=5",
                "unet_train.log_every=5", "vae_train.sample_every=0", "unet_train.sample_every=0",
                "choose_guidance=false", f"vae_train.gradient_checkpointing={str(ckpt).lower()}",
                f"unet_train.gradient_checkpointing={str(ckpt).lower()}",
                *(["conditioning=none"] if args.quick else []),
            ]  # fmt: skip
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            api.train(run, data=f"builtin:shapes?n={64 if args.quick else 4096}", image_size=size,
                      device=args.device, sets=sets)  # fmt: skip
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            cfg = RunFolder(run).config()
            t0 = time.perf_counter()
            api.sample(run, n=64, steps=20, seed=0, device=args.device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            sample_s = time.perf_counter() - t0
            for stage in ("autoencoder", "diffusion"):
                done, images_per_s = stage_speed(run, stage)
                flops, batch = step_flops(cfg, stage)
                per_step = batch / images_per_s
                tflops = flops / per_step / 1e12
                share = f"{tflops / peak:.1%}" if peak else "-"
                print(
                    f"| {size} | {'yes' if ckpt else 'no'} | {stage} | {done} | {batch} "
                    f"| {per_step:.4f} | {images_per_s:.0f} "
                    f"| {'-' if mem is None else f'{mem:.2f}'} | {tflops:.2f} | {share} "
                    f"| {sample_s:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
