"""Generation jobs of the web page: one queue and one worker thread per run, so that a run
draws one job at a time, in the order they came; a job can be cancelled while it waits or runs.

A job's `work(job)` runs in the worker thread and reports each sampler step with
`job.report(step, total, preview)`, which raises `Cancelled` once a cancel was asked for: the
sampler stops at its next step and nothing is kept.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

MAX_WAITING = 8  # jobs queued per run beyond the one running
KEEP_FINISHED = 32  # finished jobs kept (their result PNGs) before the oldest are dropped

State = Literal["queued", "running", "done", "failed", "cancelled"]


class Cancelled(Exception):
    """Raised inside a job's work when its cancel was asked for."""


class QueueFull(ValueError):
    """A run already has MAX_WAITING jobs waiting."""


@dataclass
class Result:
    """What a job made: a PNG (with its parameters in the PNG's text) and what the page shows."""

    png: bytes
    info: dict[str, Any] = field(default_factory=dict)
    images: list[bytes] = field(default_factory=list)  # one PNG per image of a grid


@dataclass
class Job:
    id: str
    run: str
    kind: str  # "sample", "inpaint", ...
    params: dict[str, Any]  # the request, as checked
    work: Callable[[Job], Result]
    state: State = "queued"
    step: int = 0
    total: int = 0
    error: str | None = None  # the one-line message of a failed job
    preview: bytes | None = None  # PNG of the current x0 estimate
    result: Result | None = None
    inputs: dict[str, bytes] = field(default_factory=dict)  # uploads as received (image, mask)
    cancel: threading.Event = field(default_factory=threading.Event)

    def report(self, step: int, total: int, preview: bytes | None = None) -> None:
        """Progress from the worker; raises Cancelled when the job is to stop."""
        self.step, self.total = step, total
        if preview is not None:
            self.preview = preview
        if self.cancel.is_set():
            raise Cancelled

    def to_json(self, position: int | None) -> dict[str, Any]:
        return {
            "id": self.id, "run": self.run, "kind": self.kind, "state": self.state,
            "step": self.step, "total": self.total, "position": position, "error": self.error,
            "has_preview": self.preview is not None, "params": self.params,
            "info": self.result.info if self.result else None,
        }  # fmt: skip


class Jobs:
    """Every job of the server, a FIFO queue and a worker thread per run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queues: dict[str, deque[Job]] = {}
        self._workers: dict[str, threading.Thread] = {}

    def submit(self, run: str, kind: str, params: dict[str, Any],
               work: Callable[[Job], Result], inputs: dict[str, bytes] | None = None) -> Job:  # fmt: skip
        with self._lock:
            queue = self._queues.setdefault(run, deque())
            if len(queue) >= MAX_WAITING:
                raise QueueFull(
                    f"{len(queue)} jobs are already waiting for {run}; wait for them or cancel one"
                )
            job = Job(uuid.uuid4().hex[:12], run, kind, params, work, inputs=inputs or {})
            queue.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            if run not in self._workers:
                worker = threading.Thread(target=self._work, args=(run,), daemon=True,
                                          name=f"ldmkit-jobs-{run}")  # fmt: skip
                self._workers[run] = worker
                worker.start()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """How many jobs of its run wait before `job` (0: next), None when it is not waiting."""
        with self._lock:
            queue = self._queues.get(job.run, deque())
            return queue.index(job) if job in queue else None

    def cancel(self, job: Job) -> None:
        job.cancel.set()
        with self._lock:
            queue = self._queues.get(job.run, deque())
            if job in queue:  # not started: it never will
                queue.remove(job)
                job.state = "cancelled"

    def close(self, timeout: float = 10.0) -> None:
        """Cancel every job and wait for the workers (a server shutting down, a test)."""
        with self._lock:
            jobs, workers = list(self._jobs.values()), list(self._workers.values())
        for job in jobs:
            self.cancel(job)
        for worker in workers:
            worker.join(timeout)

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state not in ("queued", "running")]
        for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job.id]

    def _work(self, run: str) -> None:
        while True:
            with self._lock:
                queue = self._queues[run]
                if not queue:
                    del self._workers[run]
                    return
                job = queue.popleft()
                job.state = "running"
            t0 = time.perf_counter()
            try:
                result = job.work(job)
                if job.cancel.is_set():  # a job that reports no steps cannot stop midway
                    raise Cancelled
                job.result, job.state = result, "done"
            except Cancelled:
                job.state = "cancelled"
            except ValueError as e:  # the library's expected errors: one line for the page
                job.error, job.state = _one_line(e), "failed"
            except Exception as e:  # a bug: logged with its traceback, named on the page
                log.exception("job %s (%s of %s) failed", job.id, job.kind, run)
                job.error, job.state = f"internal error: {_one_line(e)}", "failed"
            log.info("job %s (%s of %s): %s in %.1f s", job.id, job.kind, run, job.state,
                     time.perf_counter() - t0)  # fmt: skip


def _one_line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__
