"""Does generated data help a classifier? The augmentation study of issue 29.

    python bench/augment_study.py [--data mnist,shapes] [--per-class 10,50,200]
        [--ratios 1,3,10] [--seeds 3] [--budget 4m] [--steps 20] [--out DIR] [--threads N]
    python bench/augment_study.py --quick            # a minute: checks the plumbing only

For each data set and each number k of real images per class:
  1. k real training images per class are drawn (seed 0) and written as a labelled folder;
  2. a generator (`ldmkit train`, the default recipe, `--budget` of wall time) is trained on
     those images only: it never sees the rest of the training set, nor the test set;
  3. `ldmkit synth` draws max(ratios) x k images per class from it (`--steps` of the default
     sampler); ratio r takes the first r x k of each class;
  4. the fixed CAS classifier (`ldmkit.evaluation.cas`, the same recipe as `eval --cas`) is
     trained, once per seed, on: the k real images per class alone ("real"), real + r x k
     generated per class for each ratio ("+1:r"), and the k x 1 generated alone ("gen", the
     CAS at this size); each is tested on the same real test images (MNIST: 2000 of its test
     split; shapes: 2000 shapes drawn with another seed).
The table gives each accuracy's mean and std over the seeds and the change against real only;
the plot draws accuracy against k per data set. The generator's own quality (its training
images only) is the limit of the study: it is what a user with k images per class would have.
Results: DIR/augment_study.json and DIR/augment_study.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from benchlib import load_line, machine_line, print_table
from PIL import Image

from ldmkit import api
from ldmkit.data import load_dataset
from ldmkit.evaluation import cas
from ldmkit.synth import read_synth

# data set -> (training spec, test spec, image size)
DATA = {
    "mnist": ("builtin:mnist", "builtin:mnist?split=test", 32),
    "shapes": ("builtin:shapes?n=6000", "builtin:shapes?n=2000", 32),
}
TEST_N = 2000
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
    p.add_argument("--budget", default="4m", help="wall time of each generator's training")
    p.add_argument("--steps", type=int, default=20, help="sampler steps of the generated images")
    p.add_argument("--out", default="augment_study", help="folder of the runs, images, results")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.per_class, args.ratios, args.seeds, args.steps = "shapes", "4", "1,2", 1, 2
    return args


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


def study_one(name: str, k: int, args: argparse.Namespace, root: Path) -> dict:
    """One (data set, k) cell: the generator, its images and every classifier's accuracy."""
    train_spec, test_spec, size = DATA[name]
    size = 16 if args.quick else size
    ratios = [int(r) for r in args.ratios.split(",")]
    if args.quick:
        train_spec, test_spec = "builtin:shapes?n=100", "builtin:shapes?n=60"
    pool = load_dataset(train_spec, image_size=size, seed=0)
    test = load_dataset(test_spec, image_size=size, seed=1)
    names, classes = pool.class_names, len(pool.class_names)
    pick = cas.balanced(pool.labels, k, 0, classes)
    real_x, real_y = pool.images[pick], pool.labels[pick]
    t = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:TEST_N]
    test_x, test_y = test.images[t], cas.map_labels(test.labels[t], test.class_names, names)
    cell = root / f"{name}-{k}"
    data_dir = real_folder(real_x, real_y, names, cell / "real")
    t0 = time.perf_counter()
    run = cell / "run"
    if not (run / "unet").is_dir():
        sets = QUICK_SETS if args.quick else []
        api.train(run, data=str(data_dir), time_budget=None if args.quick else args.budget,
                  seed=0, image_size=size, sets=sets)  # fmt: skip
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = api.synth(run, cell / "synth", per_class=k * max(ratios), steps=args.steps)
    synth_s = time.perf_counter() - t0
    gen_x, gen_y, _, gen_names = read_synth(cell / "synth")
    gen_y = cas.map_labels(gen_y, gen_names, names)
    acc: dict[str, list[float]] = {"real": [], **{f"+1:{r}": [] for r in ratios}, "gen": []}
    for s in range(args.seeds):
        model = cas.train_classifier(real_x, real_y, classes, seed=s)
        acc["real"].append(cas.accuracy(model, test_x, test_y))
        for r in ratios:
            g = first_per_class(gen_y, k * r, classes)
            x = torch.cat([real_x, gen_x[g]])
            y = torch.cat([real_y, gen_y[g]])
            model = cas.train_classifier(x, y, classes, seed=s)
            acc[f"+1:{r}"].append(cas.accuracy(model, test_x, test_y))
        g = first_per_class(gen_y, k, classes)
        model = cas.train_classifier(gen_x[g], gen_y[g], classes, seed=s)
        acc["gen"].append(cas.accuracy(model, test_x, test_y))
    return {"data": name, "per_class": k, "ratios": ratios, "accuracy": acc,
            "generated": result.kept, "train_s": train_s, "synth_s": synth_s,
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
            (root / "augment_study.partial.json").write_text(json.dumps(cells, indent=1))
    columns = ["data", "real/class", *cells[0]["accuracy"]]
    rows = []
    for c in cells:
        real, _ = spread(c["accuracy"]["real"])
        row: list[object] = [c["data"], c["per_class"]]
        for key, values in c["accuracy"].items():
            mean, std = spread(values)
            row.append(f"{mean:.3f}+-{std:.3f}" + ("" if key == "real" else
                                                   f"({mean - real:+.3f})"))  # fmt: skip
        rows.append(row)
    print(f"accuracy on the real test images, mean+-std over {args.seeds} seed(s); (change "
          "against real only); gen = trained on k generated images per class alone (the CAS)")  # fmt: skip
    print_table(columns, rows)
    print(f"total {time.perf_counter() - t0:.0f} s wall; {load_line()}")
    (root / "augment_study.json").write_text(json.dumps(
        {"machine": machine_line(), "args": vars(args), "classifier": cas.recipe(),
         "cells": cells}, indent=1))  # fmt: skip
    plot(cells, root / "augment_study.png")
    print(f"wrote {root / 'augment_study.json'}")


def plot(cells: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: table only")
        return
    names = list(dict.fromkeys(c["data"] for c in cells))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        mine = [c for c in cells if c["data"] == name]
        ks = [c["per_class"] for c in mine]
        for key in mine[0]["accuracy"]:
            stats = [spread(c["accuracy"][key]) for c in mine]
            ax.errorbar(ks, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                        capsize=3, label=key if key != "gen" else "generated only")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("real training images per class")
        ax.set_ylabel("test accuracy")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
