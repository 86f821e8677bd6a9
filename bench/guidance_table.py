"""Does the model draw what it is asked for, and what does guidance cost? One table per run.

For a class-conditional run: a classifier trained on the run's real data reads the generated
images; the table gives, per guidance scale, the share drawn as the requested class, and an
FID in that classifier's feature space against real images of the same n (never Inception:
the numbers are labelled FID-<data>-cnn, with the real-vs-real floor beside them).

For a text-conditional run on the built-in shapes: one classifier per caption attribute (shape,
color, size, position, background), trained on freshly generated real shapes, reads images
drawn for shapes captions; the table gives the share matching each attribute and shape & color
together, separately for color-shape pairs seen in training and for the run's held-out pairs
(`builtin:shapes?holdout=...`), and first on the run's autoencoder reconstructions of 1000 real
shapes (row "vae"): the most that samples decoded by that autoencoder can score.

    python bench/guidance_table.py --run runs/shapes --guidance 1,1.5,2,3,5
    python bench/guidance_table.py --run runs/shapes-text --guidance 1,2,3,5,7 --per-prompt 4

Prints the CPU flags, the commands, and the table; figures are for the run and seed given.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from benchlib import machine_line

from ldmkit.data.shapes import (
    COLOR_NAMES,
    KINDS,
    REGIONS,
    SIZES,
    caption,
    contrasting_pairs,
    generate_shapes,
    parse_holdout,
)
from ldmkit.data.transforms import to_float
from ldmkit.evaluation.features import train_domain_classifier
from ldmkit.evaluation.metrics import fid_from_features
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runs import RunFolder


def classifier(images: torch.Tensor, labels: np.ndarray, seed: int, name: str):
    model, acc = train_domain_classifier(images, torch.as_tensor(labels), epochs=8, seed=seed)
    print(f"  classifier {name:10s}: held-out accuracy {acc:.3f} on real images")
    return model


def fid(model, fake: torch.Tensor, real: torch.Tensor) -> float:
    with torch.no_grad():
        return fid_from_features(model.features(fake), model.features(real))


# --------------------------------------------------------------------- class-conditional
def class_table(
    ldm: LatentDiffusion, folder: RunFolder, guidances, per_class: int, seed: int
) -> None:
    ds = folder.load_data()
    names = ldm.class_names or [str(i) for i in range(ldm.unet.config.num_classes)]
    print(f"training a classifier of {len(names)} classes on {len(ds)} real images of {ds.name}")
    clf = classifier(ds.images, ds.labels.numpy(), seed, "class")
    n = per_class * len(names)
    gen = torch.Generator().manual_seed(seed)
    real = ds.images[torch.randperm(len(ds), generator=gen)[: 2 * n]]
    floor = fid(clf, real[:n], real[n:])
    labels = torch.arange(len(names)).repeat_interleave(per_class)
    print(
        f"\n{'guidance':>8} {'class acc':>9} {'FID-' + ds.name + '-cnn':>16} {'s/img':>6}   (n = {n}, real-vs-real floor {floor:.2f})"
    )
    for g in guidances:
        t0 = time.perf_counter()
        x = ldm.sample(n, class_labels=labels, guidance_scale=g, seed=seed)
        dt = (time.perf_counter() - t0) / n
        with torch.no_grad():
            acc = (clf.logits(x).argmax(1) == labels).double().mean().item()
        print(f"{g:8g} {acc:9.3f} {fid(clf, x, real[:n]):16.2f} {dt:6.3f}")


# --------------------------------------------------------------------- text on shapes
ATTRS = ("shape", "color", "size", "position", "background")


def shapes_prompts(pairs, per_prompt: int, rng: np.random.Generator):
    """Captions for color-shape pairs, with random size, position and a contrasting background."""
    contrast = contrasting_pairs()
    rows = []  # (caption, attribute indices)
    for color, kind in pairs:
        c, k = COLOR_NAMES.index(color), KINDS.index(kind)
        bgs = contrast[contrast[:, 0] == c][:, 1]
        for _ in range(per_prompt):
            s, r, b = rng.integers(len(SIZES)), rng.integers(len(REGIONS)), int(rng.choice(bgs))
            rows.append((caption(k, c, b, s, r), (k, c, s, r, b)))
    return rows


def text_table(
    ldm: LatentDiffusion, folder: RunFolder, guidances, per_prompt: int, seed: int
) -> None:
    spec = folder.config().data
    if not spec.startswith("builtin:shapes"):
        raise SystemExit("the text table needs a run on builtin:shapes (attribute classifiers)")
    held = parse_holdout(
        dict(p.split("=") for p in spec.partition("?")[2].split("&") if p).get("holdout", "")
    )
    size = folder.config().image_size
    real = generate_shapes(8000, image_size=size, seed=seed + 101)
    images = torch.from_numpy(real.images)
    print(f"training 5 attribute classifiers on 8000 real shapes ({size} px)")
    attr_labels = {"shape": real.labels, "color": real.color, "size": real.size,
                   "position": real.region, "background": real.background}  # fmt: skip
    clfs = {a: classifier(images, attr_labels[a], seed, a) for a in ATTRS}
    seen = [(c, k) for c in COLOR_NAMES for k in KINDS if (c, k) not in held]
    rng = np.random.default_rng(seed)
    groups = {"seen": shapes_prompts(seen, per_prompt, rng)}
    if held:
        groups["held-out"] = shapes_prompts(held, max(per_prompt, 40 // len(held)), rng)
    real_ref = images[:1000]
    print(f"\nheld-out pairs: {', '.join(f'{c} {k}' for c, k in held) or 'none'}")
    head = "  ".join(f"{a:>10}" for a in ATTRS)
    print(
        f"{'group':>8} {'n':>4} {'guidance':>8}  {head}  {'shape&color':>11} {'FID-shapes-cnn':>14}"
    )
    # the autoencoder's ceiling: the classifiers on its reconstructions of 1000 real images
    x = ldm.decode(ldm.encode(to_float(images[1000:2000])))
    with torch.no_grad():
        pred = torch.stack([clfs[a].logits(x).argmax(1) for a in ATTRS], 1)
    truth = torch.stack([torch.as_tensor(attr_labels[a][1000:2000]) for a in ATTRS], 1)
    ok = pred == truth
    accs = "  ".join(f"{ok[:, i].double().mean().item():10.3f}" for i in range(len(ATTRS)))
    both = (ok[:, 0] & ok[:, 1]).double().mean().item()
    f = fid(clfs["shape"], x, real_ref)
    print(f"{'vae':>8} {len(x):4d} {'recon':>8}  {accs}  {both:11.3f} {f:14.2f}")
    for name, rows in groups.items():
        captions = [r[0] for r in rows]
        truth = torch.tensor([r[1] for r in rows])  # (n, 5)
        n = len(captions)
        floor = fid(clfs["shape"], images[1000 : 1000 + n], real_ref[:n])
        print(
            f"{name:>8} {n:4d} {'real':>8}  {'(real-vs-real floor of the FID at this n)':>58} {floor:14.2f}"
        )
        for g in guidances:
            x = ldm.sample(len(captions), prompt=captions, guidance_scale=g, seed=seed)
            with torch.no_grad():
                pred = torch.stack([clfs[a].logits(x).argmax(1) for a in ATTRS], 1)
            ok = pred == truth
            accs = "  ".join(f"{ok[:, i].double().mean().item():10.3f}" for i in range(len(ATTRS)))
            both = (ok[:, 0] & ok[:, 1]).double().mean().item()
            f = fid(clfs["shape"], x, real_ref[: len(x)])
            print(f"{name:>8} {len(x):4d} {g:8g}  {accs}  {both:11.3f} {f:14.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--guidance", default="1,2,3,5,7")
    p.add_argument(
        "--per-prompt", type=int, default=4, help="text runs: images per color-shape pair"
    )
    p.add_argument("--per-class", type=int, default=100, help="class runs: images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    guidances = [float(g) for g in a.guidance.split(",")]
    folder = RunFolder(a.run).require_trained()
    ldm = LatentDiffusion.from_run(folder.path, device="cpu")
    print(f"{machine_line()}; run {folder.path}")
    print(f"command: python bench/guidance_table.py --run {a.run} --guidance {a.guidance} "
          f"--per-prompt {a.per_prompt} --per-class {a.per_class} --seed {a.seed}")  # fmt: skip
    if ldm.is_text_conditional:
        text_table(ldm, folder, guidances, a.per_prompt, a.seed)
    elif ldm.conditioner.enabled:
        class_table(ldm, folder, guidances, a.per_class, a.seed)
    else:
        raise SystemExit("the run is unconditional: there is nothing to ask for")


if __name__ == "__main__":
    main()
