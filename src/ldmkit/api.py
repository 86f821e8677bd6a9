"""What a user can do with ldmkit, as plain Python functions: train, sample, evaluate, report,
convert. The command line (`cli.py`) and the web page only parse their input, call these
and show the result; every check of a user's arguments happens here, once per kind of argument
(the options of sample and the edits: their declarations in `ldmkit.options`, checked once).

    from ldmkit import api
    result = api.train(data="builtin:shapes", out="runs/shapes", time_budget="10m")
    grid = api.sample("runs/shapes", n=50)
    api.save_grid(grid, "runs/shapes/grid.png")

Errors are `ValueError` subclasses (ConfigError, CheckpointError, ...) with one-line messages
that say what is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .config import ConfigError, check_float, check_int
from .diffusion.samplers import check_sampler
from .options import (
    DISTILL_ITERATIONS,
    DISTILL_MAX_ITERATIONS,
    EDITS,
    MAX_BATCH,
    MAX_IMAGES,
    VERBS,
    DistillOptions,
    SampleOptions,
    SynthOptions,
    TrainOptions,
    check_conditions,
    check_student_guidance,
)
from .recipe import (
    GUIDANCE_HINT,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_TIMESTEPS,
    RunConfig,
    check_resume_settings,
    parse_duration,
    run_config_from_dict,
    settings_dict,
)
from .runs import RunFolder

if TYPE_CHECKING:  # the heavy modules are imported inside the functions that use them
    from torch import Tensor

    from .editing import EditResult
    from .pipeline import LatentDiffusion
    from .training.distill import DistillResult
    from .training.loop import ProgressFn, StopRequest
    from .training.run import RunResult


log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ arguments
# One helper per kind of argument, used by every verb (and by any later front, e.g. a web page).
# Each raises a one-line ConfigError naming the argument, the value and the accepted range.
# (MAX_IMAGES, MAX_BATCH and the edits' limits are the options' own: ldmkit.options)
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


NAME_MAX = 255  # bytes of one file or folder name (Linux, macOS; Windows: 255 characters)
PATH_MAX = 4096  # bytes of a whole path (Linux)


def check_path(name: str, value: str | os.PathLike | None) -> None:
    """A path a user gave: not empty (an empty --out would mean the current folder), no NUL
    character, and names the file system can hold (each part at most NAME_MAX bytes, the whole
    at most PATH_MAX), so that no later file operation fails on the name itself."""
    if value is None:
        return
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if not text.strip():
        raise ConfigError(f"{name} must be a path, got {text!r}; give a file or folder name")
    if "\0" in text:
        raise ConfigError(
            f"{name} {shorten(text)} holds a NUL character; give a file or folder name"
        )
    if len(os.fsencode(text)) > PATH_MAX:
        raise ConfigError(
            f"{name} {shorten(text)} is longer than the file system's limit of {PATH_MAX} bytes "
            "for a path; choose a shorter one"
        )
    for part in Path(text).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise ConfigError(
                f"{name}: the name {shorten(part)} is longer than the file system's limit of "
                f"{NAME_MAX} bytes for a file or folder name; choose a shorter one"
            )


def shorten(text: str, keep: int = 40) -> str:
    """A name as a message shows it (repr): a short one whole, a long one cut, with its length
    (a name of thousands of characters would make a message nobody reads)."""
    return repr(text) if len(text) <= keep else f"{text[:keep]!r}... ({len(text)} characters)"


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


def check_output_file(
    name: str, path: str | os.PathLike, *, image: bool = False,
    inputs: Sequence[tuple[str, Any]] = (),
) -> Path:  # fmt: skip
    """A file to write (a grid, a report): not a folder, in a writable place, and for an image
    a suffix Pillow can write (.png, .jpg, .webp, ...); not one of `inputs` ((flag, path) of
    the files and folders the verb reads: `check_apart`)."""
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
    for in_name, source in inputs:
        check_apart(name, path, in_name, source, spec=False)
    check_writable(path.parent)
    return path


def check_apart(
    out_name: str, out: str | os.PathLike, in_name: str, source: Any, *, spec: bool = True
) -> None:
    """Refuse an output that is one of the inputs, so that nothing is written over or into what
    is read: an output equal to an input file, or equal to, inside or containing an input
    folder. Paths are compared resolved (symbolic links, `..`, relative and absolute spellings)
    and as files (a hard link is the same file). `source` is a data spec (DIR or mnist:DIR;
    a built-in has no path) or, with `spec=False`, a path."""
    if source is None:
        return
    if spec:
        from .data import parse_spec

        kind, path, _ = parse_spec(str(source))
        if kind.startswith("builtin:"):
            return
    else:
        path = os.fspath(source)
    how = overlap(out, path)
    if how is None:
        return
    if how == "is" and not Path(path).is_dir():
        raise ConfigError(
            f"{out_name} {out} is the {in_name} file {path}; ldmkit would overwrite what it "
            f"reads: choose another {out_name} file"
        )
    noun = "folder" if Path(path).is_dir() else "file"
    raise ConfigError(
        f"{out_name} {out} {how} the {in_name} {noun} {path}; ldmkit would write into what it "
        f"reads: choose an {out_name} outside it"
    )


def overlap(out: str | os.PathLike, source: str | os.PathLike) -> str | None:
    """How an output path lies to an input path: "is" (the same file or folder: resolved, or
    a hard link), "is inside", "contains", or None (apart)."""
    src, dst = _resolved(source), _resolved(out)
    if dst == src or _same_file(src, dst):
        return "is"
    if src in dst.parents:
        return "is inside"
    if dst in src.parents:
        return "contains"
    return None


def _resolved(path: str | os.PathLike) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):  # a symbolic link loop, an unreadable folder
        return Path(os.path.abspath(path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one of them does not exist
        return False


def run_inputs(run: str | os.PathLike | None) -> list[tuple[str, Path]]:
    """(--run, path) of the files and folders of a run that sampling, editing and reports read
    (its config, data description, tokenizer, models and checkpoints): an output must not be
    one of them (`check_apart`)."""
    if run is None:
        return []
    f = RunFolder(run)
    return [("--run", p) for p in (f.config_path, f.data_path, f.tokenizer_path, f.vae_dir,
                                   f.unet_dir, f.text_encoder_dir, f.checkpoints_dir)]  # fmt: skip


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
_TRAIN = TrainOptions()  # the defaults of `train`'s option keywords


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
    conditioning: str | None = None,
    options: TrainOptions | None = None,
) -> RunResult:
    """Train a run into `out` (see ldmkit.training.run.train_run). Its per-call options
    (`options.TrainOptions`: data, time_budget, seed, image_size, conditioning; checked once)
    come as keywords or all at once as `options`; the rest of the run's settings from
    `config_file` and `sets` ("section.field=value"). `stop` (a threading.Event)
    ends it cleanly with a checkpoint; `progress` receives a `Progress` event per step.
    Launched by torchrun, every process calls this and they train together (`dist_backend`:
    auto, gloo or nccl; ldmkit.training.distributed)."""
    from .training.run import train_run

    o = _train_options(data, time_budget, seed, image_size, conditioning, options)
    cfg, size = _train_setup(out, o, device, config_file, sets, resume, stage)
    return train_run(cfg, out, resume=resume, stage=stage, progress=progress, stop=stop,
                     backend=dist_backend, size=size)  # fmt: skip


@dataclass
class TrainPlan:
    """What `train` would do, told before it starts (the page shows it before its Start)."""

    lines: list[str]  # the image size and why, the data, the models, conditioning, the time
    config: RunConfig  # the run's config as given (not yet settled by the data)


def train_plan(
    out: str | os.PathLike,
    *,
    options: TrainOptions | None = None,
    device: str | None = None,
    config_file: str | None = None,
    sets: Sequence[str] = (),
) -> TrainPlan:
    """The plan a new training into `out` logs before it starts (sizes, models, estimated time),
    after the same checks as `train` with the same messages, without writing anything: the
    data is read, the image size chosen and each model's step timed, as `train` does."""
    from .training.run import plan_run

    o = _train_options(None, None, None, None, None, options)
    cfg, size = _train_setup(out, o, device, config_file, sets, False, "all")
    return TrainPlan(plan_run(cfg, RunFolder(out), size), cfg)


def _train_options(data: Any, time_budget: Any, seed: Any, image_size: Any, conditioning: Any,
                   options: TrainOptions | None) -> TrainOptions:  # fmt: skip
    o = TrainOptions(data=data, time_budget=time_budget, seed=seed, image_size=image_size,
                     conditioning=conditioning)  # fmt: skip
    if options is not None:
        if o != _TRAIN:
            raise TypeError("give train's options as keywords or as `options`, not both")
        o = options
    return o


def _train_setup(out: Any, o: TrainOptions, device: str | None, config_file: str | None,
                 sets: Sequence[str], resume: bool, stage: str) -> tuple[RunConfig, Any]:  # fmt: skip
    """`train`'s checks, in order, and the config and size choice it trains with."""
    check_path("--out", out)
    check_path("--data", o.data)
    check_path("--config", config_file)
    o = o.check()  # --time-budget, --seed, --image-size, --conditioning: the declared ranges
    check_device(device)
    size = None
    image_size = o.image_size
    if image_size is None and not RunFolder(out).exists():  # a run keeps its size
        size = _choose_size(
            config_file, sets, data=o.data, time_budget=o.time_budget, device=device,
            conditioning=o.conditioning,
        )  # fmt: skip
        image_size = size.size if size else None
    cfg = run_config(
        out, resume=resume, config_file=config_file, sets=sets, data=o.data,
        time_budget=o.time_budget, seed=o.seed, device=device, image_size=image_size,
        conditioning=o.conditioning,
    )  # fmt: skip
    check_device(cfg.device)  # also when set in a config file or with --set device=...
    check_apart("--out", out, "--data", cfg.data)
    check_writable(out)
    if stage == "unet" and not RunFolder(out).has_model("vae"):
        raise ConfigError(
            f"--stage unet trains the UNet on the run's autoencoder, but {out} has none yet; "
            "train it first (--stage vae, or all)"
        )
    return cfg, size


def check_data_root(spec: str | None, root: str | os.PathLike | None) -> str:
    """A data spec a page may train on: a built-in set, or a folder (or a file set's path,
    mnist:PATH, ...) inside `root` (`ldmkit serve --data-root`); a relative path is taken
    under `root`. Returns the spec with the path resolved. Like runs under --runs, nothing
    outside the folder the server was given is read."""
    from .data.dataset import parse_spec

    check_path("data", spec)
    text = str(spec or "builtin:shapes").strip()
    kind, path, _ = parse_spec(text)
    if kind.startswith("builtin:"):
        return text
    if root is None:
        raise ConfigError(
            f"data {shorten(text)}: this server reads no data folders; start it with "
            "`ldmkit serve --data-root DIR` to train on the folders in DIR, or use builtin:shapes"
        )
    base = Path(root).expanduser().resolve()
    where = Path(path).expanduser()
    resolved = (where if where.is_absolute() else base / where).resolve()
    if not resolved.is_relative_to(base):
        raise ConfigError(
            f"data {shorten(text)} is outside --data-root {base}; pick a folder inside it"
        )
    return str(resolved) if kind == "folder" else text.replace(path, str(resolved), 1)


def _choose_size(config_file: str | None, sets: Sequence[str], **flags: Any) -> Any:
    """The data's own image size, or the largest this device trains in the time given
    (training/sizing.py), unless the user's settings name an image size or a run to start from
    (whose size it keeps): then None."""
    from .runtime import resolve_device
    from .training.sizing import choose_size

    given = settings_dict(config_file, sets, flags)
    if given.get("image_size") is not None or given.get("init_from"):
        return None
    return choose_size(given, resolve_device(given.get("device")))


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
    # what the user should know about the layout (uneven rows of classes, classes left out)
    notes: list[str] = field(default_factory=list)
    # images in each grid row when the rows are uneven (the short rows end blank); None: whole
    row_counts: list[int] | None = None


_SAMPLE = SampleOptions()  # the defaults of `sample`'s keywords


def sample(
    run: str | os.PathLike,
    *,
    n: int = _SAMPLE.n,
    sampler: str = _SAMPLE.sampler,
    steps: int = _SAMPLE.steps,
    seed: int = _SAMPLE.seed,
    classes: str | None = None,
    prompts: Sequence[str] | None = None,
    negative_prompt: str | None = None,
    guidance: float | None = None,
    guidance_rescale: float = _SAMPLE.guidance_rescale,
    batch_size: int = _SAMPLE.batch_size,
    adapters: Sequence[str] | None = None,
    adapter_scales: Sequence[float] | None = None,
    device: str | None = None,
    ldm: LatentDiffusion | None = None,
    callback: Callable[..., Any] | None = None,
    fast: bool = True,
    compile: bool = False,
    options: SampleOptions | None = None,
) -> Samples:
    """Draw n images from a run. Its options (`options.SampleOptions`, checked once) come as
    the keywords n ... batch_size, or all at once as `options`. A class-conditional model draws
    one row per class unless `classes` ("star", "3" or "circle,star") picks them; a
    text-conditional model draws one row per prompt (`negative_prompt` replaces "" as
    guidance's unconditional branch); `guidance` (the scale) defaults to the run's. `fast`:
    bf16 autocast where the device runs it natively; `compile`: torch.compile the UNet (see
    `LatentDiffusion`).

    `adapters`: folders written by `ldmkit finetune` (their new classes join `classes`' names),
    at `adapter_scales` (one for all or one each; default 1).

    `ldm`: the run's model when the caller has it loaded already (a server's cache);
    `callback(i, x, sigma, x0_pred)`: the sampler's, after every step (progress, previews)."""
    from .models.conditioning import row_layout
    from .options import adapter_scales as scales_of
    from .pipeline import LatentDiffusion

    check_path("--run", run)
    for path in adapters or []:
        check_path("--adapter", path)
    o = SampleOptions(
        n=n, sampler=sampler, steps=steps, seed=seed, classes=classes, prompts=prompts,
        negative_prompt=negative_prompt, guidance_scale=guidance,
        guidance_rescale=guidance_rescale, batch_size=batch_size,
        adapters=None if adapters is None else tuple(adapters),
        adapter_scales=None if adapter_scales is None else tuple(adapter_scales),
    )  # fmt: skip
    if options is not None:
        if o != _SAMPLE:
            raise TypeError("give sample's options as keywords or as `options`, not both")
        o = options
    o = o.check(RunFolder(run), shown=run)
    with_adapters = list(zip(o.adapters or [], scales_of(o.adapters, o.adapter_scales)))
    if ldm is not None and with_adapters:
        raise ConfigError("sample: adapters load with the run; do not pass a loaded model (ldm=)")
    if ldm is None:
        ldm = LatentDiffusion.from_run(run, device=check_device(device), fast=fast,
                                       compile=compile, adapters=with_adapters)  # fmt: skip
    n, steps, guidance, prompts = o.n, o.steps, o.guidance_scale, o.prompts
    if n * steps >= ANNOUNCE_FROM:  # a long job says how long before it starts
        from .utils import format_seconds

        seconds = ldm.estimate_seconds(
            n, sampler=o.sampler, steps=steps, batch_size=o.batch_size, guidance_scale=guidance
        )
        log.info(
            "sampling %d images (%s, %d steps) will take about %s here (timed on one batch)",
            n, o.sampler, steps, format_seconds(seconds),
        )  # fmt: skip
    kwargs = dict(sampler=o.sampler, steps=steps, seed=o.seed, guidance_scale=guidance,
                  guidance_rescale=o.guidance_rescale, batch_size=o.batch_size,
                  callback=callback)  # fmt: skip
    how = f"{n} images, {o.sampler}, {steps} steps, seed {o.seed}"
    if with_adapters:
        how += ", adapters " + ", ".join(f"{Path(a).name} x{s:g}" for a, s in with_adapters)
    g = ldm.default_guidance if guidance is None else guidance
    cond = ldm.conditioner
    # one row per prompt or class, each present, exactly n images (`row_layout`, the one rule
    # of the CLI's and the page's grids); uneven rows or rows left out come back as a note
    if prompts:
        layout = row_layout(n, len(prompts), "prompt", prompts)
        texts = [prompts[i] for i in layout.labels()]
        images = ldm.sample(n, prompt=texts, negative_prompt=o.negative_prompt, **kwargs)
        return Samples(
            images, layout.per_row, list(prompts[: layout.rows]),
            how + f", guidance {g:g}, one prompt per row", _notes(layout), _counts(layout),
        )  # fmt: skip
    if o.classes is not None:
        images = ldm.sample(n, class_labels=cond.parse(o.classes, n), **kwargs)
        return Samples(images, None, None, how + f", guidance {g:g}")
    if not cond.enabled:
        images, per_row, row_labels = ldm.sample_grid(n, **kwargs)
        return Samples(images, per_row, row_labels, how)
    layout = row_layout(n, cond.num_classes, "class", cond.class_names)
    images = ldm.sample(n, class_labels=_labels(layout.labels()), **kwargs)
    names = cond.class_names[: layout.rows] if cond.class_names else None
    return Samples(images, layout.per_row, names, how + f", guidance {g:g}, one class per row",
                   _notes(layout), _counts(layout))  # fmt: skip


def _notes(layout: Any) -> list[str]:
    return [layout.note] if layout.note else []


def _counts(layout: Any) -> list[int] | None:
    return None if layout.whole else list(layout.counts)


def _labels(labels: list[int]) -> Tensor:
    import torch

    return torch.tensor(labels, dtype=torch.long)


# ------------------------------------------------------------------------------ finetune (issue 28)
MAX_NAME = 64  # characters of a new class's name


def check_new_name(run: RunFolder, name: Any, shown: Any = None) -> str:
    """The name of what `finetune` teaches: a new class's name must be new to the run, and
    readable by --class (no comma, not a number)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError('--name is empty; name what the images show, e.g. --name "heart"')
    if name != name.strip() or "," in name or name.isdigit() or len(name) > MAX_NAME:
        raise ConfigError(
            f"--name {name!r} cannot be picked with --class: use up to {MAX_NAME} characters, "
            "no comma, no spaces around it, not a number"
        )
    names = run.data_info().class_names or []
    if run.config().unet.num_classes and name in names:
        raise ConfigError(
            f"--name {name!r} is a class of {shown or run.path} already ({', '.join(names)}); "
            "choose a new name"
        )
    return name


def finetune(
    run: str | os.PathLike,
    *,
    data: str,
    name: str,
    out: str | os.PathLike,
    resume: bool = False,
    device: str | None = None,
    progress: ProgressFn | None = None,
    stop: StopRequest | None = None,
    options: Any = None,
    **keywords: Any,
) -> Any:
    """Teach the trained `run` what the 3-50 images of `data` show, as an adapter folder `out`
    (ldmkit.training.finetune): for a class-conditional run the new class `name`, for an
    unconditional one a style. Its options (`options.FinetuneOptions`, checked once) come as
    keywords (rank=, steps=, time_budget=, prior_weight=, ...) or all at once as `options`.
    `resume` continues an interrupted fine-tuning from its checkpoint. Returns a
    `FinetuneResult` (the folder, its `AdapterInfo`, why it ended)."""
    from .options import FinetuneOptions
    from .runs import AdapterFolder

    check_path("--run", run)
    check_path("--data", data)
    check_path("--out", out)
    if options is not None and keywords:
        raise TypeError("give finetune's options as keywords or as `options`, not both")
    o = options if options is not None else FinetuneOptions.given(keywords)
    folder = RunFolder(run)
    o = o.check(folder, shown=run)
    check_new_name(folder, name, run)
    check_apart("--out", out, "--data", data)
    if overlap(out, run) in ("is", "contains"):  # inside the run is fine (RUN/adapters/NAME)
        raise ConfigError(
            f"--out {out} would put the adapter's files over the run's own ({run}); choose a "
            "folder of its own, e.g. inside the run"
        )
    adapter = AdapterFolder(out)
    if adapter.holds_adapter() and not resume:
        raise ConfigError(
            f"--out {out} holds an adapter already; choose another --out (or --resume to "
            "continue its fine-tuning)"
        )
    check_writable(out)
    dev = check_device(device)
    from .training.finetune import finetune_run

    return finetune_run(
        run, data, name, out, rank=o.rank, alpha=o.alpha, conv=o.targets == "attention+conv",
        steps=o.steps, lr=o.lr, class_lr=o.class_lr, batch_size=o.batch_size,
        time_budget_s=o.time_budget,
        prior_weight=o.prior_weight, prior_images=o.prior_images, flip=o.augment == "flip",
        seed=o.seed, resume=resume, device=dev, progress=progress, stop=stop,
    )  # fmt: skip


def merge_adapter(
    run: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
    scale: float = 1.0,
) -> RunFolder:  # fmt: skip
    """Bake `adapter` (written by `finetune` for `run`) into a new run folder `out` at `scale`:
    a full run of its own, its new class an ordinary class (`ldmkit finetune --merge`)."""
    from .options import MAX_ADAPTER_SCALE, MIN_ADAPTER_SCALE
    from .runs import AdapterFolder

    check_path("--run", run)
    check_path("--merge", adapter)
    check_path("--out", out)
    check_float("--adapter-scale", scale, MIN_ADAPTER_SCALE, MAX_ADAPTER_SCALE, hint=" (0 = off)")
    folder = RunFolder(run).require_trained()
    AdapterFolder(adapter).check_fits(folder, shown=f"{run}")
    if RunFolder(out).exists() or overlap(out, run) is not None:
        raise ConfigError(
            f"--out {out} holds a run already or overlaps {run}; give a new folder for the "
            "merged run"
        )
    check_writable(out)
    from .training.finetune import merge_run

    return merge_run(run, adapter, out, scale=scale)


def save_grid(samples: Samples, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write the samples as one grid PNG; `nrow` overrides the layout (and drops row labels)."""
    from .evaluation.grids import save_grid as write_grid

    if nrow is not None:
        check_count("--nrow", nrow, 1, MAX_NROW)
    per_row, labels = (nrow, None) if nrow else (samples.per_row, samples.row_labels)
    counts = None if nrow else samples.row_counts
    write_grid(samples.images, path, nrow=per_row, row_labels=labels, row_counts=counts)
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


# ------------------------------------------------------------------------------ synth
_SYNTH = SynthOptions()  # the defaults of `synth`'s keywords


def read_prompts_file(flag: str, path: str | os.PathLike) -> list[str]:
    """A text file of prompts, one per line (blank lines skipped), or a one-line error."""
    check_path(flag, path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror.lower() if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{flag}: cannot read {path} ({why}); give a UTF-8 text file") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{flag}: {path} holds no prompt; write one per line")
    return lines


def synth(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    per_class: int | None = None,
    n: int | None = None,
    prompts_file: str | os.PathLike | None = None,
    sampler: str = _SYNTH.sampler,
    steps: int = _SYNTH.steps,
    seed: int = _SYNTH.seed,
    guidance: float | None = None,
    guidance_rescale: float = _SYNTH.guidance_rescale,
    batch_size: int = _SYNTH.batch_size,
    keep: str = _SYNTH.keep,
    device: str | None = None,
    ldm: LatentDiffusion | None = None,
    progress: Callable[[int, int], None] | None = None,
    fast: bool = True,
    options: SynthOptions | None = None,
) -> Any:
    """Write a labelled folder of images drawn from a run (`ldmkit.synth`): `per_class` images
    of each class of a class-conditional run, `n` of an unconditional one, or `n` per line of
    `prompts_file` for a text run; each PNG carries its parameters and its own seed. A folder
    that an earlier call left unfinished (killed, stopped) is completed with the same options,
    as if the call had never stopped. `keep="readable"` keeps only images the run's domain
    classifier reads as their class, drawing more (the dropped are counted). Options come as
    keywords or all at once as `options` (`options.SynthOptions`); `progress(done, total)`
    follows the images kept. Returns a `synth.SynthResult`."""
    from .pipeline import LatentDiffusion
    from .synth import (
        FORMAT,
        differences,
        folder_contents,
        groups_of,
        identity,
        plan_groups,
        read_manifest,
        run_kind,
        synthesize,
    )

    check_path("--run", run)
    check_path("--out", out)
    o = SynthOptions(
        per_class=per_class, n=n, prompts_file=None if prompts_file is None else str(prompts_file),
        sampler=sampler, steps=steps, seed=seed, guidance_scale=guidance,
        guidance_rescale=guidance_rescale, batch_size=batch_size, keep=keep,
    )  # fmt: skip
    if options is not None:
        if o != _SYNTH:
            raise TypeError("give synth's options as keywords or as `options`, not both")
        o = options
    check_path("--prompts", o.prompts_file)
    o = o.check(RunFolder(run), shown=run)
    folder = RunFolder(run)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; synth writes a folder: give a folder name")
    for flag, source in [*run_inputs(run), ("--prompts", o.prompts_file)]:
        check_apart("--out", out, flag, source, spec=False)
    check_apart("--out", out, "run's data", folder.config().data)  # not into training data
    check_writable(out)
    prompts = read_prompts_file("--prompts", o.prompts_file) if o.prompts_file else None
    kind = run_kind(folder)
    cfg = folder.config()
    groups = plan_groups(kind, class_names=folder.data_info().class_names,
                         num_classes=cfg.unet.num_classes,
                         count=o.per_class if kind == "class" else o.n, prompts=prompts)  # fmt: skip
    scale = o.guidance_scale
    if kind == "none":  # no condition: guidance does not apply
        scale = 1.0
    elif scale is None:
        scale = cfg.sampling_guidance
    judge = None
    if o.keep == "readable":
        from .evaluation.feature_nets import get_feature_net

        judge = get_feature_net("domain", dataset=folder.load_data(), run_dir=folder.path)
    params = {"ldmkit": _version(), "run": str(folder.path.resolve()),
              "weights": folder.weights_hash()}  # fmt: skip
    header = {"run": params["run"], "weights": params["weights"], "kind": kind,
              "classifier": judge.fingerprint if judge is not None else None,
              "guidance": scale, "params": params}  # fmt: skip
    chosen = {k: getattr(o, k) for k in ("per_class", "n", "sampler", "steps", "seed",
              "guidance_scale", "guidance_rescale", "batch_size", "keep")}  # fmt: skip
    notes: list[str] = []
    old = read_manifest(out) if out.is_dir() else None
    if old is not None:
        new = identity({"format": FORMAT, **header, "options": chosen,
                        "groups": [vars(g) for g in groups]})  # fmt: skip
        try:
            differ = differences(new, identity(old))
        except (KeyError, TypeError):
            differ = ["its manifest (unreadable)"]
        if differ:
            raise ConfigError(
                f"--out {out} holds images of another synth (other {', '.join(differ)}); "
                "resume it with the same run and options, or choose another --out"
            )
        groups = groups_of(old)
        have = sum(min(g.kept, g.count) for g in groups)
        notes.append(f"resumed: {have} of {sum(g.count for g in groups)} images were there")
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"--out {out} already holds other files ({', '.join(folder_contents(out))}, ...); "
            "synth writes into a new or empty folder (or resumes its own): choose another --out"
        )
    if ldm is None:
        ldm = LatentDiffusion.from_run(run, device=check_device(device), fast=fast)
    result = synthesize(
        ldm, out, groups, header=header, options=chosen, sampler=o.sampler, steps=o.steps,
        seed=o.seed, guidance_scale=scale if kind != "none" else None,
        guidance_rescale=o.guidance_rescale, batch_size=o.batch_size, judge=judge,
        progress=progress,
    )  # fmt: skip
    result.notes[:0] = notes
    return result


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

    if not full and samplers is None and steps is None:  # a distilled student: its own
        try:
            own_sampler, own_steps = RunFolder(run).default_sampling()
            samplers, steps = [own_sampler], [own_steps]
        except (OSError, ValueError):  # the checks below say what is wrong with `run`
            pass
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
    check_student_guidance(folder, run, guidance_scale)  # issue 27: a fixed-scale student's
    out_dir = Path(out) if out is not None else folder.eval_dir
    for flag, data in (("--ref", options.get("ref")), ("--held-out", options.get("held_out")),
                       ("run's data", folder.config().data)):  # fmt: skip
        check_apart("--out", out_dir, flag, data)
    check_writable(out_dir)
    return evaluate_run(
        run, samplers=samplers, steps=steps, n=n, out_dir=out_dir, seed=seed,
        batch_size=batch_size, guidance_scale=guidance_scale, device=device, **options,
    )  # fmt: skip


CAS_PER_CLASS = 100  # generated images per class `eval --cas` trains its classifier on
MAX_CAS_SEEDS = 20


def cas(
    run: str | os.PathLike,
    *,
    per_class: int = CAS_PER_CLASS,
    seeds: int | None = None,
    held_out: str | None = None,
    out: str | os.PathLike | None = None,
    sampler: str = _SYNTH.sampler,
    steps: int = _SYNTH.steps,
    seed: int = _SYNTH.seed,
    guidance: float | None = None,
    batch_size: int = _SYNTH.batch_size,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The Classification Accuracy Score of a class-conditional run (`evaluation.cas`):
    `per_class` images of each class drawn with `synth` (into OUT/cas-synth-<key>/, so a second
    call reuses them and an interrupted one resumes), the fixed classifier trained on them and
    tested on held-out real images (`held_out`, default: the data's own held-out part, as `eval`
    finds it), beside the same classifier trained on as many real training images per class;
    `seeds` runs (default 3), mean and std. Written to OUT/cas.json (OUT: RUN/eval)."""
    import hashlib
    import json

    import torch

    from .checkpoint import write_json
    from .evaluation import cas as caslib
    from .evaluation.evaluate import held_out_data
    from .synth import read_synth, run_kind

    seeds = caslib.DEFAULT_SEEDS if seeds is None else seeds
    check_count("--cas-per-class", per_class, 1, MAX_IMAGES)
    check_count("--cas-seeds", seeds, 1, MAX_CAS_SEEDS)
    for flag, path in (("--run", run), ("--out", out), ("--held-out", held_out)):
        check_path(flag, path)
    folder = RunFolder(run).require_trained()
    kind = run_kind(folder)
    if kind != "class":
        what = "follows text prompts" if kind == "text" else "has no class labels (unconditional)"
        raise ConfigError(
            f"--cas: the model in {run} {what}; the Classification Accuracy Score trains a "
            "classifier on a class-conditional run's classes"
        )
    out_dir = Path(out) if out is not None else folder.eval_dir
    check_apart("--out", out_dir, "--held-out", held_out)
    train_ds = folder.load_data()
    held, note = held_out_data(folder, train_ds, held_out)
    if held is None:
        raise ConfigError(
            f"--cas needs labelled real images the model never saw, to test the classifiers on: "
            f"{train_ds.name} has no held-out part; pass --held-out DATA (a folder with one "
            "sub-folder per class, or e.g. mnist:DIR?split=test)"
        )
    if held.labels is None:
        raise ConfigError(
            f"--held-out {held_out}: its images have no class labels; put them in one sub-folder "
            "per class"
        )
    names = folder.data_info().class_names or train_ds.class_names
    key = json.dumps([folder.weights_hash(), per_class, sampler, steps, seed, guidance,
                      batch_size])  # fmt: skip
    synth_dir = out_dir / f"cas-synth-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    synth(run, synth_dir, per_class=per_class, sampler=sampler, steps=steps, seed=seed,
                 guidance=guidance, batch_size=batch_size, device=device, progress=progress)  # fmt: skip
    images, labels, _, _ = read_synth(synth_dir)
    test_labels = caslib.map_labels(held.labels, held.class_names, names)
    pick = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))[: caslib.MAX_TEST]
    result = caslib.scores(
        images, labels, train_ds.images, caslib.map_labels(train_ds.labels,
        train_ds.class_names, names), held.images[pick], test_labels[pick], len(names),
        seeds=tuple(range(seeds)),
    )  # fmt: skip
    result.update({
        "run": str(folder.path), "weights": folder.weights_hash(), "synth_folder": str(synth_dir),
        "generated": {"per_class": per_class, "sampler": sampler, "steps": steps, "seed": seed,
                      "guidance": read_synth_guidance(synth_dir)},
        "held_out": {"spec": held.spec, "name": held.name, "num_images": len(held)},
        "train_data": {"spec": train_ds.spec, "num_images": len(train_ds)},
    })  # fmt: skip
    write_json(out_dir / "cas.json", result)
    result["path"] = str(out_dir / "cas.json")
    return result


def read_synth_guidance(folder: Path) -> float | None:
    from .synth import read_manifest

    manifest = read_manifest(folder) or {}
    return manifest.get("guidance")


def report(
    run: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    device: str | None = None,
) -> Path:
    """One self-contained HTML page about a run (ldmkit.evaluation.report.build_report);
    `sampler`, `steps` None: the run's own (issue 27: a distilled student's DDIM, its count)."""
    from .evaluation.report import build_report

    if sampler is not None:
        check_sampler(sampler)
    if steps is not None:
        check_steps("--steps", steps)
    check_seed("--seed", seed)
    check_device(device)
    check_path("--run", run)
    if out is not None:
        check_output_file("--out", out, inputs=run_inputs(run))
    folder = RunFolder(run).require_run()
    if steps is not None:
        check_steps("--steps", steps, folder.config().diffusion.num_timesteps)
    return build_report(run, out_path=out, sampler=sampler, steps=steps, seed=seed, device=device)


# ------------------------------------------------------------------------------ distill
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
    iterations, time_budget, batch_size, lr, weighting, seed) come as keywords or all at once
    as `options`; without `iterations`, a halving runs DISTILL_ITERATIONS optimizer steps, or
    with a time budget as many as its share of the budget allows. `ldmkit sample --run OUT` then samples with DDIM at the student's steps.

        api.distill("runs/shapes", "runs/shapes-fast", steps=4, time_budget="20m")
    """
    from .training.distill import check_teacher, distill_run

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
        max_guidance=o.max_guidance,
    )  # fmt: skip


# ------------------------------------------------------------------------------ convert
def convert_from_diffusers(
    source: str | os.PathLike, out: str | os.PathLike, *, vae: str | None = None,
    scheduler: str | None = None,
) -> Path:  # fmt: skip
    """A diffusers pipeline folder (or UNet folder) -> an ldmkit run folder."""
    from .interop import convert_from_diffusers as convert

    given = (("--from-diffusers", source), ("--vae", vae), ("--scheduler", scheduler))
    for flag, folder in (*given, ("--out", out)):
        check_path(flag, folder)
    for flag, folder in given:
        check_apart("--out", out, flag, folder)
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


# ------------------------------------------------------------------------------ edit
EDIT_METHODS = tuple(EDITS)  # inpaint, fill, img2img, invert, interpolate, denoise
_MASKED = ("inpaint", "fill")


def check_edit_options(method: str, options: dict[str, Any], run: Any = None) -> Any:
    """The options of an edit (`options.EDITS[method]`, e.g. `InpaintOptions`) with `options`
    ({name: value}, the page's names too) over the defaults, checked once, with the CLI's flag
    names in the messages; with the run (a `RunFolder`), also against it (steps up to its T)."""
    if method not in EDIT_METHODS:
        raise ConfigError(f"unknown edit {method!r}; choose one of {', '.join(EDIT_METHODS)}")
    return VERBS[method].given(options).check(run)


def _input(name: str, path: str | os.PathLike) -> dict[str, str]:
    from .utils import file_sha256

    check_path(name, path)
    if Path(path).is_dir():
        raise ConfigError(f"{name} {path} is a folder; give an image file")
    if not Path(path).is_file():
        raise ConfigError(f"{name} {path}: no such file")
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def edit(
    method: str,
    run: str | os.PathLike,
    *,
    image: str | os.PathLike | None = None,
    mask: str | os.PathLike | None = None,
    image_b: str | os.PathLike | None = None,
    resize: bool = False,
    classes: str | None = None,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | None = None,
    device: str | None = None,
    ldm: Any = None,
    callback: Any = None,
    **options: Any,
) -> EditResult:
    """Edit an image file with a run's model (`ldmkit.editing`): method is one of
    EDIT_METHODS. `image` (and `image_b`, the second end of an image interpolation) and `mask`
    (white = regenerate; optional for fill, which then finds white holes) are files; `resize`
    fits them to the model's size instead of refusing another size. `classes` ("star", or two
    for an interpolation: "circle,star") or `prompt` (two for an interpolation) condition it.
    `options` are the method's (see `check_edit_options`); `ldm` reuses a loaded model;
    `callback(i, x, sigma, x0)` follows the sampler's steps (not for invert)."""
    from .pipeline import LatentDiffusion

    if method not in EDIT_METHODS:
        raise ConfigError(f"unknown edit {method!r}; choose one of {', '.join(EDIT_METHODS)}")
    check_path("--run", run)
    folder = RunFolder(run).require_trained()
    condition = {"classes": classes, "prompt": prompt, "negative_prompt": negative_prompt}
    given = {**options, **{k: v for k, v in condition.items() if v is not None}}
    checked = check_edit_options(method, given, folder)
    # the options as given (under their field names), checked: a colour as numbers, ...
    options = {f.name: getattr(checked, f.name) for f in checked.fields()
               if f.name in options or f.web_name in options}  # fmt: skip
    classes, prompt, negative_prompt = (getattr(checked, k) for k in condition)
    ldm = ldm if ldm is not None else LatentDiffusion.from_run(run, device=check_device(device))
    files = {"image": image, "mask": mask, "image_b": image_b}
    inputs, tensors, notes = edit_inputs(method, ldm, files, resize)
    condition = _edit_condition(method, ldm, run, classes, prompt, negative_prompt, options)
    progress = {"callback": callback} if callback is not None and method != "invert" else {}
    result = _run_edit(method, ldm, tensors, {**options, **condition, **progress})
    params = {
        "ldmkit": _version(), "method": method, "run": str(Path(run).resolve()),
        "weights": folder.weights_hash(), "inputs": inputs,
        "options": {"resize": resize, "classes": classes, "prompt": prompt,
                    "negative_prompt": negative_prompt, **options},
        "details": result.params,
    }  # fmt: skip
    return dataclasses.replace(result, params=params, notes=notes + result.notes)


def edit_inputs(
    method: str, ldm: Any, files: dict[str, Any], resize: bool
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The input files of an edit, checked and read: ({name: path and SHA-256}, {name: tensor},
    notes). An image larger than the model's in both directions is kept at its size for the
    masked edits (inpainted crop by crop); "tiled" in the tensors says so."""
    from .data.images import read_image, read_mask

    image, mask, image_b = files["image"], files["mask"], files["image_b"]
    if method != "interpolate" and image is None:
        raise ConfigError(f"{method} needs --image FILE (the image to edit)")
    if method == "inpaint" and mask is None:
        raise ConfigError("inpaint needs --mask FILE (white = regenerate, black = keep)")
    if mask is not None and method not in _MASKED:
        raise ConfigError(f"{method} takes no --mask (inpaint and fill do)")
    if (image is None) != (image_b is None) and method == "interpolate":
        raise ConfigError("interpolating images needs two: --image A --image-b B")
    inputs = {name: _input("--" + name.replace("_", "-"), path)
              for name, path in files.items() if path is not None}  # fmt: skip
    c, h, w = ldm.image_shape
    notes: list[str] = []
    tensors: dict[str, Any] = {"tiled": False}
    for name in ("image", "image_b"):
        if name in inputs:
            size = (w, h)
            if method in _MASKED and not resize:  # a larger image is inpainted crop by crop
                size = _larger_size(inputs[name]["path"], (w, h))
                tensors["tiled"] = size != (w, h)
            tensors[name], more = read_image(
                inputs[name]["path"], channels=c, size=size, resize=resize
            )
            notes += more
    if "mask" in inputs:
        size = tuple(tensors["image"].shape[-1:-3:-1])
        tensors["mask"], more = read_mask(inputs["mask"]["path"], size=size, resize=resize)
        notes += more
    return inputs, tensors, notes


def _run_edit(method: str, ldm: Any, tensors: dict[str, Any], call: dict[str, Any]) -> Any:
    """editing.<method> on the read inputs with the checked options and condition."""
    from . import editing
    from .data.masks import detect_holes

    c = ldm.image_shape[0]
    if "hole_colour" in call:
        call["hole_colour"] = [int(v) / 127.5 - 1 for v in call["hole_colour"]]
    if method == "interpolate":
        if "image" in tensors:
            call["images"] = _cat([tensors["image"], tensors["image_b"]])
        elif "seeds" in call:
            call["seeds"] = tuple(call["seeds"])
        return editing.interpolate(ldm, **call)
    if tensors["tiled"]:
        mask = tensors.get("mask")
        if mask is None:
            colour = torch_tensor(call.pop("hole_colour", [1.0] * c))
            colour = colour[:1] if c == 1 else colour.expand(c)
            mask = detect_holes(tensors["image"], colour)
        return editing.inpaint_large(ldm, tensors["image"], mask, **call)
    if method in _MASKED:
        fn = editing.inpaint if method == "inpaint" else editing.fill
        return fn(ldm, tensors["image"], tensors.get("mask"), **call)
    return getattr(editing, method)(ldm, tensors["image"], **call)


def _larger_size(path: str, model: tuple[int, int]) -> tuple[int, int]:
    """The size of an image file when it is at least the model's in both directions (it is then
    inpainted crop by crop), else the model's size (which read_image then checks). The header is
    read by `data.images.image_size`, with its one-line errors (a decompression bomb, ...)."""
    from .data.images import image_size

    size = image_size(path, "image")
    return size if size[0] >= model[0] and size[1] >= model[1] else model


def torch_tensor(values: Sequence[float]) -> Any:
    import torch

    return torch.tensor(list(values), dtype=torch.float32)


def _edit_condition(
    method: str, ldm: Any, run: Any, classes: str | None, prompt: Any, negative: str | None,
    options: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """class_labels / prompt / negative_prompt for editing.<method>, checked against the model.
    Without any, a conditional model edits unconditionally. An interpolation without --seeds or
    a second image takes two classes ("circle,star") or two prompts as its ends."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt else None
    if prompts or classes is not None or negative is not None:
        check_conditions(ldm, run, classes, prompts, negative)
    limit = 2 if method == "interpolate" else 1
    out: dict[str, Any] = {"negative_prompt": negative} if negative else {}
    if classes is not None:
        labels = ldm.conditioner.parse(classes, len(classes.split(","))).tolist()
        if len(labels) > limit:
            raise ConfigError(
                f"--class: give {'one or two classes' if limit == 2 else 'one class'}, got {classes!r}"
            )
        out["class_labels"] = labels
    if prompts:
        if len(prompts) > limit:
            raise ConfigError(
                f"--prompt: give {'one or two prompts' if limit == 2 else 'one prompt'}, got {len(prompts)}"
            )
        out["prompt"] = prompts if len(prompts) == 2 else prompts[0]
    if "guidance_scale" not in options and (classes or prompts):
        out["guidance_scale"] = ldm.default_guidance
    return out


def _cat(tensors: Sequence[Any]) -> Any:
    import torch

    return torch.cat(list(tensors))


def _version() -> str:
    from . import __version__

    return __version__


def edit_outputs(out: Path, method: str, count: int = 1) -> list[Path]:
    """The files `save_edit` writes for --out: out.png (out-1.png, ... for several images), and
    out.gif for an interpolation, out.noise.safetensors for an inversion."""
    if method == "interpolate":
        return [out, out.with_suffix(".gif")]
    paths = (
        [out] if count == 1 else [out.with_name(f"{out.stem}-{i + 1}.png") for i in range(count)]
    )
    if method == "invert":
        paths.append(out.with_suffix(".noise.safetensors"))
    return paths


def check_edit_output(
    out: str | os.PathLike, method: str | None, inputs: dict[str, Any],
    run: str | os.PathLike | None = None, count: int = 1,
) -> Path:  # fmt: skip
    """--out of an edit, before anything runs and again when it is written: a PNG path in a
    writable place none of whose files (`edit_outputs`) is an input: `inputs` ({flag: path}:
    --image, --mask, --image-b, --from-png) or the run's files (`run_inputs`)."""
    path = check_output_file("--out", out, image=True)
    if path.suffix.lower() != ".png":
        raise ConfigError(
            f"--out {path}: edits are written as PNG (they carry their parameters); use .png"
        )
    # an input given as a folder is refused as such when it is read (`edit_inputs`)
    given = [(flag, p) for flag, p in inputs.items() if p is not None and not Path(p).is_dir()]
    sources = [*given, *run_inputs(run)]
    for written in edit_outputs(path, str(method), count):
        for flag, source in sources:
            if written != path and overlap(written, source) is not None:
                raise ConfigError(
                    f"--out {path} also writes {written.name}, over the {flag} "
                    f"{'folder' if Path(source).is_dir() else 'file'} {source}; ldmkit would "
                    "overwrite what it reads: choose another --out file"
                )
            check_apart("--out", written, flag, source, spec=False)
    return path


def recorded_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """{--image: path, ...}: the input files an edit's PNG parameters record."""
    inputs = params.get("inputs")
    if not isinstance(inputs, dict):
        return {}
    return {"--" + str(k).replace("_", "-"): e["path"] for k, e in inputs.items()
            if isinstance(e, dict) and isinstance(e.get("path"), str)}  # fmt: skip


def save_edit(result: EditResult, out: str | os.PathLike) -> list[Path]:
    """Write an edit: one PNG per image carrying `result.params` (out.png, or out-1.png, ...
    for several), and for an interpolation also the strip as an animated GIF beside it
    (out.gif); for an inversion, the noise as out.noise.safetensors."""
    from .checkpoint import atomic_write, save_tensors
    from .data.images import write_png
    from .data.transforms import pil_image, to_uint8

    params = result.params
    images = result.images
    out = check_edit_output(out, params["method"], recorded_inputs(params), params.get("run"),
                            count=len(images))  # fmt: skip
    written: list[Path] = []
    if params["method"] == "interpolate":
        strip = _cat([_cat(list(images.split(1))).permute(1, 2, 0, 3).flatten(2)[None]])
        write_png(strip, out, result.params)
        written.append(out)
        frames = [pil_image(a) for a in to_uint8(images).permute(0, 2, 3, 1).numpy()]
        gif = out.with_suffix(".gif")
        atomic_write(gif, lambda tmp: frames[0].save(
            tmp, format="GIF", save_all=True, append_images=frames[1:] + frames[-2:0:-1],
            duration=120, loop=0))  # fmt: skip
        written.append(gif)
        return written
    paths = edit_outputs(out, params["method"], len(images))
    for img, path in zip(images.split(1), paths):
        write_png(img, path, result.params)
        written.append(path)
    if "noise" in result.extra:
        noise_path = out.with_suffix(".noise.safetensors")
        save_tensors(noise_path, {"noise": result.extra["noise"].contiguous()})
        written.append(noise_path)
    return written


def reproduce(png: str | os.PathLike, *, device: str | None = None, ldm: Any = None) -> EditResult:
    """Run again the edit whose parameters a PNG carries (written by `save_edit`): the same run
    (its weights unchanged), the same input files (unchanged), the same options. On the same
    machine the result is bit for bit the same."""
    from .data.images import read_png_params
    from .utils import file_sha256

    check_path("--from-png", png)
    params = read_png_params(png)
    try:
        method, run, inputs, options = (params["method"], params["run"], params["inputs"],
                                        dict(params["options"]))  # fmt: skip
    except (KeyError, TypeError) as e:
        raise ConfigError(
            f"--from-png {png}: its parameters lack {e}; it was not written by an ldmkit edit"
        ) from e
    folder = RunFolder(run).require_trained()
    if folder.weights_hash() != params.get("weights"):
        raise ConfigError(
            f"--from-png {png}: the run {run} has other weights now than when the PNG was made "
            "(retrained or replaced); the edit cannot be reproduced"
        )
    for name, entry in inputs.items():
        if not Path(entry["path"]).is_file() or file_sha256(entry["path"]) != entry["sha256"]:
            raise ConfigError(
                f"--from-png {png}: its input {name} {entry['path']} is missing or changed since"
            )
    files = {name: entry["path"] for name, entry in inputs.items()}
    return edit(method, run, device=device, ldm=ldm, **files, **options)


# ------------------------------------------------------------------------------ training log
def training_log(run: str | os.PathLike, stage: str | None = None) -> list[dict[str, Any]]:
    """The rows of a run's training log (log.jsonl), oldest first, for plotting or a table: one
    per log step of each stage ({"stage", "step", "loss", "lr", "images_per_s", ...}) and the
    autoencoder's quality measurements ({"stage", "kind": "quality", "step", "psnr", ...}).
    `stage` ("autoencoder" or "diffusion") keeps that stage's rows only. A run that has logged
    nothing yet gives []."""
    from .evaluation.plots import read_log

    check_path("--run", run)
    folder = RunFolder(run)
    if not folder.path.is_dir():
        raise ConfigError(f"--run {run}: no such folder; give a run folder (ldmkit train --out)")
    rows = read_log(folder.log_path) if folder.log_path.is_file() else []
    return [r for r in rows if stage is None or r.get("stage") == stage]


def table_text(table: Any) -> str:
    """The sampler table that `evaluate` returns, as aligned text (as `ldmkit eval` prints it:
    the metric labels, n, the real-vs-real floor and any warning)."""
    from .evaluation.table import format_table

    return format_table(table)
