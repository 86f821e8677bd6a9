"""Discrete noise schedules of variance-preserving diffusion, as plain float64 tensors.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; Kingma et al. 2021, "VDM"):

    t                  integer step, 0 .. T-1 (diffusers' convention: t = 0 is the least noisy step)
    beta_t             variance added at step t
    alpha_t            1 - beta_t
    alpha_bar_t        prod_{s <= t} alpha_s;  x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps
    snr_t              alpha_bar_t / (1 - alpha_bar_t),  log_snr_t = log(snr_t)
    sigma_t            sqrt((1 - alpha_bar_t) / alpha_bar_t) = snr_t ** -0.5, the noise level of the
                       "variance exploding" view x_t / sqrt(alpha_bar_t) = x0 + sigma_t eps used by
                       Karras et al. 2022 style samplers.

Schedules may be added, never changed: a trained model is only valid with the schedule it saw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

ScheduleName = Literal["linear", "scaled_linear", "cosine", "sigmoid"]
SCHEDULE_NAMES: tuple[str, ...] = ("linear", "scaled_linear", "cosine", "sigmoid")


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Betas linear in t (Ho et al. 2020, Sec. 4: 1e-4 to 0.02 over T = 1000)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(
    num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Betas linear in sqrt(beta) (the Latent Diffusion / Stable Diffusion schedule)."""
    root = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64)
    return root**2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule of Nichol & Dhariwal 2021, eq. 17, with betas clipped at 0.999.

    alpha_bar(t) = f(t) / f(0), f(t) = cos(((t / T) + s) / (1 + s) * pi / 2) ** 2, and
    beta_t = 1 - alpha_bar(t + 1) / alpha_bar(t).
    """

    def f(t: Tensor) -> Tensor:
        return torch.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    t = torch.arange(num_timesteps, dtype=torch.float64)
    betas = 1 - f(t + 1) / f(t)
    return betas.clamp(max=max_beta)


def sigmoid_betas(
    num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02, scale: float = 6.0
) -> Tensor:
    """Betas following a sigmoid over [-scale, scale] between beta_start and beta_end (GeoDiff, Xu et al. 2022)."""
    x = torch.linspace(-scale, scale, num_timesteps, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that alpha_bar_T = 0 exactly (Lin et al. 2024, Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    sqrt_ab = torch.cumprod(1 - betas.to(torch.float64), 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete VP schedule. Every tensor is 1-D float64 of length T (on the CPU).

    Build one with `make_schedule`; index tensors with integer steps t.
    """

    betas: Tensor

    def __post_init__(self) -> None:
        b = self.betas
        if b.ndim != 1 or b.numel() < 2:
            raise ValueError(
                f"betas must be a 1-D tensor of length >= 2, got shape {tuple(b.shape)}"
            )
        if not torch.all((b > 0) & (b <= 1)):
            raise ValueError("betas must lie in (0, 1]; check beta_start / beta_end")
        object.__setattr__(self, "betas", b.detach().to(torch.float64).cpu())

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def alphas(self) -> Tensor:
        return 1 - self.betas

    @property
    def alphas_cumprod(self) -> Tensor:
        return torch.cumprod(self.alphas, 0)

    @property
    def alphas_cumprod_prev(self) -> Tensor:
        """alpha_bar_{t-1}, with alpha_bar_{-1} = 1."""
        return torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

    @property
    def sqrt_alphas_cumprod(self) -> Tensor:
        return self.alphas_cumprod.sqrt()

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> Tensor:
        return (1 - self.alphas_cumprod).sqrt()

    @property
    def log_snr(self) -> Tensor:
        """log(alpha_bar / (1 - alpha_bar)); -inf at a zero-terminal-SNR last step."""
        ab = self.alphas_cumprod
        return ab.log() - (1 - ab).log()

    @property
    def sigmas(self) -> Tensor:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), increasing in t; inf where alpha_bar_t = 0."""
        ab = self.alphas_cumprod
        return ((1 - ab) / ab).sqrt()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous step t(sigma), interpolating linearly in log(sigma) between the discrete steps.

        Exact (up to float rounding) at sigma = self.sigmas[t]. Used to feed a network trained on
        integer t with a noise level between steps (Karras spacing). Returns float64.
        """
        log_sigmas = self.sigmas.log()
        finite = torch.isfinite(log_sigmas)
        log_sigmas = log_sigmas[finite]
        ls = sigma.detach().to(torch.float64).cpu().clamp(min=1e-30).log()
        ls = ls.clamp(log_sigmas[0], log_sigmas[-1])
        hi = torch.searchsorted(log_sigmas, ls.contiguous()).clamp(1, log_sigmas.numel() - 1)
        lo = hi - 1
        w = (ls - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return (lo.to(torch.float64) + w).reshape(sigma.shape)


def make_schedule(
    name: ScheduleName = "linear",
    num_timesteps: int = 1000,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    zero_terminal_snr: bool = False,
) -> NoiseSchedule:
    """Build a named schedule.

    Args:
        name: "linear" (DDPM), "scaled_linear" (LDM / Stable Diffusion), "cosine" (improved DDPM),
            or "sigmoid".
        num_timesteps: T, the number of discrete steps.
        beta_start, beta_end: override the schedule's defaults (linear, scaled_linear, sigmoid only).
        zero_terminal_snr: rescale so that alpha_bar_{T-1} = 0 (Lin et al. 2024). Pair it with
            v-prediction: an eps-model cannot predict anything at zero SNR.
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    kw = {}
    if beta_start is not None:
        kw["beta_start"] = beta_start
    if beta_end is not None:
        kw["beta_end"] = beta_end
    if name == "linear":
        betas = linear_betas(num_timesteps, **kw)
    elif name == "scaled_linear":
        betas = scaled_linear_betas(num_timesteps, **kw)
    elif name == "sigmoid":
        betas = sigmoid_betas(num_timesteps, **kw)
    elif name == "cosine":
        if kw:
            raise ValueError("the cosine schedule takes no beta_start / beta_end; leave them unset")
        betas = cosine_betas(num_timesteps)
    else:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return NoiseSchedule(betas)


def schedule_from_fields(spec: Any) -> NoiseSchedule:
    """`make_schedule` from the fields schedule, num_timesteps, beta_start, beta_end and
    zero_terminal_snr, read from a mapping (a run.json's "diffusion" section) or attributes
    (DiffusionConfig, SchedulerSpec). A mapping may leave out beta_start, beta_end (the
    schedule's defaults) and zero_terminal_snr (False)."""
    if isinstance(spec, Mapping):
        missing = [k for k in ("schedule", "num_timesteps") if k not in spec]
        if missing:
            raise ValueError(f"a schedule needs {' and '.join(missing)}; got {dict(spec)}")
        get = spec.get
    else:

        def get(key: str, default: Any = None) -> Any:
            return getattr(spec, key, default)

    return make_schedule(
        get("schedule"), int(get("num_timesteps")), beta_start=get("beta_start"),
        beta_end=get("beta_end"), zero_terminal_snr=bool(get("zero_terminal_snr", False)),
    )  # fmt: skip
