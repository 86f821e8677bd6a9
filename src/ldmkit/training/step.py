"""One optimizer step of any training stage: the one home of forward, backward, gradient
accumulation, DistributedDataParallel's `no_sync`, clipping, the non-finite check and the EMA.

A stage says only how to compute its loss on one micro-batch (`Stage.loss`); both stages (the
autoencoder and the diffusion UNet) go through `optimizer_step`, so everything that must happen
around a backward pass is written once, here.

A micro-batch (`MicroBatch`) carries its samples' randomness: the sample in place i of the
global batch of step k draws everything random from its own generator, keyed by (stage, seed,
k, i), so a sample gets the same noise however many processes share the batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..diffusion import losses
from .distributed import World, no_sync
from .ema import EMA


def sample_generator(key: str, step: int, slot: int) -> torch.Generator:
    """The generator of the sample in place `slot` of step `step`'s global batch (slot -1: the
    draws shared by the whole batch), seeded with a hash of (key, step, slot).

    The CPU generator (mt19937) keeps 32 bits of a seed: among the ~1e6 samples of a long run a
    few dozen pairs share a stream, two unrelated images at unrelated steps getting the same
    noise, which biases nothing.
    """
    digest = hashlib.blake2b(f"{key}/{step}/{slot}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


@dataclass
class MicroBatch:
    """One process's share of one micro-batch of a global optimizer step, with its randomness.

    Each sample draws from its own generator (`generators[j]`, keyed by its place in the global
    batch), in a fixed order: the diffusion stage draws posterior noise, t, eps, then condition
    dropout. Draws shared by the whole global batch (a stratified offset) come from `shared()`.
    So one sample's randomness is the same for 1 or N processes and any grad_accum.
    """

    indices: Tensor  # (b,) long: the data items
    slots: Tensor  # (b,) long: their places in the global batch, 0..batch_size-1
    step: int  # the optimizer step (0-based)
    batch_size: int  # the global batch
    key: str  # "<stage>/<seed>": keys the samples' generators
    generators: list[torch.Generator] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.generators = [sample_generator(self.key, self.step, int(s)) for s in self.slots]

    def __len__(self) -> int:
        return len(self.indices)

    def shared(self) -> torch.Generator:
        """A fresh generator for the draws of the whole global batch (the same in every share)."""
        return sample_generator(self.key, self.step, -1)

    def randn(self, *shape: int) -> Tensor:
        """(b, *shape) float32 on the CPU: row j ~ N(0, I) from sample j's generator."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])

    def timesteps(self, num_timesteps: int, method: str = "uniform") -> Tensor:
        """Training steps t (b,): uniform from each sample's generator, or stratified over the
        global batch (one offset from `shared()`, the sample's place in the batch)."""
        if method == "stratified":
            return losses.sample_timesteps(
                self.batch_size, num_timesteps, generator=self.shared(), method="stratified",
                positions=self.slots,
            )  # fmt: skip
        draws = [losses.sample_timesteps(1, num_timesteps, generator=g) for g in self.generators]
        return torch.cat(draws)

    def per_sample(
        self, fn: Callable[[slice, torch.Generator], dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Call `fn(rows, generator)` once per sample (rows = slice(j, j + 1)) and concatenate
        the dicts of batch-first tensors it returns: e.g. a conditioner's dropout, per sample."""
        parts = [fn(slice(j, j + 1), g) for j, g in enumerate(self.generators)]
        return {k: torch.cat([p[k] for p in parts]) for k in (parts[0] if parts else {})}


# a micro-batch -> (loss to minimise, float logs)
LossFn = Callable[[MicroBatch], tuple[Tensor, dict[str, float]]]


@dataclass
class Stage:
    """What a training stage hands to `train_stage` and `optimizer_step`."""

    name: str  # "autoencoder" or "diffusion": names checkpoints and log rows
    model: nn.Module  # the trained module (EMA'd, saved as "model")
    optimizer: torch.optim.Optimizer  # the model's optimizer
    loss: LossFn
    # the DistributedDataParallel wrapper that `loss` calls (training/distributed.py); None or
    # the model itself in one process
    wrapped: nn.Module | None = None
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
    micro_batches: list[MicroBatch],
    *,
    grad_clip: float,
    ema: EMA | None = None,
    world: World | None = None,
) -> dict[str, Any]:
    """Accumulate the loss over the micro-batches, clip, and apply the update when it is finite.

    With several processes each holds its share of every micro-batch; DistributedDataParallel
    averages the gradients in the last micro-batch's backward (the others run under `no_sync`),
    so every rank clips, checks and updates the same averaged gradient, and the losses logged are
    averaged over the ranks too: the global batch's, as in one process.

    Returns logs with "loss" (the mean over the global batch) and either "grad_norm" and the
    stage's own terms, or "skipped": True when a loss or gradient was not finite (then no weight
    changed, and the gradients are cleared).
    """
    opt = stage.optimizer
    opt.zero_grad(set_to_none=True)
    n = len(micro_batches)
    total = 0.0
    logs: dict[str, float] = {}
    for i, mb in enumerate(micro_batches):
        # forward and backward of all but the last micro-batch only accumulate locally
        with no_sync(stage.wrapped) if i < n - 1 else contextlib.nullcontext():
            loss, parts = stage.loss(mb)
            (loss / n).backward()
        total += float(loss.detach()) / n
        for k, v in parts.items():
            logs[k] = logs.get(k, 0.0) + v / n
    if world is not None and world.size > 1:  # every rank then takes the same decisions
        total, *values = world.mean([total, *logs.values()])
        logs = dict(zip(logs, values))
    norm, finite = clip_and_check(list(stage.model.parameters()), grad_clip)
    if not finite or not math.isfinite(total):
        opt.zero_grad(set_to_none=True)
        return {"loss": total, "skipped": True}
    opt.step()
    if stage.after_update is not None:
        logs.update(stage.after_update(micro_batches[0].step))
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
