"""A few-step student's sampler, chosen by a quick measurement at the end of its distillation.

A student of progressive distillation learns the deterministic DDIM path, and DDIM is what it
samples with by default. Multistep consistency sampling (`lcm`: the student's x0 prediction,
then fresh noise to the next level) helped the 4-step student of the built-in shapes (FID-cnn
12.1 -> 6.17, class accuracy 0.671 -> 0.791, n = 1000) and hurt MNIST's (1.23 -> 3.13;
docs/performance.md, issue 27), so a student measures both where its data allows it:

    for each of STUDENT_SAMPLERS: n images at the student's step count for the conditions of n
    real training images, the same seed; FID in the run's domain-classifier features against
    those n images, and the share read as the right class (evaluation/guidance_choice.py's
    `quick_set`).

The pick (`pick_sampler`) keeps ddim unless lcm is clearly better by the guidance choice's
rule (`clearly_better`: an FID 25 % lower at no lower accuracy, or an accuracy two standard
errors higher at an FID within 10 %). Not measured (DDIM kept): a 1-step student (at one step
both samplers return the same x0 prediction), an unconditional one (its class accuracy means
nothing), and data the domain classifier cannot read (`quick_set`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ldmkit.checkpoint import write_json
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runs import RunFolder

from .guidance_choice import clearly_better, quick_set, table_lines

logger = logging.getLogger(__name__)

STUDENT_SAMPLERS = ("ddim", "lcm")  # the first is the prior: the path the student learned
STUDENT_QUICK_N = 256  # images per sampler (the 1.5-2x FID gaps seen need a few hundred)
CHOICE_NAME = "sampler.json"  # in the student's eval/ folder


@dataclass
class SamplerRow:
    sampler: str
    fid: float
    accuracy: float
    seconds: float


@dataclass
class SamplerChoice:
    sampler: str  # the pick
    rows: list[SamplerRow]
    feature_name: str
    n: int
    steps: int
    floor: float
    seconds: float

    def table(self) -> str:
        rows = [(r.sampler, r, r.sampler == self.sampler) for r in self.rows]
        lines = table_lines("sampler", self.feature_name, rows)
        lines.append(
            f"(n = {self.n} per sampler, {self.steps} steps, real-vs-real floor {self.floor:.2f}; "
            f"{self.seconds:.0f} s in all)"
        )
        return "\n".join(lines)


def pick_sampler(rows: Sequence[SamplerRow], n: int) -> str:
    """The first row's sampler (the prior), unless another is clearly better; of several, the
    lowest FID."""
    better = [r for r in rows[1:] if clearly_better(r, rows[0], n)]
    return min(better, key=lambda r: r.fid).sampler if better else rows[0].sampler


def measure_student_sampler(
    ldm: LatentDiffusion,
    folder: RunFolder,
    steps: int,
    *,
    samplers: Sequence[str] = STUDENT_SAMPLERS,
    n: int = STUDENT_QUICK_N,
    seed: int = 0,
) -> SamplerChoice | None:
    """Measure each sampler at the student's `steps` (module docstring) and pick one; None where
    nothing is measured (a 1-step or unconditional student, or no domain classifier for the
    data)."""
    if steps < 2:
        logger.info("sampler: not measured, because at 1 step every sampler is the same")
        return None
    if not (ldm.is_text_conditional or getattr(ldm.conditioner, "num_classes", None)):
        logger.info("sampler: not measured, because the run is unconditional (no class to read)")
        return None
    t0 = time.perf_counter()
    qs = quick_set(ldm, folder, n=n, seed=seed, what="sampler")
    if qs is None:
        return None
    rows = [
        SamplerRow(name, *qs.measure(
            lambda name=name: ldm.sample(qs.n, sampler=name, steps=steps, seed=seed, **qs.condition)
        ))
        for name in samplers
    ]  # fmt: skip
    return SamplerChoice(
        pick_sampler(rows, qs.n), rows, qs.net.name, qs.n, steps, qs.floor,
        time.perf_counter() - t0,
    )  # fmt: skip


def save_choice(folder: RunFolder, choice: SamplerChoice) -> None:
    """The measurement as eval/sampler.json in the student's folder (the pick is in
    distill.json)."""
    write_json(folder.eval_dir / CHOICE_NAME, dataclasses.asdict(choice))
