"""Quality per CPU-minute: ldmkit's default recipe against a diffusers-example baseline, trained
for the same wall-clock budgets on builtin:mnist.

    nice -n 10 python bench/quality_per_minute.py --budgets 5,10,30 --out runs/qpm
    python bench/quality_per_minute.py --quick       # seconds-to-minutes plumbing check

Contenders, each trained for each budget (all its stages included):
  ldmkit         `ldmkit train` with the default recipe, unconditional (conditioning=none)
  diffusers      the recipe of diffusers' examples/unconditional_image_generation (UNet2DModel in
                 pixel space, DDPMScheduler, AdamW with the example's betas/decay, 500 warm-up
                 steps then cosine, EMA with warm-up), scaled to a CPU (Baseline below)
  ldmkit-class   `ldmkit train` class-conditional (the default for labelled data), one class
                 per tenth of the samples, the run's guidance
Each draws n (1000) samples (ldmkit: its default sampler; diffusers: DDPMScheduler with
--baseline-steps), all judged by the same features, ldmkit's domain classifier trained on the
MNIST training digits (labelled "-cnn": never comparable with Inception FID), against the
held-out MNIST test digits: FID, precision/recall, beside the real-vs-real floor at the same n,
and the seconds each took to sample n images. Grids go to OUT/<contender>-<budget>m.png.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from benchlib import load_line, machine_line, print_table

from ldmkit import api
from ldmkit.data import load_dataset
from ldmkit.data.transforms import to_float
from ldmkit.evaluation.feature_nets import get_feature_net
from ldmkit.evaluation.grids import save_grid
from ldmkit.evaluation.reference import (
    evaluate_samples,
    held_out_spec,
    real_vs_real_floor,
    reference_features,
)
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runtime import tune_allocator

CONTENDERS = ("ldmkit", "diffusers", "ldmkit-class")


@dataclass
class Baseline:
    """diffusers' train_unconditional.py defaults, scaled from 64 px RGB on GPUs to 32 px on a
    CPU: the example's six levels of (128 .. 512) channels with attention at the second-lowest
    resolution become three of (32, 64, 64), attention at 8x8."""

    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 2  # example: 2
    norm_num_groups: int = 32  # UNet2DModel's default
    batch_size: int = 16  # example: train_batch_size 16
    lr: float = 1e-4  # example: learning_rate 1e-4, adam_beta1/2 0.95/0.999, weight decay 1e-6
    warmup_steps: int = 500  # example: lr_warmup_steps 500, then cosine to 0
    ema_max_decay: float = 0.9999  # example: EMA with inv_gamma 1, power 3/4 warm-up


def train_baseline(images: torch.Tensor, seconds: float, cfg: Baseline, seed: int = 0):
    """Train the baseline for `seconds`; returns (EMA UNet, steps). The cosine LR schedule is
    planned from the time of the first steps, so it decays by the deadline (as ldmkit's)."""
    import diffusers
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    c, size = images.shape[1], images.shape[-1]
    unet = diffusers.UNet2DModel(
        sample_size=size, in_channels=c, out_channels=c, layers_per_block=cfg.layers_per_block,
        block_out_channels=cfg.block_out_channels, norm_num_groups=cfg.norm_num_groups,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, betas=(0.95, 0.999), weight_decay=1e-6)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=True,
                   inv_gamma=1.0, power=0.75)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    start, total, step = time.perf_counter(), None, 0
    while time.perf_counter() - start < seconds:
        if step == 5:  # plan the cosine from the time per step
            total = max(6, int(seconds / ((time.perf_counter() - start) / 5)))
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
        frac = min(1.0, step / total) if total else 0.0
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * frac))
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
        x0 = to_float(images[idx])
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=g)
        loss = torch.nn.functional.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        step += 1
    ema.copy_to(unet.parameters())
    return unet.eval(), step


@torch.inference_mode()
def sample_baseline(unet, n: int, steps: int, batch: int = 250) -> torch.Tensor:
    """The example's DDPMPipeline loop with `steps` inference steps."""
    import diffusers

    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sched.set_timesteps(steps)
    g, out = torch.Generator().manual_seed(0), []
    c, size = unet.config.in_channels, unet.config.sample_size
    for s in range(0, n, batch):
        x = torch.randn(min(batch, n - s), c, size, size, generator=g)
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, generator=g).prev_sample
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def run_contender(name: str, minutes: float, a: argparse.Namespace, images: torch.Tensor):
    """Train one contender for `minutes`; returns (samples, sampling seconds, note)."""
    out = Path(a.out) / f"{name}-{minutes:g}m"
    if name == "diffusers":
        cfg = (
            Baseline(block_out_channels=(16, 32, 32), norm_num_groups=8) if a.quick else Baseline()
        )
        unet, steps = train_baseline(images, minutes * 60, cfg)
        t0 = time.perf_counter()
        samples = sample_baseline(unet, a.n, a.baseline_steps)
        return samples, time.perf_counter() - t0, f"{steps} steps, DDPM {a.baseline_steps}"
    sets = ["conditioning=class" if name == "ldmkit-class" else "conditioning=none"]
    res = api.train(out, data=a.data, time_budget=f"{minutes * 60:.0f}s", sets=sets)
    ldm = LatentDiffusion.from_run(out)
    t0 = time.perf_counter()
    labels = torch.arange(a.n) % 10 if name == "ldmkit-class" else None
    samples = ldm.sample(a.n, class_labels=labels)
    return samples, time.perf_counter() - t0, f"{res.vae_steps}+{res.unet_steps} steps"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="5,10,30", help="minutes per contender, comma-separated")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--n", type=int, default=1000, help="samples per contender")
    p.add_argument("--baseline-steps", type=int, default=100,
                   help="DDPM inference steps of the baseline (the example's 1000 would take "
                   "hours for 1000 images here)")  # fmt: skip
    p.add_argument("--data", default="builtin:mnist")
    p.add_argument("--out", default="runs/quality_per_minute")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="builtin:digits, 6 s budgets, 64 samples: checks the plumbing only")  # fmt: skip
    a = p.parse_args(argv)
    if a.quick:
        a.budgets, a.n, a.baseline_steps, a.data = "0.1", 64, 5, "builtin:digits"
    torch.set_num_threads(a.threads)
    tune_allocator()
    print(machine_line())
    train = load_dataset(a.data, image_size=32)
    held = held_out_spec(a.data)
    test = load_dataset(held[0], image_size=32, channels=train.images.shape[1]) if held else train
    net = get_feature_net("domain", dataset=train, run_dir=a.out,
                          time_budget_s=10 if a.quick else 300)  # fmt: skip
    ref = reference_features(test, net, n=2 * a.n, cache_dir=None)
    floor = real_vs_real_floor(ref, a.n)
    print(f"judge: {net.name} on {test.name}; real-vs-real floor at n={floor['n']}: "
          f"FID {floor['FID']:.3g}, precision {floor['precision']}, recall {floor['recall']}")  # fmt: skip
    rows = []
    for minutes in (float(b) for b in a.budgets.split(",")):
        fids = {}
        for name in a.contenders.split(","):
            t0 = time.perf_counter()
            samples, sample_s, note = run_contender(name, minutes, a, train.images)
            m = evaluate_samples(samples, ref, net)
            fids[name] = m["FID"]
            grid = Path(a.out) / f"{name}-{minutes:g}m.png"
            save_grid(samples[:100], grid, nrow=10)
            rows.append([name, minutes, m["FID"], m["precision"], m["recall"], floor["FID"],
                         sample_s, a.n, note, load_line()])  # fmt: skip
            print(f"  {name} {minutes:g} min: FID {m['FID']:.3g}, sampling {sample_s:.0f} s, "
                  f"{time.perf_counter() - t0:.0f} s in all ({load_line()})", flush=True)  # fmt: skip
        if "ldmkit" in fids and "diffusers" in fids:
            print(f"budget {minutes:g} min: FID diffusers / ldmkit = "
                  f"{fids['diffusers'] / fids['ldmkit']:.2f}")  # fmt: skip
    print(machine_line())
    print(f"features: {net.name} (domain classifier; FID-cnn, not Inception FID)")
    print_table(["contender", "budget min", "FID-cnn", "precision", "recall", "floor FID",
                 "sample s", "n", "note", "load"], rows)  # fmt: skip
    print(f"grids: {a.out}/<contender>-<budget>m.png")
    print(
        "command: python bench/quality_per_minute.py "
        + " ".join(sys.argv[1:] if argv is None else argv)
    )


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    main()
