"""Does generated data help a classifier? The augmentation study of issue 29.

    python bench/augment_study.py [--data mnist,shapes] [--per-class 10,50,200]
        [--ratios 1,3,10] [--seeds 3] [--unet-steps 10=1000,50=1500,200=2500 | --budget 4m]
        [--steps 10] [--size 16] [--out DIR] [--threads N]
    python bench/augment_study.py --quick            # a minute: checks the plumbing only

For each data set and each number k of real images per class:
  1. k real training images per class are drawn (seed 0) and written as a labelled folder;
  2. a generator (`ldmkit train`: the default recipe at --size, --unet-steps UNet steps, see
     DEFAULT_UNET_STEPS) is trained on those images only: it never sees the rest of the
     training set, nor the test set; one generator serves every ratio and seed of its k;
  3. `ldmkit synth` draws max(ratios) x k images per class from it (`--steps` of the default
     sampler); ratio r takes the first r x k of each class;
  4. the fixed CAS classifier (`ldmkit.evaluation.cas`, the same recipe as `eval --cas`) is
     trained, once per seed, on: the k real images per class alone ("real"), real + r x k
     generated per class for each ratio ("+1:r"), and k generated per class alone ("gen", the
     CAS at this size: the generator's own quality); each is tested on the same real test
     images (MNIST: 2000 of its test split; shapes: 2000 shapes drawn with another seed).
The table gives each accuracy's mean and std over the seeds, the change against real only, and
flags a generator as WEAK where its CAS is under halfway from chance to the real accuracy, and a
cell as no-signal where the classifier learns next to nothing from its k real images; the plot draws accuracy against the ratio, a line per k, a panel per data set.

Resumable: each (data set, k) keeps its state in DIR/<data>-<k>/state.json (the generator once
trained, the synth folder, each classifier's accuracy as measured), so a killed study run again
with the same options continues where it stopped; the two data sets may run as two processes
(`--data mnist` and `--data shapes` into the same --out), then one call with both gathers the
table and the plot from what they stored. Results: DIR/augment_study.json and .png.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from benchlib import load_line, machine_line, print_table
from PIL import Image

from ldmkit import api
from ldmkit.checkpoint import write_json
from ldmkit.data import load_dataset
from ldmkit.evaluation import cas
from ldmkit.synth import read_synth

# data set -> (training spec, test spec)
DATA = {
    "mnist": ("builtin:mnist", "builtin:mnist?split=test"),
    "shapes": ("builtin:shapes?n=6000", "builtin:shapes?n=2000"),
}
TEST_N = 2000
# each generator: the default recipe at --size with set step counts (not a wall-time budget, so
# that a busy machine does not change the generators): UNet steps per k real images per class,
# the autoencoder's steps (it reaches its readability target in about 120 at 16 px), and a fixed
# guidance scale (the 10-minute runs measured 2 for MNIST, 3 for shapes; measuring it for each
# generator would cost about a minute each)
DEFAULT_UNET_STEPS = "10=1000,50=1500,200=2500"
VAE_STEPS = 300
GUIDANCE = 3.0
QUICK_SETS = [  # the smallest run that trains (tests/reliability's TINY), 16 px
    "vae.block_out_channels=[8,8]", "vae.norm_groups=4", "vae.layers_per_block=1",
    "vae.mid_attention=false", "unet.block_out_channels=[8,16]",
    "unet.attention_resolutions=[]", "unet.norm_num_groups=4", "unet.head_dim=8",
    "unet.num_res_blocks=1", "unet.mid_attention=false", "vae_train.batch_size=8",
    "unet_train.batch_size=8", "vae_train.steps=4", "unet_train.steps=4",
    "vae_train.sample_every=0", "unet_train.sample_every=0", "preview_steps=2",
]  # fmt: skip


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="mnist,shapes")
    p.add_argument("--per-class", default="10,50,200")
    p.add_argument("--ratios", default="1,3,10")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--unet-steps", default=DEFAULT_UNET_STEPS,
                   help="each generator's UNet steps: one count, or K=STEPS per number of real "
                        "images per class")  # fmt: skip
    p.add_argument("--budget", default=None,
                   help="instead of --unet-steps: each generator's wall time (the default "
                        "recipe's budget split): one duration, or K=DURATION per k")  # fmt: skip
    p.add_argument("--steps", type=int, default=10, help="sampler steps of the generated images")
    p.add_argument("--size", type=int, default=16, help="image size of every image")
    p.add_argument("--out", default="augment_study", help="folder of the runs, images, results")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.per_class, args.ratios, args.seeds, args.steps = "shapes", "4", "1,2", 1, 2
    return args


def per_k(flag: str, spec: str, k: int) -> str:
    """The value of a per-k flag for k real images per class: "4m", or "10=2m,50=3m,200=4m"."""
    if "=" not in spec:
        return spec
    table = dict(item.split("=", 1) for item in spec.split(","))
    if str(k) not in table:
        raise SystemExit(f"{flag} {spec} names no value for {k} images per class")
    return table[str(k)]


def real_folder(images: torch.Tensor, labels: torch.Tensor, names: list[str], out: Path) -> Path:
    """A labelled folder (one sub-folder per class) of uint8 images (N, C, H, W)."""
    for i, (x, y) in enumerate(zip(images, labels.tolist())):
        a = x.permute(1, 2, 0).numpy()
        (out / names[y]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(out / names[y] / f"{i:05d}.png")
    return out


def first_per_class(labels: torch.Tensor, n: int, classes: int) -> torch.Tensor:
    """Indices of the first n items of each class (a synth folder's images in drawing order)."""
    return torch.cat([(labels == c).nonzero().flatten()[:n] for c in range(classes)])


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


NO_SIGNAL = 0.1  # real-only accuracy within this of chance: the classifier learns nothing


def generator_status(acc: dict[str, list[float]], classes: int) -> str:
    """The cell's status: "no-signal" where the classifier learns next to nothing from k real
    images per class (real only within NO_SIGNAL of chance: the cell cannot tell whether
    anything helps),
    "WEAK" where the generator's images alone (the CAS at k) train it to less than halfway from
    chance to what as many real images reach, else "ok"."""
    chance, real = 1 / classes, spread(acc["real"])[0]
    if real < chance + NO_SIGNAL:
        return "no-signal"
    return "WEAK" if spread(acc["gen"])[0] < chance + 0.5 * (real - chance) else "ok"


def study_one(name: str, k: int, args: argparse.Namespace, root: Path) -> dict:
    """One (data set, k) cell: the generator, its images and every classifier's accuracy.
    Resumable: CELL/state.json records the finished generator and each classifier's accuracy as
    it is measured; a call after a kill redoes only what was not recorded (an unfinished
    generator is trained again from scratch, an unfinished synth folder is completed)."""
    train_spec, test_spec = DATA[name]
    size = 16 if args.quick else args.size
    ratios = [int(r) for r in args.ratios.split(",")]
    if args.quick:
        train_spec, test_spec = "builtin:shapes?n=100", "builtin:shapes?n=60"
    cell = root / f"{name}-{k}"
    cell.mkdir(parents=True, exist_ok=True)
    state_path = cell / "state.json"
    budget = None if args.quick or not args.budget else per_k("--budget", args.budget, k)
    unet_steps = None if args.quick or budget else int(per_k("--unet-steps", args.unet_steps, k))
    ident = {"data": name, "per_class": k, "size": size, "budget": budget,
             "unet_steps": unet_steps, "steps": args.steps,
             "max_ratio": max(ratios), "quick": args.quick}  # fmt: skip
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("ident") != ident:  # another configuration: start the cell again
        if state:
            print(f"{cell.name}: options changed since its last run; starting it again")
        shutil.rmtree(cell)
        cell.mkdir(parents=True)
        state = {"ident": ident, "acc": {}}

    def save() -> None:
        write_json(state_path, state)

    pool = load_dataset(train_spec, image_size=size, seed=0)
    test = load_dataset(test_spec, image_size=size, seed=1)
    names, classes = pool.class_names, len(pool.class_names)
    pick = cas.balanced(pool.labels, k, 0, classes)
    real_x, real_y = pool.images[pick], pool.labels[pick]
    t = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:TEST_N]
    test_x, test_y = test.images[t], cas.map_labels(test.labels[t], test.class_names, names)
    run = cell / "run"
    if "train_s" not in state:
        shutil.rmtree(cell / "real", ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)  # a generator killed while training
        data_dir = real_folder(real_x, real_y, names, cell / "real")
        t0, c0 = time.perf_counter(), time.process_time()
        sets = QUICK_SETS if args.quick else [] if budget else [
            f"unet_train.steps={unet_steps}", f"vae_train.steps={VAE_STEPS}",
            "choose_guidance=false", f"guidance_scale={GUIDANCE}"]  # fmt: skip
        api.train(run, data=str(data_dir), time_budget=budget, seed=0, image_size=size,
                  sets=sets)  # fmt: skip
        state["train_s"], state["train_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        done = json.loads((run / "training.json").read_text())
        state["unet_steps"] = done.get("diffusion", {}).get("steps")
        save()
    if "synth_s" not in state:
        t0, c0 = time.perf_counter(), time.process_time()
        result = api.synth(run, cell / "synth", per_class=k * max(ratios), steps=args.steps)
        state["synth_s"], state["synth_cpu_s"] = time.perf_counter() - t0, time.process_time() - c0
        state["generated"] = result.kept
        save()
    gen_x, gen_y, _, gen_names = read_synth(cell / "synth")
    gen_y = cas.map_labels(gen_y, gen_names, names)
    keys = ["real", *(f"+1:{r}" for r in ratios), "gen"]
    for s in range(args.seeds):
        for key in keys:
            if str(s) in state["acc"].get(key, {}):
                continue
            if key == "real":
                x, y = real_x, real_y
            elif key == "gen":
                g = first_per_class(gen_y, k, classes)
                x, y = gen_x[g], gen_y[g]
            else:
                g = first_per_class(gen_y, k * int(key[3:]), classes)
                x, y = torch.cat([real_x, gen_x[g]]), torch.cat([real_y, gen_y[g]])
            c0 = time.process_time()
            model = cas.train_classifier(x, y, classes, seed=s)
            state["acc"].setdefault(key, {})[str(s)] = cas.accuracy(model, test_x, test_y)
            state["classifier_cpu_s"] = state.get("classifier_cpu_s", 0) + time.process_time() - c0
            save()
    acc = {key: [state["acc"][key][str(s)] for s in range(args.seeds)] for key in keys}
    return {"data": name, "per_class": k, "size": size, "ratios": ratios, "accuracy": acc,
            "classes": classes, "status": generator_status(acc, classes), "budget": budget,
            "unet_steps": state["unet_steps"], "generated": state["generated"],
            "train_s": state["train_s"], "synth_s": state["synth_s"],
            "cpu_s": {"train": state["train_cpu_s"], "synth": state["synth_cpu_s"],
                      "classifiers": state["classifier_cpu_s"]},
            "n_test": len(test_x)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = cas.MIN_STEPS
    if args.quick:
        cas.MIN_STEPS = 20  # plumbing only: the figures mean nothing
    try:
        run_study(args)
    finally:
        cas.MIN_STEPS = steps


def run_study(args: argparse.Namespace) -> None:
    print(machine_line())
    quick_tmp = args.quick and args.out == "augment_study"
    root = Path(tempfile.mkdtemp(prefix="augment-")) if quick_tmp else Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    cells = []
    t0 = time.perf_counter()
    for name in args.data.split(","):
        for k in (int(v) for v in args.per_class.split(",")):
            cells.append(study_one(name, k, args, root))
            shown = {key: round(spread(v)[0], 3) for key, v in cells[-1]["accuracy"].items()}
            print(f"{name} k={k}: {shown} ({load_line()})", flush=True)
    columns = ["data", "real/class", *cells[0]["accuracy"], "generator"]
    rows = []
    for c in cells:
        real, _ = spread(c["accuracy"]["real"])
        row: list[object] = [c["data"], c["per_class"]]
        for key, values in c["accuracy"].items():
            mean, std = spread(values)
            row.append(f"{mean:.3f}+-{std:.3f}" + ("" if key == "real" else
                                                   f"({mean - real:+.3f})"))  # fmt: skip
        row.append(f"{c['status']},{c['unet_steps']}-steps")
        rows.append(row)
    print(f"accuracy on {cells[0]['n_test']} real test images, mean+-std over {args.seeds} "
          "seed(s); (change against real only); gen = trained on k generated images per class "
          "alone (the CAS at k); generator: WEAK when gen is under halfway from chance to real, "
          "no-signal when real only is within 0.1 of chance, and its UNet steps")  # fmt: skip
    print_table(columns, rows)
    cpu = sum(sum(c["cpu_s"].values()) for c in cells)
    print(f"CPU time of the study {cpu / 60:.1f} min (generators "
          f"{sum(c['cpu_s']['train'] for c in cells) / 60:.1f}, synth "
          f"{sum(c['cpu_s']['synth'] for c in cells) / 60:.1f}, classifiers "
          f"{sum(c['cpu_s']['classifiers'] for c in cells) / 60:.1f}; across resumed calls); "
          f"this call {time.perf_counter() - t0:.0f} s wall; {load_line()}")  # fmt: skip
    (root / "augment_study.json").write_text(json.dumps(
        {"machine": machine_line(), "args": vars(args), "classifier": cas.recipe(),
         "cpu_s": cpu, "cells": cells}, indent=1))  # fmt: skip
    plot(cells, root / "augment_study.png")
    print(f"wrote {root / 'augment_study.json'}")


def plot(cells: list[dict], path: Path) -> None:
    """Accuracy against the ratio of generated to real images, a line per number of real
    images per class, a panel per data set; the CAS at k (generated only) in the legend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: table only")
        return
    names = list(dict.fromkeys(c["data"] for c in cells))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for c in (c for c in cells if c["data"] == name):
            keys = ["real", *(f"+1:{r}" for r in c["ratios"])]
            stats = [spread(c["accuracy"][key]) for key in keys]
            cas_mean = spread(c["accuracy"]["gen"])[0]
            tail = {"ok": ")", "WEAK": ", weak generator)", "no-signal": ", real ~ chance)"}[
                c["status"]
            ]
            label = f"{c['per_class']} real/class (CAS {cas_mean:.2f}{tail}"
            ax.errorbar(range(len(keys)), [m for m, _ in stats], yerr=[s for _, s in stats],
                        marker="o", capsize=3, label=label)  # fmt: skip
            ax.set_xticks(range(len(keys)), ["real only", *(f"1:{r}" for r in c["ratios"])])
        ax.axhline(1 / cells[[c["data"] for c in cells].index(name)]["classes"], color="grey",
                   linestyle=":", linewidth=1, label="chance")  # fmt: skip
        ax.set_xlabel("real : generated images")
        ax.set_ylabel("accuracy on the real test set")
        ax.set_title(name)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
