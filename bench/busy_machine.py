"""What a timed run yields on a quiet machine and with a CPU hog beside it, and what it says.

    python bench/busy_machine.py --data builtin:shapes --budget 10m --hog 0      # quiet
    python bench/busy_machine.py --data builtin:shapes --budget 10m --hog 2      # 2 spinning
    python bench/busy_machine.py ... --src /path/to/older/checkout/src          # "before"
    python bench/busy_machine.py --quick                                         # plumbing
    python bench/busy_machine.py --judge RUN [--epochs 5]    # judge a finished run again

One run of `ldmkit train --data D --out OUT --time-budget B` in a child process (the ldmkit of
--src, default this checkout), with --hog processes spinning on the CPU (`while True: pass`)
for the first --hog-share of the budget. The run is then judged by this checkout's code with a
classifier trained apart from the run (seed 1, --epochs 15; "independent"; its held-out accuracy
on real images is printed: a sample's class accuracy can hardly exceed it), on images the run
never trained on where the data has them:
  autoencoder  its steps; readability (the share of reconstructions of 128 images that the
               independent classifier reads as their original's class) and PSNR; "AE FID":
               FID of the reconstructions of the reference's second half of real images against
               its first half, beside the floor (the second half itself): what the
               autoencoder alone costs, the best the samples could score
  UNet         its steps
  samples      --n samples at the run's own guidance scale (run.json; the default 5 when it
               chose none; or at each of --guidance), one class per n / classes: their class accuracy by the independent
               classifier and FID in its features against held-out real images, with the
               real-vs-real floor at the same n
  said         whether the run warned (a WARNING line naming the autoencoder or the UNet)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from benchlib import load_line, machine_line, print_table

from ldmkit.data import load_dataset
from ldmkit.data.transforms import to_float
from ldmkit.evaluation.features import train_domain_classifier
from ldmkit.evaluation.reconstruction import ReconstructionProbe, probe_split
from ldmkit.evaluation.reference import (
    evaluate_samples,
    held_out_spec,
    real_vs_real_floor,
    reference_features,
)
from ldmkit.pipeline import LatentDiffusion
from ldmkit.recipe import parse_duration
from ldmkit.runs import RunFolder

ROOT = Path(__file__).resolve().parents[1]


def train(a: argparse.Namespace, out: Path) -> tuple[float, str]:
    """Run the training in a child process with the hog beside it; (seconds, its stderr)."""
    env = {**os.environ, "PYTHONPATH": str(Path(a.src).resolve()), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "ldmkit", "train", "--data", a.data, "--out", str(out),
           "--time-budget", a.budget, *sum((["--set", s] for s in a.set), [])]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.hog)]
    hog_until = t0 + a.hog_share * parse_duration(a.budget)
    try:
        while proc.poll() is None:
            if hogs and time.perf_counter() >= hog_until:
                for h in hogs:
                    h.kill()
                hogs = []
            time.sleep(0.5)
    finally:
        for h in hogs:
            h.kill()
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}):\n{err[-3000:]}")
    return time.perf_counter() - t0, err


def stage_steps(folder: RunFolder) -> dict[str, int]:
    steps: dict[str, int] = {}
    for r in folder.read_log():
        if "loss" in r:
            steps[r["stage"]] = max(steps.get(r["stage"], 0), int(r["step"]))
    return steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="builtin:shapes")
    p.add_argument("--budget", default="10m")
    p.add_argument("--hog", type=int, default=0, help="spinning processes beside the run")
    p.add_argument("--hog-share", type=float, default=0.5, help="of the budget, from its start")
    p.add_argument("--src", default=str(ROOT / "src"), help="the ldmkit source that trains")
    p.add_argument("--set", action="append", default=[], help="passed on to ldmkit train")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--out", default="runs/busy")
    p.add_argument("--label", default=None, help="the row's name (default: from the options)")
    p.add_argument("--quick", action="store_true", help="builtin:shapes?n=1200, 20 s, n 50")
    p.add_argument("--guidance", default=None, help="comma-separated scales to sample at, a row "
                   "each (default: the run's own choice)")  # fmt: skip
    p.add_argument("--judge", default=None, help="judge this finished run folder; train nothing")
    p.add_argument("--epochs", type=int, default=15, help="of the independent classifier (5 "
                   "before 2026-12-07: it read 96 %% of real shapes, 15 read 99 %%+)")  # fmt: skip
    a = p.parse_args(argv)
    if a.quick:
        a.data, a.budget, a.n = "builtin:shapes?n=1200", "20s", 50
        a.set += ["vae_train.steps=20", "unet_train.steps=20", "choose_guidance=false"]
    print(machine_line())
    if a.judge:
        out, seconds, err = Path(a.judge), float("nan"), ""
        a.data = RunFolder(out).config().data
    else:
        out = Path(a.out) / (a.label or f"{a.data.split(':')[-1].split('?')[0]}-hog{a.hog}")
        if out.exists():
            raise SystemExit(f"{out} exists; remove it or give another --out/--label")
        seconds, err = train(a, out)
    said = [line for line in err.splitlines() if "WARNING" in line and
            any(k in line for k in ("AUTOENCODER", "autoencoder", "UNet", "diffusion"))]  # fmt: skip
    torch.set_num_threads(2)
    folder = RunFolder(out)
    ds = folder.load_data()
    judge, acc = train_domain_classifier(
        ds.images, ds.labels, epochs=2 if a.quick else a.epochs, seed=1
    )
    idx, _ = probe_split(len(ds.images), 0)
    ldm = LatentDiffusion.from_run(out)
    probe = ReconstructionProbe(ds.images[idx], judge).measure(ldm.vae)
    held = held_out_spec(a.data)
    test = load_dataset(held[0], image_size=ds.image_size, channels=ds.channels,
                        seed=held[1]) if held else ds  # fmt: skip
    ref = reference_features(test, judge, n=2 * a.n, cache_dir=None)
    floor = real_vs_real_floor(ref, a.n)
    second = test.images[ref.indices[a.n : 2 * a.n]]
    recon = torch.cat([ldm.decode(ldm.encode(to_float(x))).cpu() for x in second.split(250)])
    ae = evaluate_samples(recon, ref, judge)
    k = len(ds.class_names or []) or 1
    labels = torch.arange(a.n) % k
    own = folder.config().sampling_guidance
    rows = []
    steps = stage_steps(folder)
    for guidance in [float(g) for g in a.guidance.split(",")] if a.guidance else [own]:
        samples = ldm.sample(a.n, class_labels=labels if k > 1 else None, seed=0,
                             guidance_scale=guidance)  # fmt: skip
        m = evaluate_samples(samples, ref, judge)
        accuracy = float((judge.logits(samples).argmax(1) == labels).double().mean())
        rows.append(
            [out.name, steps.get("autoencoder", 0), f"{probe['readability']:.3f}",
             f"{probe['psnr']:.1f}", steps.get("diffusion", 0),
             f"{guidance:g}" + ("*" if guidance == own else ""), f"{accuracy:.3f}",
             f"{m['FID']:.2f}", f"{ae['FID']:.2f}", f"{floor['FID']:.2f}",
             "yes" if said else "-" if a.judge else "no"]
        )  # fmt: skip
    print(
        f"independent classifier ({a.epochs} epochs): held-out accuracy {acc:.3f}; "
        f"training took {seconds:.0f} s" + (" (judged again: --judge)" if a.judge else "")
    )
    print_table(
        ["run", "AE steps", "readability", "PSNR", "UNet steps", "guidance", "class accuracy",
         "FID-cnn", "AE FID", "floor", "warned"],
        rows,
    )  # fmt: skip
    print("guidance: * the run's own choice")
    for line in said:
        print("  said:", line[:300])
    print(load_line())
    print(
        "command: python bench/busy_machine.py " + " ".join(sys.argv[1:] if argv is None else argv)
    )


if __name__ == "__main__":
    main()
