"""The training loop shared by both stages: data order, LR schedule, checkpoints, resume, budget.

What a stage supplies (`Stage`): the modules to save, their optimizers, and a `step` function
that does one optimizer step on given micro-batches of data indices. Everything that must be
identical between an uninterrupted run and a killed-and-resumed one lives here:

1. data order is a pure function of (seed, step): epoch e is `randperm(N)` from a generator
   seeded with (seed, e), so resuming at step s needs no saved data position beyond s;
2. every other random draw comes from the stage's generators or torch's global RNG, whose
   states are saved in each checkpoint;
3. the learning rate is a pure function of the step.
So a run of 2N steps and a run of N steps, killed, then resumed for N more end bit-identical
(on the CPU, with the same thread count).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointError
from ..config import ConfigError
from .ema import EMA
from .state import (
    clean_stray_temporaries,
    list_checkpoints,
    load_checkpoint,
    rotate_checkpoints,
    save_checkpoint,
)

log = logging.getLogger(__name__)

# Planning a stage's length from a time budget (see train_stage)
PLAN_SKIP = 5  # first steps of a session not timed (allocator and kernel warm-up)
PLAN_OVER = 20  # the plan is revised every PLAN_OVER steps
PLAN_MARGIN = 0.95  # share of the remaining budget planned for (previews, checkpoints, noise)


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage."""

    steps: int = 2000  # optimizer steps; a time budget may stop the stage earlier
    batch_size: int = 64  # images per optimizer step (split over grad_accum micro-batches)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # peak learning rate of AdamW
    warmup_steps: int = 100  # linear LR warm-up from 0
    lr_schedule: Literal["constant", "cosine"] = (
        "constant"  # after warm-up; cosine decays to 10 % at `steps`
    )
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.999  # 0 disables EMA
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_last: int = 2  # checkpoints kept per stage (plus the best by loss)
    sample_every: int = 500  # steps between preview grids (0 disables)
    log_every: int = 25  # steps between log lines / TensorBoard scalars
    bf16: bool = False  # bf16 autocast for the forward pass (about 1.6-2x on CPUs with avx512_bf16)
    max_bad_steps: int = 5  # consecutive non-finite losses before the stage stops

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_every", "keep_last", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.max_bad_steps < 1:
            raise ConfigError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum


def lr_multiplier(step: int, cfg: TrainConfig, total: int | None = None) -> float:
    """LR factor at optimizer step `step` (0-based): linear warm-up, then constant or cosine.

    The cosine decays over `total` steps (default `cfg.steps`; a time budget plans a smaller one).
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, (total or cfg.steps) - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


class DataOrder:
    """Micro-batch k of a run is a pure function of (seed, k): epochs are seeded permutations."""

    def __init__(self, num_items: int, micro_batch: int, seed: int) -> None:
        if num_items < 1:
            raise ValueError("the data set is empty")
        self.n = num_items
        self.b = min(micro_batch, num_items)
        self.per_epoch = num_items // self.b
        self.seed = seed
        self._epoch = -1
        self._perm: Tensor | None = None

    def indices(self, k: int) -> Tensor:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm[pos * self.b : (pos + 1) * self.b]


@dataclass
class Stage:
    """What a training stage hands to `train_stage`."""

    name: str  # "autoencoder" or "diffusion": names checkpoints
    model: nn.Module  # the main trained module (EMA'd)
    optimizers: dict[str, torch.optim.Optimizer]
    # step(micro_batches, step) -> logs; must include "loss" (float) and set "skipped": True when
    # it did not apply the update (non-finite loss or gradients)
    step: Callable[[list[Tensor], int], dict[str, float]]
    extra_modules: dict[str, nn.Module] = field(default_factory=dict)  # e.g. a discriminator
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    # preview(step, ema_or_model) -> path of a grid written, or None
    preview: Callable[[int, nn.Module], Path | None] | None = None


@dataclass
class StageResult:
    steps_done: int
    stopped_because: str  # "finished", "time budget", "signal", "bad loss"
    last_loss: float
    seconds: float
    ema: EMA | None
    checkpoint: Path | None


class _SignalFlag:
    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop at once
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train_stage(
    stage: Stage,
    cfg: TrainConfig,
    *,
    run_dir: str | Path,
    num_items: int,
    seed: int,
    resume: bool = False,
    time_budget_s: float | None = None,
    extra_state: dict[str, Any] | None = None,
    writer: Any = None,
    progress: bool = True,
) -> StageResult:
    """Train one stage for cfg.steps optimizer steps (or until the budget), with checkpoints."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_stray_temporaries(run_dir)
    ema = EMA(stage.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    modules: dict[str, nn.Module] = {"model": stage.model, **stage.extra_modules}
    if ema is not None:
        modules["ema"] = ema.model
    order = DataOrder(num_items, cfg.micro_batch, seed)

    step = 0
    planned: int | None = None  # steps a time budget allows, planned from the measured speed
    last_ckpt: Path | None = None
    if resume:
        ckpts = list_checkpoints(run_dir, stage.name)
        if ckpts:
            try:
                state = load_checkpoint(
                    ckpts[-1].path,
                    modules=modules,
                    optimizers=stage.optimizers,
                    generators=stage.generators,
                )
            except CheckpointError as e:
                raise CheckpointError(
                    f"cannot resume: {e} (to resume from the checkpoint before it, delete "
                    f"{ckpts[-1].path})"
                ) from None
            step = int(state["step"])
            planned = state.get("planned_steps")
            last_ckpt = ckpts[-1].path  # so a stage resumed at its end does not re-save it
            if ema is not None:
                ema.num_updates = int(state.get("ema_updates", step))
            log.info("resumed %s from %s (step %d)", stage.name, ckpts[-1].path.name, step)

    def checkpoint(metric: float) -> Path:
        state = {
            "ema_updates": ema.num_updates if ema else 0,
            "metric": metric,
            "planned_steps": planned,
            **(extra_state or {}),
        }
        path = save_checkpoint(
            run_dir, stage.name, step, modules=modules, optimizers=stage.optimizers,
            generators=stage.generators, state=state,
        )  # fmt: skip
        rotate_checkpoints(run_dir, stage.name, cfg.keep_last)
        return path

    start = time.perf_counter()
    deadline = start + time_budget_s if time_budget_s else None
    stopped = "finished"
    last_loss = float("nan")
    bad_streak = 0
    loss_window: list[float] = []
    log_path = run_dir / "log.jsonl"
    images_seen_t0, t0 = 0, time.perf_counter()

    bar = None
    if progress and step < cfg.steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=stage.name, unit="step", dynamic_ncols=True)

    # With a time budget and a decaying LR, the decay must end when the budget does. After
    # PLAN_SKIP warm-up steps the loop times itself and, every PLAN_OVER steps, sets the stage's
    # length to what fits the remaining budget at the mean speed so far (previews and
    # checkpoints included). The plan is saved in checkpoints, so a resumed stage keeps it.
    plan = deadline is not None and cfg.lr_schedule != "constant"
    plan_start, plan_t0 = step + PLAN_SKIP, 0.0
    with _SignalFlag() as sig:
        while step < (planned or cfg.steps):
            if plan and step == plan_start:
                plan_t0 = time.perf_counter()
            elif plan and step > plan_start and (step - plan_start) % PLAN_OVER == 0:
                now = time.perf_counter()
                per_step = (now - plan_t0) / (step - plan_start)
                assert deadline is not None
                first = planned is None
                planned = min(cfg.steps, step + int(PLAN_MARGIN * (deadline - now) / per_step))
                if first:
                    log.info(
                        "%s: %.3f s/step, so the time budget allows about %d steps; the LR "
                        "decays over those", stage.name, per_step, planned,
                    )  # fmt: skip
                if bar is not None:
                    bar.total = planned
                    bar.refresh()
            mult = lr_multiplier(step, cfg, planned)
            for opt in stage.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = group.setdefault("base_lr", cfg.lr) * mult
            micro = [order.indices(step * cfg.grad_accum + i) for i in range(cfg.grad_accum)]
            logs = stage.step(micro, step)
            loss = float(logs["loss"])
            if logs.get("skipped"):
                bad_streak += 1
                step += 1  # the step is consumed (data and RNG moved on) but changed no weight
                log.warning("step %d: non-finite loss or gradient (%s); update skipped", step, loss)
                if bad_streak >= cfg.max_bad_steps:
                    stopped = "bad loss"
                    log.error(
                        "%d consecutive non-finite losses: stopping %s; the last good checkpoint is "
                        "intact. Lower the learning rate or check the data, then --resume",
                        bad_streak, stage.name,
                    )  # fmt: skip
                    break
                continue
            bad_streak = 0
            if ema is not None:
                ema.update(stage.model)
            step += 1
            last_loss = loss
            loss_window.append(loss)
            images_seen_t0 += sum(len(m) for m in micro)

            if step % cfg.log_every == 0 or step == (planned or cfg.steps):
                now = time.perf_counter()
                ips = images_seen_t0 / max(now - t0, 1e-9)
                images_seen_t0, t0 = 0, now
                mean_loss = sum(loss_window) / len(loss_window)
                loss_window.clear()
                record = {"stage": stage.name, "step": step, "loss": mean_loss, "lr": cfg.lr * mult,
                          "images_per_s": ips, **{k: v for k, v in logs.items() if k not in ("loss", "skipped")}}  # fmt: skip
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    for k, v in record.items():
                        if isinstance(v, (int, float)) and k != "step":
                            writer.add_scalar(f"{stage.name}/{k}", v, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}")
            if bar is not None:
                bar.update(1)

            if stage.preview is not None and cfg.sample_every and step % cfg.sample_every == 0:
                grid = stage.preview(step, ema.model if ema else stage.model)
                if grid is not None and writer is not None:
                    _add_image(writer, f"{stage.name}/samples", grid, step)
            if step % cfg.checkpoint_every == 0 and step < (planned or cfg.steps):
                last_ckpt = checkpoint(last_loss)
            if sig.received is not None:
                stopped = "signal"
                log.warning(
                    "%s received: saving a checkpoint of %s at step %d and stopping; continue "
                    "with --resume", signal.Signals(sig.received).name, stage.name, step,
                )  # fmt: skip
                break
            if deadline is not None and time.perf_counter() >= deadline:
                stopped = "time budget"
                break
    if bar is not None:
        bar.close()
    if stopped == "finished" and planned is not None and planned < cfg.steps:
        stopped = "time budget"  # the planned steps ran out with it
    if stopped != "bad loss" and (last_ckpt is None or not last_ckpt.name.endswith(f"{step:08d}")):
        last_ckpt = checkpoint(last_loss)
    return StageResult(step, stopped, last_loss, time.perf_counter() - start, ema, last_ckpt)


def _add_image(writer: Any, tag: str, path: Path, step: int) -> None:
    try:
        import numpy as np
        from PIL import Image

        img = np.asarray(Image.open(path).convert("RGB"))
        writer.add_image(tag, img, step, dataformats="HWC")
    except Exception as e:  # previews are a convenience; never stop training for one
        log.warning("could not add %s to TensorBoard: %s", path, e)


def clip_and_check(params: list[nn.Parameter], max_norm: float) -> tuple[float, bool]:
    """Clip the global grad norm (if max_norm > 0); return (norm, finite)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0, True
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    norm_f = float(norm)  # a sync point on GPU; once per step is fine
    return norm_f, math.isfinite(norm_f)
