"""Tests of ldmkit.diffusion.samplers: against diffusers' schedulers, against exact denoisers of
Gaussian and two-Gaussian data, identities between samplers, and bad inputs.

Deliberate differences from diffusers, and how the reference tests avoid them:
- DDIMScheduler steps from t to t - T // n whatever the spacing; with "linspace" (always) and
  "trailing" when n does not divide T, that is not the next listed timestep. ldmkit steps to the
  next listed timestep. DDIM is compared on "leading" and on "trailing" with n | T; "linspace"
  is compared through DDPMScheduler, whose previous_timestep is the next listed one.
- DDPMScheduler adds noise at its last step when that step's t > 0 (trailing/linspace);
  ldmkit follows Ho 2020 Alg. 2 and adds none on the step to sigma = 0. For "fixed_small" this
  noise has std 1e-10; "fixed_large" is compared on "leading", whose last t is 0.
- Euler/Heun/DPM "linspace" in diffusers uses fractional t with sigma interpolated linearly in t;
  ldmkit's "linspace" is DDIM's (rounded integer t). They are compared on "leading"/"trailing"
  and "karras".
- DPMSolverMultistepScheduler rounds t for Karras sigmas while ldmkit feeds the fractional t
  that matches sigma; Karras DPM++ is compared with a network that ignores t.
- EulerDiscreteScheduler applies s_churn after the network call (so its churn is not Karras
  Alg. 2); only s_churn = 0 is compared.
"""

from __future__ import annotations

import math

import pytest
import torch

from ldmkit.diffusion.denoiser import VPDenoiser
from ldmkit.diffusion.samplers import (
    SAMPLERS,
    get_sigmas,
    get_timesteps,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
    sample_langevin,
)
from ldmkit.diffusion.schedules import make_schedule

T = 1000
SHAPE = (2, 1, 4, 4)
DIFFUSERS_PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


class FixedNet:
    """A random-but-fixed smooth network: tanh of a fixed linear map of x plus a term in t."""

    def __init__(self, dim: int = 16, t_dependent: bool = True, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim**0.5
        self.phase = torch.rand(dim, generator=g, dtype=torch.float64) * 2 * math.pi
        self.t_dependent = t_dependent

    def __call__(self, x_t, t, **cond):
        B = x_t.shape[0]
        t = torch.as_tensor(t).to(x_t.dtype).expand(B)[:, None]  # (B, 1)
        h = x_t.reshape(B, -1) @ self.W.to(x_t.dtype)
        if self.t_dependent:
            h = h + 0.5 * torch.sin(3 * t / T + self.phase.to(x_t.dtype))
        return torch.tanh(h).reshape(x_t.shape)


def _x_T(dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(123), dtype=dtype)


def _ve_start(x_T, sigmas):
    return x_T if torch.isinf(sigmas[0]) else x_T * math.sqrt(1 + sigmas[0].item() ** 2)


def _scheduler(cls, schedule, prediction_type, dtype=None, **kw):
    """A diffusers scheduler on ldmkit's betas; with dtype=float64 also its alphas_cumprod."""
    sched = cls(
        num_train_timesteps=schedule.num_timesteps,
        trained_betas=schedule.betas.numpy(),
        prediction_type=DIFFUSERS_PRED[prediction_type],
        **kw,
    )
    if dtype is torch.float64:
        sched.alphas_cumprod = schedule.alphas_cumprod.clone()
    return sched


# ----------------------------------------------------------------------------------------------
# Noise levels


@pytest.mark.reference
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers_ddim(spacing):
    diffusers = pytest.importorskip("diffusers")
    for num_train, steps in [(1000, 1), (1000, 3), (1000, 7), (1000, 50), (1000, 999), (37, 5)]:
        sched = diffusers.DDIMScheduler(num_train_timesteps=num_train, timestep_spacing=spacing)
        sched.set_timesteps(steps)
        assert torch.equal(get_timesteps(num_train, steps, spacing), sched.timesteps), steps


def test_get_sigmas_discrete_and_karras():
    schedule = make_schedule("linear", T)
    sigmas = get_sigmas(schedule, 10, "trailing")
    assert sigmas.dtype == torch.float64 and sigmas.shape == (11,) and sigmas[-1] == 0
    assert torch.equal(sigmas[:-1], schedule.sigmas[get_timesteps(T, 10, "trailing")])
    assert sigmas[0] == schedule.sigmas[-1]  # trailing starts at t = T - 1
    k = get_sigmas(schedule, 10, "karras", rho=7.0)
    assert torch.isclose(k[0], schedule.sigmas[-1]) and torch.isclose(k[-2], schedule.sigmas[0])
    # Karras eq. 5: sigma^(1/rho) is linear in i
    root = k[:-1] ** (1 / 7)
    assert torch.allclose(root.diff(), root.diff()[0].expand(9), rtol=1e-10)
    assert torch.all(k[:-1] > k[1:])
    # full chain: every step once
    assert torch.equal(get_timesteps(T, T, "leading"), torch.arange(T - 1, -1, -1))


# ----------------------------------------------------------------------------------------------
# Against diffusers, step by step on the same betas, network, x_T and noise


def _run_diffusers(sched, net, x, steps, *, ve: bool, generator=None, noises=None, **step_kw):
    sched.set_timesteps(steps)
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t) if ve else x
        kw = dict(step_kw)
        if noises is not None:
            kw["variance_noise"] = noises[i]
        elif generator is not None:
            kw["generator"] = generator
        x = sched.step(net(x_in, t), t, x, **kw).prev_sample
    return x


@pytest.mark.reference
@pytest.mark.parametrize(
    "prediction_type, variance, spacing, steps",
    [("eps", "small", "leading", T), ("eps", "large", "leading", T),
     ("v", "small", "trailing", 50), ("x0", "small", "linspace", 30),
     ("eps", "small", "linspace", 30), ("v", "large", "leading", 40),
     ("x0", "large", "leading", 40)],
)  # fmt: skip
def test_ddpm_matches_diffusers(prediction_type, variance, spacing, steps):
    """The full T = 1000 chain of Ho 2020 and shorter chains on each spacing."""
    diffusers = pytest.importorskip("diffusers")
    dtype = torch.float64
    schedule, net = make_schedule("linear", T), FixedNet()
    sched = _scheduler(
        diffusers.DDPMScheduler, schedule, prediction_type, dtype,
        variance_type=f"fixed_{variance}", clip_sample=False, timestep_spacing=spacing,
    )  # fmt: skip
    x_T = _x_T(dtype)
    ref = _run_diffusers(
        sched, net, x_T, steps, ve=False, generator=torch.Generator().manual_seed(7)
    )
    sigmas = get_sigmas(schedule, steps, spacing)
    out = sample_ddpm(
        VPDenoiser(net, schedule, prediction_type),
        _ve_start(x_T, sigmas),
        sigmas,
        generator=torch.Generator().manual_seed(7),
        variance=variance,
    )
    # float64 on both sides; diffusers' extra last-step noise (trailing/linspace) has std 1e-10
    torch.testing.assert_close(out, ref, atol=1e-8, rtol=0)


@pytest.mark.reference
@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
@pytest.mark.parametrize(
    "eta, spacing, steps", [(0.0, "leading", 20), (0.0, "trailing", 25), (0.0, "leading", 7),
                            (0.5, "leading", 20), (1.0, "trailing", 10)]
)  # fmt: skip
def test_ddim_matches_diffusers(prediction_type, eta, spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    dtype = torch.float64
    schedule, net = make_schedule("scaled_linear", T), FixedNet()
    sched = _scheduler(
        diffusers.DDIMScheduler, schedule, prediction_type, dtype,
        clip_sample=False, timestep_spacing=spacing, set_alpha_to_one=True,
    )  # fmt: skip
    noises = torch.randn((steps, *SHAPE), generator=torch.Generator().manual_seed(5), dtype=dtype)
    x_T = _x_T(dtype)
    ref = _run_diffusers(sched, net, x_T, steps, ve=False, noises=noises, eta=eta)

    sigmas = get_sigmas(schedule, steps, spacing)
    it = iter(noises)
    # ldmkit's DDIM state is VE: VP noise z enters as z / sqrt(alpha_bar_{t-1}) times the VE std
    out = sample_ddim(
        VPDenoiser(net, schedule, prediction_type),
        _ve_start(x_T, sigmas),
        sigmas,
        eta=eta,
        noise_sampler=lambda sigma, sigma_next: next(it),
    )
    torch.testing.assert_close(out, ref, atol=1e-8, rtol=0)


@pytest.mark.reference
def test_ddim_zero_terminal_snr_v_matches_diffusers():
    """Lin et al. 2024: zero-SNR betas, trailing spacing, v-prediction; sigmas[0] = inf."""
    diffusers = pytest.importorskip("diffusers")
    dtype = torch.float64
    schedule, net = make_schedule("scaled_linear", T, zero_terminal_snr=True), FixedNet()
    sched = _scheduler(
        diffusers.DDIMScheduler, schedule, "v", dtype,
        clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=True,
    )  # fmt: skip
    x_T = _x_T(dtype)
    ref = _run_diffusers(sched, net, x_T, 10, ve=False, eta=0.0)
    out = sample(
        net, schedule, x_T, sampler="ddim", steps=10, prediction_type="v", spacing="trailing"
    )
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out, ref, atol=1e-8, rtol=0)


@pytest.mark.reference
@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "karras"])
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_euler_heun_match_diffusers(name, prediction_type, spacing):
    diffusers = pytest.importorskip("diffusers")
    cls = {"euler": diffusers.EulerDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler}[name]
    schedule, net, steps = make_schedule("scaled_linear", T), FixedNet(), 12
    karras = spacing == "karras"
    sched = _scheduler(
        cls, schedule, prediction_type, use_karras_sigmas=karras,
        timestep_spacing="linspace" if karras else spacing,
    )  # fmt: skip
    sigmas = get_sigmas(schedule, steps, spacing)
    x = _ve_start(_x_T(), sigmas)
    gen = torch.Generator().manual_seed(1) if name == "euler" else None  # Heun takes none
    ref = _run_diffusers(sched, net, x, steps, ve=True, generator=gen)
    out = SAMPLERS[name](VPDenoiser(net, schedule, prediction_type), x, sigmas)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.reference
@pytest.mark.parametrize("prediction_type", ["eps", "v", "x0"])
@pytest.mark.parametrize("spacing, steps", [("trailing", 10), ("trailing", 25), ("karras", 15)])
def test_dpmpp_2m_matches_diffusers(prediction_type, spacing, steps):
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("scaled_linear", T)
    karras = spacing == "karras"
    net = FixedNet(t_dependent=not karras)  # diffusers rounds t for Karras sigmas
    sched = _scheduler(
        diffusers.DPMSolverMultistepScheduler, schedule, prediction_type,
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        use_karras_sigmas=karras, timestep_spacing="linspace" if karras else spacing,
        final_sigmas_type="zero",
    )  # fmt: skip
    sigmas = get_sigmas(schedule, steps, spacing)
    x_T = _x_T()
    ref = _run_diffusers(sched, net, x_T, steps, ve=False)  # DPMSolver's state is VP
    out = sample_dpmpp_2m(
        VPDenoiser(net, schedule, prediction_type), _ve_start(x_T, sigmas), sigmas
    )
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# Identities between samplers


def _net_pair(prediction_type="eps"):
    schedule = make_schedule("linear", T)
    return schedule, VPDenoiser(FixedNet(), schedule, prediction_type)


def test_euler_is_ddim_eta0_and_ddim_eta1_is_ddpm_small():
    schedule, denoise = _net_pair()
    sigmas = get_sigmas(schedule, 15, "trailing")
    x = _ve_start(_x_T(torch.float64), sigmas)
    torch.testing.assert_close(
        sample_euler(denoise, x, sigmas), sample_ddim(denoise, x, sigmas), atol=1e-10, rtol=0
    )
    a = sample_ddim(denoise, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = sample_ddpm(denoise, x, sigmas, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("prediction_type", ["v", "eps"])
def test_lcm_is_consistency_multistep_sampling_in_vp_terms(prediction_type):
    """Song et al. 2023 Alg. 1 written in VP terms on the integer steps, independently of the
    VE code: x0 = the network's x-prediction at (z, t); z = a_next x0 + s_next * noise; the
    last step returns x0 (no noise). The same noises go to `SAMPLERS["lcm"]`."""
    schedule, net = make_schedule("linear", T), FixedNet()
    steps = 4
    ts = get_timesteps(T, steps, "trailing").tolist()
    ab = schedule.alphas_cumprod
    noises = torch.randn((steps, *SHAPE), generator=torch.Generator().manual_seed(9),
                         dtype=torch.float64)  # fmt: skip
    z = _x_T(torch.float64)
    for i, t in enumerate(ts):
        a, s = ab[t].sqrt(), (1 - ab[t]).sqrt()
        out = net(z, torch.tensor([t]))
        x0 = a * z - s * out if prediction_type == "v" else (z - s * out) / a
        if i + 1 < steps:
            n = ts[i + 1]
            z = ab[n].sqrt() * x0 + (1 - ab[n]).sqrt() * noises[i]
    sigmas = get_sigmas(schedule, steps, "trailing")
    it = iter(noises)
    got = SAMPLERS["lcm"](
        VPDenoiser(net, schedule, prediction_type), _ve_start(_x_T(torch.float64), sigmas),
        sigmas, noise_sampler=lambda sigma, sigma_next: next(it),
    )  # fmt: skip
    torch.testing.assert_close(got, x0, atol=1e-8, rtol=0)
    assert next(it, None) is not None  # the last step drew no noise: one noise left over
    # and it is not DDIM: the state's own noise is dropped between steps
    ddim = sample_ddim(VPDenoiser(net, schedule, prediction_type),
                       _ve_start(_x_T(torch.float64), sigmas), sigmas)  # fmt: skip
    assert (ddim - got).abs().max() > 1e-2


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_sees_every_step_and_can_replace_x(name):
    schedule, denoise = _net_pair()
    sigmas = get_sigmas(schedule, 6, "trailing")
    x = _ve_start(_x_T(), sigmas)
    x_copy = x.clone()
    seen = []

    def callback(i, x_i, sigma, x0):
        seen.append((i, sigma.item()))
        assert x_i.shape == x0.shape == x.shape
        return torch.full_like(x_i, 0.25) if i == len(sigmas) - 2 else None

    out = SAMPLERS[name](denoise, x, sigmas, callback=callback, generator=torch.Generator())
    assert seen == [(i, s) for i, s in enumerate(sigmas[1:].tolist())]
    assert torch.equal(out, torch.full_like(x, 0.25))
    assert torch.equal(x, x_copy)  # the caller's tensor is untouched


def test_stochastic_samplers_use_injected_noise():
    schedule, denoise = _net_pair()
    sigmas = get_sigmas(schedule, 8, "trailing")
    x = _ve_start(_x_T(), sigmas)

    def zeros(sigma, sigma_next):
        return torch.zeros_like(x)

    # with zero noise, eta = 1 DDIM is the posterior-mean chain and churn adds nothing
    a = sample_ddim(denoise, x, sigmas, eta=1.0, noise_sampler=zeros)
    b = sample_ddpm(denoise, x, sigmas, noise_sampler=zeros)
    torch.testing.assert_close(a, b)
    c = sample_euler(denoise, x, sigmas, s_churn=1.0, noise_sampler=zeros)
    assert not torch.allclose(c, sample_euler(denoise, x, sigmas))  # churn raised sigma_hat
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    torch.testing.assert_close(
        sample_langevin(denoise, x, sigmas, generator=g1),
        sample_langevin(denoise, x, sigmas, generator=g2),
    )


def test_sample_entry_point_cond_and_guidance():
    schedule = make_schedule("linear", T)
    base = FixedNet()

    def net(x_t, t, *, label):
        return base(x_t, t) + 0.1 * label.view(-1, 1, 1, 1).to(x_t.dtype)

    cond, uncond = {"label": torch.tensor([1, 3])}, {"label": torch.tensor([0, 0])}
    kw = dict(sampler="dpm++2m", steps=8, generator=torch.Generator().manual_seed(0))
    plain = sample(net, schedule, SHAPE, cond=cond, **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    guided = sample(net, schedule, SHAPE, cond=cond, uncond=uncond, guidance_scale=1.0, **kw)
    torch.testing.assert_close(guided, plain)
    kw["generator"] = torch.Generator().manual_seed(0)
    strong = sample(net, schedule, SHAPE, cond=cond, uncond=uncond, guidance_scale=4.0, **kw)
    assert not torch.allclose(strong, plain)


# ----------------------------------------------------------------------------------------------
# Exact denoisers of Gaussian and two-Gaussian data


def gaussian_denoiser(mu, s):
    """E[x0 | x] for x0 ~ N(mu, s^2), x = x0 + sigma * noise."""

    def denoise(x, sigma):
        return mu + s**2 / (s**2 + sigma.to(x.dtype) ** 2) * (x - mu)

    return denoise


def mixture_denoiser(weights=(0.3, 0.7), means=(-2.0, 2.0), s=0.5):
    """E[x0 | x] for a two-Gaussian mixture: posterior-weighted per-component Gaussian means."""
    w, m = torch.tensor(weights, dtype=torch.float64), torch.tensor(means, dtype=torch.float64)

    def denoise(x, sigma):
        var = s**2 + sigma.to(x.dtype) ** 2  # marginal variance of each component at sigma
        logp = w.log() - 0.5 * (x - m) ** 2 / var  # (N, 2), shared normalizer dropped
        post = torch.softmax(logp, dim=-1)
        comp = m + s**2 / var * (x - m)
        return (post * comp).sum(-1, keepdim=True)

    return denoise


def net_from_denoiser(denoise, schedule, prediction_type, prior_mean):
    """A VP network (eps, x0 or v at t) built from a VE denoiser; t is an integer or fractional
    step, mapped to sigma by the same log-sigma interpolation as NoiseSchedule.sigma_to_t."""
    log_sigmas = schedule.sigmas.log()

    def net(x_t, t):
        t = t.to(torch.float64)
        t = t[:1] if torch.all(t == t[0]) else t  # one noise level for the batch: compute once
        lo = t.floor().long().clamp(max=schedule.num_timesteps - 2)
        w = t - lo
        sigma = ((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]).exp()
        sigma = torch.where(w == 0, schedule.sigmas[lo], sigma)
        sigma = torch.where(w == 1, schedule.sigmas[lo + 1], sigma)[:, None]  # (B, 1)
        a, b = (1 + sigma**2).rsqrt(), (1 + sigma.pow(-2)).rsqrt()
        if torch.isinf(sigma).any():  # zero SNR: x0 is the prior mean, x_t is the noise
            x0 = torch.full_like(x_t, prior_mean)
            eps = x_t
        else:
            x0 = denoise(x_t / a, sigma)
            eps = (x_t - a * x0) / b
        return {"eps": eps, "x0": x0, "v": a * eps - b * x0}[prediction_type]

    return net


N = 10_000  # 1-D samples per test: the standard error of the std is 0.7% of s


def _check_gaussian(out, mu, s, allowance=0.015):
    """Mean and std within 4 standard errors; the std also within `allowance` * s, the
    discretization bias of the step counts used here (DDIM at 200 steps is 1% low)."""
    mean, std = out.mean().item(), out.std().item()
    assert abs(mean - mu) < 4 * s / math.sqrt(N), (mean, mu)
    assert abs(std - s) < 4 * s / math.sqrt(2 * N) + allowance * s, (std, s)


MU, S = 0.5, 0.5
GAUSSIAN_CASES = [
    ("ddpm", 100, {"variance": "large"}), ("ddim", 200, {}), ("euler", 200, {"s_churn": 10.0}),
    ("heun", 50, {}), ("dpm++2m", 50, {}), ("langevin", 100, {}),
]  # fmt: skip


@pytest.mark.parametrize("name, steps, options", GAUSSIAN_CASES)
def test_every_sampler_hits_gaussian_mean_and_std(name, steps, options):
    schedule = make_schedule("linear", T)
    net = net_from_denoiser(gaussian_denoiser(MU, S), schedule, "eps", MU)
    out = sample(
        net, schedule, (N, 1), sampler=name, steps=steps, spacing="karras",
        generator=torch.Generator().manual_seed(11), dtype=torch.float64, **options,
    )  # fmt: skip
    assert out.shape == (N, 1)
    _check_gaussian(out, MU, S)


@pytest.mark.parametrize("name, steps, options", GAUSSIAN_CASES)
def test_zero_terminal_snr_v_sampling_hits_gaussian(name, steps, options):
    """sigmas[0] = inf: the first step starts from pure VP noise (Lin et al. 2024)."""
    schedule = make_schedule("scaled_linear", T, zero_terminal_snr=True)
    net = net_from_denoiser(gaussian_denoiser(MU, S), schedule, "v", MU)
    steps = 2 * steps if name in ("heun", "dpm++2m") else steps  # trailing ends at sigma 0.07
    out = sample(
        net, schedule, (N, 1), sampler=name, steps=steps, spacing="trailing",
        prediction_type="v", generator=torch.Generator().manual_seed(4), dtype=torch.float64,
        **options,
    )  # fmt: skip
    _check_gaussian(out, MU, S, allowance=0.02)


def test_heun_survives_a_step_that_shrinks_sigma_a_thousandfold():
    """The cosine schedule's first trailing step goes from sigma 20291 to 12.8 (20 steps): a
    trapezoid over it multiplies any error of the denoiser at 12.8 by about 10^4. With a
    denoiser that is off by up to 5 % of the data's std at high noise (and not at all at the end),
    samples must still have the data's mean and std."""
    schedule = make_schedule("cosine", T)
    exact = gaussian_denoiser(MU, S)

    def biased(x, sigma):
        return exact(x, sigma) + 0.05 * S * torch.tanh(sigma.to(x.dtype) / 50)

    net = net_from_denoiser(biased, schedule, "v", MU)
    out = sample(
        net, schedule, (N, 1), sampler="heun", steps=20, spacing="trailing", prediction_type="v",
        generator=torch.Generator().manual_seed(3), dtype=torch.float64,
    )  # fmt: skip
    _check_gaussian(out, MU, S, allowance=0.05)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_full_ddpm_chain_hits_gaussian(prediction_type):
    """Ho 2020 Alg. 2 over every step of a short cosine schedule (beta-tilde variance)."""
    schedule = make_schedule("cosine", 250)
    net = net_from_denoiser(gaussian_denoiser(MU, S), schedule, prediction_type, MU)
    out = sample(
        net, schedule, (N, 1), sampler="ddpm", steps=250, prediction_type=prediction_type,
        generator=torch.Generator().manual_seed(2), dtype=torch.float64,
    )  # fmt: skip
    _check_gaussian(out, MU, S)


@pytest.mark.slow
def test_full_ddpm_chain_hits_gaussian_T1000():
    schedule = make_schedule("linear", T)
    net = net_from_denoiser(gaussian_denoiser(MU, S), schedule, "eps", MU)
    out = sample(net, schedule, (N, 1), sampler="ddpm", steps=T, dtype=torch.float64,
                 generator=torch.Generator().manual_seed(2))  # fmt: skip
    _check_gaussian(out, MU, S)


def _ode_error(sampler, steps):
    """Max error of the deterministic map x_T -> x_0 against the exact ODE solution."""
    sigma_max, sigma_min = 80.0, 1e-3
    sigmas = torch.cat(
        [torch.logspace(math.log10(sigma_max), math.log10(sigma_min), steps, dtype=torch.float64),
         torch.zeros(1, dtype=torch.float64)]
    )  # fmt: skip
    x_T = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x_T * sigma_max
    out = sampler(gaussian_denoiser(MU, S), x, sigmas)
    # probability-flow ODE of Gaussian data: x(sigma) - mu scales as sqrt(s^2 + sigma^2)
    exact = MU + S / math.sqrt(S**2 + sigma_max**2) * (x - MU)
    return (out - exact).abs().max().item(), out


def test_ddim_ode_is_deterministic_and_exact():
    err, out = _ode_error(sample_ddim, 500)
    assert torch.equal(out, _ode_error(sample_ddim, 500)[1])
    assert err < 1.2e-2
    assert _ode_error(sample_ddim, 1000)[0] < 0.55 * err  # first order: the error halves


@pytest.mark.parametrize("sampler", [sample_heun, sample_dpmpp_2m])
def test_second_order_ode_solvers_converge(sampler):
    err = _ode_error(sampler, 100)[0]
    assert err < 4e-3
    assert _ode_error(sampler, 200)[0] < 0.3 * err  # second order: the error / 4


@pytest.mark.parametrize(
    "name, steps, options",
    [("ddpm", 100, {"variance": "large"}), ("ddim", 100, {}), ("euler", 100, {"s_churn": 5.0}),
     ("heun", 20, {}), ("dpm++2m", 30, {}), ("langevin", 30, {"n_corrector": 2})],
)  # fmt: skip
def test_mixture_mode_proportions(name, steps, options):
    """0.3 N(-2, 0.5^2) + 0.7 N(2, 0.5^2): the fraction of samples below 0 is 0.3."""
    schedule = make_schedule("linear", T)
    net = net_from_denoiser(mixture_denoiser(), schedule, "eps", prior_mean=0.3 * -2 + 0.7 * 2)
    out = sample(
        net, schedule, (N, 1), sampler=name, steps=steps, spacing="karras",
        generator=torch.Generator().manual_seed(9), dtype=torch.float64, **options,
    )  # fmt: skip
    frac = (out < 0).double().mean().item()
    assert abs(frac - 0.3) < 4 * math.sqrt(0.3 * 0.7 / N), frac
    right = out[out > 0]
    assert abs(right.mean().item() - 2.0) < 0.03 and abs(right.std().item() - 0.5) < 0.03


# ----------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise_with_a_fix():
    schedule, denoise = _net_pair()
    x = torch.zeros(SHAPE)
    good = get_sigmas(schedule, 5)
    with pytest.raises(ValueError, match="unknown sampler 'foo'; choose one of"):
        sample(FixedNet(), schedule, SHAPE, sampler="foo")
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\]"):
        get_sigmas(schedule, 0)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000\]"):
        get_sigmas(schedule, 1001, "karras")
    with pytest.raises(ValueError, match="unknown spacing 'cosine'"):
        get_sigmas(schedule, 10, "cosine")
    with pytest.raises(ValueError, match="karras spacing has no integer timesteps"):
        get_timesteps(T, 10, "karras")
    with pytest.raises(ValueError, match="strictly descending"):
        sample_euler(denoise, x, good.flip(0).roll(-1))
    with pytest.raises(ValueError, match="must end in 0"):
        sample_ddim(denoise, x, good[:-1])
    with pytest.raises(ValueError, match="1-D with at least 2 entries"):
        sample_heun(denoise, x, good[:1])
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sample_ddim(denoise, x, good, eta=-0.1)
    with pytest.raises(ValueError, match="unknown variance 'huge'"):
        sample_ddpm(denoise, x, good, variance="huge")
    with pytest.raises(ValueError, match="s_churn must be >= 0"):
        sample_euler(denoise, x, good, s_churn=-1.0)
    with pytest.raises(ValueError, match="n_corrector >= 0 and snr > 0"):
        sample_langevin(denoise, x, good, snr=0.0)
    zsnr = make_schedule("linear", T, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="karras spacing needs a finite sigma_max"):
        get_sigmas(zsnr, 10, "karras")
    with pytest.raises(ValueError, match="prediction_type='v'"):
        sample(FixedNet(), zsnr, SHAPE, sampler="ddim", spacing="trailing")


# ----------------------------------------------------------------------------------------------
# DPM-Solver++(2M) SDE


@pytest.mark.reference
@pytest.mark.parametrize("prediction_type", ["eps", "v"])
@pytest.mark.parametrize("steps", [8, 20])
def test_dpmpp_2m_sde_matches_diffusers(prediction_type, steps):
    """diffusers' algorithm_type="sde-dpmsolver++" on the same noise, step by step."""
    diffusers = pytest.importorskip("diffusers")
    dtype = torch.float64
    schedule, net = make_schedule("scaled_linear", T), FixedNet()
    sched = _scheduler(
        diffusers.DPMSolverMultistepScheduler, schedule, prediction_type, dtype,
        algorithm_type="sde-dpmsolver++", solver_order=2, solver_type="midpoint",
        timestep_spacing="trailing", final_sigmas_type="zero",
    )  # fmt: skip
    noises = torch.randn((steps, *SHAPE), generator=torch.Generator().manual_seed(5), dtype=dtype)
    x_T = _x_T(dtype)
    ref = _run_diffusers(sched, net, x_T, steps, ve=False, noises=noises)
    sigmas = get_sigmas(schedule, steps, "trailing")
    it = iter(noises)
    out = SAMPLERS["dpm++2m-sde"](
        VPDenoiser(net, schedule, prediction_type), _ve_start(x_T, sigmas), sigmas,
        noise_sampler=lambda sigma, sigma_next: next(it),
    )  # fmt: skip
    # DPMSolverMultistepScheduler keeps its sigmas in float32 (the DDIM/DDPM tests reach 1e-8)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_dpmpp_2m_sde_at_eta_0_is_the_ode_solver():
    schedule, denoise = _net_pair("v")
    sigmas = get_sigmas(schedule, 12, "trailing")
    x = _ve_start(_x_T(torch.float64), sigmas)
    torch.testing.assert_close(
        SAMPLERS["dpm++2m-sde"](denoise, x, sigmas, eta=0.0), sample_dpmpp_2m(denoise, x, sigmas),
        atol=1e-10, rtol=0,
    )  # fmt: skip


def test_dpmpp_2m_sde_samples_a_gaussian_exactly():
    """With the exact denoiser of N(mu, s^2) data, 15 steps give the data's mean and std."""
    mu, s = 0.7, 0.5
    schedule = make_schedule("cosine", T)

    def denoise(x, sigma):  # E[x0 | x] for x = x0 + sigma * n
        return mu + (x - mu) * s**2 / (s**2 + sigma.item() ** 2)

    sigmas = get_sigmas(schedule, 15, "trailing")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g, dtype=torch.float64) * math.sqrt(1 + sigmas[0].item() ** 2)
    out = SAMPLERS["dpm++2m-sde"](denoise, x, sigmas, generator=g)
    assert abs(out.mean().item() - mu) < 0.02 and abs(out.std().item() - s) < 0.02


def test_cli_defaults_name_the_library_defaults():
    """cli.py spells the default sampler(s) out so that `ldmkit --help` needs no torch import."""
    from ldmkit.cli import make_parser
    from ldmkit.diffusion.samplers import DEFAULT_SAMPLER
    from ldmkit.evaluation import table

    p = make_parser()
    sample = p.parse_args(["sample", "--run", "R"])
    assert sample.sampler is None and sample.steps is None  # the run's own: default_sampling
    sample_parser = p._subparsers._group_actions[0].choices["sample"]
    assert any(a.dest == "sampler" and DEFAULT_SAMPLER in a.help for a in sample_parser._actions)
    report = p.parse_args(["report", "--run", "R"])
    assert report.sampler is None and report.steps is None  # the run's own, as for sample
    report_parser = p._subparsers._group_actions[0].choices["report"]
    assert any(a.dest == "sampler" and DEFAULT_SAMPLER in a.help for a in report_parser._actions)
    assert p.parse_args(["eval", "--run", "R"]).samplers is None  # api.evaluate's defaults
    eval_parser = p._subparsers._group_actions[0].choices["eval"]
    eval_help = " ".join(
        a.help for a in eval_parser._actions if a.dest in ("samplers", "steps", "n")
    )
    for words in (table.DEFAULT_SAMPLERS, table.FULL_SAMPLERS, table.DEFAULT_STEPS, table.FULL_STEPS,
                  (table.DEFAULT_N,), (table.FULL_N,)):  # fmt: skip
        assert ",".join(map(str, words)) in eval_help
    assert DEFAULT_SAMPLER in SAMPLERS and set(table.FULL_SAMPLERS) <= set(SAMPLERS)


def test_the_torch_free_sampler_names_are_the_samplers():
    """sampler_names.py lists the samplers for the command line's help without importing torch."""
    from ldmkit.diffusion import sampler_names

    assert sampler_names.SAMPLER_NAMES == tuple(SAMPLERS)
    assert sampler_names.DEFAULT_SAMPLER in SAMPLERS
