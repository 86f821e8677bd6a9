"""Progressive distillation's targets (diffusion/distillation.py) against independent paths:
two steps of ldmkit's own DDIM sampler (the VE code of samplers.py), the analytic target of an
exact teacher, and the order of the intermediate steps."""

import math

import pytest
import torch

from ldmkit.diffusion import distillation as pd
from ldmkit.diffusion.process import add_noise, predict_x0
from ldmkit.diffusion.samplers import get_sigmas, get_timesteps, make_denoiser, sample_ddim
from ldmkit.diffusion.schedules import make_schedule

T = 1000


def net(x_t, t):
    """A fixed nonlinear v-network (a stand-in teacher): depends on x_t and t."""
    tt = t.to(torch.float64).reshape(-1, 1, 1, 1) / T
    return (torch.tanh(1.3 * x_t) * (0.4 + tt) + 0.2 * torch.sin(3 * tt) - 0.1 * x_t).to(x_t.dtype)


def teacher_x(schedule):
    return lambda z, t: predict_x0(schedule, z, t, net(z, t), "v")


@pytest.mark.parametrize("schedule_name", ["cosine", "linear"])
@pytest.mark.parametrize("N", [2, 8, 64])
def test_the_trailing_grid_is_the_samplers_and_nests(schedule_name, N):
    g = pd.trailing_grid(T, N)
    assert torch.equal(g[:-1], get_timesteps(T, N, "trailing")) and g[-1] == -1
    half = pd.trailing_grid(T, N // 2)
    assert torch.equal(g[::2], half)  # the student's grid is every other teacher step


def test_intermediate_times_come_in_order():
    g = pd.trailing_grid(T, 8)
    j = torch.arange(4)
    t, t_mid, t_next = pd.teacher_times(g, j)
    assert torch.all(t > t_mid) and torch.all(t_mid > t_next)
    assert t.tolist() == [999, 749, 499, 249] and t_mid.tolist() == [874, 624, 374, 124]
    assert t_next.tolist() == [749, 499, 249, -1]
    s = make_schedule("cosine", T)
    z = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="noisier first"):  # the swapped order of PR #1010
        pd.teacher_two_steps(teacher_x(s), s, z, t, t_next, t_mid)


@pytest.mark.parametrize("schedule_name", ["cosine", "linear"])
@pytest.mark.parametrize("j", [0, 1, 3])
def test_two_teacher_steps_equal_ldmkits_ddim_sampler(schedule_name, j):
    """The teacher's two VP steps against samplers.sample_ddim (VE state, sigmas) on the same
    network: the state after its second step, brought back to VP."""
    s = make_schedule(schedule_name, T)
    N = 8
    g = pd.trailing_grid(T, N)
    torch.manual_seed(j)
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    jj = torch.full((3,), j)
    t, t_mid, t_next = pd.teacher_times(g, jj)
    z = add_noise(s, x0, torch.randn_like(x0), t)
    ours = pd.teacher_two_steps(teacher_x(s), s, z, t, t_mid, t_next)

    sigmas = get_sigmas(s, N, "trailing")[2 * j :]  # the tail from t: ..., ending in 0
    denoise = make_denoiser(net, s, "v")
    seen = {}

    def grab(i, x, sigma, x0_pred):
        seen[i] = (x.clone(), float(sigma))

    sample_ddim(denoise, z * math.sqrt(1 + sigmas[0].item() ** 2), sigmas, callback=grab)
    x_ve, sigma = seen[1]
    theirs = x_ve / math.sqrt(1 + sigma**2)  # VE -> VP
    assert torch.allclose(ours, theirs, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("j", [0, 2, 3])
def test_one_ddim_step_with_the_target_lands_on_the_teacher(j):
    """Line 10 of Algorithm 2: x_tilde's single DDIM step (ldmkit's sampler) from t reaches
    the teacher's two-step state at t''."""
    s = make_schedule("cosine", T)
    g = pd.trailing_grid(T, 8)
    torch.manual_seed(1)
    x0 = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    jj = torch.full((2,), j)
    t, t_mid, t_next = pd.teacher_times(g, jj)
    z = add_noise(s, x0, torch.randn_like(x0), t)
    z2 = pd.teacher_two_steps(teacher_x(s), s, z, t, t_mid, t_next)
    _, x_tilde = pd.distillation_target(teacher_x(s), s, z, g, jj)

    sig = get_sigmas(s, 4, "trailing")[j:]  # the student's grid from its step j
    seen = {}

    def grab(i, x, sigma, x0_pred):
        seen[i] = (x.clone(), float(sigma))  # returns None: the state goes on unchanged

    sample_ddim(lambda x, sigma: x_tilde, z * math.sqrt(1 + sig[0].item() ** 2), sig, callback=grab)
    x_ve, sigma = seen[0]
    assert torch.allclose(x_ve / math.sqrt(1 + sigma**2), z2, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("j", [0, 1, 3])
def test_an_exact_teacher_of_one_point_gives_that_point(j):
    """Data of one point x*: the exact x-prediction is x* at every (z, t), so every DDIM path
    stays on the line to x* and the target is x* itself."""
    s = make_schedule("cosine", T)
    g = pd.trailing_grid(T, 8)
    x_star = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    teacher = lambda z, t: x_star.expand_as(z)  # noqa: E731
    z = torch.randn(5, 2, 4, 4, dtype=torch.float64)  # any state, not only noised x*
    _, x_tilde = pd.distillation_target(teacher, s, z, g, torch.full((5,), j))
    assert torch.allclose(x_tilde, x_star.expand_as(z), atol=1e-8)


def test_a_two_point_teacher_gives_a_target_that_is_not_its_own_prediction():
    """With data at +-1 the exact denoiser is tanh(a z / s^2) (one dimension): the target
    differs from the teacher's x-prediction at t: the two steps carry information one step
    with the teacher's own prediction misses."""
    s = make_schedule("cosine", T)

    def exact(z, t):
        a, sg = pd.coefficients(s, t, z)
        return torch.tanh(a * z / sg**2)

    g = pd.trailing_grid(T, 8)
    z = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(9, 1, 1, 1)
    jj = torch.full((9,), 1)
    t, x_tilde = pd.distillation_target(exact, s, z, g, jj)
    assert (x_tilde - exact(z, t)).abs().max() > 1e-3
    # and x_tilde is no mere rescaling of the state: an odd function of z, like the teacher
    assert torch.allclose(x_tilde, -x_tilde.flip(0), atol=1e-9)


def test_loss_weights():
    s = make_schedule("cosine", T)
    t = torch.tensor([0, 500, 999])
    w = pd.loss_weights(s, t, "truncated-snr")
    ab = s.alphas_cumprod[t]
    snr = ab / (1 - ab)
    assert torch.allclose(w, torch.maximum(snr, torch.ones_like(snr)) / (1 + snr))
    assert torch.all(pd.loss_weights(s, t, "snr+1") == 1)
    with pytest.raises(ValueError, match="unknown weighting"):
        pd.loss_weights(s, t, "min-snr")


def test_the_v_loss_weight_is_the_x_loss():
    """max(SNR, 1) |x - x_hat|^2 = loss on v with the weight: checked on random tensors."""
    s = make_schedule("cosine", T)
    t = torch.tensor([10, 300, 990])
    z = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    x_tilde = torch.randn_like(z)
    v_pred = torch.randn_like(z)
    x_pred = predict_x0(s, z, t, v_pred, "v")
    ab = s.alphas_cumprod[t]
    snr = (ab / (1 - ab)).clamp(min=1)
    want = (snr * (x_pred - x_tilde).square().flatten(1).mean(1)).mean()
    got = pd.distillation_loss(v_pred, z, t, x_tilde, s, "truncated-snr")
    assert torch.allclose(got.double(), want, rtol=1e-5)
