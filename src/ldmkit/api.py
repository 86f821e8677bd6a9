"""What a user can do with ldmkit, as plain Python functions: train, sample, evaluate, report,
convert. The command line (`cli.py`) and a later web page only parse their input, call these
and show the result; every check of a user's arguments happens here, once per kind of argument.

    from ldmkit import api
    result = api.train(data="builtin:shapes", out="runs/shapes", time_budget="10m")
    grid = api.sample("runs/shapes", n=50)
    api.save_grid(grid, "runs/shapes/grid.png")

Errors are `ValueError` subclasses (ConfigError, CheckpointError, ...) with one-line messages
that say what is wrong and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .config import ConfigError
from .diffusion.samplers import DEFAULT_SAMPLER, check_sampler
from .recipe import RunConfig, check_resume_settings, run_config_from_dict, settings_dict
from .runs import RunFolder

if TYPE_CHECKING:  # the heavy modules are imported inside the functions that use them
    from torch import Tensor

    from .training.loop import ProgressFn, StopRequest
    from .training.run import RunResult


# ------------------------------------------------------------------------------ arguments
def check_count(name: str, value: int, minimum: int = 1) -> int:
    """A count, size or step number given by a user: a whole number >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def check_writable(folder: str | os.PathLike) -> Path:
    """Refuse an output location that cannot be written (a file in the way, no permission)."""
    folder = Path(folder) if str(folder) else Path(".")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"cannot write to {folder}: {probe} is a file, not a folder; choose another output path"
        )
    if not os.access(probe, os.W_OK):
        raise ConfigError(
            f"cannot write to {folder}: permission denied; choose another output path"
        )
    return folder


def run_config(
    out: str | os.PathLike,
    *,
    resume: bool = False,
    config_file: str | None = None,
    sets: Sequence[str] = (),
    **flags: Any,
) -> RunConfig:
    """The RunConfig a training into `out` runs with: defaults (or, with resume, the run's saved
    run.json) <- config file <- `section.field=value` settings <- flags (data, seed, ...)."""
    folder = RunFolder(out)
    given = settings_dict(config_file, sets, flags)
    base: dict[str, Any] = {}
    if resume and folder.exists():  # a run resumes with its saved config
        base = folder.config_dict()
        check_resume_settings(base, given, str(folder.config_path))
    from .config import deep_update

    deep_update(base, given)
    return run_config_from_dict(base)


# ------------------------------------------------------------------------------ train
def train(
    out: str | os.PathLike,
    *,
    data: str | None = None,
    time_budget: str | None = None,
    seed: int | None = None,
    image_size: int | None = None,
    device: str | None = None,
    config_file: str | None = None,
    sets: Sequence[str] = (),
    resume: bool = False,
    stage: Literal["all", "vae", "unet"] = "all",
    progress: ProgressFn | None = None,
    stop: StopRequest | None = None,
    dist_backend: str = "auto",
) -> RunResult:
    """Train a run into `out` (see ldmkit.training.run.train_run). `stop` (a threading.Event)
    ends it cleanly with a checkpoint; `progress` receives a `Progress` event per step.
    Launched by torchrun, every process calls this and they train together (`dist_backend`:
    auto, gloo or nccl; ldmkit.training.distributed)."""
    from .training.run import train_run

    cfg = run_config(
        out, resume=resume, config_file=config_file, sets=sets, data=data,
        time_budget=time_budget, seed=seed, device=device, image_size=image_size,
    )  # fmt: skip
    check_writable(out)
    return train_run(cfg, out, resume=resume, stage=stage, progress=progress, stop=stop,
                     backend=dist_backend)  # fmt: skip


def tqdm_progress() -> ProgressFn:
    """A progress callback that draws one tqdm bar per training stage."""
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}

    def show(p: Any) -> None:
        bar = bars.get(p.stage)
        if bar is None:
            if p.done:
                return
            bar = bars[p.stage] = tqdm(total=p.total, initial=p.step - 1, desc=p.stage,
                                       unit="step", dynamic_ncols=True)  # fmt: skip
        if p.done:
            bar.close()
            return
        if bar.total != p.total:
            bar.total = p.total
            bar.refresh()
        if p.loss is not None:
            bar.set_postfix(loss=f"{p.loss:.4f}", img_s=f"{p.images_per_s:.0f}")
        bar.update(p.step - bar.n)

    return show


# ------------------------------------------------------------------------------ sample
@dataclass
class Samples:
    """Images drawn from a run, with how to lay them out and how they were made."""

    images: Tensor  # (n, C, H, W) in [-1, 1]
    per_row: int | None  # images per grid row; None: a square grid
    row_labels: list[str] | None  # one per grid row (class names), or None
    description: (
        str  # e.g. "50 images, dpm++2m-sde, 20 steps, seed 0, guidance 5, one class per row"
    )


def sample(
    run: str | os.PathLike,
    *,
    n: int = 64,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = 20,
    seed: int = 0,
    classes: str | None = None,
    prompts: Sequence[str] | None = None,
    negative_prompt: str | None = None,
    guidance: float | None = None,
    guidance_rescale: float = 0.0,
    batch_size: int = 64,
    device: str | None = None,
) -> Samples:
    """Draw n images from a run. A class-conditional model draws one row per class unless
    `classes` ("star", "3" or "circle,star") picks them; a text-conditional model draws one row
    per prompt (`negative_prompt` replaces "" as guidance's unconditional branch); `guidance`
    defaults to the run's."""
    from .pipeline import LatentDiffusion

    check_count("--n", n)
    check_count("--steps", steps)
    check_count("--batch-size", batch_size)
    check_sampler(sampler)
    if guidance is not None and guidance < 0:
        raise ConfigError(f"--guidance must be >= 0 (1 = no guidance), got {guidance}")
    if not 0 <= guidance_rescale <= 1:
        raise ConfigError(f"--guidance-rescale must be in [0, 1], got {guidance_rescale}")
    ldm = LatentDiffusion.from_run(run, device=device)
    _check_condition_args(ldm, run, classes, prompts, negative_prompt)
    kwargs = dict(sampler=sampler, steps=steps, seed=seed, guidance_scale=guidance,
                  guidance_rescale=guidance_rescale, batch_size=batch_size)  # fmt: skip
    how = f"{n} images, {sampler}, {steps} steps, seed {seed}"
    g = ldm.default_guidance if guidance is None else guidance
    cond = ldm.conditioner
    if prompts:
        per_row = -(-n // len(prompts))
        texts = [p for p in prompts for _ in range(per_row)][:n]
        images = ldm.sample(n, prompt=texts, negative_prompt=negative_prompt, **kwargs)
        rows = -(-n // per_row)
        return Samples(
            images, per_row, list(prompts[:rows]), how + f", guidance {g:g}, one prompt per row"
        )
    if classes is not None:
        images = ldm.sample(n, class_labels=cond.parse(classes, n), **kwargs)
        return Samples(images, None, None, how + f", guidance {g:g}")
    images, per_row, row_labels = ldm.sample_grid(n, **kwargs)
    if cond.enabled:
        how += f", guidance {g:g}, one class per row"
    return Samples(images, per_row, row_labels, how)


def _check_condition_args(
    ldm: Any, run: Any, classes: str | None, prompts: Sequence[str] | None, negative: str | None
) -> None:
    """--class, --prompt and --negative-prompt against what the model was trained on."""
    text = ldm.is_text_conditional
    if (prompts is not None or negative is not None) and not text:
        flag = "--prompt" if prompts is not None else "--negative-prompt"
        how = " (pick a class with --class)" if ldm.conditioner.enabled else ""
        raise ConfigError(
            f"{flag}: the model in {run} has no text conditioning, so it cannot follow a "
            f"prompt; drop {flag}{how}"
        )
    if classes is not None and not ldm.conditioner.enabled:
        raise ConfigError(
            f"--class: the model in {run} was trained without class labels (unconditional); "
            "drop --class"
        )
    if classes is not None and text:
        raise ConfigError(
            f"--class: the model in {run} follows text prompts, not classes; describe what to "
            'draw with --prompt, e.g. --prompt "a large red star on a blue background"'
        )
    if text and not prompts:
        raise ConfigError(
            f"the model in {run} follows text prompts: give --prompt TEXT (repeat it for one "
            "row per prompt) or --prompts FILE (one per line)"
        )
    for p in prompts or []:
        if not p.strip():
            raise ConfigError(
                '--prompt is empty; describe the image, e.g. --prompt "a small blue circle"'
            )


def save_grid(samples: Samples, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write the samples as one grid PNG; `nrow` overrides the layout (and drops row labels)."""
    from .evaluation.grids import save_grid as write_grid

    if nrow is not None:
        check_count("--nrow", nrow)
    per_row, labels = (nrow, None) if nrow else (samples.per_row, samples.row_labels)
    write_grid(samples.images, path, nrow=per_row, row_labels=labels)
    return Path(path)


def save_images(samples: Samples, folder: str | os.PathLike) -> Path:
    """Write one PNG per image, 00000.png, 00001.png, ... into `folder`."""
    from .pipeline import LatentDiffusion

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(LatentDiffusion.to_pil(samples.images)):
        im.save(folder / f"{i:05d}.png")
    return folder


# ------------------------------------------------------------------------------ evaluate, report
def evaluate(
    run: str | os.PathLike,
    *,
    samplers: Sequence[str],
    steps: Sequence[int],
    n: int = 2000,
    out: str | os.PathLike | None = None,
    **options: Any,
) -> tuple[Any, dict[str, Any]]:
    """The sampler-quality table of a run (ldmkit.evaluation.evaluate.evaluate_run)."""
    from .evaluation.evaluate import evaluate_run

    if not samplers:
        raise ConfigError("--samplers: give at least one sampler, e.g. dpm++2m,ddim")
    check_sampler(*samplers)
    if not steps:
        raise ConfigError("--steps: give at least one step count, e.g. 10,20,50")
    for s in steps:
        check_count("--steps", s)
    if not isinstance(n, int) or n < 6:
        raise ConfigError(f"--n must be at least 6 images (precision/recall use k = 3), got {n}")
    folder = RunFolder(run).require_run()
    out_dir = Path(out) if out else folder.eval_dir
    check_writable(out_dir)
    return evaluate_run(run, samplers=list(samplers), steps=list(steps), n=n, out_dir=out_dir,
                        **options)  # fmt: skip


def report(run: str | os.PathLike, *, out: str | os.PathLike | None = None, **options: Any) -> Path:
    """One self-contained HTML page about a run (ldmkit.evaluation.report.build_report)."""
    from .evaluation.report import build_report

    RunFolder(run).require_run()
    if out:
        check_writable(Path(out).parent)
    if "steps" in options:
        check_count("--steps", options["steps"])
    if "sampler" in options:
        check_sampler(options["sampler"])
    return build_report(run, out_path=out, **options)


# ------------------------------------------------------------------------------ convert
def convert_from_diffusers(
    source: str | os.PathLike, out: str | os.PathLike, *, vae: str | None = None,
    scheduler: str | None = None,
) -> Path:  # fmt: skip
    """A diffusers pipeline folder (or UNet folder) -> an ldmkit run folder."""
    from .interop import convert_from_diffusers as convert

    return Path(convert(source, out, vae_dir=vae, scheduler_dir=scheduler))


def export_to_diffusers(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """An ldmkit run folder -> a diffusers pipeline folder (model_index.json, unet/, vae/, ...)."""
    from .interop import export_to_diffusers as export

    return Path(export(run, out))
