"""Shared by the benchmarks: machine description, interleaved timing, peak GFLOP/s, tables.

Every figure of a benchmark is a ratio measured in one run: the functions compared are timed
alternately (A B A B ...) after a warm-up and summarised by their medians, so that a neighbour's
load hits both alike. Each table is printed with the load average and the CPU flags that decide
the speed (avx512_bf16 / AMX: native bf16; avx512f; avx2).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

FLAGS = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")


def cpu_flags() -> dict[str, bool]:
    """The CPU flags that matter here, from /proc/cpuinfo (all False where it is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        words = set()
    return {flag: flag in words for flag in FLAGS}


def machine_line() -> str:
    """Date, CPU, flags, threads, torch, allocator settings and the load average, on one line."""
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu_flags().items())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    malloc = os.environ.get("MALLOC_MMAP_MAX_") == "0" or "ldmkit mallopt"
    return (
        f"{datetime.datetime.now():%Y-%m-%d %H:%M} | {clock_name()} | {platform.processor() or platform.machine()} "
        f"{os.cpu_count()} cores | {flags} | torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads | allocator: {malloc} | load avg {load}"
    )


def load_line() -> str:
    return "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# The clock of `interleaved`: wall time, or with `use_cpu_clock()` the process's CPU time, which
# neighbours' load barely moves (with one thread it equals the wall time of a quiet machine;
# with several it also counts OpenMP's spin-waiting).
CLOCK: Callable[[], float] = time.perf_counter


def use_cpu_clock() -> None:
    global CLOCK
    CLOCK = time.process_time


def clock_name() -> str:
    return "process CPU time" if CLOCK is time.process_time else "wall time"


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each function, called in turn (A B C A B C ...) after `warmup` rounds."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t0 = CLOCK()
            fn()
            if r >= warmup:
                times[name].append(CLOCK() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def peak_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 8) -> float:
    """The practical peak in `dtype`: the best GFLOP/s of a large 1x1 convolution (a GEMM of
    size^3 through oneDNN) and of a 3x3 convolution 32x128x32x32 (PERF_ANCHORS: about 100 % of
    peak), against which the models' convolutions are measured.

    NaN for bf16 on a CPU without native bf16 (`runtime.cpu_has_fast_bf16`): there the fast
    path stays in fp32, so no row is measured against it, and the emulated 3x3 convolution
    takes 12.6 s a call (2-core EPYC, avx2 only): 4 minutes of the quick tests went to it."""
    from ldmkit.runtime import cpu_has_fast_bf16

    if dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        return float("nan")
    gemm = (
        torch.randn(1, size, size // 32, 32, dtype=dtype),
        torch.randn(size, size, 1, 1, dtype=dtype),
    )
    conv = (torch.randn(32, 128, 32, 32, dtype=dtype), torch.randn(128, 128, 3, 3, dtype=dtype))
    best = 0.0
    for (x, w), flop in ((gemm, 2 * size**3), (conv, 2 * 32 * 128 * 128 * 9 * 32 * 32)):
        pad = w.shape[-1] // 2
        torch.nn.functional.conv2d(x, w, padding=pad)  # oneDNN's first call builds its kernel
        for _ in range(repeats):
            t0 = CLOCK()
            torch.nn.functional.conv2d(x, w, padding=pad)
            best = max(best, flop / max(CLOCK() - t0, 1e-9) / 1e9)
    return best


def print_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned table (floats to 3 significant digits, None as '-')."""

    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in text)]) for i, c in enumerate(columns)]
    print(
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(columns, widths)))
    )
    for r in text:
        print("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))))
    print()  # a table ends at a blank line


@torch.no_grad()
def perturb(model: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    """Give zero-initialised layers weights, so that an output comparison means something."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)
    return model
