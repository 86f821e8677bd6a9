"""Training checkpoints: atomic, pickle-free, exactly resumable.

A checkpoint is a folder `<stage>-<step:08d>/` in a run's checkpoints folder (the caller gives
that folder: `RunFolder.checkpoints_dir` names it) holding
    modules.safetensors   every trained module's weights (+ EMA), keys "<module>.<param>"
    optim.safetensors     optimizer tensors, keys "<optimizer>.<param index>.<state key>"
    rng.safetensors       torch's global CPU RNG state and the trainer's generators
    state.json            step, stage, optimizer hyper-parameters, EMA count, metrics, config
It is written into a hidden temporary folder and renamed into place, so a crash mid-write
leaves at most a stray temporary folder (removed at the next start), never a half checkpoint.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checkpoint import (
    CheckpointError,
    fsync_dir,
    load_state_dict_strict,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)

log = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^(?P<stage>[a-z0-9_]+)-(?P<step>\d{8})$")


def optimizer_to_tensors(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer's state_dict into tensors (for safetensors) and JSON-able metadata."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"{name}.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(
    name: str, opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = name + "."
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        idx, skey = key[len(prefix) :].split(".", 1)
        state.setdefault(int(idx), {})[skey] = value
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


@dataclass
class Checkpoint:
    path: Path
    stage: str
    step: int


def checkpoint_dir(root: str | os.PathLike, stage: str, step: int) -> Path:
    """The folder of the checkpoint of `stage` at `step` in the checkpoints folder `root`."""
    return Path(root) / f"{stage}-{step:08d}"


def list_checkpoints(root: str | os.PathLike, stage: str | None = None) -> list[Checkpoint]:
    """Complete checkpoints in the checkpoints folder `root` (of one stage, or all), oldest
    first."""
    root = Path(root)
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = CKPT_RE.match(p.name)
            if m and p.is_dir() and (p / "state.json").is_file():
                if stage is None or m["stage"] == stage:
                    out.append(Checkpoint(p, m["stage"], int(m["step"])))
    return sorted(out, key=lambda c: (c.stage, c.step))


def clean_stray_temporaries(root: str | os.PathLike) -> int:
    """Remove the temporary folders a crash left in the checkpoints folder `root`."""
    root = Path(root)
    n = 0
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


def save_checkpoint(
    root: str | os.PathLike,
    stage: str,
    step: int,
    *,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
    state: dict[str, Any],
) -> Path:
    """Write a checkpoint folder into the checkpoints folder `root`, atomically; its path."""
    final = checkpoint_dir(root, stage, step)
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        weights = {f"{m}.{k}": v for m, mod in modules.items() for k, v in mod.state_dict().items()}
        save_tensors(tmp / "modules.safetensors", weights)
        _test_pause()
        optim_tensors: dict[str, Tensor] = {}
        optim_meta = {}
        for name, opt in optimizers.items():
            t, meta = optimizer_to_tensors(name, opt)
            optim_tensors.update(t)
            optim_meta[name] = meta
        save_tensors(tmp / "optim.safetensors", optim_tensors)
        rng = {"torch_global": torch.get_rng_state()}
        rng.update({f"gen.{k}": g.get_state() for k, g in generators.items()})
        save_tensors(tmp / "rng.safetensors", rng)
        write_json(
            tmp / "state.json", {"stage": stage, "step": step, "optimizers": optim_meta, **state}
        )
        old = None
        if final.exists():  # re-saving a step: move the old copy aside whole, never half-delete it
            old = Path(tempfile.mkdtemp(prefix=".tmp-old-", dir=root))
            os.rename(final, old / final.name)
        os.rename(tmp, final)
        fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise CheckpointError(
                f"the disk is full: could not write checkpoint {final.name}; the previous checkpoints "
                "are intact. Free some space and resume with --resume"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_checkpoint(
    path: str | os.PathLike,
    *,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    generators: dict[str, torch.Generator],
) -> dict[str, Any]:
    """Restore modules, optimizers and RNG states in place; return state.json's content."""
    path = Path(path)
    state = read_json(path / "state.json")
    weights = load_tensors(path / "modules.safetensors")
    for m, mod in modules.items():
        prefix = m + "."
        sub = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        load_state_dict_strict(mod, sub, f"{path}/modules.safetensors [{m}]")
    optim_tensors = load_tensors(path / "optim.safetensors")
    for name, opt in optimizers.items():
        meta = state.get("optimizers", {}).get(name)
        if meta is None:
            raise CheckpointError(
                f"{path} has no optimizer state for {name!r}; it belongs to another stage"
            )
        optimizer_from_tensors(name, opt, optim_tensors, meta)
    rng = load_tensors(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_global"])
    for k, g in generators.items():
        g.set_state(rng[f"gen.{k}"])
    return state


def rotate_checkpoints(
    root: str | os.PathLike, stage: str, keep_last: int, keep_best: bool = True
) -> None:
    """Delete all but the newest `keep_last` checkpoints of a stage in the checkpoints folder
    `root` (and the best one, by state['metric'])."""
    ckpts = list_checkpoints(root, stage)
    keep = {c.path for c in ckpts[-keep_last:]} if keep_last > 0 else set()
    if keep_best and ckpts:
        best, best_val = None, float("inf")
        for c in ckpts:
            try:
                val = json.loads((c.path / "state.json").read_text()).get("metric")
            except (OSError, json.JSONDecodeError):
                continue
            if val is not None and val < best_val:
                best, best_val = c.path, val
        if best is not None:
            keep.add(best)
    for c in ckpts:
        if c.path not in keep:
            # rename first (atomic), so a crash mid-delete never leaves a half checkpoint that
            # list_checkpoints would offer; the stray temporary is removed at the next start
            trash = c.path.with_name(f".tmp-rot-{c.path.name}")
            try:
                os.rename(c.path, trash)
            except OSError:
                trash = c.path
            shutil.rmtree(trash, ignore_errors=True)


def _test_pause() -> None:
    """Fault-injection hook for tests/reliability: LDMKIT_TEST_SLOW_CHECKPOINT=SECONDS sleeps
    inside every checkpoint write (after modules.safetensors), so a test can SIGKILL or signal the
    process mid-write. Unset (always, outside those tests) it does nothing."""
    delay = os.environ.get("LDMKIT_TEST_SLOW_CHECKPOINT")
    if delay:
        time.sleep(float(delay))


LOCK_TRIES = 4  # attempts to take a run's lock, 50 ms apart


class RunLock:
    """An exclusive lock on a run folder, so two trainings cannot write into it at once."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(LOCK_TRIES):  # an `is_held` probe holds it for microseconds
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt + 1 < LOCK_TRIES:
                    time.sleep(0.05)
        else:
            os.close(fd)
            raise RunLockedError(
                f"another training is already writing to {self.path.parent}; wait for it to finish "
                "or choose another --out folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    @staticmethod
    def is_held(run_dir: str | os.PathLike) -> bool:
        """Whether a training holds the lock of `run_dir` now (a probe: a shared lock taken
        and dropped at once, which never blocks)."""
        path = Path(run_dir) / ".lock"
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunLockedError(RuntimeError):
    pass
