"""A run's guidance scale, chosen by a quick measurement at the end of its training.

The best classifier-free guidance scale differs per data set (issue 19: on the built-in shapes
both FID and class accuracy were best at 5, on MNIST FID was best at 1.5 and tripled at 5), so a
conditional run measures it instead of taking one fixed default:

    for each scale in GUIDANCE_SCALES: n images drawn for the conditions of n real training
    images (their class labels, or their captions), QUICK_STEPS sampler steps, the same seed;
    FID in the run's domain-classifier features against those n real images, and the share of
    images the classifier reads as the real image's class (for a text run: the class named in
    its caption, e.g. the shape).

The pick (`pick_scale`) starts from PRIOR_SCALE (1.5) and moves only on clear evidence. At 64
images per scale the quick FIDs' noise is as large as their differences (a real-vs-real FID of
this n is often larger than the samples' own), and a rule that took the lowest FID picked
scales from 1 to 5 on one run as the seed changed (docs/performance.md, "the quick guidance
choice"). 1.5 is the best scale, or next to it, in every 500-sample measurement of the built-in
shapes and MNIST runs since issue 25's recipe. Another scale replaces it when it is better on
one measure by more than the noise and no worse on the other (`clearly_better`): a quick FID
lower by FID_MARGIN (25 %) at no lower accuracy, or an accuracy higher by ACCURACY_SE (2)
standard errors of the difference at an FID within FID_TIE (10 %); among several such scales,
the lowest FID, the most accurate within FID_TIE of it, then the lowest scale. The FIDs are of
small n and few steps, biased upward: they rank the scales of one run, they are no figure to
quote.

It needs the domain classifier (`feature_nets`: images of at most 64 px, data with labels); the
classifier is cached in the run folder, where `ldmkit eval` reuses it. Without one nothing is
measured (`measure_guidance` returns None) and the run keeps the default scale.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ldmkit.checkpoint import CONFIG_NAME, write_json
from ldmkit.diffusion.samplers import DEFAULT_SAMPLER
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runs import RunFolder

from .feature_nets import (
    FeatureNet,
    default_feature_kind,
    domain_classifier_dir,
    get_feature_net,
)
from .metrics import FeatureStats, frechet_distance

logger = logging.getLogger(__name__)

GUIDANCE_SCALES = (1.0, 1.5, 2.0, 3.0, 5.0)
QUICK_N = 64  # images per scale
QUICK_STEPS = 8  # sampler steps of the default sampler
PRIOR_SCALE = 1.5  # the pick unless another scale is clearly better (pick_scale)
FID_MARGIN = 0.25  # a quick FID this share below the prior's is better beyond the noise
ACCURACY_SE = 2.0  # an accuracy this many standard errors above the prior's is better
FID_TIE = 0.10  # FIDs within this share of each other count as tied
CLASSIFIER_BUDGET_S = 60.0  # longest the domain classifier trains, when it is not cached
CHOICE_NAME = "guidance.json"  # in the run's eval/ folder


@dataclass
class GuidanceRow:
    scale: float
    fid: float
    accuracy: float  # share drawn as the requested class (of the caption, for a text run)
    seconds: float


@dataclass
class GuidanceChoice:
    scale: float  # the pick
    rows: list[GuidanceRow]
    feature_name: str  # the domain classifier's name: the FIDs are FID-<name>
    n: int
    steps: int
    floor: float  # FID of n real images against n others: the floor at this n
    seconds: float  # the whole measurement, the classifier's training included

    def table(self) -> str:
        """The measurement as text lines, the pick marked."""
        rows = [(f"{r.scale:g}", r, r.scale == self.scale) for r in self.rows]
        lines = table_lines("guidance", self.feature_name, rows)
        lines.append(
            f"(n = {self.n} per scale, {self.steps} {DEFAULT_SAMPLER} steps, real-vs-real "
            f"floor {self.floor:.2f}; {self.seconds:.0f} s in all)"
        )
        return "\n".join(lines)


def table_lines(key: str, feature_name: str, rows: Sequence[tuple[str, Any, bool]]) -> list[str]:
    """A quick measurement's table: a header, then per (label, row with fid / accuracy /
    seconds, chosen) a line, the chosen one marked."""
    lines = [f"{key:>8} {'FID-' + feature_name:>16} {'accuracy':>8} {'s':>5}"]
    for label, r, chosen in rows:
        mark = "  <- chosen" if chosen else ""
        lines.append(f"{label:>8} {r.fid:16.2f} {r.accuracy:8.3f} {r.seconds:5.1f}{mark}")
    return lines


def pick_scale(rows: Sequence[GuidanceRow], n: int, prior: float = PRIOR_SCALE) -> float:
    """The measured scale nearest `prior` (the lower of two as near), unless another is clearly
    better (the module docstring); `n`: images per scale, for the accuracies' standard errors."""
    anchor = min(rows, key=lambda r: (abs(r.scale - prior), r.scale))
    better = [r for r in rows if r is anchor or clearly_better(r, anchor, n)]
    best = min(r.fid for r in better)
    tied = [r for r in better if r.fid <= best * (1 + FID_TIE)]
    return min(tied, key=lambda r: (-r.accuracy, r.scale)).scale


def clearly_better(r: Any, anchor: Any, n: int) -> bool:
    """Is `r` better than `anchor` on one measure beyond the noise of n images, and no worse on
    the other? (Rows with `fid` and `accuracy`: FID_MARGIN, ACCURACY_SE, FID_TIE.)"""
    p, q = r.accuracy, anchor.accuracy
    se = math.sqrt((p * (1 - p) + q * (1 - q)) / max(n, 1))
    lower_fid = r.fid < anchor.fid * (1 - FID_MARGIN) and p >= q
    more_accurate = p - q > ACCURACY_SE * se and r.fid <= anchor.fid * (1 + FID_TIE)
    return lower_fid or more_accurate


def can_measure(folder: RunFolder) -> str | None:
    """Why the run's guidance cannot be measured quickly (None: it may; the labels the domain
    classifier needs are checked on the data, which a text run's data.json does not list)."""
    if default_feature_kind(folder.config().image_size) != "domain":
        return "its images are larger than the domain classifier's 64 px (Inception is slow)"
    return None


def measure_guidance(
    ldm: LatentDiffusion,
    folder: RunFolder,
    *,
    scales: Sequence[float] | None = None,
    n: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    net: FeatureNet | None = None,
) -> GuidanceChoice | None:
    """Measure FID and accuracy at each guidance scale (see the module docstring) and pick one;
    None when the run has no domain classifier to measure with (`can_measure`). Unset
    arguments take GUIDANCE_SCALES, QUICK_N and QUICK_STEPS; `net` is a domain classifier
    already trained on the run's data (training's judge, which reads any image size), else one
    is trained or reused (for images of at most 64 px, `can_measure`)."""
    scales = GUIDANCE_SCALES if scales is None else scales
    n, steps = n or QUICK_N, steps or QUICK_STEPS
    t0 = time.perf_counter()
    qs = quick_set(ldm, folder, n=n, seed=seed, net=net, what="guidance")
    if qs is None:
        return None
    rows = [
        GuidanceRow(float(g), *qs.measure(
            lambda g=g: ldm.sample(qs.n, steps=steps, seed=seed, guidance_scale=g, **qs.condition)
        ))
        for g in scales
    ]  # fmt: skip
    return GuidanceChoice(
        pick_scale(rows, qs.n), rows, qs.net.name, qs.n, steps, qs.floor,
        time.perf_counter() - t0,
    )  # fmt: skip


@dataclass
class QuickSet:
    """What a quick measurement scores samples against: n real training images' conditions
    (`condition`, for `LatentDiffusion.sample`), their labels, their features' statistics in
    the domain classifier `net`, and the real-vs-real floor at this n."""

    net: FeatureNet
    n: int
    labels: torch.Tensor
    condition: dict[str, Any]
    ref: FeatureStats
    floor: float

    def measure(self, draw: Callable[[], torch.Tensor]) -> tuple[float, float, float]:
        """(FID against the real images, the share read as the asked-for class, seconds) of the
        samples `draw()` returns (n of them, for `condition`)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            x = draw()
            accuracy = float((self.net.logits(x).argmax(1) == self.labels).double().mean())
            fid = _fid(FeatureStats().update(self.net.features(x).double()), self.ref)
        return fid, accuracy, time.perf_counter() - t0


def quick_set(
    ldm: LatentDiffusion, folder: RunFolder, *, n: int, seed: int = 0,
    net: FeatureNet | None = None, what: str = "guidance",
) -> QuickSet | None:  # fmt: skip
    """The real side of a quick measurement on the run's data (n images drawn with `seed`, n
    others for the floor), or None, logged as `what` "not measured" with the reason, where the
    run has no domain classifier to measure with (`can_measure`, labels, captions)."""
    why = can_measure(folder) if net is None else None
    if why is not None:
        logger.info("%s: not measured, because %s", what, why)
        return None
    ds = folder.load_data()
    if ds.labels is None or (ldm.is_text_conditional and ds.captions is None):
        logger.info(
            "%s: not measured, because its data has no class labels to train the domain "
            "classifier on (or no captions)", what,
        )  # fmt: skip
        return None
    # the run's cached classifier (`ldmkit eval`'s); else a quick one of DOMAIN_MIN_STEPS steps
    # (one epoch of MNIST: 1/5 of eval's), not cached, so that eval still trains its own
    cached = (domain_classifier_dir(folder.path) / CONFIG_NAME).is_file()
    if cached or net is None:
        net = get_feature_net(
            "domain", dataset=ds, run_dir=folder.path if cached else None,
            epochs=5 if cached else 1, seed=seed, time_budget_s=CLASSIFIER_BUDGET_S,
        )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(ds.images), generator=gen)[: 2 * n]
    n = len(pick) // 2
    real, other = ds.images[pick[:n]], ds.images[pick[n : 2 * n]]
    labels = ds.labels[pick[:n]]
    condition: dict[str, Any] = {"class_labels": labels}
    if ldm.is_text_conditional and ds.captions is not None:
        condition = {"prompt": [ds.captions[int(i)] for i in pick[:n]]}
    with torch.no_grad():
        ref = FeatureStats().update(net.features(real).double())
        floor = _fid(FeatureStats().update(net.features(other).double()), ref)
    return QuickSet(net, n, labels, condition, ref, floor)


def _fid(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def save_choice(folder: RunFolder, choice: GuidanceChoice) -> None:
    """The measurement as eval/guidance.json in the run folder (the scale is in run.json)."""
    write_json(folder.eval_dir / CHOICE_NAME, dataclasses.asdict(choice))
