"""The training loop shared by both stages: data order, LR schedule, checkpoints, resume, budget,
logging, progress and stopping.

What a stage supplies is a `Stage` (training/step.py): its model, optimizer and per-micro-batch
loss. Everything that must be identical between an uninterrupted run and a killed-and-resumed
one lives here:

1. data order is a pure function of (seed, step): epoch e is `randperm(N)` from a generator
   seeded with (seed, e), and global step k takes places [kB, (k+1)B) of the epochs laid end
   to end (B the global batch), so resuming at step s needs no saved data position beyond s;
2. each sample's random draws come from a generator keyed by (stage, seed, step, place in the
   global batch) (`step.MicroBatch`); any other draw comes from the stage's generators or
   torch's global RNG, whose states are saved in each checkpoint;
3. the learning rate is a pure function of the step (`TrainConfig.lr_multiplier`).
So a run of 2N steps and a run of N steps, killed, then resumed for N more end bit-identical
(on the CPU, with the same thread count).

With several processes (training/distributed.py) all of this is defined per global batch:
rank r takes its share of each micro-batch of the global batch, the step, the data position
and the randomness keys are global, and a run saved with N processes resumes with any other
number. Only rank 0 writes checkpoints, logs and previews, inside `World.together()` blocks;
stopping, the time budget and its plan are decided for all ranks once a step (`World.agree`).

A training stops early, with a checkpoint, on SIGINT/SIGTERM or when its `stop` request is set
(a `threading.Event` or any callable returning True: a web page's stop button, a notebook).
Progress goes to an optional callback as `Progress` events; the CLI draws them as a tqdm bar.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointError
from ..recipe import WSD_DECAY, TrainConfig
from ..runs import RunFolder
from .distributed import World, local_micro_batch
from .ema import EMA
from .state import (
    checkpoint_dir,
    clean_stray_temporaries,
    list_checkpoints,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)
from .step import MicroBatch, Stage, optimizer_step

log = logging.getLogger(__name__)

# Planning a stage's length from a time budget (see BudgetPlan)
PLAN_SKIP = 5  # first steps of a session not timed (allocator and kernel warm-up)
PLAN_OVER = 20  # the plan is revised every PLAN_OVER steps
PLAN_MARGIN = 0.95  # share of the remaining budget planned for (previews, checkpoints, noise)
PLAN_WINDOWS = 3  # windows of PLAN_OVER steps whose speed the plan uses

StopRequest = threading.Event | Callable[[], bool]


@dataclass
class Progress:
    """One step of a stage, as reported to a progress callback."""

    stage: str
    step: int  # optimizer steps done
    total: int  # steps the stage will run (shrinks when a time budget plans fewer)
    loss: float | None = None  # mean loss since the last log row (set on log steps only)
    images_per_s: float | None = None
    done: bool = False  # the stage has ended


ProgressFn = Callable[[Progress], None]


@dataclass
class StageResult:
    steps_done: int
    stopped_because: str  # "finished", "time budget", "signal", "stop request", "bad loss"
    last_loss: float
    seconds: float
    ema: EMA | None
    checkpoint: Path | None
    planned: int | None = None  # the steps the stage planned at its end
    threads: list[tuple[int, int]] = field(default_factory=list)  # (step, threads) changes


class DataOrder:
    """The data items of each global step: a pure function of (seed, step), whatever the number
    of processes.

    The epochs, each a permutation seeded by (seed, epoch), are laid end to end; global step k
    takes the B items at places [kB, (k+1)B) (B the global batch size; a batch may straddle two
    epochs, so every item is seen once per epoch). Micro-batch m of that batch is its m-th
    B / grad_accum items, and rank r takes the r-th of the `size` equal shares of each.
    """

    def __init__(self, num_items: int, batch_size: int, grad_accum: int, seed: int,
                 key: str) -> None:  # fmt: skip
        if num_items < 1:
            raise ValueError("the data set is empty")
        self.n, self.batch_size, self.grad_accum = num_items, batch_size, grad_accum
        self.seed = seed
        self.key = key  # keys the samples' generators (MicroBatch)
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if abs(e - epoch) <= 1}
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int, slots: Tensor) -> Tensor:
        """The data items at places `slots` (long) of global step `step`'s batch."""
        places = step * self.batch_size + slots  # in the stream of epochs
        epochs, offsets = places // self.n, places % self.n
        out = torch.empty_like(places)
        for e in epochs.unique().tolist():
            out[epochs == e] = self._perm(e)[offsets[epochs == e]]
        return out

    def micro_batches(self, step: int, rank: int = 0, size: int = 1) -> list[MicroBatch]:
        """Process `rank`'s share (of `size`) of each micro-batch of global step `step`."""
        per_micro = self.batch_size // self.grad_accum
        b = per_micro // size
        out = []
        for m in range(self.grad_accum):
            slots = torch.arange(b) + m * per_micro + rank * b
            out.append(
                MicroBatch(self.indices(step, slots), slots, step, self.batch_size, self.key)
            )
        return out


class StopFlag:
    """Why a training should stop now: a signal (SIGINT/SIGTERM) or a stop request."""

    def __init__(self, request: StopRequest | None = None) -> None:
        self.request = request
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: only the stop request works there
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop at once
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self) -> bool:
        req = self.request
        return req is not None and bool(req.is_set() if isinstance(req, threading.Event) else req())

    def reason(self) -> str | None:
        if self.signal is not None:
            return "signal"
        return "stop request" if self.requested() else None


class RunLog:
    """Scalars of a run: one JSON line per log step in log.jsonl, and TensorBoard when installed."""

    def __init__(self, folder: RunFolder, tensorboard: bool = True) -> None:
        self.path = folder.log_path
        self.writer = _tensorboard(folder.tensorboard_dir) if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(f"{record['stage']}/{k}", v, record["step"])

    def add_image(self, tag: str, path: Path, step: int) -> None:
        if self.writer is None:
            return
        try:
            import numpy as np
            from PIL import Image

            img = np.asarray(Image.open(path).convert("RGB"))
            self.writer.add_image(tag, img, step, dataformats="HWC")
        except Exception as e:  # previews are a convenience; never stop training for one
            log.warning("could not add %s to TensorBoard: %s", path, e)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        log.info(
            "TensorBoard is not installed (pip install tensorboard): scalars go to log.jsonl only"
        )
        return None
    return SummaryWriter(log_dir=str(folder))


class BudgetPlan:
    """How many steps a time budget allows, so that a decaying LR ends when the budget does.

    After PLAN_SKIP warm-up steps the loop times itself and, every PLAN_OVER steps, sets the
    stage's length to what fits PLAN_MARGIN of the remaining budget at the recent speed (the
    last PLAN_WINDOWS windows of PLAN_OVER steps, previews and checkpoints included), so a
    stage re-plans as the machine gets busier or quieter. A quality gate may end the stage
    sooner (`finish_at`); the plan is then fixed, and time can only shorten it further. The
    plan is saved in checkpoints, so a resumed stage keeps its schedule.
    """

    def __init__(self, name: str, cfg: TrainConfig, deadline: float | None, start_step: int,
                 planned: int | None, fixed: bool = False) -> None:  # fmt: skip
        self.name, self.cfg, self.deadline = name, cfg, deadline
        self.active = deadline is not None and cfg.lr_schedule != "constant"
        self.start = start_step + PLAN_SKIP
        self.planned = planned  # None until the first plan (or the saved plan of a resume)
        self.fixed = fixed  # a quality gate has set the end
        self.windows: list[tuple[int, float]] = []  # (step, time) at each window's start
        self.per_step: float | None = None  # the recent seconds per step
        self.last_window: float | None = None  # seconds per step of the last window alone

    @property
    def total(self) -> int:
        return self.planned or self.cfg.steps

    def observe(self, step: int) -> bool:
        """Call before each step; returns True when a window closed (`per_step` is new)."""
        if self.deadline is None:
            return False
        if step == self.start:
            self.windows = [(step, time.perf_counter())]
        elif step > self.start and (step - self.start) % PLAN_OVER == 0:
            now = time.perf_counter()
            self.windows = [*self.windows[-PLAN_WINDOWS:], (step, now)]
            first_step, first_t = self.windows[0]
            self.per_step = (now - first_t) / (step - first_step)
            self.last_window = (now - self.windows[-2][1]) / (step - self.windows[-2][0])
            if not self.active:
                return True
            first = self.planned is None
            remaining = int(PLAN_MARGIN * (self.deadline - now) / self.per_step)
            planned = min(self.cfg.steps, step + remaining)
            self.planned = min(planned, self.planned) if self.fixed and self.planned else planned
            if first:
                log.info(
                    "%s: %.3f s/step, so the time budget allows about %d steps; the LR "
                    "decays over those", self.name, self.per_step, self.planned,
                )  # fmt: skip
            return True
        return False

    def finish_at(self, step: int) -> int:
        """End the stage soon after `step` (its target is reached): at once with a constant or
        cosine LR, after the decay with a wsd one (which then starts now). Returns the end."""
        end = step
        if self.cfg.lr_schedule == "wsd":
            end = math.ceil(step / (1 - WSD_DECAY))
        self.planned = min(end, self.planned or end, self.cfg.steps)
        self.fixed = True
        return self.planned


class ThreadGovernor:
    """Fewer threads when the machine is busy: with all cores' threads in one process, a thread
    descheduled by another program stalls the rest at every parallel region (issue 16 measured
    16-20 img/s for 2 threads against 79-83 for 1 under load).

    Fed the seconds per step of each plan window, it tries the other thread count (1, or the
    full count) for one window now and then and keeps whichever was faster: first on the second
    window (a machine busy from the start), then whenever the full count slows to CONTENTION x
    its best, and otherwise after RETRY_WINDOWS windows, a wait that doubles each time a trial
    loses (so a quiet machine pays for few slow windows). Thread counts change float rounding,
    so a stage whose threads changed resumes close to, not bit-identical with, an
    uninterrupted one.
    """

    CONTENTION = 2.5
    RETRY_WINDOWS = 10

    def __init__(self, name: str) -> None:
        self.name = name
        self.full = torch.get_num_threads()
        self.best: dict[int, float] = {}  # threads -> best s/step seen
        self.last: dict[int, float] = {}  # threads -> the latest s/step
        self.trial = False  # the window just measured was a trial of the current count
        self.wait = self.RETRY_WINDOWS  # windows between trials
        self.since = 0  # windows since the last trial
        self.changes: list[tuple[int, int]] = []  # (step, threads)

    def _set(self, step: int, threads: int) -> None:
        torch.set_num_threads(threads)
        self.changes.append((step, threads))

    def observe(self, step: int, per_step: float) -> None:
        if self.full <= 1:
            return
        n = torch.get_num_threads()
        other = 1 if n == self.full else self.full
        self.last[n] = per_step
        self.best[n] = min(per_step, self.best.get(n, math.inf))
        self.since += 1
        if self.trial:  # this window tried `n`: keep it if it beat the other count
            self.trial = False
            if per_step >= self.last[other]:
                self._set(step, other)
                self.wait *= 2
            else:
                self.wait = self.RETRY_WINDOWS
                if n == 1:
                    log.warning(
                        "%s: 1 thread runs faster than %d (%.3f against %.3f s/step): another "
                        "program is using the CPU; training on 1 thread while it does",
                        self.name, self.full, per_step, self.last[other],
                    )  # fmt: skip
            return
        contended = n == self.full and per_step > self.CONTENTION * self.best[n]
        if other not in self.last or contended or self.since >= self.wait:
            self._set(step, other)
            self.trial, self.since = True, 0

    def restore(self) -> None:
        if torch.get_num_threads() != self.full:
            torch.set_num_threads(self.full)


@dataclass
class QualityGate:
    """A stage's measurement while it trains, and its target (see training/run.py).

    `measure(model)` returns a row of figures (logged as {"kind": "quality", ...}); with
    `stop_on_target` (a time budget) the stage ends, through its LR decay, once
    `target_reached(rows)` names a reason. Measurements take at most `max_share` of the
    stage's time and come at least `min_steps` apart.
    """

    measure: Callable[[nn.Module], dict[str, float]]
    target_reached: Callable[[list[dict[str, float]]], str | None]
    stop_on_target: bool = False
    min_steps: int = 25
    max_share: float = 0.05
    rows: list[dict[str, float]] = field(default_factory=list)
    reason: str | None = None  # why the target counts as reached
    next_step: int = 0

    def due(self, step: int) -> bool:
        return step >= self.next_step

    spent: float = 0.0  # seconds of measurement so far
    spent_cpu: float = 0.0

    def run(self, step: int, model: nn.Module, per_step: float | None, *, since: float,
            since_cpu: float) -> dict[str, float]:  # fmt: skip
        """Measure after `step`; the row's seconds / cpu_s are the stage's since its start
        (perf_counter `since`, process_time `since_cpu`), less the measurements'."""
        t0, c0 = time.perf_counter(), time.process_time()
        row = {"step": step, **self.measure(model)}
        cost, cost_cpu = time.perf_counter() - t0, time.process_time() - c0
        row["seconds"] = t0 - since - self.spent
        row["cpu_s"] = c0 - since_cpu - self.spent_cpu
        row["measure_s"] = cost
        self.spent += cost
        self.spent_cpu += cost_cpu
        self.rows.append(row)
        gap = self.min_steps
        if per_step:  # the measurement's cost at most max_share of the time
            gap = max(gap, math.ceil(cost / (self.max_share * per_step)))
        self.next_step = step + gap
        if self.reason is None:
            self.reason = self.target_reached(self.rows)
        return row


class _Meter:
    """Mean loss and images/s between two log rows."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.images, self.t0 = 0, time.perf_counter()

    def add(self, loss: float, images: int) -> None:
        self.losses.append(loss)
        self.images += images

    def read(self) -> tuple[float, float]:
        now = time.perf_counter()
        ips = self.images / max(now - self.t0, 1e-9)
        mean = sum(self.losses) / len(self.losses)
        self.losses.clear()
        self.images, self.t0 = 0, now
        return mean, ips


def train_stage(
    stage: Stage,
    cfg: TrainConfig,
    *,
    folder: RunFolder,
    num_items: int,
    seed: int,
    resume: bool = False,
    time_budget_s: float | None = None,
    run_log: RunLog | None = None,
    progress: ProgressFn | None = None,
    stop: StopRequest | None = None,
    world: World | None = None,
    gate: QualityGate | None = None,
) -> StageResult:
    """Train one stage for cfg.steps optimizer steps (or until the budget), with checkpoints.

    With several processes (`world`) every rank calls this at once; rank 0 alone writes, logs
    and reports progress. A `gate` measures the model as it trains (log rows of kind
    "quality") and, when its stop_on_target is set, ends the stage once its target is reached
    ("quality target"). With a time budget in one process, the thread count follows the
    machine's load (`ThreadGovernor`).
    """
    world = world or World(torch.device("cpu"))
    local_micro_batch(cfg, world.size, stage.name)  # a batch that does not split: one error
    if world.is_main:
        folder.path.mkdir(parents=True, exist_ok=True)
        clean_stray_temporaries(folder.checkpoints_dir)
    run_log = run_log or RunLog(folder, tensorboard=False)
    ema = EMA(stage.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    modules: dict[str, nn.Module] = {"model": stage.model, **stage.extra_modules}
    if ema is not None:
        modules["ema"] = ema.model
    order = DataOrder(num_items, cfg.batch_size, cfg.grad_accum, seed, key=f"{stage.name}/{seed}")
    step, saved, state = 0, None, {}  # saved: the step of the newest checkpoint
    if resume:
        with world.together():  # every rank reads the same checkpoint
            step, saved, state = _resume(stage, folder, modules, ema)

    start, start_cpu = time.perf_counter(), time.process_time()
    plan = BudgetPlan(stage.name, cfg, start + time_budget_s if time_budget_s else None, step,
                      state.get("planned_steps"), bool(state.get("plan_fixed")))  # fmt: skip
    if plan.fixed and gate is not None:
        gate.reason = state.get("quality_reason") or "quality target"
    governor = ThreadGovernor(stage.name) if time_budget_s and world.size == 1 else None

    def checkpoint(metric: float) -> int:
        state = {"ema_updates": ema.num_updates if ema else 0, "metric": metric,
                 "planned_steps": plan.planned, "plan_fixed": plan.fixed,
                 "quality_reason": gate.reason if gate is not None else None,
                 "batch_size": cfg.batch_size, "processes": world.size}  # fmt: skip
        with world.together():  # rank 0 writes; the others wait, and stop too if it fails
            if world.is_main:
                save_checkpoint(
                    folder.checkpoints_dir, stage.name, step, modules=modules, optimizers=stage.optimizers,
                    generators=stage.generators, state=state,
                )  # fmt: skip
                rotate_checkpoints(folder.checkpoints_dir, stage.name, cfg.keep_last)
        return step

    stopped, last_loss, bad_streak, meter = "finished", float("nan"), 0, _Meter()
    with StopFlag(stop) as flag:
        while step < plan.total:
            mult = cfg.lr_multiplier(step, plan.planned)
            for opt in stage.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = group.setdefault("base_lr", cfg.lr) * mult
            micro = order.micro_batches(step, world.rank, world.size)
            logs = optimizer_step(stage, micro, grad_clip=cfg.grad_clip, ema=ema, world=world)
            step += 1  # a skipped step is consumed too (data and RNG moved on)
            # the loss and gradients are averaged over the ranks: each takes the same branch
            if logs.get("skipped"):
                bad_streak += 1
                log.warning("step %d: non-finite loss or gradient (%s); update skipped", step, logs["loss"])  # fmt: skip
                if bad_streak >= cfg.max_bad_steps:
                    stopped = "bad loss"
                    log.error(
                        "%d consecutive non-finite losses: stopping %s; the last good checkpoint is "
                        "intact. Lower the learning rate or check the data, then --resume",
                        bad_streak, stage.name,
                    )  # fmt: skip
                    break
            else:
                bad_streak, last_loss = 0, float(logs["loss"])
                meter.add(last_loss, sum(len(m) for m in micro) * world.size)
                _report(stage, cfg, step, plan.total, logs, cfg.lr * mult, meter, run_log,
                        progress, world, ema)  # fmt: skip
                if step % cfg.checkpoint_every == 0 and step < plan.total:
                    saved = checkpoint(last_loss)
                if gate is not None and gate.due(step) and step < plan.total:
                    _measure(stage, step, gate, plan, run_log, world, ema, start, start_cpu)
            if world.is_main and plan.observe(step) and governor is not None:
                # the last window alone: a trial window ran at one thread count only
                governor.observe(step, plan.last_window or 0.0)
            why = _end_reason(stage.name, step, plan, flag, world)
            if why is not None:
                stopped = why
                break
    if governor is not None:
        governor.restore()
    if world.is_main and progress is not None:
        progress(Progress(stage.name, step, plan.total, done=True))
    if stopped == "finished" and plan.fixed:
        stopped = "quality target"  # the gate ended it (its reason: gate.reason)
    elif stopped == "finished" and plan.planned is not None and plan.planned < cfg.steps:
        stopped = "time budget"  # the planned steps ran out with it
    if stopped != "bad loss" and saved != step:
        saved = checkpoint(last_loss)
    path = checkpoint_dir(folder.checkpoints_dir, stage.name, saved) if saved is not None else None
    return StageResult(
        step, stopped, last_loss, time.perf_counter() - start, ema, path,
        planned=plan.total, threads=governor.changes if governor else [],
    )  # fmt: skip


def _measure(stage: Stage, step: int, gate: QualityGate, plan: BudgetPlan, run_log: RunLog,
             world: World, ema: EMA | None, start: float, start_cpu: float) -> None:  # fmt: skip
    """Rank 0 measures the (EMA) model and logs the row; a target reached with stop_on_target
    fixes the plan's end (shared with the other ranks by `_end_reason`). Only rank 0 has a
    gate: the others wait for it at the next step's collective."""
    if world.is_main:
        row = gate.run(step, ema.model if ema else stage.model, plan.per_step,
                       since=start, since_cpu=start_cpu)  # fmt: skip
        run_log.write({"stage": stage.name, "kind": "quality", **row})
        if gate.stop_on_target and gate.reason and not plan.fixed:
            end = plan.finish_at(step)
            log.info("%s: %s reached at step %d; the stage ends at step %d%s", stage.name,
                     gate.reason, step, end, " after its LR decay" if end > step else "")  # fmt: skip


def _report(
    stage: Stage, cfg: TrainConfig, step: int, total: int, logs: dict[str, Any], lr: float,
    meter: _Meter, run_log: RunLog, progress: ProgressFn | None, world: World, ema: EMA | None,
) -> None:  # fmt: skip
    """After an applied step (rank 0): the log row every log_every steps, a Progress event, and
    a preview grid every sample_every steps (every rank waits for it)."""
    event = Progress(stage.name, step, total)
    if world.is_main and (step % cfg.log_every == 0 or step == total):
        event.loss, event.images_per_s = meter.read()
        extra = {k: v for k, v in logs.items() if k not in ("loss", "skipped")}
        run_log.write({"stage": stage.name, "step": step, "loss": event.loss, "lr": lr,
                       "images_per_s": event.images_per_s, **extra})  # fmt: skip
    if world.is_main and progress is not None:
        progress(event)
    if stage.preview is not None and cfg.sample_every and step % cfg.sample_every == 0:
        with world.together():  # rank 0 draws with the unwrapped model: no collective
            if world.is_main:
                grid = stage.preview(step, ema.model if ema else stage.model)
                if grid is not None:
                    run_log.add_image(f"{stage.name}/samples", grid, step)


def _end_reason(name: str, step: int, plan: BudgetPlan, flag: StopFlag, world: World) -> str | None:
    """Whether the stage ends after `step`, decided once for every rank: a signal or a stop
    request that reached any of them ("signal", "stop request"), rank 0's deadline ("time
    budget"); rank 0's plan is shared on the way (the others pass -1)."""
    late, mine, fixed = False, -1, False
    if world.is_main:  # (its plan observed step `step` just before)
        late = plan.deadline is not None and time.perf_counter() >= plan.deadline
        mine, fixed = plan.planned or -1, plan.fixed
    signum, requested, late, planned, fixed = world.agree(
        [flag.signal or 0, flag.requested(), late, mine, fixed]
    )
    plan.planned, plan.fixed = (planned if planned > 0 else None), bool(fixed)
    if signum or requested:
        what = signal.Signals(signum).name if signum else "a stop request"
        log.warning(
            "%s received: saving a checkpoint of %s at step %d and stopping; continue "
            "with --resume", what, name, step,
        )  # fmt: skip
        return "signal" if signum else "stop request"
    return "time budget" if late else None


def _resume(
    stage: Stage, folder: RunFolder, modules: dict[str, nn.Module], ema: EMA | None
) -> tuple[int, int | None, dict[str, Any]]:
    """Restore the newest checkpoint of the stage: (step, its step or None, its saved state:
    "planned_steps", "plan_fixed", ...).

    A checkpoint saved by N processes resumes with any number: everything it holds is global
    (the step, the unwrapped weights, the optimizer state, the plan).
    """
    ckpts = list_checkpoints(folder.checkpoints_dir, stage.name)
    if not ckpts:
        return 0, None, {}
    try:
        state = load_checkpoint(
            ckpts[-1].path, modules=modules, optimizers=stage.optimizers,
            generators=stage.generators,
        )  # fmt: skip
    except CheckpointError as e:
        raise CheckpointError(
            f"cannot resume: {e} (to resume from the checkpoint before it, delete {ckpts[-1].path})"
        ) from None
    step = int(state["step"])
    if ema is not None:
        ema.num_updates = int(state.get("ema_updates", step))
    log.info("resumed %s from %s (step %d)", stage.name, ckpts[-1].path.name, step)
    # the step is returned so that a stage resumed at its end does not re-save it
    return step, step, state
