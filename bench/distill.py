"""Few-step students (`ldmkit distill`) against their teacher: FID-cnn, class accuracy and speed.

    python bench/distill.py --teacher runs/shapes --out runs/bench-distill   # reuse a trained run
    python bench/distill.py --out runs/bench-distill [--train 10m]           # train the teacher too
    python bench/distill.py --quick --out /tmp/d                             # a tiny run: seconds

The teacher: --teacher RUN is copied into OUT/teacher first (its weights, config, data record and
latent cache; the benchmark writes evaluation caches there, never into RUN); without --teacher
the README's main run is trained there (`ldmkit train --data builtin:shapes --time-budget 10m`).
It is distilled --teacher-steps -> 1 DDIM steps within --budget into OUT/NAME (the students at
8, 4, 2 and 1 steps are saved as they are made, under OUT/NAME-students/, so a second call
measures them without distilling again).

Every row draws n images with the same seed and the same labels, the way `ldmkit eval` measures
a run: the reference is 2n images of the run's training data (n compared, n more for the
real-vs-real floor), read by the run's domain classifier (FID-cnn, the FID `ldmkit eval`
reports), the labels are the reference images' own, and the seed is 0. Accuracy is the share
the same classifier reads as the class asked for. Rows: the teacher with its default sampler
(guided at its chosen scale) at --teacher-rows steps, the teacher with DDIM (guided; what the
students learn from) at --ddim-rows steps, and each student at its steps with each of
--student-samplers (default ddim, the path it learns, and lcm, its x-predictions noised afresh
between steps; no guidance: it is distilled in; one UNet call per step). Time: wall and process CPU seconds to
draw the n images (batches of 64); the speed-up is the teacher-20 row's CPU time over the row's.
The teacher's rows are kept in OUT/teacher-rows.json (by weights, n, seed and features) and
reused by a later call with the same teacher and n; the table goes to OUT/NAME-table.md and
.json, and grids (8 per class, teacher at 20 and 4 steps, each student: NAME-K.png and
NAME-K-SAMPLER.png) to OUT/grids/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from benchlib import machine_line, print_table

from ldmkit import api
from ldmkit.evaluation.feature_nets import get_feature_net
from ldmkit.evaluation.grids import save_grid
from ldmkit.evaluation.reference import evaluate_samples, real_vs_real_floor, reference_features
from ldmkit.models.unet import UNet
from ldmkit.pipeline import LatentDiffusion
from ldmkit.recipe import parse_duration, run_config_from_dict
from ldmkit.runs import RunFolder
from ldmkit.runtime import tune_allocator
from ldmkit.training.distill import EMA_DECAY, distill_run
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
COPY_SKIP = ("checkpoints", "tb", "samples", ".lock", "report.html")
BATCH = 64


def copy_teacher(src: Path, dst: Path) -> None:
    """The run's files a teacher needs, copied (never written into the original)."""
    if RunFolder(dst).exists():
        return
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*COPY_SKIP))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", "--run", dest="teacher",
                   help="a trained run to distil (copied into OUT/teacher; default: train the "
                   "README's shapes run there)")  # fmt: skip
    p.add_argument("--out", required=True, help="folder for the teacher copy and the students")
    p.add_argument("--name", default="student", help="the student's folder in OUT")
    p.add_argument("--train", default="10m", help="the teacher's time budget (without --teacher)")
    p.add_argument("--budget", default="10m", help="the distillation's time budget")
    p.add_argument("--teacher-steps", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ema", type=float, default=EMA_DECAY)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--teacher-rows", default="1,2,4,8,20", help="the teacher's step counts")
    p.add_argument("--ddim-rows", default="8,16", help="the teacher's step counts with DDIM, "
                   "the sampler the students are distilled from (empty: none)")  # fmt: skip
    p.add_argument("--student-samplers", default="ddim,lcm", help="the samplers of the students' "
                   "rows: ddim (the path they learn), lcm (fresh noise between their steps)")  # fmt: skip
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a tiny run, for the tests")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    tune_allocator()
    print(machine_line())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = out / "teacher"
    t0 = time.perf_counter()
    if a.quick:
        a.n, a.teacher_steps = 64, 16
    if a.teacher:
        copy_teacher(Path(a.teacher), teacher)
    elif a.quick:
        if not RunFolder(teacher).exists():
            train_run(run_config_from_dict(QUICK_TEACHER), teacher)
    elif not RunFolder(teacher).exists():
        api.train(teacher, data="builtin:shapes", time_budget=a.train)
    report = RunFolder(teacher).stage_report()
    stage_s = sum(float(r.get("seconds") or 0) for r in report.values() if isinstance(r, dict))
    print(f"teacher {a.teacher or teacher}: {stage_s / 60:.1f} min of training (its stages), "
          f"{(time.perf_counter() - t0) / 60:.1f} min here")  # fmt: skip

    # the measurement's parts, as `ldmkit eval` makes them (before the student copies the caches)
    folder = RunFolder(teacher)
    train = folder.load_data()
    net = get_feature_net("domain", dataset=train, run_dir=teacher)
    ref = reference_features(train, net, n=2 * a.n, cache_dir=folder.eval_dir / "reference")
    floor = real_vs_real_floor(ref, a.n)
    print(f"floor ({net.name}, n = {a.n}): FID {floor['FID']:.3f}")
    t = LatentDiffusion.from_run(teacher)
    classes = t.conditioner.num_classes or 0
    labels = ref.labels[: a.n].clone() if classes and ref.labels is not None else None
    if classes and labels is None:
        labels = torch.arange(a.n) % classes
    grids = out / "grids"

    def measure(name: str, ldm: LatentDiffusion, sampler: str, steps: int, guidance) -> dict:
        w0, c0 = time.perf_counter(), time.process_time()
        x = ldm.sample(a.n, sampler=sampler, steps=steps, class_labels=labels, seed=0,
                       guidance_scale=guidance, batch_size=BATCH)  # fmt: skip
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        m = evaluate_samples(x, ref, net, seed=0)
        acc = None
        if labels is not None:
            acc = float((net.logits(x).argmax(1) == labels).double().mean())
        if name.startswith("student") or steps in (4, 20):
            idx = (torch.cat([torch.nonzero(labels == c).flatten()[:8] for c in range(classes)])
                   if labels is not None else torch.arange(min(64, a.n)))  # fmt: skip
            grids.mkdir(exist_ok=True)
            file = f"{name}-{sampler}-{steps}.png"
            if name.startswith("student"):  # named by --name: a second student keeps the first's
                stem = f"{a.name}-{steps}"
                file = f"{stem}.png" if sampler == "ddim" else f"{stem}-{sampler}.png"
            save_grid(x[idx], grids / file, nrow=8, scale=2)
        g = guidance if guidance is not None else ldm.guidance_scale
        row = {"model": name, "sampler": sampler, "steps": steps,
               "guidance": g if classes else None, "FID": m["FID"], "accuracy": acc,
               "wall_s": wall, "cpu_s": cpu}  # fmt: skip
        print("  " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                 for k, v in row.items()}), flush=True)  # fmt: skip
        return row

    # the teacher's rows (kept by weights, n, seed and features: a second call reuses them)
    key = f"{folder.weights_hash()}:{a.n}:0:{net.fingerprint}:{t.guidance_scale}"
    cache = out / "teacher-rows.json"
    kept = json.loads(cache.read_text()) if cache.is_file() else {}
    kept = kept if kept.get("key") == key else {"key": key, "rows": {}}
    wanted = [(t.default_sampler, int(k)) for k in a.teacher_rows.split(",")]
    wanted += [("ddim", int(k)) for k in a.ddim_rows.split(",") if k.strip()]
    teacher_rows = []
    for sampler, k in sorted(set(wanted), key=lambda r: (r[0] == "ddim", r[1])):
        name = str(k) if sampler == t.default_sampler else f"{sampler}:{k}"
        if name not in kept["rows"]:
            kept["rows"][name] = measure("teacher", t, sampler, k, None)
            cache.write_text(json.dumps(kept, indent=1))
        teacher_rows.append(kept["rows"][name])

    # the students: distilled once, each halving's student saved; a later call reuses them
    student = out / a.name
    saved = out / f"{a.name}-students"
    record = RunFolder(student).distill_record() if RunFolder(student).exists() else None
    if record is None or not record.get("complete"):

        def keep(n: int, unet: torch.nn.Module) -> None:
            unet.save_pretrained(saved / str(n))

        t0 = time.perf_counter()
        res = distill_run(
            teacher, student, steps=1, teacher_steps=a.teacher_steps,
            iterations=5 if a.quick else 1_000_000, batch_size=8 if a.quick else a.batch_size,
            lr=1e-3 if a.quick else a.lr, ema_decay=a.ema,
            time_budget_s=None if a.quick else parse_duration(a.budget), on_halving=keep,
            resume=record is not None,
        )  # fmt: skip
        print(f"distillation {a.teacher_steps} -> {res.steps} steps: "
              f"{(time.perf_counter() - t0) / 60:.1f} min")  # fmt: skip
        record = RunFolder(student).distill_record()
    minutes = sum(h["seconds"] for h in record["halvings"]) / 60
    print(f"distillation: {minutes:.1f} min of halvings (lr {a.lr:g}, EMA {a.ema:g}, batch "
          f"{a.batch_size}, teacher steps {a.teacher_steps}); halvings:")  # fmt: skip
    for h in record["halvings"]:
        print("  " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                 for k, v in h.items()}))  # fmt: skip
    student_rows = []
    for k in STUDENT_STEPS:
        if (saved / str(k)).is_dir():
            s = LatentDiffusion(t.vae, UNet.from_pretrained(saved / str(k)).eval(), t.schedule,
                                class_names=t.class_names, default_sampler="ddim",
                                default_steps=k)  # fmt: skip
            for sampler in a.student_samplers.split(","):
                student_rows.append(measure(f"student-{k}", s, sampler.strip(), k, 1.0))

    own = [r for r in teacher_rows if r["sampler"] == t.default_sampler]
    ref20 = next((r for r in own if r["steps"] == 20), own[-1])
    base = ref20["cpu_s"]
    rows = []
    for r in [*teacher_rows, *student_rows]:
        rows.append([r["model"], r["sampler"], r["steps"], r["guidance"] or "-", r["FID"],
                     r["FID"] / ref20["FID"], r["accuracy"] if r["accuracy"] is not None else "-",
                     r["cpu_s"], base / r["cpu_s"]])  # fmt: skip
    head = ["model", "sampler", "steps", "guidance", "FID-cnn", "vs_teacher20", "accuracy",
            "cpu_s", "speed-up"]  # fmt: skip
    print()
    print_table(head, rows)
    summary = {"machine": machine_line(), "n": a.n, "floor_FID": floor["FID"],
               "feature_net": net.name, "teacher": str(a.teacher or teacher),
               "distill_minutes": minutes, "lr": a.lr, "ema": a.ema, "batch_size": a.batch_size,
               "teacher_steps": a.teacher_steps, "halvings": record["halvings"],
               "rows": [*teacher_rows, *student_rows]}  # fmt: skip
    (out / f"{a.name}-table.json").write_text(json.dumps(summary, indent=1))
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) + " |"
           for r in rows]  # fmt: skip
    (out / f"{a.name}-table.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
