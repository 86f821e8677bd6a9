"""The data path's share of a training step on cached latents, and the peak memory of the
README's main job.

    python bench/data_path.py [--threads 2] [--steps 30] [--classes 5]
    python bench/data_path.py --rss [--budget 10m]     # + runs the README's main job (minutes)
    python bench/data_path.py --quick                  # seconds: checks the plumbing

Data path: the diffusion stage of the default recipe (its UNet, batch, EMA; class-conditional,
as for labelled data) on a latent cache of the default shape, timed three ways, interleaved:
  full        one training step as `train_stage` runs it: `DataOrder.micro_batches` (the
              batch's items and per-sample generators) + `optimizer_step` (latents drawn from
              the cached moments, t, noise, label dropout, the loss, backward, AdamW, EMA)
  no network  the same step with the UNet replaced by a one-parameter stand-in: everything
              but the network's forward, backward and update (an upper bound on the data path)
  batches     `DataOrder.micro_batches` alone
The share is no-network / full. `--rss` then runs the README's main job (train with its time
budget, then sample 50) in child processes and prints each one's peak resident memory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
from benchlib import interleaved, machine_line, print_table
from torch import Tensor, nn

from ldmkit.models.conditioning import ClassConditioner
from ldmkit.models.unet import UNet
from ldmkit.recipe import RunConfig, resolve_config
from ldmkit.runtime import tune_allocator
from ldmkit.training.ema import EMA
from ldmkit.training.loop import DataOrder
from ldmkit.training.stages import diffusion_stage
from ldmkit.training.step import optimizer_step


class StandIn(nn.Module):
    """A network of one parameter, called like the UNet: what is left of a step without it."""

    def __init__(self, prediction_type: str) -> None:
        super().__init__()
        self.config = SimpleNamespace(prediction_type=prediction_type)
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x_t: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        return x_t * self.w


def data_path(args: argparse.Namespace) -> None:
    cfg = resolve_config(RunConfig(), channels=3, num_classes=args.classes)
    tc = cfg.unet_train
    zc, size = cfg.vae.latent_channels, cfg.unet.sample_size
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(args.items, 2 * zc, size, size, generator=g)
    labels = torch.randint(0, args.classes, (args.items,), generator=g)
    cpu = torch.device("cpu")

    def make(model: nn.Module):
        conditioner = ClassConditioner(args.classes, dropout=cfg.diffusion.class_dropout)
        stage = diffusion_stage(model, moments, conditioner, labels, 0.5, cfg.diffusion, tc, cpu)
        ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
        order = DataOrder(args.items, tc.batch_size, tc.grad_accum, 0, key="diffusion/0")
        step = [0]

        def run() -> None:
            micro = order.micro_batches(step[0])
            optimizer_step(stage, micro, grad_clip=tc.grad_clip, ema=ema)
            step[0] += 1

        return run, order

    torch.manual_seed(0)
    full, order = make(UNet(cfg.unet))
    bare, _ = make(StandIn(cfg.unet.prediction_type))
    k = [0]

    def batches() -> None:
        order.micro_batches(k[0])
        k[0] += 1

    t = interleaved({"full": full, "no network": bare, "batches": batches}, args.steps)
    print(machine_line())
    print(
        f"default recipe's diffusion stage: UNet {cfg.unet.block_out_channels} on "
        f"{zc}x{size}x{size} latents, batch {tc.batch_size} (grad_accum {tc.grad_accum}), "
        f"EMA {tc.ema_decay}, {args.classes} classes, {args.items} cached latents; "
        f"medians of {args.steps} interleaved steps"
    )
    rows = [
        [name, t[name] * 1e3, 100 * t[name] / t["full"]]
        for name in ("full", "no network", "batches")
    ]
    print_table(["part of a step", "ms", "% of the step"], rows)


def peak_rss(args: argparse.Namespace) -> None:
    """The README's main job, each command in a child process; ru_maxrss of the children."""
    out = os.path.join(tempfile.mkdtemp(prefix="ldmkit-rss-"), "shapes")
    exe = [sys.executable, "-m", "ldmkit"]
    jobs = {
        "train": exe + ["train", "--data", "builtin:shapes", "--out", out,
                        "--time-budget", args.budget],
        "sample": exe + ["sample", "--run", out, "--n", "50", "--out", f"{out}/grid.png"],
    }  # fmt: skip
    rows = []
    for name, cmd in jobs.items():
        t0 = time.perf_counter()
        # each job in its own grandchild: RUSAGE_CHILDREN would keep the larger of the two
        probe = (
            "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        res = subprocess.run(
            [sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True
        )
        kib = int(res.stdout.strip().splitlines()[-1])
        rows.append([name, kib / 2**20, time.perf_counter() - t0, " ".join(cmd[2:])])
    print(machine_line())
    print_table(["README main job", "peak RSS GiB", "wall s", "command"], rows)
    print(f"run folder: {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--steps", type=int, default=30, help="timed steps of each kind")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--items", type=int, default=20_000, help="cached latents")
    p.add_argument("--rss", action="store_true", help="also run the README's main job")
    p.add_argument("--budget", default="10m", help="the main job's --time-budget with --rss")
    p.add_argument("--quick", action="store_true", help="2 timed steps on 512 latents: seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.items = 2, 512
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_path(args)
    if args.rss:
        peak_rss(args)


if __name__ == "__main__":
    main()
