"""Which sampler would `ldmkit distill --sampler auto` pick for each student, over seeds?

    python bench/student_sampler.py --bench OUT [--name student] [--seeds 3] [--threads 1]

OUT is a bench/distill.py output folder: its teacher, and each halving's student UNet under
OUT/NAME-students/K. For every student of 2 or more steps this runs the measurement that ends
a distillation (evaluation/sampler_choice.py: STUDENT_QUICK_N images per sampler at the
student's steps, FID-cnn and class accuracy in the run's domain classifier) at each seed, and
prints the picks and seed 0's figures: a pick that changes with the seed is a draw.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from benchlib import load_line, machine_line, print_table

from ldmkit.evaluation.sampler_choice import measure_student_sampler
from ldmkit.models.unet import UNet
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runs import RunFolder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", required=True, help="a bench/distill.py --out folder")
    p.add_argument("--name", default="student", help="the student's name there (--name)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(machine_line())
    out = Path(a.bench)
    teacher = LatentDiffusion.from_run(out / "teacher")
    saved = out / f"{a.name}-students"
    rows = []
    for k in sorted((int(d.name) for d in saved.iterdir() if d.name.isdigit()), reverse=True):
        if k < 2:
            continue  # one step: both samplers are the same
        student = LatentDiffusion(
            teacher.vae, UNet.from_pretrained(saved / str(k)).eval(), teacher.schedule,
            class_names=teacher.class_names, default_sampler="ddim", default_steps=k,
        )  # fmt: skip
        picks, first, seconds = [], None, []
        for seed in range(a.seeds):
            choice = measure_student_sampler(student, RunFolder(out / a.name), k, seed=seed)
            if choice is None:
                raise SystemExit(f"{out}: nothing to measure (an unconditional run?)")
            picks.append(choice.sampler)
            first = first or choice
            seconds.append(choice.seconds)
        ddim, lcm = first.rows
        rows.append([f"{a.name}-{k}", k, " ".join(picks), ddim.fid, lcm.fid, ddim.accuracy,
                     lcm.accuracy, min(seconds)])  # fmt: skip
    print_table(["student", "steps", f"picks, seeds 0-{a.seeds - 1}", "FID ddim", "FID lcm",
                 "acc ddim", "acc lcm", "s (least)"], rows)  # fmt: skip
    print(f"(seed 0's figures; n = {first.n} per sampler)" if rows else "no student of 2+ steps")
    print(load_line())


if __name__ == "__main__":
    main()
