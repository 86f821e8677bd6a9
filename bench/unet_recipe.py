"""The UNet stage's recipe at equal CPU time: which settings draw the asked-for class most often.

    python bench/unet_recipe.py train --run RUN --out DIR --budget 450s --variants recipe,wsd,...
    python bench/unet_recipe.py train ... --steps N       # N steps each, no time budget
    python bench/unet_recipe.py judge --run RUN --out DIR [--judge-dir J] [--guidance 1.5,2,3]
    python bench/unet_recipe.py list

`train` gives each variant a copy of RUN's autoencoder and cached latents (so every variant
diffuses in the same latent space) and trains a fresh UNet on them with `--budget` of wall clock
(`ldmkit train --time-budget`'s own plan: the step time is probed and the LR schedule fitted to
the steps that fit), in this process, with --threads threads. Run two `train` processes with one
thread each side by side to use both cores: each variant then sees the same kind of machine.

`judge` reads every variant folder in DIR with one independent classifier (seed 1, --epochs,
trained on RUN's data once and kept in --judge-dir), and prints, per variant and guidance scale,
the UNet's steps, the share of --n samples (one class per n / classes) that it reads as the class
asked for, and FID in its features against held-out real images, beside the real-vs-real floor.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from benchlib import load_line, machine_line, print_table
from busy_machine import stage_steps

from ldmkit.checkpoint import read_json, write_json
from ldmkit.config import deep_update, to_dict
from ldmkit.recipe import run_config_from_dict, settings_dict
from ldmkit.runs import RunFolder

# each variant: --set items on top of RUN's own run.json (its recipe); "recipe" changes nothing
VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "wsd": ["unet_train.lr_schedule=wsd"],
    "lr2e-3": ["unet_train.lr=2e-3"],
    "lr5e-4": ["unet_train.lr=5e-4"],
    "ema0.995": ["unet_train.ema_decay=0.995"],
    "batch16": ["unet_train.batch_size=16"],
    "batch64": ["unet_train.batch_size=64"],
    "attn8": ["unet.attention_resolutions=[8,4]"],
    "res2": ["unet.num_res_blocks=2"],
    "wide": ["unet.block_out_channels=[48,96,192]"],
    "thin": ["unet.block_out_channels=[32,64,64]"],
    "no-minsnr": ["diffusion.loss_weighting=none"],
    "stratified": ["diffusion.timestep_sampling=stratified"],
    "dropout0.2": ["diffusion.class_dropout=0.2"],
    # the second round: on top of wsd, the first round's winner
    "wsd-ema0.995": ["unet_train.lr_schedule=wsd", "unet_train.ema_decay=0.995"],
    "wsd-lr2e-3": ["unet_train.lr_schedule=wsd", "unet_train.lr=2e-3"],
    "wsd-gamma2": ["unet_train.lr_schedule=wsd", "diffusion.min_snr_gamma=2"],
    "wsd-gamma1": ["unet_train.lr_schedule=wsd", "diffusion.min_snr_gamma=1"],
    "wsd-thin": ["unet_train.lr_schedule=wsd", "unet.block_out_channels=[32,64,64]"],
    "wsd-stratified": ["unet_train.lr_schedule=wsd", "diffusion.timestep_sampling=stratified"],
}
COPIED = ("vae", "latents.safetensors", "latents.json", "data.json")


def prepare(run: Path, out: Path, sets: list[str], budget: str | None, steps: int | None):
    """A run folder at `out` holding RUN's autoencoder and latents, and RUN's config with
    `sets` and the budget (or, with `steps`, that many steps and no budget); returns its
    RunConfig."""
    saved = read_json(run / "run.json")
    deep_update(saved, settings_dict(None, sets))
    saved.update(time_budget=None if steps else budget, choose_guidance=False)
    saved["unet_train"].update(sample_every=0, checkpoint_every=100_000)
    if steps:
        saved["unet_train"].update(steps=steps, warmup_steps=min(steps, 100))
    cfg = run_config_from_dict(saved)
    out.mkdir(parents=True)
    for name in COPIED:
        src = run / name
        if src.is_dir():
            shutil.copytree(src, out / name)
        elif src.exists():
            shutil.copy2(src, out / name)
    write_json(out / "run.json", to_dict(cfg))
    return cfg


def train(a: argparse.Namespace) -> None:
    from ldmkit.training.run import train_run

    torch.set_num_threads(a.threads)
    print(machine_line(), f"threads {a.threads}", flush=True)
    for name in a.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; `list` shows them")
        out = Path(a.out) / name
        if out.exists():
            print(f"{out} exists: skipped", flush=True)
            continue
        cfg = prepare(Path(a.run), out, VARIANTS[name] + a.set, a.budget, a.steps)
        t0, c0 = time.perf_counter(), time.process_time()
        train_run(cfg, out, resume=True, stage="diffusion")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        write_json(out / "bench.json", {"variant": name, "sets": VARIANTS[name] + a.set,
                                        "wall_s": wall, "cpu_s": cpu, "threads": a.threads,
                                        "load": load_line()})  # fmt: skip
        print(f"{name}: {wall:.0f} s wall, {cpu:.0f} CPU-s; {load_line()}", flush=True)


def judge(a: argparse.Namespace) -> None:
    from ldmkit.data import load_dataset
    from ldmkit.evaluation.features import DomainClassifier, train_domain_classifier
    from ldmkit.evaluation.reference import (
        evaluate_samples,
        held_out_spec,
        real_vs_real_floor,
        reference_features,
    )
    from ldmkit.pipeline import LatentDiffusion

    torch.set_num_threads(a.threads)
    print(machine_line(), f"threads {a.threads}")
    ds = RunFolder(a.run).load_data()
    jdir = Path(a.judge_dir) if a.judge_dir else Path(a.out) / f"judge-{a.epochs}"
    if (jdir / "config.json").exists():
        net, acc = DomainClassifier.from_pretrained(jdir), read_json(jdir / "bench.json")["acc"]
    else:
        net, acc = train_domain_classifier(ds.images, ds.labels, epochs=a.epochs, seed=1)
        net.save_pretrained(jdir)
        write_json(jdir / "bench.json", {"acc": acc, "epochs": a.epochs, "seed": 1})
    held = held_out_spec(RunFolder(a.run).config().data)
    test = load_dataset(held[0], image_size=ds.image_size, channels=ds.channels,
                        seed=held[1]) if held else ds  # fmt: skip
    ref = reference_features(test, net, n=2 * a.n, cache_dir=None)
    floor = real_vs_real_floor(ref, a.n)
    k = len(ds.class_names or []) or 1
    labels = torch.arange(a.n) % k
    rows, record = [], []
    names = a.variants.split(",") if a.variants else sorted(
        p.name for p in Path(a.out).iterdir() if (p / "unet").is_dir())  # fmt: skip
    for name in names:
        out = Path(a.out) / name
        ldm = LatentDiffusion.from_run(out)
        info = read_json(out / "bench.json") if (out / "bench.json").exists() else {}
        steps = stage_steps(RunFolder(out)).get("diffusion", 0)
        for g in [float(x) for x in a.guidance.split(",")]:
            x = ldm.sample(a.n, class_labels=labels if k > 1 else None, seed=0, guidance_scale=g)
            m = evaluate_samples(x, ref, net)
            pred = net.logits(x).argmax(1)
            accuracy = float((pred == labels).double().mean())
            per_class = [float((pred[labels == c] == c).double().mean()) for c in range(k)]
            rows.append([name, steps, f"{info.get('cpu_s', float('nan')):.0f}", f"{g:g}",
                         f"{accuracy:.3f}", " ".join(f"{p:.2f}" for p in per_class),
                         f"{m['FID']:.2f}"])  # fmt: skip
            record.append({"variant": name, "steps": steps, "guidance": g,
                           "accuracy": accuracy, "per_class": per_class, "fid": m["FID"]})  # fmt: skip
            print(rows[-1], flush=True)
    print(f"independent classifier ({a.epochs} epochs, seed 1): held-out accuracy {acc:.3f} on "
          f"real images; classes {', '.join(ds.class_names or [])}; FID floor (real vs real, "
          f"n = {a.n}) {floor['FID']:.2f}; n = {a.n} samples per row, the run's sampler")  # fmt: skip
    print_table(["variant", "UNet steps", "CPU-s", "guidance", "class accuracy",
                 "per class", "FID-cnn"], rows)  # fmt: skip
    write_json(Path(a.out) / "judged.json", {"rows": record, "floor": floor["FID"], "acc": acc})
    print(load_line())
    print("command: python bench/unet_recipe.py " + " ".join(sys.argv[1:]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    j = sub.add_parser("judge")
    sub.add_parser("list")
    for q in (t, j):
        q.add_argument("--run", required=True, help="a trained run: its autoencoder and data")
        q.add_argument("--out", required=True, help="one folder per variant in here")
        q.add_argument("--threads", type=int, default=1)
    t.add_argument("--budget", default="450s", help="each variant's UNet stage, wall clock")
    t.add_argument("--steps", type=int, default=None, help="this many steps, no budget")
    t.add_argument("--variants", default="recipe")
    t.add_argument("--set", action="append", default=[], help="on every variant")
    j.add_argument("--variants", default=None, help="default: every trained folder in --out")
    j.add_argument("--guidance", default="1.5,2,3")
    j.add_argument("--n", type=int, default=500)
    j.add_argument("--epochs", type=int, default=15)
    j.add_argument("--judge-dir", default=None, help="keep / reuse the classifier here")
    a = p.parse_args(argv)
    if a.cmd == "list":
        print(json.dumps(VARIANTS, indent=1))
    else:
        (train if a.cmd == "train" else judge)(a)


if __name__ == "__main__":
    main()
