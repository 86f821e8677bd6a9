"""`distill`: a few-step student of a trained run."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from ..options import (
    DISTILL_ITERATIONS,
    DISTILL_MAX_ITERATIONS,
    DistillOptions,
)
from ..recipe import (
    parse_duration,
)
from ..runs import RunFolder

if TYPE_CHECKING:  # the heavy modules are imported inside the functions that use them
    from ..training.distill import DistillResult
    from ..training.loop import ProgressFn, StopRequest

from .checks import check_apart, check_device, check_path, check_writable

log = logging.getLogger(__name__)


_DISTILL = DistillOptions()


def distill(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    options: DistillOptions | None = None,
    resume: bool = False,
    device: str | None = None,
    progress: ProgressFn | None = None,
    stop: StopRequest | None = None,
    **given: Any,
) -> DistillResult:
    """Distil the run `run` into a few-step student run folder `out` (progressive distillation,
    ldmkit.training.distill). Its options (`options.DistillOptions`: steps, teacher_steps,
    iterations, time_budget, batch_size, lr, weighting, seed, guidance_mode, max_guidance,
    sampler) come as keywords or all at once as `options`; without `iterations`, a halving runs
    DISTILL_ITERATIONS optimizer steps, or with a time budget as many as its share of the budget
    allows. `ldmkit sample --run OUT` then samples at the student's steps with its sampler
    (`sampler`: DDIM, or lcm where "auto" measured it clearly better).

        api.distill("runs/shapes", "runs/shapes-fast", steps=4, time_budget="20m")
    """
    from ..training.distill import check_teacher, distill_run

    if options is not None and given:
        raise TypeError("give distill's options as keywords or as `options`, not both")
    o = options if options is not None else DistillOptions.given(given)
    check_path("--run", run)
    check_path("--out", out)
    check_device(device)
    folder = RunFolder(run)
    o = o.check(folder, shown=run)  # the ranges; the run's models saved
    check_teacher(folder, run, o.steps, o.teacher_steps)
    for flag, source in (("--run", run), ("run's data", folder.config().data)):
        check_apart("--out", out, flag, source)
    check_writable(out)
    iterations = o.iterations
    if iterations is None:  # a time budget's plan ends each halving, else a fixed count
        iterations = DISTILL_MAX_ITERATIONS if o.time_budget else DISTILL_ITERATIONS
    return distill_run(
        run, out, steps=o.steps, teacher_steps=o.teacher_steps, iterations=iterations,
        time_budget_s=parse_duration(o.time_budget, "--time-budget") if o.time_budget else None,
        batch_size=o.batch_size, lr=o.lr, weighting=o.weighting, seed=o.seed, resume=resume,
        device=device, progress=progress, stop=stop, guidance_input=o.guidance_mode == "input",
        max_guidance=o.max_guidance, sampler=o.sampler,
    )  # fmt: skip
