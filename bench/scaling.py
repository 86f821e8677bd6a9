"""ldmkit's UNet forward: images/s and GFLOP/s against batch size and latent size.

    python bench/scaling.py                    # batch 1..128 x latent 8, 16, 32 (minutes)
    python bench/scaling.py --sizes 8,16 --batches 1,4,16,64 --out scaling.png
    python bench/scaling.py --quick            # seconds (the CI smoke run)

The model is the latent reference UNet of shared/PERF_ANCHORS.md (block channels (128, 256,
256), attention at the two lower resolutions and the middle) at each latent size, in float32
and on ldmkit's fast path (bf16 autocast where the CPU runs bf16 natively), timed interleaved
with the peaks of the same run. Where GFLOP/s stops rising with the batch, the convolutions
are big enough to keep the vector units busy; below it per-op overhead (Python, dispatch,
oneDNN's small-batch path, GroupNorm/SiLU passes over small tensors) sets the time. The
"knee" column is the smallest batch reaching 90 % of the size's best images/s.
"""

from __future__ import annotations

import argparse
import sys

import torch
from benchlib import interleaved, machine_line, peak_gflops, perturb, print_table, use_cpu_clock
from model_flops import UNET_BASE, forward_gflop

from ldmkit.models import UNet, UNetConfig
from ldmkit.runtime import fast_autocast, fast_dtype, tune_allocator


def unet(size: int, quick: bool) -> UNet:
    kw = {**UNET_BASE, "sample_size": size, "attention_resolutions": (size // 2, size // 4)}
    if quick:
        kw.update(block_out_channels=(32, 64, 64), norm_num_groups=16)
    torch.manual_seed(0)
    return perturb(UNet(UNetConfig(**kw))).eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8,16,32", help="latent sizes (H = W), comma-separated")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-images", type=int, default=128 * 16 * 16,
                   help="skip a batch x size above this many latent pixels / 4 (memory, time)")  # fmt: skip
    p.add_argument("--out", default="scaling.png", help="PNG plot (needs matplotlib)")
    p.add_argument("--cpu-time", action="store_true", help="time by process CPU time")
    p.add_argument("--quick", action="store_true", help="tiny model, batches 1, 2, 4, size 8")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tune_allocator()
    if a.cpu_time:
        use_cpu_clock()
    sizes = [8] if a.quick else [int(s) for s in a.sizes.split(",")]
    batches = [1, 2, 4] if a.quick else [int(b) for b in a.batches.split(",")]
    repeats = 1 if a.quick else a.repeats
    fast = fast_dtype(torch.device("cpu")) is not None
    print(machine_line())
    gemm = 512 if a.quick else 2048
    peaks = {"fp32": peak_gflops(torch.float32, gemm), "bf16": peak_gflops(torch.bfloat16, gemm)}
    print(f"peak: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    rows, curves = [], {}
    for size in sizes:
        model = unet(size, a.quick)
        gflop = forward_gflop(model, torch.randn(1, 4, size, size), torch.tensor([500]))
        best: dict[str, float] = {}
        for b in batches:
            if b * size * size > a.max_images:
                continue
            x, t = torch.randn(b, 4, size, size), torch.full((b,), 500)

            def run(bf16: bool):
                def go() -> object:
                    with torch.inference_mode(), fast_autocast(torch.device("cpu"), bf16):
                        return model(x, t)

                return go

            fns = {"fp32": run(False), **({"fast": run(True)} if fast else {})}
            sec = interleaved(fns, repeats)
            for kind, s in sec.items():
                ips = b / s
                best[kind] = max(best.get(kind, 0.0), ips)
                curves.setdefault((size, kind), []).append((b, ips, ips * gflop))
            fast_ips = b / sec["fast"] if fast else None
            rows.append([size, b, gflop, b / sec["fp32"], b / sec["fp32"] * gflop,
                         100 * b / sec["fp32"] * gflop / peaks["fp32"], fast_ips,
                         fast_ips * gflop if fast_ips else None,
                         100 * fast_ips * gflop / peaks["bf16"] if fast_ips else None])  # fmt: skip
            print(f"  latent {size} batch {b}: {b / sec['fp32']:.3g} img/s", flush=True)
        for kind in best:
            knee = next(b for b, ips, _ in curves[(size, kind)] if ips >= 0.9 * best[kind])
            print(f"latent {size} {kind}: knee at batch {knee} (90 % of {best[kind]:.3g} img/s)")
    print(machine_line())
    print_table(["latent", "batch", "GFLOP/img", "fp32 img/s", "fp32 GFLOP/s", "% fp32 pk",
                 "fast img/s", "fast GFLOP/s", "% bf16 pk"], rows)  # fmt: skip
    plot(curves, peaks, a.out)
    print("command: python bench/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv))


def plot(curves: dict, peaks: dict[str, float], out: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: table only")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for (size, kind), pts in sorted(curves.items()):
        ax.plot([b for b, _, _ in pts], [g for _, _, g in pts], "o-" if kind == "fp32" else "s--",
                label=f"latent {size}, {kind}")  # fmt: skip
    for kind, v in peaks.items():
        if v != v:  # NaN: no native bf16 here, so no bf16 peak was measured
            continue
        ax.axhline(v, color="grey", lw=0.8, ls=":")
        ax.text(1, v, f" {kind} peak", va="bottom", fontsize=8)
    ax.set(xscale="log", xlabel="batch", ylabel="GFLOP/s", title="ldmkit UNet forward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
