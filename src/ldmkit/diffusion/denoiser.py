"""Turn a VP network (eps, x0 or v prediction at step t) into a VE denoiser D(x, sigma) -> x0.

Samplers in ldmkit work in the "variance exploding" state convention of Karras et al. 2022
(EDM): x = x0 + sigma * noise, and a *denoiser* returns its estimate of x0. Networks are trained
in the "variance preserving" convention of Ho et al. 2020 on integer steps t. This module is the
one place where the two meet (k-diffusion's `external.py` plays the same role).

Notation (Ho et al. 2020; Salimans & Ho 2022 for v; Karras et al. 2022 for c_in):

    sigma      VE noise level, sqrt((1 - alpha_bar) / alpha_bar); x = x0 + sigma * eps
    alpha      sqrt(alpha_bar) = 1 / sqrt(1 + sigma^2)       (the VP signal scale, = c_in)
    sigma_vp   sqrt(1 - alpha_bar) = 1 / sqrt(1 + 1/sigma^2) (the VP noise scale)
    x_t        alpha * x = alpha * x0 + sigma_vp * eps      (what the network sees)
    eps        x0 = x - sigma * eps                          (Ho 2020 eq. 15, in VE terms)
    v          alpha * eps - sigma_vp * x0;  x0 = alpha * x_t - sigma_vp * v   (Salimans & Ho 2022)

Zero terminal SNR (Lin et al. 2024): the last step of a rescaled schedule has alpha_bar = 0 and
sigma = inf, where the VE state x0 + sigma * eps is infinite. ldmkit's convention there: a state
at sigma = inf holds the VP value x_t = eps (the limit of alpha * x), so the network is fed x as
is. Only v- and x0-prediction can denoise there (x0 = -v at alpha = 0); eps-prediction raises.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldmkit.diffusion.process import PredictionType
from ldmkit.diffusion.schedules import NoiseSchedule

PREDICTION_TYPES: tuple[str, ...] = ("eps", "x0", "v")

# A network function model(x_t, t, **cond) -> prediction, on VP-scaled x_t and steps t (B,).
NetworkFn = Callable[..., Tensor]
# A denoiser denoise(x, sigma, **cond) -> x0, in the VE convention x = x0 + sigma * noise.
Denoiser = Callable[..., Tensor]

# sigma_to_t within this distance of an integer counts as that integer step.
_INTEGER_T_ATOL = 1e-4


def append_dims(c: Tensor, ndim: int) -> Tensor:
    """View a per-sample tensor (B,) as (B, 1, ..., 1) with `ndim` dims, to broadcast against x."""
    return c.reshape(c.shape + (1,) * (ndim - c.ndim))


def vp_coefficients(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(alpha, sigma_vp) = (1 / sqrt(1 + sigma^2), 1 / sqrt(1 + 1/sigma^2)); finite at 0 and inf."""
    sigma = sigma.to(torch.float64)
    return (1 + sigma**2).rsqrt(), (1 + sigma.pow(-2)).rsqrt()


def x0_from_eps(x: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    """x0 = x - sigma * eps (VE state x; sigma broadcastable to x). Undefined at sigma = inf."""
    if torch.isinf(sigma).any():
        raise ValueError(
            "eps-prediction cannot give x0 at sigma = inf (zero terminal SNR); "
            "use a v- or x0-prediction model, or a spacing that skips the last step"
        )
    return x - sigma.to(x.dtype) * eps


def x0_from_v(x_t: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
    """x0 = alpha * x_t - sigma_vp * v, with x_t the VP-scaled state (Salimans & Ho 2022)."""
    alpha, sigma_vp = vp_coefficients(sigma)
    return alpha.to(x_t.dtype) * x_t - sigma_vp.to(x_t.dtype) * v


class VPDenoiser:
    """Wrap a VP network `model(x_t, t, **cond)` as a denoiser `D(x, sigma, **cond) -> x0`.

    Args:
        model: network on VP-scaled x_t = x / sqrt(1 + sigma^2) and steps t (B,). t is a long
            tensor when sigma is one of `schedule.sigmas` (so a discrete time embedding sees the
            same t as with diffusers), else a float tensor in x's dtype (Karras spacing).
        schedule: the schedule the network was trained with; maps sigma to t.
        prediction_type: what the network predicts: "eps" (Ho 2020), "x0" or "v" (Salimans & Ho 2022).
    """

    def __init__(
        self, model: NetworkFn, schedule: NoiseSchedule, prediction_type: PredictionType = "eps"
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}"
            )
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Step t for each noise level (B,): long when all are discrete steps, else float64."""
        sigma = sigma.detach().to(torch.float64).cpu()
        at_inf = torch.isinf(sigma)
        if at_inf.any() and not torch.isinf(self.schedule.sigmas[-1]):
            raise ValueError(
                "sigma = inf only exists in a zero-terminal-SNR schedule; "
                "build it with make_schedule(..., zero_terminal_snr=True) or use finite sigmas"
            )
        t = self.schedule.sigma_to_t(sigma)
        t = torch.where(at_inf, float(self.schedule.num_timesteps - 1), t)
        t_int = t.round()
        if torch.all((t - t_int).abs() < _INTEGER_T_ATOL):
            return t_int.long()
        return t

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond) -> Tensor:
        """x0 estimate for VE state x (B, ...) at noise level sigma (scalar or (B,))."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if sigma.ndim > 1 or (sigma.ndim == 1 and sigma.shape != (x.shape[0],)):
            raise ValueError(
                f"sigma must be a scalar or of shape ({x.shape[0]},), got {tuple(sigma.shape)}"
            )
        t = self.sigma_to_t(sigma).to(x.device).expand(x.shape[0]).contiguous()  # (B,)
        if t.is_floating_point():
            t = t.to(x.dtype)

        sigma = append_dims(sigma.to(x.device), x.ndim) if sigma.ndim else sigma.to(x.device)
        alpha, _ = vp_coefficients(sigma)
        # At sigma = inf the state already is the VP value (see the module docstring).
        c_in = torch.where(torch.isinf(sigma), torch.ones_like(alpha), alpha)
        x_t = x * c_in.to(x.dtype)  # (B, C, H, W)
        out = self.model(x_t, t, **cond)
        if out.shape != x.shape:
            raise ValueError(
                f"the network returned shape {tuple(out.shape)} for input {tuple(x.shape)}; "
                "it must predict one tensor shaped like x"
            )
        if self.prediction_type == "x0":
            return out
        if self.prediction_type == "eps":
            return x0_from_eps(x, sigma, out)
        return x0_from_v(x_t, sigma, out)
