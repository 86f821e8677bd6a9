"""Process-level speed settings for CPU training and sampling.

With glibc's default malloc, tensors above the mmap threshold (e.g. a 64x128x32x32 float32
activation, 33.5 MB) are mapped and unmapped on every op; the page faults cost 25-30 % of a
convolution-bound step on CPU (see shared/PERF_ANCHORS.md, conclusion 4). Setting
MALLOC_MMAP_MAX_=0 and a huge MALLOC_TRIM_THRESHOLD_ before start-up avoids it; `tune_allocator`
does the same from inside a running process through glibc's mallopt.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_MAX = -4


def tune_allocator() -> bool:
    """Keep freed memory in the heap (no mmap per large tensor). Returns True when applied.

    Does nothing off glibc/Linux, or when LDMKIT_NO_MALLOC_TUNING is set.
    """
    if not sys.platform.startswith("linux") or os.environ.get("LDMKIT_NO_MALLOC_TUNING"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    log.debug("glibc malloc tuned for large tensors: %s", ok)
    return bool(ok)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (avx512_bf16 or AMX through oneDNN).

    Without it, PyTorch's bf16 convolutions fall back to a slow reference kernel: measured on a
    2-core AVX2 EPYC, a latent UNet training step ran about 15x slower under bf16 autocast.
    """
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision of ldmkit's fast sampling path on `device`, or None (stay fp32).

    bf16 autocast on a CUDA GPU with bf16 and on a CPU with native bf16 (`cpu_has_fast_bf16`),
    where it ran the UNets 1.6-2x faster than fp32 (shared/PERF_ANCHORS.md); None elsewhere (a
    CPU without native bf16 would run 15x slower, and MPS autocast lacks some ops).
    """
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def fast_autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast where `fast_dtype` says it is fast (and `enabled`), else a no-op."""
    import torch

    dtype = fast_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def compile_for_sampling(module: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """`torch.compile` of a network for inference, with inductor's freezing: weights become
    constants of the graph and convolutions get pre-packed oneDNN kernels (measured on a latent
    UNet at batch 1: about 3x the speed of eager, after a compile of 30-90 s). The weights are
    frozen at the first call: compile a loaded model, not one that still trains."""
    import torch

    return torch.compile(module, options={"freezing": True})


def default_device() -> torch.device:
    """cuda, then mps, then cpu."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """A device from a user's setting: None or "auto" (default_device), cpu, cuda, cuda:1, mps.

    The one check of a device setting, used by every verb: an unknown name, or a device this
    machine does not have, is a one-line ConfigError that says what to use instead.
    """
    import torch

    from .config import ConfigError

    if name is None or name == "auto":
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:1 or mps")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {str(name)!r} was asked for but no CUDA GPU is available; use --device cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"device {str(name)!r} was asked for but this machine has {count} CUDA GPU(s) "
                f"(cuda:0 to cuda:{count - 1}); use one of those or --device cpu"
            )
    mps = getattr(torch.backends, "mps", None)
    if dev.type == "mps" and (mps is None or not mps.is_available()):
        raise ConfigError(
            f"device {str(name)!r} was asked for but MPS is not available; use --device cpu"
        )
    return dev
