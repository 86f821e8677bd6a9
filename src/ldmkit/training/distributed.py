"""Several processes: the one module that knows about them (like guided-diffusion's dist_util.py).

ldmkit starts no process itself. `torchrun --standalone --nproc-per-node=N -m ldmkit train ...`
starts N copies of the command, each with RANK, LOCAL_RANK and WORLD_SIZE in its environment;
`start` joins them into one process group (gloo on the CPU, nccl on CUDA) and returns this
process's `World`. Without torchrun, or with one process, the World is a single process and every
method here does nothing, so the trainer reads the same for 1 or N processes.

What the trainer and the World agree on:
- Batches are global: a stage's `batch_size` is split into `grad_accum` micro-batches, and each of
  those over the N processes (`local_micro_batch` refuses a batch that does not divide, naming
  the N that do). Learning rate, warm-up and schedule lengths count optimizer steps and never
  depend on N.
- DistributedDataParallel (`World.wrap`) averages the gradients over the processes in the
  backward pass of the last micro-batch of a step only (`no_sync` on the others, in step.py), so
  clipping, the non-finite check and the EMA see the same gradients on every rank.
- Only rank 0 writes files, inside `together()` blocks that every rank enters: a barrier that also
  tells every rank whether one of them failed in the block, so an error stops all of them, with
  its message printed once by rank 0, instead of leaving the others waiting in a collective.
- Whatever ends a loop (a signal, a stop request, the time budget and its plan) is decided for all
  ranks at once, once a step (`agree`); the plan is made from rank 0's clock alone.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError
from ..recipe import RunConfig, TrainConfig
from ..runtime import resolve_device

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKENDS = ("auto", "gloo", "nccl")  # auto: nccl on CUDA, gloo on the CPU
# How long a rank waits in a collective: the others wait while rank 0 alone encodes the
# latents, draws previews and writes checkpoints (nccl's default of 10 minutes is too short
# for encoding a large data set)
TIMEOUT = datetime.timedelta(minutes=60)
MESSAGE_BYTES = 400  # of an error message that together() passes to rank 0


_started = False  # whether this process started a process group (see `leave`)


class PeerFailed(ValueError):
    """Another rank failed inside a `together()` block (rank 0's message names it)."""


def launched_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def local_micro_batch(cfg: TrainConfig, processes: int, name: str = "train") -> int:
    """Images per micro-batch in one process: batch_size / (grad_accum * processes)."""
    share = cfg.grad_accum * processes
    if cfg.batch_size % share == 0:
        return cfg.batch_size // share
    micro = cfg.batch_size // cfg.grad_accum
    fits = [str(n) for n in range(1, micro + 1) if micro % n == 0]
    listed = ", ".join(fits[:-1]) + (" or " if len(fits) > 1 else "") + fits[-1]
    accum = f" (grad_accum {cfg.grad_accum})" if cfg.grad_accum > 1 else ""
    raise ConfigError(
        f"{name}.batch_size {cfg.batch_size}{accum} does not split over {processes} processes: "
        f"use {listed} processes, or a {name}.batch_size that is a multiple of {share} "
        f"(e.g. {share * -(-cfg.batch_size // share)})"
    )


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a training: one process by default."""

    device: torch.device
    rank: int = 0
    size: int = 1
    backend: str | None = None  # "gloo" or "nccl"; None: one process, no process group

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, logs and draws progress."""
        return self.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        # gloo reduces CPU tensors; nccl only CUDA ones
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel around `module` with several processes, else `module` itself.

        Only a stage's loss calls the wrapper (its backward averages the gradients over the
        processes); weights, EMA, checkpoints and previews use the unwrapped module, so a preview
        on rank 0 starts no collective. Constructing it broadcasts rank 0's weights.
        """
        if self.size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            module, device_ids=[self.device] if self.device.type == "cuda" else None
        )

    def agree(self, values: Sequence[int]) -> list[int]:
        """The element-wise maximum over the ranks: a flag that any rank raised, or a value that
        only rank 0 knows (the others pass -1)."""
        if self.size == 1:
            return [int(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def mean(self, values: Sequence[float]) -> list[float]:
        """The mean over the ranks (of per-rank means of equal-sized shares: the global mean)."""
        if self.size == 1:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return [float(v) for v in (t / self.size).tolist()]

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """A block that every rank leaves the same way; put rank 0's file writes in one.

        At its end every rank waits for the others (a barrier). If one or more ranks raised an
        exception in the block, every rank raises: a failed rank its own exception, the others
        `PeerFailed`, whose message on rank 0 is the first failed rank's. The CLI prints rank 0's
        error only, so the user reads the cause once.
        """
        if self.size == 1:
            yield
            return
        error: Exception | None = None
        try:
            yield
        except Exception as e:  # shared with the other ranks below, then raised again
            error = e
        mine = torch.zeros(MESSAGE_BYTES + 1, dtype=torch.uint8)
        if error is not None:
            text = (str(error).splitlines() or [type(error).__name__])[0]
            raw = text.encode()[:MESSAGE_BYTES]
            mine[0] = 1
            mine[1 : 1 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        mine = mine.to(self._comm_device)
        every = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(every, mine)
        failed = [r for r, t in enumerate(every) if int(t[0])]
        if error is not None:
            raise error
        if failed:
            raw = bytes(every[failed[0]][1:].cpu().tolist()).rstrip(b"\0")
            raise PeerFailed(f"rank {failed[0]}: {raw.decode(errors='replace')}")

    def main_first(self, fn: Callable[[], T]) -> T:
        """`fn()` on rank 0, then, once it has succeeded, on the other ranks: for a step whose
        files rank 0 writes and the others read. One process just calls it."""
        result: T | None = None
        with self.together():
            if self.is_main:
                result = fn()
        with self.together():
            if not self.is_main:
                result = fn()
        return result  # type: ignore[return-value]

    def close(self) -> None:
        if self.backend is not None and dist.is_initialized():
            dist.destroy_process_group()


def no_sync(module: nn.Module | None) -> contextlib.AbstractContextManager:
    """Inside it, backward passes accumulate gradients locally without DDP's all-reduce (all but
    the last micro-batch of a step); a no-op for an unwrapped module or None."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def start(cfg: RunConfig, backend: str = "auto") -> World:
    """This process's World: one process, or one of torchrun's N (the process group started).

    The batch sizes are checked before the process group starts, so a batch that does not split
    over N stops every rank at once with the same one-line error.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown distributed backend {backend!r}; use {', '.join(BACKENDS)}")
    size = launched_size()
    if size > 1 and cfg.device.split(":")[0] not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {cfg.device}: several processes train on cpu or cuda only")
    device = resolve_device(cfg.device)
    if size == 1:
        if backend != "auto":
            log.warning("--dist-backend %s: one process trains, so it has no effect", backend)
        return World(device)
    for name in ("vae_train", "unet_train"):
        local_micro_batch(getattr(cfg, name), size, name)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        # UNTESTED in ldmkit's CI (no GPU there): one GPU per process, cuda:LOCAL_RANK
        if device.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                f"--device {device}: with several processes per machine each one takes "
                "cuda:LOCAL_RANK; pass --device cuda (or auto)"
            )
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"--device {device}: several processes train on cpu or cuda only")
    chosen = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
    if chosen == "nccl" and device.type != "cuda":
        raise ConfigError("--dist-backend nccl needs CUDA devices; use gloo on the CPU")
    dist.init_process_group(
        chosen, timeout=TIMEOUT, device_id=device if chosen == "nccl" else None
    )  # env:// (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, set by torchrun)
    global _started
    _started = True
    if rank > 0:  # rank 0 speaks for all; the others log warnings and errors only
        logging.getLogger("ldmkit").setLevel(logging.WARNING)
    log.info("process %d of %d on %s (%s)", rank, size, device, chosen)
    return World(device, rank, size, chosen)


def leave(code: int) -> None:
    """End a process that started a process group with `code`, skipping Python's finalization;
    a no-op in a process that started none. Call it last: it flushes and exits.

    With DDP on gloo (torch 2.13), about one 2-process run in six aborted during interpreter
    finalization, after all its work ("terminate called without an active exception", SIGABRT;
    a 20-line DDP script without ldmkit does the same, a barrier before destroy_process_group
    only makes it rarer), and torchrun then reports the run as failed and kills the other ranks.
    Every file is written and closed by then, so `os._exit` loses nothing: 0 aborts in 30 runs.
    """
    if not _started:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    os._exit(code)
