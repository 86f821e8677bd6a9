"""Atomic, pickle-free persistence: JSON configs and safetensors weights.

A model folder holds `config.json` (the model's dataclass config) and `model.safetensors`.
Every write goes to a temporary file in the same folder, is fsync'ed, then renamed over the
target, so a crash or a full disk mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from typing_extensions import Self

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint or model folder is missing, corrupt or does not match the model."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync the result, then rename it onto `path`.

    If anything fails the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _test_pause(path)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def _test_pause(path: Path) -> None:
    """Fault-injection hook for tests/reliability: LDMKIT_TEST_SLOW_WRITE=GLOB=SECONDS sleeps
    before the rename of every atomic write whose file name matches GLOB, so a test can SIGKILL
    the process mid-write. Unset (always, outside those tests) it does nothing."""
    hook = os.environ.get("LDMKIT_TEST_SLOW_WRITE")
    if hook:
        import fnmatch
        import time

        pattern, _, seconds = hook.rpartition("=")
        if fnmatch.fnmatch(path.name, pattern):
            time.sleep(float(seconds))


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the platform can."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on every platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as pretty JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; is this the right folder?")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is corrupt") from None


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save a flat dict of tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        save_file(flat, tmp, metadata=metadata)
        _sort_metadata(tmp)

    atomic_write(path, write)


def _sort_metadata(path: str) -> None:
    """Rewrite a safetensors header with its metadata keys sorted, in place.

    safetensors keeps metadata in a Rust HashMap, so two saves of the same tensors and metadata
    order its keys at random and the files' checksums differ. Sorted, equal content gives equal
    bytes (the header keeps its length: same keys and values, same compact JSON).
    """
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None)
        if not meta or len(meta) < 2:
            return
        header = {"__metadata__": dict(sorted(meta.items())), **header}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > n:  # never expected; leave the file as safetensors wrote it
            return
        f.seek(8)
        f.write(text + b" " * (n - len(text)))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Load a safetensors file, turning any corruption into a CheckpointError that names the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; is this the right folder?")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({e}); it is truncated or corrupt, "
            "restore it or use an earlier checkpoint"
        ) from None


def load_state_dict_strict(module: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Copy `state` into `module`, refusing missing, unexpected or mis-shaped tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{source} does not match the model config: {'; '.join(parts)}; "
            "was it saved from a different config?"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: tensor {k} has shape {tuple(state[k].shape)} but the config gives "
                f"{tuple(v.shape)}; the weights were saved from a different config"
            )
    check_finite(state, source)
    module.load_state_dict(state, strict=True)


def check_finite(state: dict[str, Tensor], source: str) -> None:
    """Refuse weights with NaN or inf in them, naming the first such tensor: a model loaded
    from them would only ever produce garbage."""
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
            raise CheckpointError(
                f"{source}: tensor {k} holds non-finite values ({nan} NaN, {inf} inf of "
                f"{v.numel()}); the weights are broken (a training that diverged, or a damaged "
                "file): restore them or use an earlier checkpoint"
            )


def save_model_folder(
    directory: str | os.PathLike, module: torch.nn.Module, config: Any, metadata: dict[str, str]
) -> None:
    """Write `model.safetensors` then `config.json` (a dataclass config) into `directory`.

    Weights first: a crash in between leaves the old config, which refuses new weights of
    another shape, never a new config beside stale weights.
    """
    from .config import to_dict

    directory = Path(directory)
    save_tensors(directory / WEIGHTS_NAME, module.state_dict(), metadata=metadata)
    write_json(directory / CONFIG_NAME, to_dict(config))


def load_model_folder(
    model_cls: Callable[[Any], torch.nn.Module], config_cls: type, directory: str | os.PathLike
) -> torch.nn.Module:
    """Build `model_cls(config)` from a folder written by `save_model_folder` and load its
    weights strictly; a bad config or corrupt/mismatched weights raise CheckpointError."""
    from .config import ConfigError, from_dict

    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    try:
        config = from_dict(config_cls, read_json(config_path))
    except ConfigError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    model = model_cls(config)
    state = load_tensors(directory / WEIGHTS_NAME)
    load_state_dict_strict(model, state, str(directory / WEIGHTS_NAME))
    return model


class ModelFolder:
    """`save_pretrained` / `from_pretrained` for a model class with a typed `config` (its
    dataclass: `config_class`): a folder of `config.json` and `model.safetensors`, written
    atomically and loaded strictly (see save_model_folder / load_model_folder). A model writes
    `class Model(ModelFolder, nn.Module)` and sets `config_class`."""

    config_class: ClassVar[type]
    config: Any

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` into `directory`, each atomically."""
        assert isinstance(self, torch.nn.Module)
        meta = {"format": "pt", "ldmkit_model": type(self).__name__}
        save_model_folder(directory, self, self.config, metadata=meta)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu"
    ) -> Self:
        """Load a folder written by `save_pretrained` in eval mode; refuse corrupt or
        mismatched files (CheckpointError)."""
        model = load_model_folder(cls, cls.config_class, directory)
        summary = getattr(model, "summary", None)
        log.info("loaded %s from %s", summary() if summary else cls.__name__, directory)
        return model.to(device).eval()  # type: ignore[return-value]
