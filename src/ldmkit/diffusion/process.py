"""The forward process q of a discrete VP diffusion, its posterior, and the eps / x0 / v parameterizations.

Papers: Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM);
Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models";
Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models" (v).

Notation (t is an integer step 0 .. T-1, Ho's t - 1: our x_t at t = 0 is Ho's x_1):

    a_t          sqrt(alpha_bar_t)                 (alpha_t in Salimans & Ho)
    s_t          sqrt(1 - alpha_bar_t)             (sigma_t in Salimans & Ho; not the VE sigma)
    x_t          a_t x0 + s_t eps,  eps ~ N(0, I)                      Ho 2020 eq. 4
    v            a_t eps - s_t x0                                      Salimans & Ho 2022 Sec. 4
    snr_t        a_t^2 / s_t^2 = alpha_bar_t / (1 - alpha_bar_t)
    alpha_bar_{t-1}  with alpha_bar_{-1} = 1, so "x_{-1}" is the data x0
    beta_tilde_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t    Ho 2020 eq. 7
    mu_tilde_t   posterior mean of q(x_{t-1} | x_t, x0)               Ho 2020 eq. 7

Tensors x0, x_t, eps, v have shape (B, ...) and t is a long tensor of shape (B,). Coefficients are
computed in float64 from the schedule and cast to the data's dtype and device by `extract`.
Nothing here changes a caller's tensor in place.

Contents:
    add_noise, snr                          the forward process q(x_t | x0)
    posterior_mean_variance                 q(x_{t-1} | x_t, x0), with the "small" / "large" choice
    predict_x0, predict_eps, predict_v      exact conversions among the three parameterizations
    target_for                              the regression target of each parameterization
    extract, check_*                        the coefficient gather and input checks, shared with
                                            `ldmkit.diffusion.losses` (the ELBO, the training
                                            losses and their weights, timestep sampling)

At a zero-terminal-SNR step (alpha_bar = 0) x0 cannot be recovered from eps: `predict_x0` with
prediction_type="eps" returns inf/nan there. Use v-prediction with such schedules.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ldmkit.diffusion.schedules import NoiseSchedule

PredictionType = Literal["eps", "x0", "v"]
PREDICTION_TYPES: tuple[str, ...] = ("eps", "x0", "v")
PosteriorVariance = Literal["small", "large"]


def check_prediction_type(prediction_type: str) -> None:
    """Raise ValueError unless prediction_type is one of "eps", "x0", "v"."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}"
        )


def check_timesteps(schedule: NoiseSchedule, t: Tensor, batch: int | None = None) -> None:
    """Raise ValueError unless t is an integer tensor of shape (batch,) with values in [0, T)."""
    if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError("t must be an integer (long) tensor of steps; use torch.long, not floats")
    if t.ndim != 1 or (batch is not None and t.shape[0] != batch):
        want = f"({batch},)" if batch is not None else "(B,)"
        raise ValueError(
            f"t must have shape {want}, one step per sample, got {tuple(t.shape)}; "
            "expand a scalar step with t.expand(B)"
        )
    T = schedule.num_timesteps
    # t.min() / t.max() are a CPU-GPU sync point; cheap next to a network call.
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= T):
        raise ValueError(
            f"t must lie in [0, {T}) for this schedule, got values in "
            f"[{int(t.min())}, {int(t.max())}]; steps are 0-based"
        )


def check_same_shape(**tensors: Tensor) -> None:
    """Raise ValueError unless every tensor given by keyword has the same shape."""
    shapes = {name: tuple(x.shape) for name, x in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listed}; pass tensors of the same shape")


def extract(coef: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """coef[t] as (B, 1, ..., 1), cast to like's dtype and device so it broadcasts against like.

    coef is a 1-D float64 CPU tensor of length T. The gather happens on the CPU in float64 so that
    devices without float64 (MPS) still work; only the (B,) result moves.
    """
    values = coef[t.cpu()]  # (B,) float64
    values = values.to(device=like.device, dtype=like.dtype)
    return values.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)


def snr(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), as float64 (B,) on t's device."""
    check_timesteps(schedule, t)
    ab = schedule.alphas_cumprod
    return (ab / (1 - ab))[t.cpu()].to(t.device)


def add_noise(schedule: NoiseSchedule, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """Sample q(x_t | x0) in closed form: x_t = a_t x0 + s_t eps (Ho 2020 eq. 4)."""
    check_same_shape(x0=x0, eps=eps)
    check_timesteps(schedule, t, x0.shape[0])
    a = extract(schedule.sqrt_alphas_cumprod, t, x0)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0)
    return a * x0 + s * eps  # Ho 2020 eq. 4


def _posterior_variance(schedule: NoiseSchedule) -> Tensor:
    """beta_tilde_t for every t (float64 (T,)); beta_tilde_0 = 0 since alpha_bar_{-1} = 1."""
    ab, ab_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    return (1 - ab_prev) / (1 - ab) * schedule.betas  # Ho 2020 eq. 7


def posterior_log_variance_table(schedule: NoiseSchedule, variance: PosteriorVariance) -> Tensor:
    """log of the reverse-step variance for every t (float64 (T,)), with t = 0 clipped.

    "small": log beta_tilde_t. beta_tilde_0 = 0, so t = 0 uses log beta_tilde_1 (Ho 2020 and
    Nichol & Dhariwal 2021 code: "log calculation clipped because the posterior variance is 0 at
    the beginning of the diffusion chain").
    "large": log beta_t for t >= 1 and, like Nichol & Dhariwal's code, log beta_tilde_1 at t = 0.
    The t = 0 value only sets the width of the decoder L_0; a sampler adds no noise at t = 0.
    """
    beta_tilde = _posterior_variance(schedule)
    if variance == "small":
        return torch.cat([beta_tilde[1:2], beta_tilde[1:]]).log()
    if variance == "large":
        return torch.cat([beta_tilde[1:2], schedule.betas[1:]]).log()
    raise ValueError(f"unknown variance {variance!r}; use 'small' (beta_tilde) or 'large' (beta)")


def posterior_mean_variance(
    schedule: NoiseSchedule,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    variance: PosteriorVariance = "small",
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, variance and log-variance of q(x_{t-1} | x_t, x0) (Ho 2020 eqs. 6-7).

    The mean mu_tilde_t does not depend on the variance choice. The variance is
    "small": beta_tilde_t, the true posterior variance (0 at t = 0, where x_{-1} = x0 exactly), or
    "large": beta_t (Ho 2020 Sec. 3.2, the other fixed choice of Sigma_theta).
    log_variance is `posterior_log_variance_table(schedule, variance)[t]`, finite at t = 0; for
    "small", variance and exp(log_variance) differ at t = 0 only. For "large", variance at t = 0 is
    beta_tilde_1, matching log_variance (Nichol & Dhariwal 2021 code).

    Returns:
        (mean, variance, log_variance): mean has x0's shape, the other two are (B, 1, ..., 1).
    """
    check_same_shape(x0=x0, x_t=x_t)
    check_timesteps(schedule, t, x0.shape[0])
    ab, ab_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    coef_x0 = ab_prev.sqrt() * schedule.betas / (1 - ab)  # Ho 2020 eq. 7
    coef_xt = schedule.alphas.sqrt() * (1 - ab_prev) / (1 - ab)  # Ho 2020 eq. 7
    mean = extract(coef_x0, t, x0) * x0 + extract(coef_xt, t, x_t) * x_t
    log_table = posterior_log_variance_table(schedule, variance)
    if variance == "small":
        var_table = _posterior_variance(schedule)
    else:
        var_table = log_table.exp()
    return mean, extract(var_table, t, x0), extract(log_table, t, x0)


def _coefs(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(a_t, s_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) as (B, 1, ..., 1) tensors."""
    a = extract(schedule.sqrt_alphas_cumprod, t, like)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, like)
    return a, s


def _check_conversion(
    schedule: NoiseSchedule, x_t: Tensor, t: Tensor, pred: Tensor, prediction_type: str
) -> None:
    check_prediction_type(prediction_type)
    check_same_shape(x_t=x_t, pred=pred)
    check_timesteps(schedule, t, x_t.shape[0])


def predict_x0(
    schedule: NoiseSchedule, x_t: Tensor, t: Tensor, pred: Tensor, prediction_type: PredictionType
) -> Tensor:
    """x0 implied by a prediction of type prediction_type at (x_t, t)."""
    _check_conversion(schedule, x_t, t, pred, prediction_type)
    a, s = _coefs(schedule, t, x_t)
    if prediction_type == "eps":
        return (x_t - s * pred) / a  # Ho 2020 eq. 4 solved for x0
    if prediction_type == "v":
        return a * x_t - s * pred  # Salimans & Ho 2022 Sec. 4: x = alpha z - sigma v
    return pred


def predict_eps(
    schedule: NoiseSchedule, x_t: Tensor, t: Tensor, pred: Tensor, prediction_type: PredictionType
) -> Tensor:
    """eps implied by a prediction of type prediction_type at (x_t, t)."""
    _check_conversion(schedule, x_t, t, pred, prediction_type)
    a, s = _coefs(schedule, t, x_t)
    if prediction_type == "x0":
        return (x_t - a * pred) / s  # Ho 2020 eq. 4 solved for eps
    if prediction_type == "v":
        return s * x_t + a * pred  # Salimans & Ho 2022 Sec. 4: eps = sigma z + alpha v
    return pred


def predict_v(
    schedule: NoiseSchedule, x_t: Tensor, t: Tensor, pred: Tensor, prediction_type: PredictionType
) -> Tensor:
    """v implied by a prediction of type prediction_type at (x_t, t)."""
    _check_conversion(schedule, x_t, t, pred, prediction_type)
    a, s = _coefs(schedule, t, x_t)
    # v = a eps - s x0 with x_t = a x0 + s eps and a^2 + s^2 = 1:
    if prediction_type == "eps":
        return (pred - s * x_t) / a
    if prediction_type == "x0":
        return (a * x_t - pred) / s
    return pred


def target_for(
    prediction_type: PredictionType,
    x0: Tensor,
    eps: Tensor,
    schedule: NoiseSchedule | None = None,
    t: Tensor | None = None,
) -> Tensor:
    """The regression target of a network that predicts prediction_type.

    schedule and t are needed for "v" only: v = a_t eps - s_t x0 (Salimans & Ho 2022 Sec. 4).
    """
    check_prediction_type(prediction_type)
    check_same_shape(x0=x0, eps=eps)
    if prediction_type == "eps":
        return eps
    if prediction_type == "x0":
        return x0
    if schedule is None or t is None:
        raise ValueError("the v target depends on t; pass schedule and t to target_for")
    check_timesteps(schedule, t, x0.shape[0])
    a, s = _coefs(schedule, t, x0)
    return a * eps - s * x0  # Salimans & Ho 2022 Sec. 4
