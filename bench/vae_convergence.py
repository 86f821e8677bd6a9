"""Seconds to a readable autoencoder: each recipe variant of the first stage trained alone, on
the same machine in one go, until its reconstructions reach a readability target.

    python bench/vae_convergence.py [--data builtin:shapes] [--target 0.95] [--cap 300]
        [--variants today,wsd,...] [--threads 1]
    python bench/vae_convergence.py --quick          # seconds: checks the plumbing
    python bench/vae_convergence.py --variants recipe --target 1.01 --cap 400 --curve
                                                     # the recipe's curve, past any target

Each variant is `train_run(..., stage="autoencoder")` with no time budget (the variant's step count and
LR schedule, so "today" is the recipe as a 10-minute main job ran it: cosine over 700 steps),
stopped by a stop request once a measurement reaches the target or the cap. The stage measures itself as it trains
(evaluation/reconstruction.py: PSNR, SSIM, and readability = the share of held-out
reconstructions that the run's domain classifier reads as their original's class); this script
reads those rows from the run's training.json and prints the first training CPU-second (and
step) at which readability >= --target, the best readability and PSNR within --cap CPU-seconds,
and the ratio to the first variant. CPU-seconds are the process's CPU time less the time spent
measuring: with one thread they are the wall time on a quiet core, and they stay within a few
per cent on a busy host, where wall time does not.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch
from benchlib import load_line, machine_line, print_table

# name -> --set overrides of the autoencoder's recipe (the other settings are the defaults)
VARIANTS: dict[str, dict[str, object]] = {
    "today": {
        "vae_train.lr_schedule": "cosine",
        "vae_train.steps": 700,
        "vae_train.lr": 2e-3,
        "vae_train.ema_decay": 0.995,
        "vae_train.batch_size": 32,
    },
    "today-3000": {
        "vae_train.lr_schedule": "cosine",
        "vae_train.steps": 3000,
        "vae_train.lr": 2e-3,
        "vae_train.ema_decay": 0.995,
    },
    "wsd": {"vae_train.lr_schedule": "wsd", "vae_train.steps": 3000},
    "wsd-ema.98": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.ema_decay": 0.98,
    },
    "wsd-noema": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.ema_decay": 0.0,
    },
    "lr4e-3": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.lr": 4e-3,
        "vae_train.ema_decay": 0.98,
    },
    "lr1e-3": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.lr": 1e-3,
        "vae_train.ema_decay": 0.98,
    },
    "b16": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.batch_size": 16,
        "vae_train.ema_decay": 0.98,
    },
    "b64": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.batch_size": 64,
        "vae_train.ema_decay": 0.98,
    },
    "wide": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.ema_decay": 0.98,
        "vae.block_out_channels": [32, 64],
    },
    "thin": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.ema_decay": 0.98,
        "vae.block_out_channels": [8, 16],
        "vae.norm_groups": 4,
    },
    "no-attn": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.ema_decay": 0.98,
        "vae.mid_attention": False,
    },
    "ssim0.5": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.ema_decay": 0.98,
        "vae.perceptual_weight": 0.5,
    },
    "l2": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.ema_decay": 0.98,
        "vae.reconstruction": "l2",
    },
    "feat1": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.ema_decay": 0.98,
        "vae.feature_weight": 1.0,
    },
    "feat10": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.ema_decay": 0.98,
        "vae.feature_weight": 10.0,
    },
    "feat100": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.ema_decay": 0.98,
        "vae.feature_weight": 100.0,
    },
    "feat1-b16": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.ema_decay": 0.98,
        "vae.feature_weight": 1.0,
        "vae_train.batch_size": 16,
    },
    "feat1-b8": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.ema_decay": 0.98,
        "vae.feature_weight": 1.0,
        "vae_train.batch_size": 8,
    },
    "feat0.3-b16": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.ema_decay": 0.98,
        "vae.feature_weight": 0.3,
        "vae_train.batch_size": 16,
    },
    "z8": {
        "vae_train.lr_schedule": "wsd",
        "vae_train.steps": 3000,
        "vae_train.ema_decay": 0.98,
        "vae.latent_channels": 8,
    },
    # at 128 px (--image-size 128): the size table's f8 autoencoder, with more latent channels,
    # and an f4 one (issue 26)
    "recipe": {},  # the recipe as it is, at any size
    "f8": {},
    "f8-z8": {"vae.latent_channels": 8},
    "f8-z16": {"vae.latent_channels": 16},
    "f4": {"vae.block_out_channels": [16, 32, 64]},
    # detail terms beside the recipe at any size (issue 26): without the judge's feature term,
    # with the PatchGAN from step 300, with the MS-SSIM term
    "recipe-nofeat": {"vae.feature_weight": 0.0},
    "recipe-disc": {"vae.disc_weight": 0.5, "vae.disc_start": 300},
    "recipe-ssim": {"vae.perceptual_weight": 0.5},
}
QUICK = {"vae_train.steps": 30, "vae_train.batch_size": 8}


def quality_rows(out: Path) -> list[dict]:
    log = out / "log.jsonl"
    if not log.is_file():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "quality"]


def print_curve(name: str, rows: list[dict], points: int = 10) -> None:
    """The measurements of one variant at about `points` evenly spaced rows (and the last)."""
    every = max(1, len(rows) // points)
    keep = rows[::every] + ([rows[-1]] if (len(rows) - 1) % every else [])
    print_table([f"{name}: step", "CPU-s", "PSNR", "SSIM", "readability"], [
        [r["step"], f"{r['cpu_s']:.0f}", f"{r['psnr']:.2f}", f"{r['ssim']:.3f}",
         f"{r['readability']:.3f}" if "readability" in r else "-"] for r in keep
    ])  # fmt: skip


def run_variant(name: str, sets: dict[str, object], args: argparse.Namespace, tmp: Path) -> dict:
    """Train the variant's autoencoder until a measurement reaches the target or passes the
    CPU-second cap (a stop request the loop checks every step)."""
    from ldmkit.recipe import run_config_from_dict, settings_dict
    from ldmkit.training.run import train_run

    out = tmp / name
    items = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
             for k, v in {**sets, **(QUICK if args.quick else {})}.items()]  # fmt: skip
    flags = {"data": args.data, "seed": args.seed, "image_size": args.image_size}
    cfg = run_config_from_dict(settings_dict(None, items, flags))
    state = {"n": 0, "stop": False}

    def stop() -> bool:  # read the log only when a new measurement may be there
        state["n"] += 1
        if state["n"] % 5 == 0:
            rows = quality_rows(out)
            if rows and (
                rows[-1].get("readability", 0) >= args.target or rows[-1]["cpu_s"] > args.cap
            ):
                state["stop"] = True
        return state["stop"]

    train_run(cfg, out, stage="autoencoder", stop=stop)
    rows = quality_rows(out)
    independent = independent_readability(out, args)
    fid = reconstruction_fid(out, args) if args.fid else (None, None)
    hit = next((r for r in rows if r.get("readability", 0) >= args.target), None)
    within = [r for r in rows if r["cpu_s"] <= args.cap] or rows[:1]
    last = rows[-1]
    return {
        "name": name, "hit_s": hit["cpu_s"] if hit else None, "hit_step": hit["step"] if hit else None,
        "best": max(r.get("readability", 0) for r in within),
        "best_psnr": max(r["psnr"] for r in within), "last_ssim": last["ssim"],
        "s_per_step": last["cpu_s"] / max(last["step"], 1), "independent": independent,
        "last_readability": last.get("readability"), "last_psnr": last["psnr"],
        "last_step": last["step"], "recon_fid": fid[0], "floor": fid[1],
    }  # fmt: skip


_INDEPENDENT: dict = {}
_REFERENCE: dict = {}


def independent_classifier(ds, args: argparse.Namespace):
    """A classifier trained apart from the run's (another seed, 5 epochs), once per data."""
    from ldmkit.evaluation.features import train_domain_classifier

    if args.data not in _INDEPENDENT:
        net, _ = train_domain_classifier(ds.images, ds.labels, epochs=5, seed=args.seed + 1)
        _INDEPENDENT[args.data] = net
    return _INDEPENDENT[args.data]


def final_autoencoder(out: Path):
    """The newest checkpoint's autoencoder (its EMA weights where it keeps them)."""
    from ldmkit.checkpoint import load_tensors
    from ldmkit.models.vae import Autoencoder
    from ldmkit.runs import RunFolder
    from ldmkit.training.state import list_checkpoints

    folder = RunFolder(out)
    vae = Autoencoder(folder.config().vae)
    weights = load_tensors(
        list_checkpoints(folder.checkpoints_dir, "autoencoder")[-1].path / "modules.safetensors"
    )
    prefix = "ema." if any(k.startswith("ema.") for k in weights) else "model."
    vae.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    return vae.eval()


def reconstruction_fid(out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(FID of reconstructions, the real-vs-real floor), both against the same --fid real
    images: the reconstructions are of --fid other real images (held out where the data has
    them, or --held-out), so a perfect autoencoder scores the floor."""
    from ldmkit.data import load_dataset
    from ldmkit.data.transforms import to_float
    from ldmkit.evaluation.feature_nets import get_feature_net
    from ldmkit.evaluation.reference import (
        evaluate_samples,
        held_out_spec,
        real_vs_real_floor,
        reference_features,
    )
    from ldmkit.runs import RunFolder

    n = args.fid
    if "ref" not in _REFERENCE:
        ds = RunFolder(out).load_data()
        spec, seed = (
            (args.held_out, 0) if args.held_out else (held_out_spec(args.data) or (None, 0))
        )
        test = ds if spec is None else load_dataset(spec, image_size=ds.image_size,
                                                    channels=ds.channels, seed=seed)  # fmt: skip
        net = (independent_classifier(ds, args) if args.fid_features == "domain"
               else get_feature_net(args.fid_features))  # fmt: skip
        ref = reference_features(test, net, n=2 * n, cache_dir=None)
        _REFERENCE.update(ref=ref, net=net, test=test, floor=real_vs_real_floor(ref, n)["FID"])
    ref, net, test = _REFERENCE["ref"], _REFERENCE["net"], _REFERENCE["test"]
    vae = final_autoencoder(out)
    with torch.no_grad():
        recon = torch.cat([
            vae.decode(vae.encode(to_float(x)).mode()).clamp(-1, 1)
            for x in test.images[ref.indices[n : 2 * n]].split(100)
        ])  # fmt: skip
    return evaluate_samples(recon, ref, net)["FID"], _REFERENCE["floor"]


def independent_readability(out: Path, args: argparse.Namespace) -> float | None:
    """Readability of the newest checkpoint's (EMA) autoencoder by a second classifier,
    trained apart from the run's (another seed, 5 epochs): a feature-matching term in the
    run's own classifier must not simply teach the autoencoder that classifier's quirks."""
    from ldmkit.evaluation.reconstruction import ReconstructionProbe, probe_split
    from ldmkit.runs import RunFolder

    folder = RunFolder(out)
    ds = folder.load_data()
    if ds.labels is None:
        return None
    vae = final_autoencoder(out)
    idx, _ = probe_split(len(ds.images), args.seed)
    reader = independent_classifier(ds, args)
    return ReconstructionProbe(ds.images[idx], reader).measure(vae)["readability"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="builtin:shapes")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--cap", type=float, default=300.0, help="CPU-seconds per variant at most")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=None, help="default: the recipe's 32 px; "
                    "the models follow the size (recipe.size_settings)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fid", type=int, default=0, help="also FID of the final autoencoder's "
                    "reconstructions of this many real images (0: no)")  # fmt: skip
    ap.add_argument(
        "--fid-features",
        default="domain",
        choices=["domain", "inception"],
        help="the features of --fid: the independent classifier's, or Inception's",
    )
    ap.add_argument("--held-out", default=None, help="real images for --fid (default: the "
                    "data's held-out part, or the data itself where it has none)")  # fmt: skip
    ap.add_argument("--curve", action="store_true",
                    help="also print each variant's measurements at about 10 points")  # fmt: skip
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    if args.quick:
        names, args.data = names[:1], "builtin:shapes?n=1200"
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    print(machine_line())
    print(f"{args.data} at {args.image_size or 32} px, target readability {args.target:.0%}, cap {args.cap:g} CPU-s, "
          f"{args.threads} thread(s), seed {args.seed}")  # fmt: skip
    print(load_line())
    logging.basicConfig(level=logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = run_variant(name, VARIANTS[name], args, Path(tmp))
            results.append(r)
            print(f"  {name}: {r}", flush=True)
            if args.curve:
                print_curve(name, quality_rows(Path(tmp) / name))
    base = results[0]["hit_s"]
    rows = []
    for r in results:
        ratio = f"{r['hit_s'] / base:.2f}" if r["hit_s"] and base else "-"
        rows.append([
            r["name"], f"{r['hit_s']:.0f}" if r["hit_s"] else f"> {args.cap:g}",
            r["hit_step"] or "-", ratio, f"{r['best']:.3f}" if r["best"] is not None else "-",
            f"{r['best_psnr']:.1f}", f"{r['s_per_step']:.3f}",
            f"{r['independent']:.3f}" if r["independent"] is not None else "-",
            *([f"{r['last_step']}", f"{r['last_psnr']:.1f}", f"{r['last_ssim']:.3f}",
               f"{r['recon_fid']:.2f}", f"{r['floor']:.2f}"] if args.fid else []),
        ])  # fmt: skip
    fid_cols = ["end step", "end PSNR", "end SSIM", f"recon FID-{args.fid_features}",
                "floor"] if args.fid else []  # fmt: skip
    print_table(["variant", f"CPU-s to {args.target:.0%}", "step", "vs first", "best readability",
                 "best PSNR", "CPU-s/step", "independent reader (end)", *fid_cols], rows)  # fmt: skip
    print(load_line())


if __name__ == "__main__":
    main()
