"""Trainings started from the page's New run form: one at a time per server, each one
`api.train` call (as `ldmkit train --out RUNS/NAME ...` makes it) in a thread of its own.

The form's fields are `options.TrainOptions`' (web/forms.py draws them); a request is checked
as `ldmkit train` checks its flags (`api.train_plan`, `api.train`: the same functions and
messages), and its data must lie under the server's --data-root (`api.check_data_root`).
`start` returns once the run folder holds its run.json (the page then follows it like any
training: log, previews, stop) or once the training failed before that (its one-line error).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import api
from ..config import ConfigError
from ..options import TrainOptions
from ..runs import RunFolder

log = logging.getLogger(__name__)

READY_S = 600.0  # the most `start` waits for the run.json of a training (size probe, data read)


class TrainingBusy(ConfigError):
    """A second training while one runs (HTTP 409)."""

    status = 409


@dataclass
class Training:
    """One training the page started."""

    run: str  # its name under --runs
    out: Path
    options: TrainOptions
    state: str = "starting"  # starting, running, finished, failed
    error: str | None = None  # the one-line message of a failed training
    stopped_because: str | None = None  # training.run's reason once it ended
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "state": self.state, "error": self.error,
                "stopped_because": self.stopped_because}  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class Trainer:
    """The server's trainings: at most one running."""

    def __init__(self, *, device: str | None, config_file: str | None) -> None:
        self.device, self.config_file = device, config_file
        self._lock = threading.Lock()
        self.current: Training | None = None

    def plan(self, out: Path, options: TrainOptions) -> list[str]:
        """The plan `ldmkit train` logs before it starts, after its checks."""
        return api.train_plan(out, options=options, device=self.device,
                              config_file=self.config_file).lines  # fmt: skip

    def start(self, run: str, out: Path, options: TrainOptions,
              ready_s: float = READY_S) -> Training:  # fmt: skip
        """Start a training of `options` into `out`, unless one runs (TrainingBusy); returns
        when its run.json is written, or raises the error that ended it before."""
        with self._lock:
            if self.current is not None and self.current.alive:
                raise TrainingBusy(
                    f"a training is running already ({self.current.run}); this server runs one "
                    "at a time: wait for it to end, or stop it in its Training tab"
                )
            RunFolder(out).require_new()  # as train_run's own check, before the thread
            training = self.current = Training(run, out, options)
            training.thread = threading.Thread(
                target=self._train, args=(training,), daemon=True, name=f"ldmkit-train-{run}"
            )
            training.thread.start()
        deadline = time.monotonic() + ready_s
        folder = RunFolder(out)
        while training.alive and not folder.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if training.state == "failed" and not folder.exists():
            raise ConfigError(training.error or "the training failed")
        if training.state == "starting":
            training.state = "running"
        return training

    def _train(self, training: Training) -> None:
        try:
            result = api.train(training.out, options=training.options, device=self.device,
                               config_file=self.config_file, stop=training.stop)  # fmt: skip
            training.stopped_because, training.state = result.stopped_because, "finished"
        except ValueError as e:  # the library's expected errors: one line, as the CLI prints
            training.error, training.state = _one_line(e), "failed"
        except Exception as e:  # a bug: logged with its traceback, named on the page
            log.exception("the training of %s failed", training.run)
            training.error, training.state = f"internal error: {_one_line(e)}", "failed"
        log.info("training %s: %s (%s)", training.run, training.state,
                 training.error or training.stopped_because)  # fmt: skip

    def close(self, timeout: float = 60.0) -> None:
        """Stop a running training (it saves a checkpoint) and wait for it: a server going."""
        training = self.current
        if training is not None and training.alive:
            training.stop.set()
            assert training.thread is not None
            training.thread.join(timeout)


def _one_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__
