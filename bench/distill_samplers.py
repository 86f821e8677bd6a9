"""Why do deterministic samplers score worse than the SDE sampler on a run, and what do few-step
students gain from noise between their steps? FID-cnn, accuracy and image statistics per row.

    python bench/distill_samplers.py --bench OUT [--n 500]   # OUT: a bench/distill.py folder
    python bench/distill_samplers.py --quick --bench OUT     # after `bench/distill.py --quick`

Reads what `bench/distill.py` left in OUT: the teacher copy (OUT/teacher, with its domain
classifier and reference cache) and the students it saved (OUT/student-students/<k>/). Every
row draws n images with seed 0 and the reference images' own labels, as `ldmkit eval` does.

Rows: the teacher (guided at its chosen scale) with the deterministic samplers (DDIM = Euler in
sigma, Heun, DPM-Solver++(2M)) and the stochastic ones (DDIM with eta = 1, i.e. ancestral DDPM
steps on the same trailing grid; DPM-Solver++(2M) SDE) at --teacher-steps; each student at its
steps with DDIM at --etas (eta = 0: the path it was distilled on; eta = 1: the DDPM posterior
around its x-prediction) and "renoise" (each step's x-prediction noised afresh to the next
level: consistency models' multistep sampling).

Statistics, beside FID-cnn and accuracy (the domain classifier's argmax = the class asked for):
`lat_std` the std of the final latents (all elements), `pix_std` the mean per-image pixel std
(contrast), `grad` the mean absolute difference of neighbouring pixels (sharpness), `sat` the
share of pixels at |x| > 0.95 (saturated); the same for n real training images (the "real" row;
its latents are the autoencoder's means).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from benchlib import machine_line, print_table

from ldmkit.evaluation.feature_nets import get_feature_net
from ldmkit.evaluation.reference import evaluate_samples, reference_features
from ldmkit.models.unet import UNet
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runs import RunFolder

BATCH = 64


def image_stats(x: torch.Tensor, z: torch.Tensor | None) -> dict[str, float]:
    """Contrast, sharpness and saturation of images (N, C, H, W) in [-1, 1]; latent std."""
    x = x.double()
    grad = (
        (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean()
    ) / 2
    return {
        "lat_std": float(z.double().std()) if z is not None else float("nan"),
        "pix_std": float(x.flatten(1).std(1).mean()),
        "grad": float(grad),
        "sat": float((x.abs() > 0.95).double().mean()),
    }


def renoise_callback(seed: int):
    """A sampler callback that replaces each new state by its step's x-prediction noised afresh
    to the new level (VE: x0 + sigma_next * z); the last step (sigma 0) keeps x0."""
    g = torch.Generator().manual_seed(seed)

    def cb(i: int, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        s = float(sigma)
        if s == 0:
            return x0
        return x0 + s * torch.randn(x0.shape, generator=g).to(x0)

    return cb


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", required=True, help="a bench/distill.py output folder")
    p.add_argument("--name", default="student", help="the student's name there")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--teacher-rows", default="ddim:8,ddim:16,ddim:32,heun:8,dpm++2m:8,"
                   "dpm++2m:16,ddim-eta1:16,ddim-eta1:32,dpm++2m-sde:8,dpm++2m-sde:16,"
                   "dpm++2m-sde:20,ddim:16@1,ddim:16@2.5,ddim:16@4",
                   help="sampler:steps[@guidance] rows of the teacher (default guidance: the "
                   "run's)")  # fmt: skip
    p.add_argument("--students", default="8,4,2,1", help="the students' step counts")
    p.add_argument("--etas", default="0,0.5,1", help="DDIM eta of the students' rows")
    p.add_argument("--renoise", type=int, default=1, help="also the renoise rows (1/0)")
    p.add_argument("--out", help="the table as JSON (default: BENCH/samplers.json)")
    p.add_argument("--quick", action="store_true", help="n = 64, a few rows (the tests)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.quick:
        a.n, a.teacher_rows, a.etas = 64, "ddim:4,ddim-eta1:4,dpm++2m-sde:4", "0,1"
    print(machine_line())
    bench = Path(a.bench)
    teacher = bench / "teacher"
    folder = RunFolder(teacher)
    train = folder.load_data()
    net = get_feature_net("domain", dataset=train, run_dir=teacher)
    ref = reference_features(train, net, n=2 * a.n, cache_dir=folder.eval_dir / "reference")
    t = LatentDiffusion.from_run(teacher)
    classes = t.conditioner.num_classes or 0
    labels = ref.labels[: a.n].clone() if classes and ref.labels is not None else None
    if classes and labels is None:
        labels = torch.arange(a.n) % classes
    rows: list[dict] = []

    def add(name: str, x: torch.Tensor, z: torch.Tensor | None, extra: dict) -> None:
        m = evaluate_samples(x, ref, net, seed=0)
        acc = None
        if labels is not None and name != "real":
            acc = float((net.logits(x).argmax(1) == labels).double().mean())
        row = {"model": name, **extra, "FID": m["FID"], "accuracy": acc, **image_stats(x, z)}
        rows.append(row)
        print("  " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                 for k, v in row.items()}), flush=True)  # fmt: skip

    # the real images (the reference's data order does not matter for these averages)
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(len(train.images), generator=g)[: a.n]
    from ldmkit.data.transforms import to_float

    real = to_float(train.images[idx])
    with torch.no_grad():
        z_real = torch.cat([t.encode(real[i : i + BATCH]) for i in range(0, len(real), BATCH)])
    add("real", real, z_real, {"sampler": "-", "steps": 0, "calls": 0})

    def draw(ldm: LatentDiffusion, sampler: str, steps: int, guidance, **opts):
        w0, c0 = time.perf_counter(), time.process_time()
        z = ldm.sample(a.n, sampler=sampler, steps=steps, class_labels=labels, seed=0,
                       guidance_scale=guidance, batch_size=BATCH, return_latents=True,
                       **opts)  # fmt: skip
        with torch.no_grad():
            x = torch.cat([ldm.decode(z[i : i + BATCH]) for i in range(0, len(z), BATCH)])
        return x, z, {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0}

    saved = bench / f"{a.name}-students"
    for k in [int(s) for s in a.students.split(",") if s.strip()]:
        if not (saved / str(k)).is_dir():
            print(f"  (no student-{k} in {saved})")
            continue
        s = LatentDiffusion(t.vae, UNet.from_pretrained(saved / str(k)).eval(), t.schedule,
                            class_names=t.class_names, default_sampler="ddim",
                            default_steps=k)  # fmt: skip
        for eta in [float(e) for e in a.etas.split(",")]:
            x, z, tm = draw(s, "ddim", k, 1.0, eta=eta)
            add(f"student-{k}", x, z, {"sampler": f"ddim-eta{eta:g}", "steps": k, "calls": k,
                                        "guidance": 1.0, **tm})  # fmt: skip
        if a.renoise and k > 1:
            x, z, tm = draw(s, "ddim", k, 1.0, callback=renoise_callback(0))
            add(f"student-{k}", x, z, {"sampler": "renoise", "steps": k, "calls": k, **tm})

    for spec in [r for r in a.teacher_rows.split(",") if r.strip()]:
        spec, _, w = spec.partition("@")
        sampler, steps = spec.split(":")
        guidance = float(w) if w else None
        opts = {}
        if sampler == "ddim-eta1":
            sampler, opts = "ddim", {"eta": 1.0}
        x, z, tm = draw(t, sampler, int(steps), guidance, **opts)
        calls = int(steps) * (2 if sampler == "heun" else 1) - (1 if sampler == "heun" else 0)
        g = guidance if guidance is not None else t.guidance_scale
        add("teacher", x, z, {"sampler": spec.split(":")[0], "steps": int(steps), "calls": calls,
                              "guidance": g, **tm})  # fmt: skip

    head = ["model", "sampler", "steps", "guidance", "calls", "FID", "accuracy", "lat_std",
            "pix_std", "grad", "sat", "cpu_s"]  # fmt: skip
    print()
    print_table(head, [[r.get(h, "-") if r.get(h) is not None else "-" for h in head]
                       for r in rows])  # fmt: skip
    out = Path(a.out) if a.out else bench / "samplers.json"
    out.write_text(json.dumps({"machine": machine_line(), "n": a.n, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
