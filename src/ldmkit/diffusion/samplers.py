"""Samplers for diffusion models: DDPM, DDIM, Euler, Heun, DPM-Solver++(2M) (ODE and SDE),
annealed Langevin, and the multistep sampling of consistency models ("lcm", for few-step
students).

Every sampler is a stateless function in the style of k-diffusion:

    sample_<name>(denoise, x, sigmas, *, generator=None, callback=None, <options>) -> x0 samples

- `denoise(x, sigma) -> x0` is any denoiser in the VE convention x = x0 + sigma * noise
  (`ldmkit.diffusion.denoiser.VPDenoiser` adapts an eps/x0/v network; bind conditioning with
  functools.partial or wrap it with `ldmkit.diffusion.guidance.classifier_free_guidance`).
  sigma is passed as a 0-d float64 tensor.
- `sigmas` is the whole schedule: a descending 1-D tensor ending in 0 (`get_sigmas`).
- `x` is x_T already scaled to sigmas[0], i.e. unit noise times sqrt(1 + sigmas[0]^2) for a VP
  start, or times sigmas[0] for a pure VE start. When sigmas[0] = inf (zero terminal SNR,
  Lin et al. 2024), x is the unit-variance noise itself (see `denoiser.py`); the first step,
  which only needs eps = x and the denoiser's x0, then lands on a finite sigma.
- `callback(i, x, sigma, x0_pred)` runs after step i with the new state x at sigma = sigmas[i+1]
  and the step's x0 prediction; it may return a replacement for x (inpainting), None keeps x.
  Collect a trajectory with it. The caller owns any progress bar.
- Randomness comes from `noise_sampler(sigma, sigma_next) -> Tensor` if given (tests inject
  fixed noise with it), else from torch.randn(x.shape, generator=generator) in x's dtype, drawn
  in the same order as diffusers' schedulers draw it.

Notation: sigma = sigmas[i], sigma_next = sigmas[i + 1] (Karras: t_i, t_{i+1}), x0 = D(x, sigma),
eps = (x - x0) / sigma (= d, the ODE derivative dx/dsigma of Karras 2022 eq. 3),
alpha_bar = 1 / (1 + sigma^2). The VP quantities of DDPM/DDIM are functions of sigma alone, so no
sampler needs the schedule: e.g. beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ldmkit.diffusion.denoiser import Denoiser, NetworkFn, PredictionType, VPDenoiser
from ldmkit.diffusion.guidance import classifier_free_guidance
from ldmkit.diffusion.sampler_names import DEFAULT_SAMPLER, DEFAULT_STEPS
from ldmkit.diffusion.schedules import NoiseSchedule

Spacing = Literal["leading", "trailing", "linspace", "karras"]
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace", "karras")
Callback = Callable[[int, Tensor, Tensor, Tensor], "Tensor | None"]
NoiseSampler = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------------------------
# Noise levels


def get_timesteps(num_timesteps: int, steps: int, spacing: Spacing = "leading") -> Tensor:
    """Descending integer steps t (long, (steps,)) of a discrete spacing.

    The definitions are those of Lin et al. 2024, Table 2, as in diffusers' DDIMScheduler
    (`timestep_spacing`, with steps_offset = 0):
        leading   t = i * (T // n),                 i = 0 .. n-1   (DDIM's original choice)
        trailing  t = round(T - i * T / n) - 1,    i = 0 .. n-1   (always includes t = T - 1)
        linspace  t = round(linspace(0, T - 1, n))
    """
    T, n = num_timesteps, steps
    if not 1 <= n <= T:
        raise ValueError(f"steps must be in [1, {T}] for a {T}-step schedule, got {n}")
    if spacing == "leading":
        t = torch.arange(n, dtype=torch.float64) * (T // n)
    elif spacing == "trailing":
        t = (T - torch.arange(n, dtype=torch.float64) * (T / n)).round() - 1
        return t.long()
    elif spacing == "linspace":
        t = torch.linspace(0, T - 1, n, dtype=torch.float64).round()
    elif spacing == "karras":
        raise ValueError("karras spacing has no integer timesteps; use get_sigmas for it")
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return t.flip(0).long()


def get_sigmas(
    schedule: NoiseSchedule, steps: int, spacing: Spacing = "leading", rho: float = 7.0
) -> Tensor:
    """Descending noise levels (float64, (steps + 1,)) ending in 0, for `steps` denoiser steps.

    "leading", "trailing", "linspace": schedule.sigmas at `get_timesteps`. "karras": Karras et
    al. 2022 eq. 5 between the schedule's sigma_min and sigma_max, with exponent rho.
    """
    if spacing == "karras":
        T = schedule.num_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}] for a {T}-step schedule, got {steps}")
        sigma_min, sigma_max = schedule.sigmas[0], schedule.sigmas[-1]
        if not torch.isfinite(sigma_max):
            raise ValueError(
                "karras spacing needs a finite sigma_max; with a zero-terminal-SNR schedule use "
                "spacing='trailing'"
            )
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (hi + ramp * (lo - hi)) ** rho  # Karras 2022 eq. 5
    else:
        sigmas = schedule.sigmas[get_timesteps(schedule.num_timesteps, steps, spacing)]
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def check_sigmas(sigmas: Tensor) -> None:
    """Raise ValueError unless `sigmas` is a sampler's noise levels: 1-D, strictly descending,
    ending in 0, with only the first allowed to be inf (the samplers and editing check it)."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(
            f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}; "
            "build them with get_sigmas"
        )
    if sigmas[-1] != 0:
        raise ValueError("sigmas must end in 0; append a zero (get_sigmas does)")
    if torch.isnan(sigmas).any() or not torch.all(sigmas[:-1] > sigmas[1:]):
        raise ValueError("sigmas must be strictly descending; build them with get_sigmas")
    if torch.isinf(sigmas[1:]).any():
        raise ValueError("only sigmas[0] may be inf (zero terminal SNR)")


# ----------------------------------------------------------------------------------------------
# Small shared helpers


def _noise_source(x: Tensor, generator: torch.Generator | None, noise_sampler):
    if noise_sampler is not None:
        return noise_sampler

    def randn(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)

    return randn


def _to_eps(x: Tensor, sigma: float, x0: Tensor) -> Tensor:
    """eps = (x - x0) / sigma (Karras' d); at sigma = inf the state x is the noise itself."""
    return x if math.isinf(sigma) else (x - x0) / sigma


def _after_step(callback, i: int, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    if callback is None:
        return x
    out = callback(i, x, sigma, x0)
    return x if out is None else out


def ddim_step(x: Tensor, x0: Tensor, sigma: float, sigma_next: float, eta: float, noise) -> Tensor:
    """DDIM eq. 12 in VE terms: x0 + sqrt(sigma_next^2 - std^2) eps + std z.

    std = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2) is DDIM eq. 16 divided by
    sqrt(alpha_bar_{t-1}); eta = 1 is the DDPM posterior (Ho 2020 eq. 7, beta-tilde variance).
    """
    eps = _to_eps(x, sigma, x0)
    std = eta * sigma_next * math.sqrt(1 - (sigma_next / sigma) ** 2)
    x_next = x0 + math.sqrt(sigma_next**2 - std**2) * eps
    if std > 0:
        x_next = x_next + std * noise()
    return x_next


def _churn(x: Tensor, sigma: float, gamma: float, s_noise: float, noise) -> tuple[Tensor, float]:
    """Karras 2022 Alg. 2 lines 5-6: raise the noise level to sigma_hat = (1 + gamma) sigma."""
    if gamma <= 0 or math.isinf(sigma):
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + s_noise * math.sqrt(sigma_hat**2 - sigma**2) * noise(), sigma_hat


def _churn_gamma(sigma: float, steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """Karras 2022 Alg. 2 line 4: gamma_i = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax]."""
    if s_churn < 0:
        raise ValueError(f"s_churn must be >= 0, got {s_churn}")
    return min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0


def _sigma(s: float) -> Tensor:
    return torch.tensor(s, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Samplers


@torch.no_grad()
def sample_ddpm(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    variance: Literal["small", "large"] = "small",
) -> Tensor:
    """Ancestral sampling of Ho et al. 2020 (Alg. 2, eq. 11), one posterior step per sigma pair.

    The mean is the posterior mean of q(x_{t-1} | x_t, x0_pred) (eq. 7), which in VE terms is
    x0 + (sigma_next^2 / sigma) eps. The variance is "small", beta-tilde (eq. 7), or "large",
    beta_t (Sec. 3.2), divided by alpha_bar_{t-1} for the VE state; beta_t =
    1 - alpha_bar_t / alpha_bar_{t-1} comes from the sigmas, so no schedule is needed. As in
    Alg. 2 no noise is added on the last step (to sigma = 0). With sigmas of consecutive steps
    this equals diffusers' DDPMScheduler step by step ("fixed_small" / "fixed_large").
    """
    if variance not in ("small", "large"):
        raise ValueError(f"unknown variance {variance!r}; choose 'small' or 'large'")
    check_sigmas(sigmas)
    noise = _noise_source(x, generator, noise_sampler)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        x0 = denoise(x, sigmas[i])
        eps = _to_eps(x, sigma, x0)
        x_next = x0 + (sigma_next**2 / sigma) * eps  # Ho 2020 eq. 7 mean, VE terms
        if sigma_next > 0:
            if variance == "small":  # beta-tilde / alpha_bar_{t-1}
                var = sigma_next**2 * (1 - (sigma_next / sigma) ** 2)
            else:  # beta_t / alpha_bar_{t-1}, alpha_bar = 1 / (1 + sigma^2)
                beta = 1 - (1 + sigma_next**2) / (1 + sigma**2)
                var = beta * (1 + sigma_next**2)
            x_next = x_next + math.sqrt(var) * noise(sigmas[i], sigmas[i + 1])
        x = _after_step(callback, i, x_next, sigmas[i + 1], x0)
    return x


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 with the variance of eq. 16 scaled by eta).

    eta = 0 is the deterministic DDIM ODE solver (equal to Euler in sigma, Karras 2022 Sec. 4);
    eta = 1 is ancestral DDPM sampling with the beta-tilde variance. Equals diffusers'
    DDIMScheduler when its prev_timestep t - T // n is the next entry of the timesteps.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM), got {eta}")
    check_sigmas(sigmas)
    noise = _noise_source(x, generator, noise_sampler)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x0 = denoise(x, sigmas[i])
        step_noise = functools.partial(noise, sigmas[i], sigmas[i + 1])
        x_next = ddim_step(x, x0, s[i], s[i + 1], eta, step_noise)
        x = _after_step(callback, i, x_next, sigmas[i + 1], x0)
    return x


@torch.no_grad()
def sample_euler(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler steps on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma.

    Karras et al. 2022 Alg. 2 without the second-order correction; s_churn > 0 adds the
    stochastic "churn" of Alg. 2 (lines 4-6) before each step, s_churn = 0 is Alg. 1's Euler.
    """
    check_sigmas(sigmas)
    noise = _noise_source(x, generator, noise_sampler)
    s = sigmas.tolist()
    n = len(s) - 1
    for i in range(n):
        gamma = _churn_gamma(s[i], n, s_churn, s_tmin, s_tmax)
        x, sigma_hat = _churn(
            x, s[i], gamma, s_noise, functools.partial(noise, sigmas[i], sigmas[i])
        )
        x0 = denoise(x, _sigma(sigma_hat))
        d = _to_eps(x, sigma_hat, x0)
        # x + (sigma_next - sigma_hat) d, written so that it also holds from sigma_hat = inf
        x_next = x0 + s[i + 1] * d
        x = _after_step(callback, i, x_next, sigmas[i + 1], x0)
    return x


HEUN_MAX_RATIO = 100.0  # sample_heun takes an Euler step where sigma shrinks more than this


@torch.no_grad()
def sample_heun(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's second-order method, Karras et al. 2022 Alg. 2 (Alg. 1 when s_churn = 0).

    The last step (to sigma = 0) is an Euler step, as in the paper; so is a step from
    sigma = inf, where the trapezoid over an infinite interval is undefined, and a step that
    shrinks sigma more than HEUN_MAX_RATIO times: the trapezoid multiplies the difference of
    its two slope estimates by (sigma - sigma_next) / 2, so a learned denoiser's small error at
    sigma_next becomes a huge one (the cosine schedule's first trailing step, 20291 -> 12.8 at
    20 steps, turned samples into noise of std 12). 2n - 1 denoiser calls for n steps, fewer
    when such Euler steps occur.
    """
    check_sigmas(sigmas)
    noise = _noise_source(x, generator, noise_sampler)
    s = sigmas.tolist()
    n = len(s) - 1
    for i in range(n):
        sigma_next = s[i + 1]
        gamma = _churn_gamma(s[i], n, s_churn, s_tmin, s_tmax)
        x, sigma_hat = _churn(
            x, s[i], gamma, s_noise, functools.partial(noise, sigmas[i], sigmas[i])
        )
        x0 = denoise(x, _sigma(sigma_hat))
        d = _to_eps(x, sigma_hat, x0)
        if sigma_next == 0 or sigma_hat > HEUN_MAX_RATIO * sigma_next:  # incl. sigma_hat = inf
            x_next = x0 + sigma_next * d  # Euler step (Alg. 2 line 8)
        else:
            x_euler = x + (sigma_next - sigma_hat) * d  # Alg. 2 line 8
            d_next = _to_eps(x_euler, sigma_next, denoise(x_euler, sigmas[i + 1]))  # line 10
            x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2  # line 11
        x = _after_step(callback, i, x_next, sigmas[i + 1], x0)
    return x


def _dpmpp_2m_x0(
    x0: Tensor, x0_prev: Tensor | None, h: float, h_prev: float | None, *, last: bool
) -> Tensor:
    """The x0 that a DPM-Solver++(2M) step uses: x0 linearly extrapolated from the previous
    prediction, D = x0 + (x0 - x0_prev) / (2r) with r = h_prev / h (Lu 2022b Alg. 2); plain x0
    (first order, = DDIM) on the first and the last step."""
    if x0_prev is None or h_prev is None or last:
        return x0
    return x0 + (x0 - x0_prev) / (2 * (h_prev / h))


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++"), Alg. 2, data prediction.

    In lambda = -log(sigma) (half the log-SNR), each step is a DDIM step whose x0 is linearly
    extrapolated from the last two predictions: D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1} with
    r = h_{i-1} / h_i. The first and the last step (to sigma = 0) are first order, as in
    diffusers (final_sigmas_type="zero"). Deterministic: `generator` is accepted and unused.
    """
    check_sigmas(sigmas)
    s = sigmas.tolist()
    lam = [-math.log(v) if v > 0 else math.inf for v in s]  # -inf at sigma = inf
    x0_prev, h_prev = None, None
    for i in range(len(s) - 1):
        x0 = denoise(x, sigmas[i])
        h = lam[i + 1] - lam[i]
        x0_d = _dpmpp_2m_x0(x0, x0_prev, h, h_prev, last=s[i + 1] == 0)
        # (sigma_next / sigma) x - expm1(-h) D, written as a DDIM step so it holds at sigma = inf
        x_next = x0_d + s[i + 1] * _to_eps(x, s[i], x0_d)
        x0_prev, h_prev = x0, h
        x = _after_step(callback, i, x_next, sigmas[i + 1], x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE: the second-order multistep solver of Lu et al. 2022 ("DPM-Solver++",
    Sec. 4 and App. B) for the reverse SDE instead of the probability-flow ODE.

    With q = sigma_next / sigma (= exp(-h), h the step in lambda = -log sigma), each step is
        x_next = q^(1+eta) x + (1 - q^(1+eta)) D + sigma_next sqrt(1 - q^(2 eta)) z
    where D is the x0 prediction, linearly extrapolated from the last two as in
    `sample_dpmpp_2m` ("midpoint": D = x0 + (x0 - x0_prev) / (2r), r = h_prev / h). eta = 1 is
    diffusers' algorithm_type="sde-dpmsolver++"; eta = 0 is `sample_dpmpp_2m` exactly. The
    first and the last step (to sigma = 0, which adds no noise) are first order. Like DDPM,
    the fresh noise corrects part of an imperfect model's error that an ODE solver keeps.
    """
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    check_sigmas(sigmas)
    noise = _noise_source(x, generator, noise_sampler)
    s = sigmas.tolist()
    lam = [-math.log(v) if v > 0 else math.inf for v in s]
    x0_prev, h_prev = None, None
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        x0 = denoise(x, sigmas[i])
        h = lam[i + 1] - lam[i]
        x0_d = _dpmpp_2m_x0(x0, x0_prev, h, h_prev, last=sigma_next == 0)
        q = sigma_next / sigma  # 0 at sigma = inf and at sigma_next = 0
        if math.isinf(sigma):
            # x is the unit noise itself; q^(1+eta) x_ve -> sigma_next^(1+eta) / sigma^eta x
            x_next = x0_d + (sigma_next * x if eta == 0 else 0.0)
        else:
            x_next = q ** (1 + eta) * x + (1 - q ** (1 + eta)) * x0_d
        if sigma_next > 0 and eta > 0:
            z = noise(sigmas[i], sigmas[i + 1])
            x_next = x_next + sigma_next * math.sqrt(-math.expm1(2 * eta * math.log(q))) * z
        x0_prev, h_prev = x0, h
        x = _after_step(callback, i, x_next, sigmas[i + 1], x0)
    return x


@torch.no_grad()
def sample_lcm(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; LCM, Luo et al. 2023): each
    step's x0 prediction is noised afresh to the next level, x_next = x0 + sigma_next z (VP:
    z_s = a_s x0 + s_s z), and the last step returns x0. Nothing of the state's own noise is
    kept, unlike DDIM (all of it) and DDPM (part of it).

    For few-step students (`ldmkit distill`), where the run's stochastic sampler beats its ODE
    path: the fresh noise between their steps corrects errors that the deterministic path keeps
    (the shapes run: a 4-step student's FID-cnn 6.1 -> 4.0); where DDIM is the better sampler
    it loses (MNIST: 6.8 -> 10.4). docs/performance.md, issue 27. As k-diffusion's
    `sample_lcm` and diffusers' LCMScheduler (one step each), on ldmkit's sigmas.
    """
    check_sigmas(sigmas)
    noise = _noise_source(x, generator, noise_sampler)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x0 = denoise(x, sigmas[i])
        x_next = x0
        if s[i + 1] > 0:
            x_next = x0 + s[i + 1] * noise(sigmas[i], sigmas[i + 1])
        x = _after_step(callback, i, x_next, sigmas[i + 1], x0)
    return x


@torch.no_grad()
def sample_langevin(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    n_corrector: int = 1,
    snr: float = 0.16,
) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through
    SDEs", Alg. 4 for VE SDEs) with annealed Langevin dynamics as the corrector.

    Predictor: an ancestral step from sigma to sigma_next (DDPM posterior, = `sample_ddim` with
    eta = 1). Corrector, `n_corrector` times at each new level sigma_next > 0 (Song & Ermon 2019):
        score = (D(x, sigma) - x) / sigma^2     (= -eps / sqrt(1 - alpha_bar) in VP terms)
        step  = 2 (snr * ||z|| / ||score||)^2   (norms per sample, averaged over the batch, as
                                                 in Song et al.'s code)
        x    <- x + step * score + sqrt(2 step) z
    The last step (to sigma = 0) is the predictor alone, i.e. x = D(x, sigma_min). n_corrector =
    0 is plain ancestral sampling. callback runs once per noise level, after the corrector.
    """
    if n_corrector < 0 or snr <= 0:
        raise ValueError(
            f"need n_corrector >= 0 and snr > 0, got n_corrector={n_corrector}, snr={snr}"
        )
    check_sigmas(sigmas)
    noise = _noise_source(x, generator, noise_sampler)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        sigma_next = s[i + 1]
        x0 = denoise(x, sigmas[i])
        x = ddim_step(
            x, x0, s[i], sigma_next, 1.0, functools.partial(noise, sigmas[i], sigmas[i + 1])
        )
        for _ in range(n_corrector if sigma_next > 0 else 0):
            score = (denoise(x, sigmas[i + 1]) - x) / sigma_next**2
            z = noise(sigmas[i + 1], sigmas[i + 1])
            z_norm = z.flatten(1).norm(dim=1).mean()
            score_norm = score.flatten(1).norm(dim=1).mean()
            step = 2 * (snr * z_norm / score_norm) ** 2  # Song 2021 Alg. 4, line 6
            x = x + step * score + (2 * step).sqrt() * z
        x = _after_step(callback, i, x, sigmas[i + 1], x0)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpm++2m": sample_dpmpp_2m,
    "dpm++2m-sde": sample_dpmpp_2m_sde,
    "langevin": sample_langevin,
    "lcm": sample_lcm,
}  # the names of sampler_names.SAMPLER_NAMES (a test keeps them equal)


def check_sampler(*names: str) -> None:
    """Raise a ValueError that names every unknown sampler among `names` and lists the known."""
    unknown = [n for n in names if n not in SAMPLERS]
    if len(unknown) == 1:
        raise ValueError(f"unknown sampler {unknown[0]!r}; choose one of {', '.join(SAMPLERS)}")
    if unknown:
        raise ValueError(
            f"unknown sampler(s) {', '.join(map(repr, unknown))}; choose one of {', '.join(SAMPLERS)}"
        )


# Spacing used by `sample` when none is given: Lin et al. 2024 (Sec. 3.3) recommend "trailing",
# which starts at t = T - 1; DDPM uses "leading" so that steps = T is the full chain of Ho 2020.
DEFAULT_SPACING: dict[str, Spacing] = {
    "ddpm": "leading",
    "ddim": "trailing",
    "euler": "trailing",
    "heun": "trailing",
    "dpm++2m": "trailing",
    "dpm++2m-sde": "trailing",
    "langevin": "trailing",
    "lcm": "trailing",
}


def make_denoiser(
    model: NetworkFn,
    schedule: NoiseSchedule,
    prediction_type: PredictionType = "eps",
    *,
    cond: dict | None = None,
    uncond: dict | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
) -> Denoiser:
    """The denoiser `(x, sigma) -> x0` a sampler calls: the network in VE terms with its
    condition bound, or wrapped in classifier-free guidance when `uncond` is given."""
    denoise: Denoiser = VPDenoiser(model, schedule, prediction_type)
    cond = cond or {}
    if uncond is not None:
        return classifier_free_guidance(
            denoise, guidance_scale, cond=cond, uncond=uncond, rescale=guidance_rescale
        )
    return functools.partial(denoise, **cond) if cond else denoise


@torch.no_grad()
def run_sampler(
    denoise: Denoiser,
    x_T: Tensor,
    sigmas: Tensor,
    *,
    sampler: str = DEFAULT_SAMPLER,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    **sampler_options,
) -> Tensor:
    """Run `sampler` from the VP state x_T at sigmas[0] down to sigmas[-1] = 0.

    x_T enters the VE sampler as x_T * sqrt(1 + sigmas[0]^2), or unchanged when sigmas[0] = inf.
    `sigmas` may be any tail of `get_sigmas` (image-to-image starts part-way down), and x_T any
    VP state at that level (e.g. `process.add_noise` of a latent). The state is checked for
    NaN/inf after every step (NonFiniteSampleError names the step).
    """
    check_sampler(sampler)
    check_sigmas(sigmas)
    scale = 1.0 if torch.isinf(sigmas[0]) else math.sqrt(1 + sigmas[0].item() ** 2)
    steps = len(sigmas) - 1
    x0 = SAMPLERS[sampler](
        denoise, x_T * scale, sigmas, generator=generator,
        callback=_stop_if_not_finite(callback, sampler, steps), **sampler_options,
    )  # fmt: skip
    _require_finite(x0, sampler, steps - 1, steps, sigmas[-1])  # samplers that skip a callback
    return x0


def check_start(sigmas: Tensor, prediction_type: PredictionType) -> None:
    """Refuse an eps-prediction network at sigma = inf, where it cannot say anything."""
    if torch.isinf(sigmas[0]) and prediction_type == "eps":
        raise ValueError(
            "an eps-prediction model cannot start at zero terminal SNR (sigma = inf); "
            "use prediction_type='v' (Lin et al. 2024) or spacing='leading'"
        )


@torch.no_grad()
def sample(
    model: NetworkFn,
    schedule: NoiseSchedule,
    shape_or_xT: tuple[int, ...] | torch.Size | Tensor,
    *,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    prediction_type: PredictionType = "eps",
    spacing: Spacing | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    cond: dict | None = None,
    uncond: dict | None = None,
    guidance_scale: float = 1.0,
    guidance_rescale: float = 0.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    **sampler_options,
) -> Tensor:
    """Draw samples from a VP network in one call; returns x0-space samples shaped like x_T.

    Args:
        model: network `model(x_t, t, **cond)` predicting `prediction_type` ("eps", "x0", "v").
        schedule: the schedule the network was trained with.
        shape_or_xT: a shape (x_T ~ N(0, I) is drawn with `generator` on `device` in `dtype`)
            or x_T itself (its device and dtype are used). x_T is the VP start; it enters the
            VE samplers as x_T * sqrt(1 + sigmas[0]^2), or unchanged when sigmas[0] = inf
            (zero terminal SNR, where the VE state is the VP noise; see `denoiser.py`).
        sampler: a key of SAMPLERS. steps: number of sampler steps (denoiser calls for most).
        spacing: "leading", "trailing", "linspace" or "karras"; None = DEFAULT_SPACING[sampler].
        cond: keyword arguments for the network (e.g. class_labels, context).
        uncond, guidance_scale: with `uncond` given, classifier-free guidance of scale
            `guidance_scale` between `cond` and `uncond` (see guidance.py); `guidance_rescale`
            in [0, 1] pulls a high scale's output std back toward the conditional one.
        sampler_options: passed to the sampler (eta, variance, s_churn, n_corrector, ...).

    The same as `run_sampler(make_denoiser(...), x_T, get_sigmas(...))`.
    """
    check_sampler(sampler)
    spacing = DEFAULT_SPACING[sampler] if spacing is None else spacing
    sigmas = get_sigmas(schedule, steps, spacing)
    check_start(sigmas, prediction_type)
    if isinstance(shape_or_xT, Tensor):
        x_T = shape_or_xT
    else:
        # draw on the generator's device (a CPU generator gives the same x_T on any device)
        draw_on = generator.device if generator is not None else device
        x_T = torch.randn(tuple(shape_or_xT), generator=generator, device=draw_on, dtype=dtype)
        x_T = x_T.to(device)
    denoise = make_denoiser(
        model, schedule, prediction_type, cond=cond, uncond=uncond,
        guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
    )  # fmt: skip
    return run_sampler(
        denoise, x_T, sigmas, sampler=sampler, generator=generator, callback=callback,
        **sampler_options,
    )  # fmt: skip


class NonFiniteSampleError(ValueError):
    """A sampler's state became NaN or inf: its images would be garbage."""


def _require_finite(x: Tensor, sampler: str, i: int, steps: int, sigma: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteSampleError(
            f"sampler {sampler} produced non-finite values (NaN or inf) at step {i + 1} of "
            f"{steps} (sigma {float(sigma):.4g}); the model diverges there: check its weights, "
            "or lower the guidance scale"
        )


def _stop_if_not_finite(callback: Callback | None, sampler: str, steps: int) -> Callback:
    """A callback that raises NonFiniteSampleError, naming the sampler and the step, as soon as
    the state is not finite, then calls `callback`. One reduction per step: cheap beside the
    network call, and it stops a diverging run at once rather than after its last step."""

    def check(i: int, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor | None:
        _require_finite(x, sampler, i, steps, sigma)
        return None if callback is None else callback(i, x, sigma, x0)

    return check
