"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2) as plain tensor functions of a schedule.

A student learns to take ONE deterministic DDIM step where its teacher takes TWO. With the
teacher sampling on N steps, the student samples on N/2; the student then becomes the teacher
and the count halves again.

Notation (VP, as in `process.py`; Salimans & Ho's alpha_t, sigma_t are our a_t, s_t):

    z_t      a_t x + s_t eps                         the VP state at integer step t
    x_hat    the teacher's x-prediction at (z_t, t) (guided: x_u + w (x_c - x_u))
    DDIM     z_s = a_s x_hat + s_s (z_t - a_t x_hat) / s_t          (eta = 0, Song 2021 eq. 12)

Steps: ldmkit samples on discrete steps t in [0, T); DDIM's default spacing here is "trailing"
(`samplers.get_timesteps`), whose grids nest: the grid of n steps is every other step of the
grid of 2n steps (both round T - i T / (2n) for even i), and both end at the data (step -1,
a = 1, s = 0). For a student step j of n = N/2 (from t = g_N[2j] to g_N[2j + 2]), the teacher
takes g_N[2j] -> g_N[2j + 1] -> g_N[2j + 2]: first the NOISIER intermediate step, then the
less noisy one (diffusers PR #1010 had the two swapped).

The target (Algorithm 2): the x that makes ONE DDIM step from (z_t, t) land on the teacher's
z_t'' after its two steps,

    x_tilde = (z_t'' - (s_t'' / s_t) z_t) / (a_t'' - (s_t'' / s_t) a_t).

A student that predicts v (ldmkit's default) regresses v_tilde = (a_t z_t - x_tilde) / s_t.
The loss weight is Salimans & Ho's "truncated SNR" max(SNR_t, 1) on the x error (their eq. 10
variant), or "snr+1" (= the plain v MSE); with x = a z - s v, |x - x_hat|^2 = s^2 |v - v_hat|^2.
eps-prediction is not distilled: x = (z - s eps) / a blows up the target's error at high noise
(the paper, Sec. 4), so the fronts refuse eps runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ldmkit.diffusion.process import extract
from ldmkit.diffusion.schedules import NoiseSchedule

# A teacher in VP terms: x_hat(z_t, t) -> its (guided) x-prediction, t long (B,), t >= 0.
XPredictor = Callable[[Tensor, Tensor], Tensor]

WEIGHTINGS: tuple[str, ...] = ("truncated-snr", "snr+1")


def trailing_grid(num_timesteps: int, steps: int) -> Tensor:
    """The DDIM grid of `steps` steps (long, (steps + 1,)): the trailing spacing's steps,
    descending, then -1 (the data: a = 1, s = 0). Equal to `samplers.get_timesteps(T, steps,
    "trailing")` with -1 appended (a test keeps them equal)."""
    T, n = num_timesteps, steps
    if not 1 <= n <= T:
        raise ValueError(f"steps must be in [1, {T}] for a {T}-step schedule, got {n}")
    t = (T - torch.arange(n, dtype=torch.float64) * (T / n)).round() - 1
    return torch.cat([t.long(), torch.tensor([-1])])


def teacher_times(grid: Tensor, j: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(t, t', t'') of student step j (long (B,)) on the teacher's grid of N steps (N + 1
    entries): t = grid[2j] > t' = grid[2j + 1] > t'' = grid[2j + 2] (t'' = -1: the data)."""
    if grid.numel() % 2 != 1:
        raise ValueError("the teacher's grid must have an even number of steps")
    if int(j.min()) < 0 or int(j.max()) >= (grid.numel() - 1) // 2:
        raise ValueError(f"student steps must lie in [0, {(grid.numel() - 1) // 2})")
    return grid[2 * j], grid[2 * j + 1], grid[2 * j + 2]


def coefficients(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(a_t, s_t) as (B, 1, ..., 1) tensors in like's dtype; t = -1 gives (1, 0) (the data)."""
    a_tab = torch.cat([schedule.sqrt_alphas_cumprod, torch.ones(1, dtype=torch.float64)])
    s_tab = torch.cat([schedule.sqrt_one_minus_alphas_cumprod, torch.zeros(1, dtype=torch.float64)])
    idx = torch.where(t < 0, schedule.num_timesteps, t)  # -1 -> the appended entry
    return extract(a_tab, idx, like), extract(s_tab, idx, like)


def ddim_step(
    schedule: NoiseSchedule, z_t: Tensor, t: Tensor, x_hat: Tensor, s_next: Tensor
) -> Tensor:
    """One deterministic DDIM step (eta = 0) from (z_t, t) to step `s_next` (-1: the data),
    given the x-prediction x_hat: a_s x_hat + s_s (z_t - a_t x_hat) / s_t."""
    a, s = coefficients(schedule, t, z_t)
    a_n, s_n = coefficients(schedule, s_next, z_t)
    eps = (z_t - a * x_hat) / s
    return a_n * x_hat + s_n * eps


@torch.no_grad()
def teacher_two_steps(
    teacher: XPredictor, schedule: NoiseSchedule, z_t: Tensor, t: Tensor, t_mid: Tensor,
    t_next: Tensor,
) -> Tensor:  # fmt: skip
    """The teacher's state at t'' after two DDIM steps t -> t' -> t'' (Algorithm 2, lines 6-9)."""
    if not (torch.all(t > t_mid) and torch.all(t_mid > t_next)):
        raise ValueError("the teacher's steps must go down: t > t' > t'' (noisier first)")
    z_mid = ddim_step(schedule, z_t, t, teacher(z_t, t), t_mid)
    return ddim_step(schedule, z_mid, t_mid, teacher(z_mid, t_mid), t_next)


def target_x(
    schedule: NoiseSchedule, z_t: Tensor, t: Tensor, z_next: Tensor, t_next: Tensor
) -> Tensor:
    """x_tilde: the x-prediction whose one DDIM step from (z_t, t) lands on z_next at t_next
    (Algorithm 2, line 10): (z'' - (s''/s) z) / (a'' - (s''/s) a)."""
    a, s = coefficients(schedule, t, z_t)
    a_n, s_n = coefficients(schedule, t_next, z_t)
    ratio = s_n / s
    return (z_next - ratio * z_t) / (a_n - ratio * a)


def distillation_target(
    teacher: XPredictor, schedule: NoiseSchedule, z_t: Tensor, grid: Tensor, j: Tensor
) -> tuple[Tensor, Tensor]:
    """(t, x_tilde) of student steps j (long (B,)) at states z_t (noised at t = grid[2j])."""
    t, t_mid, t_next = teacher_times(grid, j)
    z_next = teacher_two_steps(teacher, schedule, z_t, t, t_mid, t_next)
    return t, target_x(schedule, z_t, t, z_next, t_next)


def v_from_x(schedule: NoiseSchedule, z_t: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """The v that the x-prediction x implies at (z_t, t): (a z_t - x) / s."""
    a, s = coefficients(schedule, t, z_t)
    return (a * z_t - x) / s


def loss_weights(schedule: NoiseSchedule, t: Tensor, weighting: str) -> Tensor:
    """Per-sample weights (float64 (B,)) of the v MSE that give the x-space weighting:
    "truncated-snr": max(SNR, 1) |x - x_hat|^2 = max(SNR, 1) / (1 + SNR) |v - v_hat|^2;
    "snr+1": (1 + SNR) |x - x_hat|^2 = |v - v_hat|^2."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    ab = schedule.alphas_cumprod[t.cpu()]
    snr = ab / (1 - ab)
    if weighting == "snr+1":
        return torch.ones_like(snr)
    return snr.clamp(min=1.0) / (1 + snr)


def distillation_loss(
    v_pred: Tensor, z_t: Tensor, t: Tensor, x_tilde: Tensor, schedule: NoiseSchedule,
    weighting: str = "truncated-snr",
) -> Tensor:  # fmt: skip
    """The student's weighted v MSE against the target x_tilde (mean over the batch)."""
    v_tilde = v_from_x(schedule, z_t, t, x_tilde)
    per = (v_pred.float() - v_tilde.float()).square().flatten(1).mean(1)  # (B,)
    w = loss_weights(schedule, t, weighting).to(per)
    return (w * per).mean()
