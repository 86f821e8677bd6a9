"""The training objective of a discrete VP diffusion: the (weighted) simple loss and the
sampling of training timesteps / noise levels.

Papers: Ho et al. 2020 (DDPM), Alg. 1 and eq. 14 (L_simple); Hang et al. 2023 (min-SNR-gamma
weighting); Kingma et al. 2021 (VDM, low-discrepancy timesteps); Karras et al. 2022 (EDM),
Table 1 (log-normal noise levels); Esser et al. 2024 (SD3, logit-normal timesteps).

Contents:
    training_loss                 what the trainer calls: draw t and eps, noise x0, the loss
    diffusion_loss, loss_weights  the per-sample MSE and its weights (min-SNR, eps-equivalent)
    sample_timesteps              training steps t: uniform or stratified
    sample_log_sigmas             continuous noise levels (EDM / SD3), for a continuous-time
                                  trainer; ldmkit's discrete trainer does not use them yet

The variational bound (and the hybrid loss of learned variances) is in
`ldmkit.diffusion.likelihood`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ldmkit.diffusion.process import (
    PredictionType,
    add_noise,
    check_prediction_type,
    check_same_shape,
    check_timesteps,
    target_for,
)
from ldmkit.diffusion.schedules import NoiseSchedule

Weighting = Literal["none", "min_snr", "eps_equivalent"]
WEIGHTINGS: tuple[str, ...] = ("none", "min_snr", "eps_equivalent")


def _mean_per_sample(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).mean(dim=1)  # (B,)


# ---------------------------------------------------------------- the simple loss and its weights


def diffusion_loss(
    model_output: Tensor,
    target: Tensor,
    weights: Tensor | None = None,
    *,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Per-sample MSE (mean over non-batch dims), times weights (B,), then averaged over the batch.

    With target = eps and no weights this is L_simple (Ho 2020 eq. 14). reduction="none" returns the
    weighted per-sample losses (B,), e.g. for `LossAwareSampler.update`.
    """
    check_same_shape(model_output=model_output, target=target)
    per_sample = _mean_per_sample((model_output - target) ** 2)  # (B,)
    if weights is not None:
        if weights.shape != per_sample.shape:
            raise ValueError(
                f"weights must have shape ({per_sample.shape[0]},), one per sample, "
                f"got {tuple(weights.shape)}"
            )
        per_sample = per_sample * weights.to(per_sample.dtype)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"unknown reduction {reduction!r}; use 'mean' or 'none'")


def loss_weights(
    schedule: NoiseSchedule,
    t: Tensor,
    prediction_type: PredictionType,
    weighting: Weighting = "none",
    gamma: float = 5.0,
) -> Tensor:
    """Per-sample weights (B,) for `diffusion_loss`, float32 on t's device.

    "none": 1.
    "min_snr": min-SNR-gamma (Hang et al. 2023, Sec. 3.4): the x0-space weight
        min(snr, gamma), carried to each target's scale: eps min(snr, gamma) / snr,
        x0 min(snr, gamma), v min(snr, gamma) / (snr + 1).
    "eps_equivalent": puts an x0 or v loss on the eps loss's scale, since for the same prediction
        error |x0 err|^2 = |eps err|^2 / snr and |v err|^2 = |eps err|^2 / alpha_bar:
        eps 1, x0 snr, v snr / (snr + 1) = alpha_bar.
    """
    check_prediction_type(prediction_type)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; use one of {', '.join(WEIGHTINGS)}")
    check_timesteps(schedule, t)
    ab = schedule.alphas_cumprod[t.cpu()]  # (B,) float64
    r = ab / (1 - ab)  # snr
    if weighting == "none":
        w = torch.ones_like(r)
    elif weighting == "min_snr":
        x0_weight = r.clamp(max=gamma)  # Hang 2023 Sec. 3.4
        if prediction_type == "eps":
            w = (gamma / r).clamp(max=1.0)  # min(snr, gamma) / snr, = 1 at snr = 0
        elif prediction_type == "x0":
            w = x0_weight
        else:
            w = x0_weight / (r + 1)
    else:
        w = {"eps": torch.ones_like(r), "x0": r, "v": ab}[prediction_type]
    return w.to(device=t.device, dtype=torch.float32)


def training_loss(
    model: Callable[..., Tensor],
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    prediction_type: PredictionType,
    weighting: Weighting = "none",
    gamma: float = 5.0,
    generator: torch.Generator | None = None,
    cond: dict | Callable[[], dict] | None = None,
    timesteps: Literal["uniform", "stratified"] = "uniform",
    t: Tensor | None = None,
    eps: Tensor | None = None,
) -> Tensor:
    """The loss ldmkit trains a diffusion network with: draw t and eps, noise x0, weight the MSE.

        t ~ U{0, .., T-1},  eps ~ N(0, I),  x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) eps
        loss = mean_b  w(t_b) * mean |model(x_t, t) - target(x0, eps, t)|^2      Ho 2020 Alg. 1

    The target is eps, x0 or v (`prediction_type`), w is `loss_weights(weighting)`.
    t and eps are drawn on the generator's device (the CPU by default), in that order, then
    moved to x0's device, so a seeded run draws the same numbers on any device. `cond` holds
    the network's condition kwargs, or a function returning them: it is called after t and eps
    are drawn, so a condition dropout that draws from the same generator comes third. A `t`
    (long (B,)) or `eps` (x0's shape) that is given is used instead of a draw: the trainer draws
    them per sample (`ldmkit.training.step.MicroBatch`), so that a sample's noise does not
    depend on how a batch is split over processes.

    Returns:
        The scalar loss, float32 (the prediction is upcast, e.g. after bf16 autocast).
    """
    b = x0.shape[0]
    if t is None:
        t = sample_timesteps(b, schedule.num_timesteps, generator=generator, method=timesteps)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=t.device, dtype=x0.dtype)
    check_same_shape(x0=x0, eps=eps)
    kwargs = cond() if callable(cond) else (cond or {})
    t, eps = t.to(x0.device), eps.to(device=x0.device, dtype=x0.dtype)
    x_t = add_noise(schedule, x0, eps, t)
    prediction = model(x_t, t, **kwargs).float()
    target = target_for(prediction_type, x0, eps, schedule, t)
    weights = loss_weights(schedule, t, prediction_type, weighting=weighting, gamma=gamma)
    return diffusion_loss(prediction, target, weights)


# ---------------------------------------------------------------- sampling t and sigma


def sample_timesteps(
    batch: int,
    num_timesteps: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    method: Literal["uniform", "stratified"] = "uniform",
    positions: Tensor | None = None,
) -> Tensor:
    """Training steps t, long (batch,), on device.

    "uniform": i.i.d. uniform on [0, T) (Ho 2020 Alg. 1).
    "stratified": one shared uniform offset u, t_i = floor(T * ((u + i / batch) mod 1)), the
        low-discrepancy sampler of Kingma et al. 2021 (VDM): same marginal, less
        variance in the batch loss. `positions` (long (b,)) returns only the t_i of those places
        i of the batch (one process's share of it; same generator state, same u).
    """
    if batch < 1 or num_timesteps < 1:
        raise ValueError(f"batch and num_timesteps must be >= 1, got {batch} and {num_timesteps}")
    gen_device = generator.device if generator is not None else device
    if method == "uniform":
        t = torch.randint(0, num_timesteps, (batch,), generator=generator, device=gen_device)
    elif method == "stratified":
        u = torch.rand((), generator=generator, device=gen_device, dtype=torch.float64)
        i = torch.arange(batch) if positions is None else positions
        grid = i.to(device=gen_device, dtype=torch.float64) / batch
        t = (((u + grid) % 1.0) * num_timesteps).long().clamp(max=num_timesteps - 1)
    else:
        raise ValueError(f"unknown method {method!r}; use 'uniform' or 'stratified'")
    return t.to(device)


def sample_log_sigmas(
    batch: int,
    *,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """ln sigma ~ N(p_mean, p_std^2), (batch,): the continuous-time training noise levels.

    Defaults are EDM's (Karras 2022, Table 1: P_mean = -1.2, P_std = 1.2). With p_mean = 0,
    p_std = 1 this is SD3's logit-normal t (Esser 2024, Sec. 3.1): for x_t = (1 - t) x0 + t eps,
    x_t / (1 - t) = x0 + sigma eps with ln sigma = logit(t). A VP network on integer steps takes
    t = schedule.sigma_to_t(log_sigmas.exp()).
    """
    if p_std <= 0:
        raise ValueError(f"p_std must be > 0, got {p_std}")
    gen_device = generator.device if generator is not None else device
    z = torch.randn((batch,), generator=generator, device=gen_device, dtype=dtype)
    return (p_mean + p_std * z).to(device)  # Karras 2022 Table 1, "ln(sigma) ~ N(P_mean, P_std^2)"
