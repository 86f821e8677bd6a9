"""`train` (progress, stop), `train_plan` (the plan before a training, nothing written),
`check_data_root` (a page's data kept under `--data-root`) and `training_log`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..config import ConfigError
from ..options import (
    TrainOptions,
)
from ..recipe import (
    RunConfig,
    settings_dict,
)
from ..runs import RunFolder

if TYPE_CHECKING:  # the heavy modules are imported inside the functions that use them
    from ..training.loop import ProgressFn, StopRequest
    from ..training.run import RunResult

from .checks import check_apart, check_device, check_path, check_writable, run_config, shorten

log = logging.getLogger(__name__)

STAGES = ("all", "autoencoder", "diffusion")  # what `--stage` trains: both, or one of the two


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
    stage: Literal["all", "autoencoder", "diffusion"] = "all",
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
    from ..training.run import train_run

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
    from ..training.run import plan_run

    o = _train_options(None, None, None, None, None, options)
    cfg, size = _train_setup(out, o, device, config_file, sets, False, "all")
    return TrainPlan(plan_run(cfg, RunFolder(out), size), cfg)


def _train_options(data: Any, time_budget: Any, seed: Any, image_size: Any, conditioning: Any,
                   options: TrainOptions | None) -> TrainOptions:  # fmt: skip
    return TrainOptions(data=data, time_budget=time_budget, seed=seed, image_size=image_size,
                        conditioning=conditioning).or_instead(options)  # fmt: skip


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
    if stage not in STAGES:
        raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if stage == "diffusion" and not RunFolder(out).has_model("vae"):
        raise ConfigError(
            f"--stage diffusion trains the UNet on the run's autoencoder, but {out} has none "
            "yet; train it first (--stage autoencoder, or all)"
        )
    return cfg, size


def check_data_root(spec: str | None, root: str | os.PathLike | None) -> str:
    """A data spec a page may train on: a built-in set, or a folder (or a file set's path,
    mnist:PATH, ...) inside `root` (`ldmkit serve --data-root`); a relative path is taken
    under `root`. Returns the spec with the path resolved. Like runs under --runs, nothing
    outside the folder the server was given is read."""
    from ..data.dataset import parse_spec

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
    from ..runtime import resolve_device
    from ..training.sizing import choose_size

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


def training_log(run: str | os.PathLike, stage: str | None = None) -> list[dict[str, Any]]:
    """The rows of a run's training log (log.jsonl), oldest first, for plotting or a table: one
    per log step of each stage ({"stage", "step", "loss", "lr", "images_per_s", ...}) and the
    autoencoder's quality measurements ({"stage", "kind": "quality", "step", "psnr", ...}).
    `stage` ("autoencoder" or "diffusion") keeps that stage's rows only. A run that has logged
    nothing yet gives []."""
    from ..evaluation.plots import read_log

    check_path("--run", run)
    folder = RunFolder(run)
    if not folder.path.is_dir():
        raise ConfigError(f"--run {run}: no such folder; give a run folder (ldmkit train --out)")
    rows = read_log(folder.log_path) if folder.log_path.is_file() else []
    return [r for r in rows if stage is None or r.get("stage") == stage]
