"""How good are ldmkit's edits? Inpainting, inversion and image-to-image on held-out images.

Inpainting: held-out built-in shapes (a seed the run never saw) with three kinds of mask
(centre boxes, random boxes, brush strokes) are filled by
  naive     the hole filled with uniform noise, encoded, and denoised by one network call at
            the schedule's middle noise level (t = T/2), then pasted back;
  blend     blended inpainting with the run's default sampler (editing.inpaint);
  repaint   blending with RePaint's resampling (ddpm steps, jumps of --jump steps, 3 passes);
  trained   a model fine-tuned with task=inpaint (--inpaint-run), given the mask and the known
            latent as inputs;
each conditioned on the image's own class (a class-conditional run) at the run's guidance.
Columns: the largest pixel change outside the mask after paste-back (0 means bit-exact),
FID of the whole images in the run's domain-classifier feature space against other held-out
real images (FID-<data>-cnn, real-vs-real floor printed), and the share of images whose
masked shape the classifier reads as the requested class ("shape acc", over the images whose
shape is at least half masked).

Inversion: PSNR of the DDIM round trip (image -> noise -> image) at 20, 50 and 200 steps, and
at 20 steps with 2 fixed-point refinements, beside the autoencoder's own PSNR (the ceiling).

Image-to-image: FID-cnn and the input-output distance (pixel RMSE on [0, 1], and the distance
of classifier features) as functions of strength, as a table and a plot.

    python bench/editing_quality.py --run runs/shapes --inpaint-run runs/shapes-inpaint
    python bench/editing_quality.py --run runs/shapes --quick      # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import machine_line

from ldmkit import editing
from ldmkit.data.masks import make_mask
from ldmkit.data.shapes import generate_shapes
from ldmkit.data.transforms import to_float, to_uint8
from ldmkit.evaluation.features import train_domain_classifier
from ldmkit.evaluation.metrics import fid_from_features
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runs import RunFolder


def masks_of(kind: str, n: int, size: int, seed: int) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(seed * 7919 + i) for i in range(n)]
    return torch.stack([make_mask(kind, size, g) for g in gens])[:, None]


def shape_pixels(images_u8: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) bool: pixels whose colour differs from the background (the border's mode)
    by more than the background's own shading (up to about 15 levels)."""
    out = []
    for img in images_u8:
        border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], 1).T  # (4H, C)
        values, counts = border.unique(dim=0, return_counts=True)
        bg = values[counts.argmax()]
        diff = (img.int() - bg.int()[:, None, None]).abs().amax(0, keepdim=True)
        out.append(diff > 48)
    return torch.stack(out)


def naive_fill(ldm: LatentDiffusion, images: torch.Tensor, masks: torch.Tensor, labels, seed: int):
    """Noise in the hole, one denoiser call at t = T/2, pasted back."""
    g = torch.Generator().manual_seed(seed)
    filled = images * (1 - masks) + (torch.rand(images.shape, generator=g) * 2 - 1) * masks
    z = ldm.encode(filled)
    sigma = ldm.schedule.sigmas[ldm.schedule.num_timesteps // 2]
    noisy = z + sigma * torch.randn(z.shape, generator=g)
    conditions = ldm.conditions(len(images), class_labels=labels)
    x0 = ldm.denoiser(conditions)(noisy, sigma)
    return images * (1 - masks) + ldm.decode(x0).float().cpu() * masks


def inpaint_rows(args, ldm, trained, clf, real_u8, held_u8, labels, floor) -> None:
    n, size = len(real_u8), real_u8.shape[-1]
    images = to_float(real_u8)
    shape = shape_pixels(real_u8)
    real_features = clf.features(to_float(held_u8))
    cond = {"class_labels": labels} if ldm.conditioner.enabled else {}
    print(
        f"\nInpainting, n = {n} held-out images per row, conditioned on their class"
        f"{f' at guidance {ldm.guidance_scale:g}' if cond else ''}; FID floor "
        f"(real vs real, n = {n}) {floor:.2f}"
    )
    print(f"{'mask':>8} {'method':>8} {'steps':>5} {'max err outside':>15} {'FID-cnn':>8} "
          f"{'shape acc':>9} {'masked':>6} {'calls':>5} {'s':>6}")  # fmt: skip
    for kind in args.masks:
        masks = masks_of(kind, n, size, args.seed)
        hidden = (shape & masks.bool()).flatten(1).sum(1) >= 0.5 * shape.flatten(1).sum(1)
        methods = [("naive", None, 1)] + [
            (m, s, s) for s in args.steps for m in ("blend", "repaint", "trained")
        ]
        for method, steps, shown_steps in methods:
            if method == "trained" and trained is None:
                continue
            t0 = time.perf_counter()
            calls = 1
            if method == "naive":
                out = naive_fill(ldm, images, masks, labels if cond else None, args.seed)
            else:
                opts = dict(steps=steps, seed=args.seed, **cond)
                if method == "repaint":
                    opts.update(sampler="ddpm", repaint_jump=args.jump, repaint_resample=3)
                res = editing.inpaint(
                    trained if method == "trained" else ldm, images, masks, **opts
                )
                out, calls = res.images, res.network_calls
            seconds = time.perf_counter() - t0
            out_u8 = to_uint8(out)
            keep = (masks == 0).expand_as(out_u8)
            err = (out_u8[keep].int() - real_u8[keep].int()).abs().max().item()
            fid = fid_from_features(clf.features(out), real_features)
            pred = clf.logits(out).argmax(1)
            acc = (
                (pred[hidden] == labels[hidden]).double().mean().item()
                if hidden.any()
                else float("nan")
            )
            print(f"{kind:>8} {method:>8} {shown_steps:>5} {err:>15d} {fid:>8.2f} {acc:>9.3f} "
                  f"{int(hidden.sum()):>6} {calls:>5} {seconds:>6.1f}")  # fmt: skip


def inversion_rows(args, ldm, real_u8) -> None:
    images = to_float(real_u8[: args.n_invert])
    print(f"\nInversion (DDIM, no guidance), n = {len(images)}: PSNR dB of the round trip")
    print(
        f"{'steps':>5} {'refine':>6} {'PSNR':>7} {'autoencoder':>11} {'latent RMSE':>11} {'calls':>5} {'s':>6}"
    )
    runs = [(s, 0) for s in args.invert_steps] + [(args.invert_steps[0], 2)]
    for steps, refine in runs:
        t0 = time.perf_counter()
        res = editing.invert(ldm, images, steps=steps, refine=refine)
        e = res.extra
        print(f"{steps:>5} {refine:>6} {np.mean(e['psnr']):>7.2f} {np.mean(e['autoencoder_psnr']):>11.2f} "
              f"{np.mean(e['latent_rmse']):>11.4f} {res.network_calls:>5} {time.perf_counter() - t0:>6.1f}")  # fmt: skip


def img2img_rows(args, ldm, clf, real_u8, held_u8, labels, out_png: Path | None) -> None:
    images = to_float(real_u8)
    real_features = clf.features(to_float(held_u8))
    in_features = clf.features(images)
    cond = {"class_labels": labels} if ldm.conditioner.enabled else {}
    print(f"\nImage-to-image, n = {len(images)}, {args.steps[-1]} steps, conditioned on the class")
    print(f"{'strength':>8} {'FID-cnn':>8} {'pixel RMSE':>10} {'feature dist':>12} {'calls':>5}")
    ae = ldm.decode(ldm.encode(images)).float().cpu()  # strength 0: the autoencoder alone
    f = clf.features(ae)
    print(f"{'0 (VAE)':>8} {fid_from_features(f, real_features):>8.2f} "
          f"{((ae - images) / 2).pow(2).flatten(1).mean(1).sqrt().mean().item():>10.4f} "
          f"{(f - in_features).norm(dim=1).mean().item():>12.3f} {0:>5}")  # fmt: skip
    rows = []
    for s in args.strengths:
        res = editing.img2img(ldm, images, strength=s, steps=args.steps[-1], seed=args.seed, **cond)
        f = clf.features(res.images)
        fid = fid_from_features(f, real_features)
        rmse = ((res.images - images) / 2).pow(2).flatten(1).mean(1).sqrt().mean().item()
        dist = (f - in_features).norm(dim=1).mean().item()
        rows.append((s, fid, rmse, dist))
        print(f"{s:>8.2f} {fid:>8.2f} {rmse:>10.4f} {dist:>12.3f} {res.network_calls:>5}")
    if out_png is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(8, 3))
    x = [r[0] for r in rows]
    ax[0].plot(x, [r[1] for r in rows], "o-")
    ax[0].set(xlabel="strength", ylabel="FID-cnn vs held-out real", title="quality")
    ax[1].plot(x, [r[2] for r in rows], "o-", label="pixel RMSE")
    ax[1].set(xlabel="strength", ylabel="distance to the input", title="faithfulness")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    print(f"wrote {out_png}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--inpaint-run", help="a run trained or fine-tuned with task=inpaint")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", default="10,20")
    p.add_argument("--masks", default="centre,box,strokes")
    p.add_argument("--jump", type=int, default=5)
    p.add_argument("--strengths", default="0.2,0.4,0.6,0.8,1.0")
    p.add_argument("--invert-steps", default="20,50,200")
    p.add_argument("--n-invert", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="img2img_strength.png")
    p.add_argument("--sections", default="inpaint,invert,img2img")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.n, args.steps, args.masks, args.strengths = 16, "3", "centre", "0.5,1.0"
        args.invert_steps, args.n_invert, args.plot = "4,8", 4, ""
    args.steps = [int(s) for s in args.steps.split(",")]
    args.masks = args.masks.split(",")
    args.strengths = [float(s) for s in args.strengths.split(",")]
    args.invert_steps = [int(s) for s in args.invert_steps.split(",")]
    logging.getLogger("ldmkit.evaluation.metrics").setLevel(logging.ERROR)  # FID-at-small-n note
    print(
        f"FID at n = {args.n} is biased upward: compare rows of this table only, never with "
        "published figures"
    )
    print(f"{machine_line()}; run {args.run}")
    torch.manual_seed(args.seed)
    ldm = LatentDiffusion.from_run(args.run)
    trained = LatentDiffusion.from_run(args.inpaint_run) if args.inpaint_run else None
    folder = RunFolder(args.run)
    ds = folder.load_data()
    size = ldm.image_shape[-1]
    print(f"training a classifier on {len(ds)} real images of {ds.name}")
    clf, acc = train_domain_classifier(ds.images, ds.labels, epochs=8, seed=args.seed)
    print(f"  held-out accuracy {acc:.3f}")
    held = generate_shapes(2 * args.n, image_size=size, seed=10_000 + args.seed)
    real_u8 = torch.as_tensor(held.images[: args.n])
    other_u8 = torch.as_tensor(held.images[args.n :])
    labels = torch.as_tensor(held.labels[: args.n]).long()
    with torch.no_grad():
        floor = fid_from_features(clf.features(to_float(real_u8)), clf.features(to_float(other_u8)))
        inpaint_rows(args, ldm, trained, clf, real_u8, other_u8, labels, floor)
        inversion_rows(args, ldm, real_u8)
        img2img_rows(
            args, ldm, clf, real_u8, other_u8, labels, Path(args.plot) if args.plot else None
        )


if __name__ == "__main__":
    main()
