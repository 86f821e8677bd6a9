"""Few-step students (`ldmkit distill`) against their teacher: FID-cnn, class accuracy and speed.

    python bench/distill.py --out runs/bench-distill [--train 10m] [--budget 10m] [--n 1000]
    python bench/distill.py --run runs/shapes --out runs/bench-distill     # an existing teacher
    python bench/distill.py --quick --out /tmp/d                           # a tiny run: seconds

Trains the README's main run (`ldmkit train --data builtin:shapes --time-budget 10m`) unless
--run names a teacher, distils it 64 -> 1 DDIM steps within --budget (the students at 8, 4, 2
and 1 steps are kept as they are made), then draws n images per row with the same seeds and
labels (one class per n / classes), all read by the run's domain classifier against 2n
held-out shapes: FID-cnn beside the real-vs-real floor, and the share drawn as their class.
Rows: the teacher with its default sampler at 20 steps (guided), the teacher with DDIM at
1/2/4/8 steps (guided), and each student with DDIM at its steps (unguided: one UNet call per
step). Sampling time is process CPU time, the speed ratio the teacher-20 row's over the row's.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from benchlib import machine_line, print_table

from ldmkit import api
from ldmkit.data import load_dataset
from ldmkit.evaluation.feature_nets import get_feature_net
from ldmkit.evaluation.reference import (
    evaluate_samples,
    held_out_spec,
    real_vs_real_floor,
    reference_features,
)
from ldmkit.pipeline import LatentDiffusion
from ldmkit.recipe import parse_duration, run_config_from_dict
from ldmkit.runs import RunFolder
from ldmkit.runtime import tune_allocator
from ldmkit.training.distill import distill_run
from ldmkit.training.run import train_run

QUICK_TEACHER = {
    "data": "builtin:shapes?n=128", "image_size": 16,
    "vae": {"block_out_channels": [8, 8], "layers_per_block": 1, "norm_groups": 4,
            "mid_attention": False},
    "unet": {"block_out_channels": [16, 32], "attention_resolutions": [], "norm_num_groups": 8,
             "head_dim": 8, "num_res_blocks": 1, "mid_attention": False},
    "vae_train": {"steps": 20, "batch_size": 8, "sample_every": 0},
    "unet_train": {"steps": 100, "batch_size": 16, "lr": 2e-3, "sample_every": 0},
    "preview_steps": 2, "guidance_scale": 3.0,
}  # fmt: skip
STUDENT_STEPS = (8, 4, 2, 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="the teacher (default: train the README's shapes run into OUT)")
    p.add_argument("--out", required=True, help="folder for the teacher and the student")
    p.add_argument("--train", default="10m", help="the teacher's time budget")
    p.add_argument("--budget", default="10m", help="the distillation's time budget")
    p.add_argument("--teacher-steps", type=int, default=64)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a tiny run, for the tests")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tune_allocator()
    print(machine_line())
    out = Path(a.out)
    teacher = Path(a.run) if a.run else out / "teacher"
    t0 = time.perf_counter()
    if a.quick:
        a.n, a.teacher_steps = 64, 16
        if not RunFolder(teacher).exists():
            train_run(run_config_from_dict(QUICK_TEACHER), teacher)
    elif not RunFolder(teacher).exists():
        api.train(teacher, data="builtin:shapes", time_budget=a.train)
    train_s = time.perf_counter() - t0
    report = RunFolder(teacher).stage_report()
    stage_s = sum(float(r.get("seconds") or 0) for r in report.values() if isinstance(r, dict))
    print(f"teacher {teacher}: {stage_s / 60:.1f} min of training (stages), "
          f"{train_s / 60:.1f} min here")  # fmt: skip

    students: dict[int, torch.nn.Module] = {}
    t0 = time.perf_counter()
    res = distill_run(
        teacher, out / "student", steps=1, teacher_steps=a.teacher_steps,
        iterations=5 if a.quick else 1_000_000, batch_size=8 if a.quick else 32,
        lr=1e-3 if a.quick else 1e-4,
        time_budget_s=None if a.quick else parse_duration(a.budget),
        on_halving=lambda n, unet: students.__setitem__(n, copy.deepcopy(unet).cpu()),
    )  # fmt: skip
    distill_s = time.perf_counter() - t0
    print(f"distillation {a.teacher_steps} -> {res.steps} steps: {distill_s / 60:.1f} min; "
          "halvings:")  # fmt: skip
    for h in res.halvings:
        print("  " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                 for k, v in h.items()}))  # fmt: skip

    folder = RunFolder(teacher)
    train = folder.load_data()
    spec, offset = held_out_spec(folder.config().data)
    held = load_dataset(spec, image_size=folder.config().image_size, seed=offset)
    net = get_feature_net("domain", dataset=train, run_dir=teacher)
    ref = reference_features(held, net, n=2 * a.n, cache_dir=None)
    floor = real_vs_real_floor(ref, a.n)
    print(f"floor ({net.name}, n = {a.n}): FID {floor['FID']:.3f}")

    t = LatentDiffusion.from_run(teacher)
    classes = t.conditioner.num_classes or 0
    labels = torch.arange(a.n) * classes // a.n if classes else None
    rows, base = [], None

    def measure(name: str, ldm: LatentDiffusion, sampler: str, steps: int, guidance) -> None:
        nonlocal base
        c0 = time.process_time()
        x = ldm.sample(a.n, sampler=sampler, steps=steps, class_labels=labels, seed=0,
                       guidance_scale=guidance)  # fmt: skip
        cpu = time.process_time() - c0
        m = evaluate_samples(x, ref, net)
        acc = float((net.logits(x).argmax(1) == labels).double().mean()) if classes else None
        base = base or cpu
        g = guidance if guidance is not None else t.guidance_scale
        rows.append([name, sampler, steps, g if classes else "-", m["FID"], acc, cpu,
                     base / cpu])  # fmt: skip

    measure("teacher", t, "dpm++2m-sde", 20, None)
    for k in STUDENT_STEPS:
        measure("teacher", t, "ddim", k, None)
    for k in STUDENT_STEPS:
        if k in students:
            s = LatentDiffusion(t.vae, students[k], t.schedule, class_names=t.class_names,
                                default_sampler="ddim", default_steps=k)  # fmt: skip
            measure(f"student-{k}", s, "ddim", k, 1.0)
    print()
    print_table(["model", "sampler", "steps", "guidance", "FID-cnn", "accuracy", "cpu_s",
                 "speedup"], rows)  # fmt: skip


if __name__ == "__main__":
    main()
