"""The Classification Accuracy Score (Ravuri & Vinyals 2019): a classifier trained on generated
images only, tested on real images the model never saw, beside the same classifier trained on
the same number of real images.

The classifier is fixed, so that scores compare across runs and with the real baseline:

    network   `features.DomainClassifier` with widths (16, 32, 64, 128): four 3x3 stride-2
              convs with BatchNorm and ReLU, global average pool, a 128-wide feature layer,
              the class head (about 0.1 M parameters); any image size
    training  AdamW (lr 2e-3, weight decay 5e-4), batches of 64, cosine decay to 0 over
              clamp(20 epochs, 1000, 3000) steps; each image shifted by up to 1/16 of its side
              (edge pixels repeated) at every draw; cross-entropy
    seeds     seed s fixes the initial weights, the order of the batches, the shifts and the
              real images drawn for the baseline; the scores are the mean and the sample std
              over the seeds (default 3)

`scores` runs it on tensors (the tests and the augmentation study call it); `api.cas` draws the
generated images with `ldmkit synth` and finds the held-out real ones (`evaluate.held_out_data`).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .features import DomainClassifier, DomainClassifierConfig

logger = logging.getLogger(__name__)

WIDTHS = (16, 32, 64, 128)
LR = 2e-3
WEIGHT_DECAY = 5e-4
BATCH = 64
EPOCHS = 20
MIN_STEPS = 1000
MAX_STEPS = 3000
SHIFT = 1 / 16  # largest shift, as a share of the image side
DEFAULT_SEEDS = 3
MAX_TEST = 10_000  # held-out images scored (the first of a seeded permutation)


def recipe() -> dict[str, Any]:
    """The classifier's fixed recipe, as cas.json records it."""
    return {"network": "DomainClassifier", "widths": list(WIDTHS), "optimizer": "AdamW",
            "lr": LR, "weight_decay": WEIGHT_DECAY, "batch": BATCH, "epochs": EPOCHS,
            "min_steps": MIN_STEPS, "max_steps": MAX_STEPS, "schedule": "cosine to 0",
            "shift": SHIFT}  # fmt: skip


def train_steps(n: int) -> int:
    return max(MIN_STEPS, min(MAX_STEPS, math.ceil(EPOCHS * n / BATCH)))


def _shifted(x: Tensor, g: torch.Generator) -> Tensor:
    """Each image moved by up to SHIFT of its side in x and y, edges repeated (a float batch)."""
    b, _, h, w = x.shape
    pad = max(1, round(SHIFT * max(h, w)))
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def to_float(images: Tensor) -> Tensor:
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()


def train_classifier(
    images: Tensor, labels: Tensor, num_classes: int, *, seed: int = 0
) -> DomainClassifier:
    """The fixed classifier (module doc) trained on images (N, C, H, W) uint8 or float in
    [-1, 1] and labels (N,) in [0, num_classes); returned in eval mode."""
    if len(images) < 2:
        raise ValueError(f"the classifier needs at least 2 training images, got {len(images)}")
    x, y = to_float(images), torch.as_tensor(labels).long()
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DomainClassifier(DomainClassifierConfig(
            in_channels=x.shape[1], num_classes=num_classes, widths=WIDTHS, name="cas-cnn"))  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps = train_steps(len(x))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps))
    )
    model.train()
    order = torch.randperm(len(x), generator=g)
    pos = 0
    for _ in range(steps):
        if pos + min(BATCH, len(x)) > len(order):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos : pos + BATCH]
        pos += len(idx)
        if len(idx) < 2:  # BatchNorm needs 2 items
            continue
        _, logits = model(_shifted(x[idx], g))
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def accuracy(model: DomainClassifier, images: Tensor, labels: Tensor) -> float:
    pred = model.logits(images).argmax(1)
    return float((pred == torch.as_tensor(labels).long()).double().mean())


def balanced(labels: Tensor, per_class: int, seed: int, num_classes: int) -> Tensor:
    """Indices of up to `per_class` items of each class, drawn by `seed`, in class order."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(num_classes):
        idx = (torch.as_tensor(labels) == c).nonzero().flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(out)


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": list(values)}  # fmt: skip


def scores(
    generated: Tensor, generated_labels: Tensor, real: Tensor, real_labels: Tensor, test: Tensor,
    test_labels: Tensor, num_classes: int, *, seeds: Sequence[int] = tuple(range(DEFAULT_SEEDS)),
) -> dict[str, Any]:  # fmt: skip
    """CAS (trained on `generated`, tested on `test`) beside the real baseline (trained on as
    many images per class of `real` as `generated` holds, drawn by each seed), per seed and as
    mean and std. Images (N, C, H, W) uint8 or float in [-1, 1]; labels (N,)."""
    counts = torch.bincount(torch.as_tensor(generated_labels), minlength=num_classes)
    per_class = int(counts.max())
    cas_runs, real_runs, n_real = [], [], 0
    t0 = time.perf_counter()
    for s in seeds:
        model = train_classifier(generated, generated_labels, num_classes, seed=s)
        cas_runs.append(accuracy(model, test, test_labels))
        pick = balanced(real_labels, per_class, s, num_classes)
        n_real = len(pick)
        model = train_classifier(real[pick], real_labels[pick], num_classes, seed=s)
        real_runs.append(accuracy(model, test, test_labels))
    out = {
        "cas": _spread(cas_runs),
        "real": _spread(real_runs),
        "seeds": list(seeds),
        "n_generated": len(generated),
        "n_real": n_real,
        "n_test": len(test),
        "num_classes": num_classes,
        "chance": 1 / num_classes,
        "classifier": recipe(),
        "seconds": time.perf_counter() - t0,
    }
    logger.info(
        "CAS %.3f +- %.3f (real %.3f +- %.3f) over %d seeds, %d generated / %d real training "
        "images, %d test images", out["cas"]["mean"], out["cas"]["std"], out["real"]["mean"],
        out["real"]["std"], len(seeds), len(generated), n_real, len(test),
    )  # fmt: skip
    return out


def map_labels(labels: Tensor, names: Sequence[str] | None, to: Sequence[str]) -> Tensor:
    """Labels of a data set whose classes are `names`, as indices into `to` (the run's class
    names); a class `to` lacks is a ValueError naming it."""
    if names is None or list(names) == list(to):
        return torch.as_tensor(labels).long()
    missing = [n for n in names if n not in to]
    if missing:
        raise ValueError(
            f"the held-out data has classes the run does not ({', '.join(missing[:3])}); "
            "give held-out data of the run's classes"
        )
    table = torch.tensor([list(to).index(n) for n in names])
    return table[torch.as_tensor(labels).long()]


__all__ = ["DEFAULT_SEEDS", "accuracy", "map_labels", "recipe", "scores", "train_classifier"]
