"""The before/after pictures of the README's editing section, from trained runs.

    python bench/editing_figures.py --run runs/shapes --inpaint-run runs/shapes-inpaint \
        [--photo-run runs/photos --photo astronaut96.png] --out docs

Held-out built-in shapes (a seed the run never saw), fixed seeds; every picture says in its
captions what each column is. Writes edit-inpaint.png, edit-img2img.png, edit-invert.png,
edit-interpolate.png, edit-restore-shapes.png and (with a photo run) edit-restore-fill.png and
edit-restore-denoise.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmkit import editing
from ldmkit.data.masks import make_mask
from ldmkit.data.shapes import generate_shapes
from ldmkit.data.transforms import to_float
from ldmkit.evaluation.grids import save_grid
from ldmkit.pipeline import LatentDiffusion


def mask_view(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the masked region painted white."""
    return image * (1 - mask) + mask


def inpaint_figure(ldm, trained, images, labels, out: Path) -> None:
    kinds = ["centre", "box", "strokes", "box"]
    cells, captions = [], []
    for i, kind in enumerate(kinds):
        g = torch.Generator().manual_seed(100 + i)
        m = make_mask(kind, images.shape[-1], g)[None, None]
        x, y = images[i : i + 1], labels[i : i + 1]
        row = [x, mask_view(x, m)]
        row.append(editing.inpaint(ldm, x, m, seed=i, class_labels=y).images)
        row.append(editing.inpaint(ldm, x, m, sampler="ddpm", repaint_jump=5,
                                   repaint_resample=3, seed=i, class_labels=y).images)  # fmt: skip
        names = ["input", "mask (white)", "blend", "RePaint"]
        if trained is not None:
            row.append(editing.inpaint(trained, x, m, seed=i, class_labels=y).images)
            names.append("trained")
        cells += row
        captions += names
    save_grid(torch.cat(cells), out / "edit-inpaint.png", nrow=len(captions) // len(kinds),
              captions=captions)  # fmt: skip


def img2img_figure(ldm, images, labels, out: Path) -> None:
    strengths = [0.3, 0.5, 0.7, 1.0]
    cells, captions = [], []
    for i in range(3):
        x, y = images[4 + i : 5 + i], labels[4 + i : 5 + i]
        cells.append(x)
        captions.append("input")
        for s in strengths:
            cells.append(editing.img2img(ldm, x, strength=s, seed=i, class_labels=y).images)
            captions.append(f"strength {s:g}")
    save_grid(
        torch.cat(cells), out / "edit-img2img.png", nrow=1 + len(strengths), captions=captions
    )


def invert_figure(ldm, images, out: Path) -> None:
    cells, captions = [], []
    x = images[8:12]
    for steps in (20, 200):
        res = editing.invert(ldm, x, steps=steps)
        if not cells:
            cells.append(x)
            captions += ["input"] * len(x)
        cells.append(res.images)
        captions += [f"{steps} steps: {p:.1f} dB" for p in res.extra["psnr"]]
    save_grid(torch.cat(cells), out / "edit-invert.png", nrow=len(x), captions=captions)


def interpolate_figure(ldm, images, out: Path) -> None:
    strips, captions = [], []
    label = [0] if ldm.conditioner.enabled else None  # one class for both ends
    seeds = editing.interpolate(ldm, seeds=(1, 2), frames=8, class_labels=label)
    strips.append(seeds.images)
    name = f" ({ldm.class_names[0]})" if label and ldm.class_names else ""
    captions += [f"seed 1{name}"] + [""] * 6 + [f"seed 2{name}"]
    if ldm.conditioner.enabled and ldm.class_names and len(ldm.class_names) >= 4:
        a, b = ldm.class_names[0], ldm.class_names[3]
        classes = editing.interpolate(ldm, class_labels=(0, 3), frames=8, seed=0)
        strips.append(classes.images)
        captions += [a] + [""] * 6 + [b]
    pair = editing.interpolate(ldm, images=images[12:14], frames=8)
    strips.append(pair.images)
    captions += ["image A"] + [""] * 6 + ["image B"]
    save_grid(torch.cat(strips), out / "edit-interpolate.png", nrow=8, captions=captions)


def restore_shapes_figure(ldm, images, labels, out: Path) -> None:
    """Held-out shapes with holes and scratches painted magenta (a colour the data never has, so
    `fill` finds them by colour), filled; with noise, denoised."""
    cells, captions = [], []
    g = torch.Generator().manual_seed(7)
    for i in range(3):
        x, y = images[14 - i : 15 - i], labels[14 - i : 15 - i]
        holed = x.clone()
        size = x.shape[-1]
        magenta = torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1)
        r, c = (int(v) for v in torch.randint(4, size - 10, (2,), generator=g))
        holed[..., r : r + 7, c : c + 7] = magenta.expand(1, 3, 7, 7)  # a hole
        holed[..., size // 2 + i : size // 2 + i + 1, 2:-2] = magenta  # and a 1-pixel scratch
        filled = editing.fill(ldm, holed, hole_colour=(1.0, -1.0, 1.0), seed=i, class_labels=y)
        noisy = (x + 0.1 * 2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
        den = editing.denoise(ldm, noisy, seed=i, class_labels=y)
        cells += [x, holed, filled.images, noisy, den.images]
        captions += ["original", "holes (magenta)", "fill", "noise std 0.1", "denoise"]
    save_grid(torch.cat(cells), out / "edit-restore-shapes.png", nrow=5, captions=captions)


def restore_figure(photo_ldm, photo: Path, out: Path) -> None:
    """A scratched photo larger than the model, filled crop by crop; a noisy crop, denoised."""
    big = to_float(
        torch.from_numpy(np.asarray(Image.open(photo).convert("RGB")).copy()).permute(2, 0, 1)
    )[None]
    h, w = big.shape[-2:]
    mask = torch.zeros(1, 1, h, w)
    g = np.random.default_rng(3)
    for _ in range(6):  # thin scratches, 1-2 px wide
        y = int(g.integers(4, h - 4))
        x0, x1 = sorted(g.integers(0, w, 2).tolist())
        mask[..., y : y + int(g.integers(1, 3)), x0:x1] = 1
    mask[..., h // 3 : h // 3 + 10, w // 2 : w // 2 + 12] = 1  # and a hole
    damaged = mask_view(big, mask)
    filled = editing.inpaint_large(photo_ldm, damaged, mask, seed=0, steps=20)
    save_grid(torch.cat([damaged, filled.images]), out / "edit-restore-fill.png", nrow=2,
              captions=["scratched (white)", f"filled, {filled.notes[-1].split(': ')[-1]}"], scale=2)  # fmt: skip
    size = photo_ldm.image_shape[-1]
    crops = big[..., 8 : 8 + size, 40 : 40 + size].repeat(1, 1, 1, 1)
    noisy = (
        crops + 0.1 * 2 * torch.randn(crops.shape, generator=torch.Generator().manual_seed(0))
    ).clamp(-1, 1)
    den = editing.denoise(photo_ldm, noisy, steps=20)
    save_grid(torch.cat([crops, noisy, den.images]), out / "edit-restore-denoise.png", nrow=3,
              captions=["clean crop", "noise std 0.1", "denoised"], scale=4)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--inpaint-run")
    p.add_argument("--photo-run")
    p.add_argument("--photo", type=Path)
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args()
    torch.manual_seed(0)
    ldm = LatentDiffusion.from_run(args.run)
    trained = LatentDiffusion.from_run(args.inpaint_run) if args.inpaint_run else None
    held = generate_shapes(16, image_size=ldm.image_shape[-1], seed=10_001)
    images = to_float(torch.as_tensor(held.images))
    labels = torch.as_tensor(held.labels).long()
    with torch.no_grad():
        inpaint_figure(ldm, trained, images, labels, args.out)
        img2img_figure(ldm, images, labels, args.out)
        invert_figure(ldm, images, args.out)
        interpolate_figure(ldm, images, args.out)
        restore_shapes_figure(ldm, images, labels, args.out)
        if args.photo_run and args.photo:
            restore_figure(LatentDiffusion.from_run(args.photo_run), args.photo, args.out)
    print(f"wrote the figures to {args.out}")


if __name__ == "__main__":
    main()
