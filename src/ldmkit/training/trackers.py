"""Experiment trackers: where a training's progress goes besides log.jsonl.

One small interface, `Tracker`, receives the events of a run (`RunLog` in loop.py passes them
on): the config when it opens, scalars per log step (`stage/name`, e.g. `diffusion/loss`),
images (preview grids, the autoencoder's reconstructions, the final grid), tables (the
guidance measurement), and a summary with the run's figures and final files when it ends.
Three sit behind it, chosen by `log.trackers` (recipe.LogConfig):

- `tensorboard`: event files in RUN/tb/ (the default; skipped with a note when the
  tensorboard package is missing);
- `wandb` (pip install 'ldmkit[wandb]'): Weights & Biases, offline unless log.wandb_mode is
  online: a folder RUN/trackers/wandb/offline-run-DATE-ID/ that `wandb sync` uploads later;
- `mlflow` (pip install 'ldmkit[mlflow]'): an MLflow run, in a file store in
  RUN/trackers/mlruns/ unless log.mlflow_uri names another tracking server or store.

Nothing reaches the network unless the user asks for it (online mode, a server's URI). Only
rank 0 opens trackers (run.py). The tracked runs' ids are kept in RUN/trackers/ids.json, so a
run resumed with --resume continues the same W&B and MLflow runs. A tracker that fails while
the training runs is reported once and dropped: a tracker never stops a training.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, to_dict
from ..recipe import LogConfig, RunConfig
from ..runs import RunFolder

log = logging.getLogger(__name__)

# the package each tracker needs and the extra that installs it
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}  # fmt: skip


class Tracker:
    """One experiment tracker. Every method is called on rank 0 only; the defaults do nothing."""

    name = "tracker"

    def scalars(self, stage: str, step: int, values: dict[str, float]) -> None:
        """Numbers of one log step of a stage (loss, lr, images_per_s, psnr, ...)."""

    def image(self, tag: str, path: Path, step: int) -> None:
        """A PNG (a preview grid, reconstructions) under `tag` ("diffusion/samples")."""

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """A small table (the guidance measurement)."""

    def summary(self, values: dict[str, Any], files: Sequence[Path]) -> None:
        """The run's final figures (flat names) and files (final grid, loss plot)."""

    def close(self, status: str) -> None:
        """The run ended: "finished", "stopped" (resumable) or "failed"."""


def missing_packages(cfg: LogConfig) -> None:
    """A one-line ConfigError when a named tracker's package is not installed (TensorBoard is
    only skipped, with a note, as before trackers could be chosen)."""
    for name in cfg.trackers:
        package, extra = PACKAGES[name]
        if name != "tensorboard" and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"log.trackers names {name}, but {package} is not installed: pip install "
                f"'ldmkit[{extra}]' (or drop {name} from log.trackers)"
            )


def open_trackers(cfg: RunConfig, folder: RunFolder, *, resume: bool) -> list[Tracker]:
    """The trackers of `cfg.log`, opened on the run (rank 0 only). With `resume`, a W&B or
    MLflow run whose id is saved in the run folder continues; otherwise each starts a new one."""
    missing_packages(cfg.log)
    ids = folder.tracker_ids() if resume else {}
    out: list[Tracker] = []
    for name in cfg.log.trackers:
        if name == "tensorboard":
            tracker: Tracker | None = TensorBoardTracker.open(folder, cfg)
        elif name == "wandb":
            tracker = WandbTracker(folder, cfg, ids.get("wandb"))
        else:
            tracker = MlflowTracker(folder, cfg, ids.get("mlflow"))
        if tracker is not None:
            out.append(tracker)
    return out


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a record (bools and text left out)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}  # fmt: skip


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of dotted names ({"vae": {"lr": 1}} -> {"vae.lr": 1})."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _run_name(cfg: RunConfig, folder: RunFolder) -> str:
    return cfg.log.run_name or folder.path.resolve().name


def _save_id(folder: RunFolder, name: str, value: dict[str, Any]) -> None:
    ids = folder.tracker_ids()
    ids[name] = value
    folder.write_tracker_ids(ids)


# ------------------------------------------------------------------ TensorBoard
class TensorBoardTracker(Tracker):
    """Event files in RUN/tb/ (as before trackers could be chosen)."""

    name = "tensorboard"

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    @classmethod
    def open(cls, folder: RunFolder, cfg: RunConfig | None = None) -> TensorBoardTracker | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            log.info(
                "TensorBoard is not installed (pip install tensorboard): scalars go to "
                "log.jsonl only"
            )  # fmt: skip
            return None
        writer = SummaryWriter(log_dir=str(folder.tensorboard_dir))
        if cfg is not None:
            writer.add_text(
                "config", "    " + json.dumps(to_dict(cfg), indent=2).replace("\n", "\n    ")
            )
        return cls(writer)

    def scalars(self, stage: str, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"{stage}/{k}", v, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
        self.writer.add_image(tag, img, step, dataformats="HWC")

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        body = "".join("| " + " | ".join(f"{v:g}" if isinstance(v, float) else str(v)
                                         for v in r) + " |\n" for r in rows)  # fmt: skip
        self.writer.add_text(name, head + body)

    def summary(self, values: dict[str, Any], files: Sequence[Path]) -> None:
        lines = "\n".join(f"    {k}: {v}" for k, v in values.items())
        self.writer.add_text("summary", lines)

    def close(self, status: str) -> None:
        self.writer.close()


# ------------------------------------------------------------------ Weights & Biases
class WandbTracker(Tracker):
    """A W&B run, offline by default (RUN/trackers/wandb/offline-run-DATE-ID/, `wandb sync`).

    Each stage's numbers are logged against that stage's own step (`autoencoder/step`,
    `diffusion/step`, set with define_metric); W&B's own step counts log calls and is saved
    with the run's id, so a resumed run continues where it left off (an offline resume writes
    a second folder of the same id, and `wandb sync` replays both in order)."""

    name = "wandb"

    def __init__(self, folder: RunFolder, cfg: RunConfig, saved: dict[str, Any] | None) -> None:
        if cfg.log.wandb_mode == "offline":
            # offline, W&B would still probe its server for its own telemetry and start its
            # service with error reports on; its documented switch turns both off (unless the
            # user set it)
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        import wandb

        self.wandb, self.folder = wandb, folder
        folder.trackers_dir.mkdir(parents=True, exist_ok=True)
        resume = isinstance(saved, dict) and isinstance(saved.get("id"), str)
        run_id = saved["id"] if resume else uuid.uuid4().hex[:8]
        self.step = int(saved.get("step", 0)) if resume else 0
        settings = wandb.Settings(silent=True, console="off", disable_git=True, save_code=False)
        self.run = wandb.init(
            project=cfg.log.project, entity=cfg.log.wandb_entity, name=_run_name(cfg, folder),
            dir=str(folder.trackers_dir), mode=cfg.log.wandb_mode, id=run_id,
            resume="allow", settings=settings,
        )  # fmt: skip
        self.run.config.update(to_dict(cfg), allow_val_change=True)
        for stage in ("autoencoder", "diffusion"):
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
        self._save()
        log.info("W&B run %s (%s%s)", run_id, cfg.log.wandb_mode, f": upload later with wandb "
                 f"sync {folder.wandb_dir}" if cfg.log.wandb_mode == "offline" else "")  # fmt: skip

    def _save(self) -> None:
        _save_id(self.folder, self.name, {"id": self.run.id, "step": self.step})

    def _log(self, data: dict[str, Any]) -> None:
        self.run.log(data, step=self.step)
        self.step += 1
        self._save()  # a killed run resumes after the last step it logged

    def scalars(self, stage: str, step: int, values: dict[str, float]) -> None:
        self._log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in values.items()}})

    def image(self, tag: str, path: Path, step: int) -> None:
        stage = tag.split("/")[0]
        self._log({f"{stage}/step": step, tag: self.wandb.Image(str(path))})

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self._log({name: self.wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def summary(self, values: dict[str, Any], files: Sequence[Path]) -> None:
        self.run.summary.update(values)
        for f in files:
            self._log({f"final/{f.stem}": self.wandb.Image(str(f))})

    def close(self, status: str) -> None:
        self.run.finish(exit_code=1 if status == "failed" else 0)


# ------------------------------------------------------------------ MLflow
class MlflowTracker(Tracker):
    """An MLflow run, through `MlflowClient` (no global state), in a file store under the run
    folder unless log.mlflow_uri names one. The config is logged as parameters when the run is
    created (MLflow refuses to change a parameter) and as a copy of run.json each time it opens; images
    and tables are artifacts (`<stage>/step-N.png`, `guidance.json`)."""

    name = "mlflow"

    def __init__(self, folder: RunFolder, cfg: RunConfig, saved: dict[str, Any] | None) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.folder = folder
        uri = cfg.log.mlflow_uri
        if uri is None:
            folder.mlflow_store.mkdir(parents=True, exist_ok=True)
            uri = folder.mlflow_store.resolve().as_uri()
            # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        resume = isinstance(saved, dict) and saved.get("uri") == uri and saved.get("run_id")
        if resume:
            self.run_id = str(saved["run_id"])
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(cfg.log.project)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.log.project)
            run = self.client.create_run(exp_id, run_name=_run_name(cfg, folder))
            self.run_id = run.info.run_id
            params = [Param(k, json.dumps(v) if not isinstance(v, str) else v[:6000])
                      for k, v in flat(to_dict(cfg)).items()]  # fmt: skip
            for i in range(0, len(params), 100):  # MLflow takes at most 100 per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_dict(self.run_id, to_dict(cfg), folder.config_path.name)
        _save_id(folder, self.name, {"run_id": self.run_id, "uri": uri})
        log.info("MLflow run %s in %s", self.run_id, uri)

    def scalars(self, stage: str, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        metrics = [Metric(f"{stage}/{k}", v, ms, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, tag: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), tag)

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.client.log_dict(self.run_id, {"columns": list(columns),
                                           "rows": [list(r) for r in rows]}, f"{name}.json")  # fmt: skip

    def summary(self, values: dict[str, Any], files: Sequence[Path]) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        metrics = [Metric(f"final/{k}", v, ms, 0) for k, v in numbers(values).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        self.client.log_dict(self.run_id, values, "summary.json")
        for f in files:
            self.client.log_artifact(self.run_id, str(f), "final")

    def close(self, status: str) -> None:
        mlflow_status = {"finished": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=mlflow_status)
