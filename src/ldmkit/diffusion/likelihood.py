"""The variational bound of a discrete VP diffusion, and what trains on it.

Papers: Ho et al. 2020 (DDPM), eq. 5 (the bound), eq. 13 (the discretized decoder);
Nichol & Dhariwal 2021 (improved DDPM), eqs. 15-16 (learned variances, hybrid loss), Sec. 3.3
(importance sampling of t).

Notation follows `ldmkit.diffusion.process`: t = 0 .. T-1 is Ho's t - 1, x_{t-1} at t = 0 is the
data x0. Naming each term by the step t whose x_t it conditions on (which gives Ho's names), the
bound is

    -log p(x0) <= L_T + sum_{t=0}^{T-1} L_t                                     Ho 2020 eq. 5
    L_T  = KL(q(x_{T-1} | x0) || N(0, I))                                      (`prior_kl`)
    L_t  = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)),  t = 1 .. T-1         (`vlb_term`)
    L_0  = -log p(x0 | x_{t=0}), a discretized Gaussian over 256 bins          (`vlb_term`, t = 0)

Contents:
    normal_kl, discretized_gaussian_log_likelihood     elementwise pieces of the bound
    prior_kl, vlb_term, nll_bits_per_dim               the bound: one term, or all of it
    model_mean_log_variance                            the model's p(x_{t-1} | x_t)
    hybrid_loss                                        L_simple + lambda L_vlb (learned variances)
    LossAwareSampler                                   importance sampling of t for L_vlb

ldmkit's trainer uses the simple loss (`ldmkit.diffusion.losses.training_loss`); this module is
for likelihood estimates (`nll_bits_per_dim`, in bits per dimension) and for models with
learned variances.

Units: `normal_kl` and `discretized_gaussian_log_likelihood` are elementwise, in nats;
`prior_kl` and `vlb_term` return nats per sample (summed over all non-batch dimensions), so terms
add up; `nll_bits_per_dim` divides the total by D ln 2 (D = values per sample); `hybrid_loss`
converts its L_vlb part to bits per dim, the scale on which Nichol & Dhariwal's lambda = 0.001 was set.

p(x_{t-1} | x_t) has mean mu_tilde_t(x_t, x0_hat) (x0_hat from the network) and a variance chosen by
`variance`: "small" (beta_tilde_t), "large" (beta_t), or "learned_range", where the network outputs
2C channels: the prediction, then v in [-1, 1] with
    log Sigma = (v + 1) / 2 * log beta_t + (1 - v) / 2 * log beta_tilde_t    Nichol & Dhariwal eq. 15
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ldmkit.diffusion.losses import diffusion_loss
from ldmkit.diffusion.process import (
    PredictionType,
    add_noise,
    check_prediction_type,
    check_same_shape,
    check_timesteps,
    extract,
    posterior_log_variance_table,
    posterior_mean_variance,
    predict_x0,
    target_for,
)
from ldmkit.diffusion.schedules import NoiseSchedule

ModelVariance = Literal["small", "large", "learned_range"]
MODEL_VARIANCES: tuple[str, ...] = ("small", "large", "learned_range")


# ---------------------------------------------------------------- Gaussian KL and the decoder


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    Arguments broadcast against each other (e.g. means (B, C, H, W), log-variances (B, 1, 1, 1)).
    """
    try:
        torch.broadcast_shapes(mean1.shape, logvar1.shape, mean2.shape, logvar2.shape)
    except RuntimeError:
        shapes = [tuple(x.shape) for x in (mean1, logvar1, mean2, logvar2)]
        raise ValueError(
            f"normal_kl arguments do not broadcast: shapes {shapes}; pass broadcastable tensors"
        ) from None
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _std_normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * torch.special.erfc(-z / math.sqrt(2))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) elementwise, in nats, for a Gaussian discretized to 256 bins on [-1, 1].

    x must lie on the 8-bit grid k / 127.5 - 1 (k = 0 .. 255). Each bin is [x - 1/255, x + 1/255],
    except that the edge bins extend to -inf (x = -1) and +inf (x = 1), so the 256 probabilities
    sum to 1 (Ho 2020 eq. 13). log_scales is log(std) and broadcasts against x. Tail masses are
    exact to float precision down to the smallest float (log P ~ -708 in float64, -87 in
    float32), and floored there.
    """
    check_same_shape(x=x, means=means)
    centered = x - means
    inv_std = torch.exp(-log_scales)
    plus_in = inv_std * (centered + 1.0 / 255.0)  # Ho 2020 eq. 13, upper bin edge
    min_in = inv_std * (centered - 1.0 / 255.0)  # lower bin edge
    # Phi(b) - Phi(a) loses every digit when both are near 1; mirror the right tail onto the left,
    # where Phi(z) = erfc(-z / sqrt 2) / 2 keeps full relative precision (torch.special.ndtr
    # does not: it goes through erf).
    right = centered > 0
    delta = torch.where(
        right,
        _std_normal_cdf(-min_in) - _std_normal_cdf(-plus_in),
        _std_normal_cdf(plus_in) - _std_normal_cdf(min_in),
    )
    log_mid = torch.log(delta.clamp(min=torch.finfo(delta.dtype).tiny))
    log_cdf_plus = torch.special.log_ndtr(plus_in)  # x = -1: P = Phi(upper edge)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)  # x = 1: P = 1 - Phi(lower edge)
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mid)
    )


def _sum_per_sample(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).sum(dim=1)  # (B,)


# ---------------------------------------------------------------- the variational bound


def prior_kl(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_{T-1} | x0) || N(0, I)) in nats per sample, (B,).

    Close to 0 when alpha_bar_{T-1} is close to 0; no network is involved, so it is a constant of
    training that only shows how well the schedule destroys the data.
    """
    t = torch.full((x0.shape[0],), schedule.num_timesteps - 1, dtype=torch.long, device=x0.device)
    mean = extract(schedule.sqrt_alphas_cumprod, t, x0) * x0  # Ho 2020 eq. 4
    logvar = extract((1 - schedule.alphas_cumprod).log(), t, x0)
    kl = normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(logvar))
    return _sum_per_sample(kl.expand_as(x0))


def model_mean_log_variance(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x_t: Tensor,
    t: Tensor,
    prediction_type: PredictionType,
    variance: ModelVariance = "small",
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and log-variance of the model's p(x_{t-1} | x_t), and its x0 estimate.

    The mean is mu_tilde_t(x_t, x0_hat) (Ho 2020 eq. 11 for eps, written through x0_hat).
    For variance="learned_range", model_output has 2C channels: the prediction, then v in [-1, 1].

    Returns:
        (mean, log_variance, x0_hat); log_variance is (B, 1, ..., 1) for fixed variances and has
        x_t's shape for "learned_range".
    """
    check_prediction_type(prediction_type)
    if variance not in MODEL_VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; use one of {', '.join(MODEL_VARIANCES)}")
    if variance == "learned_range":
        if model_output.ndim < 2 or model_output.shape[1] != 2 * x_t.shape[1]:
            raise ValueError(
                f"variance='learned_range' needs model_output with 2 * {x_t.shape[1]} channels "
                f"(prediction, then v), got shape {tuple(model_output.shape)}"
            )
        pred, v = model_output.chunk(2, dim=1)
    else:
        pred, v = model_output, None
    x0_hat = predict_x0(schedule, x_t, t, pred, prediction_type)
    mean, _, fixed_log_var = posterior_mean_variance(
        schedule, x0_hat, x_t, t, variance="large" if variance == "large" else "small"
    )
    if v is None:
        return mean, fixed_log_var, x0_hat
    min_log = extract(posterior_log_variance_table(schedule, "small"), t, x_t)  # log beta_tilde
    max_log = extract(schedule.betas.log(), t, x_t)  # log beta
    frac = (v + 1) / 2
    log_var = frac * max_log + (1 - frac) * min_log  # Nichol & Dhariwal 2021 eq. 15
    return mean, log_var, x0_hat


def vlb_term(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    prediction_type: PredictionType,
    variance: ModelVariance = "small",
) -> Tensor:
    """The bound's term L_t at each sample's step t, in nats per sample, (B,).

    For t >= 1: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) (Ho 2020 eq. 5). For t = 0: the
    decoder NLL -log p(x0 | x_t) with the discretized Gaussian (Ho 2020 eq. 13); x0 must then lie
    on the 8-bit grid in [-1, 1]. Differentiable in model_output.
    """
    check_same_shape(x0=x0, x_t=x_t)
    check_timesteps(schedule, t, x0.shape[0])
    true_mean, _, true_log_var = posterior_mean_variance(schedule, x0, x_t, t, "small")
    mean, log_var, _ = model_mean_log_variance(
        schedule, model_output, x_t, t, prediction_type, variance
    )
    kl = normal_kl(true_mean, true_log_var, mean, log_var)  # Ho 2020 eq. 5, L_t for t >= 1
    decoder_nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)  # L_0
    decoder = (t == 0).to(x0.device).reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, ..., 1)
    return _sum_per_sample(torch.where(decoder, decoder_nll, kl))


def hybrid_loss(
    schedule: NoiseSchedule,
    model_output: Tensor,
    x0: Tensor,
    eps: Tensor,
    x_t: Tensor,
    t: Tensor,
    prediction_type: PredictionType,
    *,
    lam: float = 0.001,
) -> Tensor:
    """L_hybrid = L_simple + lam * L_vlb for a learned-range model (Nichol & Dhariwal 2021 eq. 16).

    model_output has 2C channels (prediction, then v). L_simple is the MSE on the prediction.
    L_vlb = T * L_t in bits per dim estimates sum_t L_t from one uniform t, and sees the
    mean through a stop-gradient so that it trains only the variance (Sec. 3.1). With T = 1000 and
    lam = 0.001 this is the improved-DDPM code's `mse + vb`. Returns a scalar (batch mean).
    """
    if model_output.ndim < 2 or model_output.shape[1] != 2 * x0.shape[1]:
        raise ValueError(
            f"hybrid_loss needs model_output with 2 * {x0.shape[1]} channels (prediction, then v), "
            f"got shape {tuple(model_output.shape)}"
        )
    pred, v = model_output.chunk(2, dim=1)
    simple = diffusion_loss(pred, target_for(prediction_type, x0, eps, schedule, t))
    frozen = torch.cat([pred.detach(), v], dim=1)
    nats = vlb_term(schedule, frozen, x0, x_t, t, prediction_type, "learned_range")
    bits_per_dim = nats / (x0[0].numel() * math.log(2))
    return simple + lam * schedule.num_timesteps * bits_per_dim.mean()


@torch.no_grad()
def nll_bits_per_dim(
    model_fn: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    prediction_type: PredictionType,
    variance: ModelVariance = "small",
    generator: torch.Generator | None = None,
    timesteps: Tensor | int | None = None,
) -> Tensor:
    """Upper bound on -log p(x0) in bits per dim, per sample (B,): (L_T + sum_t L_t) / (D ln 2).

    Args:
        model_fn: network function model_fn(x_t, t) -> model_output (2C channels for
            variance="learned_range").
        x0: data on the 8-bit grid in [-1, 1], (B, ...).
        generator: the source of the noise eps drawn for each step (on x0's device).
        timesteps: which KL terms L_t, t in [1, T), to compute. None: all of them (the exact
            bound, up to the noise draw). A long tensor of K distinct steps in [1, T), or an int K
            to draw K such steps uniformly with generator: their sum is scaled by (T - 1) / K, an
            unbiased estimate when the steps are uniformly random. The decoder term (t = 0), which
            dominates the bound, and L_T are always computed exactly.
    """
    T = schedule.num_timesteps
    if timesteps is None:
        steps = torch.arange(1, T)
    elif isinstance(timesteps, int):
        if not 1 <= timesteps <= T - 1:
            raise ValueError(f"timesteps={timesteps} must be in [1, {T - 1}]; use None for all")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        steps = 1 + torch.randperm(T - 1, generator=generator, device=gen_device)[:timesteps].cpu()
    else:
        steps = timesteps.cpu()
        check_timesteps(schedule, steps)
        if len(steps) == 0 or int(steps.min()) < 1 or len(torch.unique(steps)) != len(steps):
            raise ValueError(
                "timesteps must hold distinct steps in [1, T); t = 0 is always included"
            )
    batch = x0.shape[0]

    def term(step: int) -> Tensor:
        t = torch.full((batch,), step, dtype=torch.long, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x_t = add_noise(schedule, x0, eps, t)
        return vlb_term(schedule, model_fn(x_t, t), x0, x_t, t, prediction_type, variance)

    kl_sum = torch.stack([term(step) for step in steps.tolist()]).sum(dim=0)  # (B,)
    total = prior_kl(schedule, x0) + term(0) + kl_sum * ((T - 1) / len(steps))
    return total / (x0[0].numel() * math.log(2))


class LossAwareSampler:
    """Importance sampling of t with p_t ~ sqrt(E[L_t^2]) (Nichol & Dhariwal 2021, Sec. 3.3).

    Keeps the last `history` losses of every step and samples uniformly until each step has them
    all; a small `uniform_prob` keeps every step reachable. `sample` returns (t, weights) with
    weights = 1 / (T p_t), so that the mean of weights * loss is unbiased for the uniform mean.
    The state is local to this process: in data-parallel training, feed it gathered losses.
    """

    def __init__(self, num_timesteps: int, *, history: int = 10, uniform_prob: float = 0.001):
        self.num_timesteps = num_timesteps
        self.uniform_prob = uniform_prob
        self._losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self._counts = torch.zeros(num_timesteps, dtype=torch.long)

    def probabilities(self) -> Tensor:
        """p_t, float64 (T,)."""
        T, history = self._losses.shape
        if not bool((self._counts == history).all()):
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        p = self._losses.pow(2).mean(dim=1).sqrt()  # Nichol & Dhariwal Sec. 3.3
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / T

    def sample(
        self,
        batch: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Steps t, long (batch,), and importance weights, float32 (batch,), on device."""
        p = self.probabilities()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-sample losses (B,) (e.g. `vlb_term` values) observed at steps t (B,)."""
        check_same_shape(t=t, losses=losses)
        history = self._losses.shape[1]
        for step, loss in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            if self._counts[step] == history:
                self._losses[step] = torch.roll(self._losses[step], -1)
                self._losses[step, -1] = loss
            else:
                self._losses[step, self._counts[step]] = loss
                self._counts[step] += 1
