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

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .config import ConfigError, check_float, check_int
from .diffusion.samplers import DEFAULT_SAMPLER, check_sampler
from .recipe import (
    GUIDANCE_HINT,
    MAX_GUIDANCE,
    MAX_IMAGE_SIZE,
    MAX_SEED,
    MAX_TIMESTEPS,
    MIN_IMAGE_SIZE,
    RunConfig,
    check_resume_settings,
    parse_duration,
    run_config_from_dict,
    settings_dict,
)
from .runs import RunFolder

if TYPE_CHECKING:  # the heavy modules are imported inside the functions that use them
    from torch import Tensor

    from .training.loop import ProgressFn, StopRequest
    from .training.run import RunResult


log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ arguments
# One helper per kind of argument, used by every verb (and by any later front, e.g. a web page).
# Each raises a one-line ConfigError naming the argument, the value and the accepted range.
MAX_IMAGES = 100_000  # images one call of sample / eval draws (all are held in memory)
MAX_BATCH = 4096  # images per batch
MAX_NROW = 1000  # images per grid row
ANNOUNCE_FROM = 10_000  # image-steps from which `sample` first logs how long it will take


def check_count(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """A count, size or step number given by a user: a whole number in [minimum, maximum]."""
    return check_int(name, value, minimum, maximum)


def check_seed(name: str, value: Any) -> int:
    """A random seed: a whole number from 0 to 2**32 - 1."""
    return check_int(name, value, 0, MAX_SEED)


def check_steps(name: str, value: Any, num_timesteps: int = MAX_TIMESTEPS) -> int:
    """Sampler steps: a whole number from 1 to the model's T (at most MAX_TIMESTEPS)."""
    return check_int(name, value, 1, num_timesteps)


def check_guidance(name: str, value: Any) -> float | None:
    """A classifier-free guidance scale: finite, in [0, MAX_GUIDANCE]; None keeps the run's."""
    if value is None:
        return None
    return check_float(name, value, 0, MAX_GUIDANCE, hint=GUIDANCE_HINT)


def check_duration(name: str, value: str | None) -> float | None:
    """A wall-clock duration ('90s', '10m', '1h30m') in seconds, > 0; None: no limit."""
    return None if value is None else parse_duration(value, name)


def check_device(value: str | None) -> Any:
    """A device a user asked for (auto, cpu, cuda, cuda:1, mps) that this machine has."""
    from .runtime import resolve_device

    return resolve_device(value)


def check_path(name: str, value: str | os.PathLike | None) -> None:
    """A path a user gave: not empty (an empty --out would mean the current folder)."""
    if value is not None and not str(value).strip():
        raise ConfigError(f"{name} must be a path, got {str(value)!r}; give a file or folder name")


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


def check_output_file(name: str, path: str | os.PathLike, *, image: bool = False) -> Path:
    """A file to write (a grid, a report): not a folder, in a writable place, and for an image
    a suffix Pillow can write (.png, .jpg, .webp, ...)."""
    check_path(name, path)
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"{name} {path} is a folder; give a file name, e.g. {path / ('grid.png' if image else 'report.html')}"
        )
    if image:
        from PIL import Image

        ok = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
        if path.suffix.lower() not in ok:
            raise ConfigError(
                f"{name} {path} does not end in an image suffix Pillow can write; use .png "
                "(or .jpg, .webp)"
            )
    check_writable(path.parent)
    return path


def check_apart(out_name: str, out: str | os.PathLike, in_name: str, source: Any) -> None:
    """Refuse an output folder equal to, inside, or containing an input folder (a data spec
    such as DIR or mnist:DIR, or a folder path), so that nothing is written into what is read."""
    from .data import parse_spec

    if source is None:
        return
    kind, path, _ = parse_spec(str(source))
    if kind.startswith("builtin:"):
        return
    src, dst = Path(path).expanduser().resolve(), Path(out).expanduser().resolve()
    if dst == src:
        how = "is"
    elif src in dst.parents:
        how = "is inside"
    elif dst in src.parents:
        how = "contains"
    else:
        return
    raise ConfigError(
        f"{out_name} {out} {how} the {in_name} folder {path}; ldmkit would write into what it "
        f"reads: choose an {out_name} folder outside it"
    )


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

    check_path("--out", out)
    check_path("--data", data)
    check_duration("--time-budget", time_budget)
    if seed is not None:
        check_seed("--seed", seed)
    if image_size is not None:
        check_count("--image-size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    check_device(device)
    cfg = run_config(
        out, resume=resume, config_file=config_file, sets=sets, data=data,
        time_budget=time_budget, seed=seed, device=device, image_size=image_size,
    )  # fmt: skip
    check_device(cfg.device)  # also when set in a config file or with --set device=...
    check_apart("--out", out, "--data", cfg.data)
    check_writable(out)
    if stage == "unet" and not RunFolder(out).has_model("vae"):
        raise ConfigError(
            f"--stage unet trains the UNet on the run's autoencoder, but {out} has none yet; "
            "train it first (--stage vae, or all)"
        )
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
    fast: bool = True,
    compile: bool = False,
) -> Samples:
    """Draw n images from a run. A class-conditional model draws one row per class unless
    `classes` ("star", "3" or "circle,star") picks them; a text-conditional model draws one row
    per prompt (`negative_prompt` replaces "" as guidance's unconditional branch); `guidance`
    defaults to the run's. `fast`: bf16 autocast where the device runs it natively; `compile`:
    torch.compile the UNet (see `LatentDiffusion`)."""
    from .pipeline import LatentDiffusion

    check_path("--run", run)
    check_count("--n", n, 1, MAX_IMAGES)
    check_steps("--steps", steps)
    check_count("--batch-size", batch_size, 1, MAX_BATCH)
    check_seed("--seed", seed)
    check_guidance("--guidance", guidance)
    check_float("--guidance-rescale", guidance_rescale, 0, 1)
    check_sampler(sampler)
    ldm = LatentDiffusion.from_run(run, device=check_device(device), fast=fast, compile=compile)
    check_steps("--steps", steps, ldm.schedule.num_timesteps)
    _check_condition_args(ldm, run, classes, prompts, negative_prompt)
    if n * steps >= ANNOUNCE_FROM:  # a long job says how long before it starts
        from .utils import format_seconds

        seconds = ldm.estimate_seconds(
            n, sampler=sampler, steps=steps, batch_size=batch_size, guidance_scale=guidance
        )
        log.info(
            "sampling %d images (%s, %d steps) will take about %s here (timed on one batch)",
            n, sampler, steps, format_seconds(seconds),
        )  # fmt: skip
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
        check_count("--nrow", nrow, 1, MAX_NROW)
    per_row, labels = (nrow, None) if nrow else (samples.per_row, samples.row_labels)
    write_grid(samples.images, path, nrow=per_row, row_labels=labels)
    return Path(path)


def save_images(samples: Samples, folder: str | os.PathLike) -> Path:
    """Write one PNG per image, 00000.png, 00001.png, ... into `folder`.

    The images are written into a hidden staging folder inside `folder`, then moved into place:
    a kill leaves the folder's earlier images as they were (and a hidden folder that the next
    call removes), never a half-written PNG.
    """
    import shutil
    import tempfile

    from .data.transforms import to_uint8
    from .evaluation.grids import save_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(".ldmkit-staging-*"):  # left by a call that was killed
        shutil.rmtree(old, ignore_errors=True)
    arrays = to_uint8(samples.images.clamp(-1, 1)).permute(0, 2, 3, 1).cpu().numpy()
    names = [f"{i:05d}.png" for i in range(len(arrays))]
    staging = Path(tempfile.mkdtemp(prefix=".ldmkit-staging-", dir=folder))
    try:
        for name, a in zip(names, arrays):
            save_image(a, staging / name)
        for name in names:
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stale = sorted(p.name for p in folder.glob("[0-9]" * 5 + ".png") if int(p.stem) >= len(names))
    if stale:
        log.warning(
            "%s also holds %d image(s) of an earlier call (%s ...): they are not from this one",
            folder, len(stale), stale[0],
        )  # fmt: skip
    return folder


# ------------------------------------------------------------------------------ evaluate, report
def evaluate(
    run: str | os.PathLike,
    *,
    samplers: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    n: int | None = None,
    full: bool = False,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    batch_size: int = 64,
    guidance_scale: float | None = None,
    device: str | None = None,
    **options: Any,
) -> tuple[Any, dict[str, Any]]:
    """The sampler-quality table of a run (ldmkit.evaluation.evaluate.evaluate_run).

    Unset samplers / steps / n give a table that takes minutes on a CPU (the default sampler
    at 20 steps, n = 500); `full` gives the whole table (six samplers x 10..1000 steps, n = 2000,
    hours on a CPU). The estimated time is logged before the sampling starts.
    """
    from .evaluation.evaluate import evaluate_run
    from .evaluation.table import (
        DEFAULT_N,
        DEFAULT_SAMPLERS,
        DEFAULT_STEPS,
        FULL_N,
        FULL_SAMPLERS,
        FULL_STEPS,
        MIN_N,
    )

    samplers = list(
        samplers if samplers is not None else FULL_SAMPLERS if full else DEFAULT_SAMPLERS
    )
    steps = list(steps if steps is not None else FULL_STEPS if full else DEFAULT_STEPS)
    n = n if n is not None else FULL_N if full else DEFAULT_N
    if not samplers:
        raise ConfigError("--samplers: give at least one sampler, e.g. dpm++2m,ddim")
    check_sampler(*samplers)
    if not steps:
        raise ConfigError("--steps: give at least one step count, e.g. 10,20,50")
    for s in steps:
        check_steps("--steps", s)
    check_count("--n", n, MIN_N, MAX_IMAGES)
    check_seed("--seed", seed)
    check_count("--batch-size", batch_size, 1, MAX_BATCH)
    check_guidance("--guidance", guidance_scale)
    check_device(device)
    for flag, path in (("--run", run), ("--out", out), ("--ref", options.get("ref")),
                       ("--held-out", options.get("held_out"))):  # fmt: skip
        check_path(flag, path)
    folder = RunFolder(run).require_run()
    out_dir = Path(out) if out is not None else folder.eval_dir
    for flag, data in (("--ref", options.get("ref")), ("--held-out", options.get("held_out")),
                       ("run's data", folder.config().data)):  # fmt: skip
        check_apart("--out", out_dir, flag, data)
    check_writable(out_dir)
    return evaluate_run(
        run, samplers=samplers, steps=steps, n=n, out_dir=out_dir, seed=seed,
        batch_size=batch_size, guidance_scale=guidance_scale, device=device, **options,
    )  # fmt: skip


def report(
    run: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = 20,
    seed: int = 0,
    device: str | None = None,
) -> Path:
    """One self-contained HTML page about a run (ldmkit.evaluation.report.build_report)."""
    from .evaluation.report import build_report

    check_sampler(sampler)
    check_steps("--steps", steps)
    check_seed("--seed", seed)
    check_device(device)
    check_path("--run", run)
    if out is not None:
        check_output_file("--out", out)
    folder = RunFolder(run).require_run()
    check_steps("--steps", steps, folder.config().diffusion.num_timesteps)
    return build_report(run, out_path=out, sampler=sampler, steps=steps, seed=seed, device=device)


# ------------------------------------------------------------------------------ convert
def convert_from_diffusers(
    source: str | os.PathLike, out: str | os.PathLike, *, vae: str | None = None,
    scheduler: str | None = None,
) -> Path:  # fmt: skip
    """A diffusers pipeline folder (or UNet folder) -> an ldmkit run folder."""
    from .interop import convert_from_diffusers as convert

    for flag, folder in (("--from-diffusers", source), ("--vae", vae), ("--scheduler", scheduler)):
        check_path(flag, folder)
        check_apart("--out", out, flag, folder)
    check_path("--out", out)
    check_writable(out)
    return Path(convert(source, out, vae_dir=vae, scheduler_dir=scheduler))


def export_to_diffusers(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """An ldmkit run folder -> a diffusers pipeline folder (model_index.json, unet/, vae/, ...)."""
    from .interop import export_to_diffusers as export

    check_path("--to-diffusers", run)
    check_path("--out", out)
    check_apart("--out", out, "--to-diffusers", run)
    check_writable(out)
    return Path(export(run, out))
