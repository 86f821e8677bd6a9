"""One optimizer step of any training stage: the one home of forward, backward, gradient
accumulation, clipping, the non-finite check and the EMA update.

A stage says only how to compute its loss on one micro-batch (`Stage.loss`); both stages (the
autoencoder and the diffusion UNet) go through `optimizer_step`, so everything that must happen
around a backward pass (a later DistributedDataParallel `no_sync` on all but the last
micro-batch, for instance) is written once, here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .ema import EMA

# (data indices of one micro-batch, optimizer step) -> (loss to minimise, float logs)
LossFn = Callable[[Tensor, int], tuple[Tensor, dict[str, float]]]


@dataclass
class Stage:
    """What a training stage hands to `train_stage` and `optimizer_step`."""

    name: str  # "autoencoder" or "diffusion": names checkpoints and log rows
    model: nn.Module  # the trained module (EMA'd, saved as "model")
    optimizer: torch.optim.Optimizer  # the model's optimizer
    loss: LossFn
    # runs after every applied update, e.g. a discriminator's own step; returns float logs
    after_update: Callable[[int], dict[str, float]] | None = None
    # further modules and optimizers to checkpoint (e.g. the discriminator)
    extra_modules: dict[str, nn.Module] = field(default_factory=dict)
    extra_optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    generators: dict[str, torch.Generator] = field(default_factory=dict)  # checkpointed RNGs
    # preview(step, ema_or_model) -> path of a grid written, or None
    preview: Callable[[int, nn.Module], Path | None] | None = None

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adamw": self.optimizer, **self.extra_optimizers}


def optimizer_step(
    stage: Stage,
    micro_batches: list[Tensor],
    step: int,
    *,
    grad_clip: float,
    ema: EMA | None = None,
) -> dict[str, float | bool]:
    """Accumulate the loss over the micro-batches, clip, and apply the update when it is finite.

    Returns logs with "loss" (the mean over micro-batches) and either "grad_norm" and the
    stage's own terms, or "skipped": True when a loss or gradient was not finite (then no weight
    changed, and the gradients are cleared).
    """
    opt = stage.optimizer
    opt.zero_grad(set_to_none=True)
    n = len(micro_batches)
    total = 0.0
    logs: dict[str, float] = {}
    for idx in micro_batches:
        loss, parts = stage.loss(idx, step)
        (loss / n).backward()
        total += float(loss.detach()) / n
        for k, v in parts.items():
            logs[k] = logs.get(k, 0.0) + v / n
    norm, finite = clip_and_check(list(stage.model.parameters()), grad_clip)
    if not finite or not math.isfinite(total):
        opt.zero_grad(set_to_none=True)
        return {"loss": total, "skipped": True}
    opt.step()
    if stage.after_update is not None:
        logs.update(stage.after_update(step))
    if ema is not None:
        ema.update(stage.model)
    return {"loss": total, "grad_norm": norm, **logs}


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
