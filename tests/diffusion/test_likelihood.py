"""The variational bound (ldmkit.diffusion.likelihood)."""

import math

import pytest
import torch
from loss_data import GRID, gen, image_data

from ldmkit.diffusion.likelihood import (
    LossAwareSampler,
    discretized_gaussian_log_likelihood,
    hybrid_loss,
    nll_bits_per_dim,
    normal_kl,
    prior_kl,
    vlb_term,
)
from ldmkit.diffusion.losses import diffusion_loss
from ldmkit.diffusion.process import (
    add_noise,
    posterior_mean_variance,
    predict_eps,
    predict_x0,
    target_for,
)
from ldmkit.diffusion.schedules import make_schedule

# ---------------------------------------------------------------- Gaussian KL and the decoder


def test_normal_kl_of_identical_gaussians_is_zero():
    g = gen()
    mean, logvar = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    assert torch.all(normal_kl(mean, logvar, mean, logvar).abs() < 1e-6)


def test_normal_kl_matches_torch_distributions():
    g = gen(1)
    m1, m2 = (torch.randn(6, 7, generator=g, dtype=torch.float64) for _ in range(2))
    lv1, lv2 = (2 * torch.randn(6, 7, generator=g, dtype=torch.float64) for _ in range(2))
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    expected = torch.distributions.kl_divergence(p, q)
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-10, atol=1e-12)
    assert torch.all(normal_kl(m1, lv1, m2, lv2) > 0)


def test_normal_kl_broadcasts_and_rejects_bad_shapes():
    m1, m2 = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    lv = torch.zeros(2, 1, 1, 1)
    assert torch.allclose(normal_kl(m1, lv, m2, lv), torch.full((2, 3, 4, 4), 0.5))
    with pytest.raises(ValueError, match="do not broadcast"):
        normal_kl(m1, torch.zeros(3), m2, lv)


@pytest.mark.parametrize("mean,std", [(0.0, 0.5), (0.93, 0.01), (-1.3, 0.2), (0.5, 1e-4), (0, 5)])
def test_discretized_likelihood_sums_to_one_over_bins(mean, std):
    means = torch.full_like(GRID, mean)
    log_scales = torch.full_like(GRID, math.log(std))
    log_p = discretized_gaussian_log_likelihood(GRID, means, log_scales)
    assert torch.all(log_p <= 0)
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def _mp_log_bin_mass(x, mean, std):
    """log P(bin of x) for N(mean, std^2) at 50 digits (mpmath), edge bins open-ended."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    x, mean, std = (mpmath.mpf(float(v)) for v in (x, mean, std))
    hi = mpmath.inf if x > 0.999 else (x + mpmath.mpf(1) / 255 - mean) / std
    lo = -mpmath.inf if x < -0.999 else (x - mpmath.mpf(1) / 255 - mean) / std
    if lo + hi > 0:  # 1 - Phi(z) = Phi(-z); a right-tail difference of two ~1s loses all 50 digits
        lo, hi = -hi, -lo
    return float(mpmath.log(mpmath.ncdf(hi) - mpmath.ncdf(lo)))


def test_discretized_likelihood_matches_high_precision_reference():
    g = gen(2)
    x = GRID[torch.randint(0, 256, (40,), generator=g)]
    x[:2] = torch.tensor([-1.0, 1.0], dtype=torch.float64)  # both edge bins
    means = torch.rand(40, generator=g, dtype=torch.float64) * 2.4 - 1.2
    log_scales = torch.rand(40, generator=g, dtype=torch.float64) * 4 - 5  # std 0.007 .. 0.37
    got = discretized_gaussian_log_likelihood(x, means, log_scales)
    expected = [_mp_log_bin_mass(*a) for a in zip(x, means, log_scales.exp())]
    expected = torch.tensor(expected, dtype=torch.float64)
    # Masses below the smallest float64 (log < -708) are floored there.
    floor = math.log(torch.finfo(torch.float64).tiny)
    representable = expected > floor + 1
    assert 5 < representable.sum() < 40 and expected[representable].min() < -100
    torch.testing.assert_close(got[representable], expected[representable], rtol=1e-8, atol=1e-10)
    assert torch.all(got[~representable] == floor)


def test_discretized_likelihood_keeps_digits_far_in_the_tail():
    """10 standard deviations out, Phi(b) - Phi(a) is 0 in float64; the bin mass is ~1e-27."""
    x, mean, std = GRID[200], -0.5, 0.1
    for sign in (1, -1):  # right tail, and its mirror image in the left tail
        got = discretized_gaussian_log_likelihood(
            sign * x.reshape(1),
            torch.tensor([sign * mean], dtype=torch.float64),
            torch.tensor([math.log(std)], dtype=torch.float64),
        )
        exact = _mp_log_bin_mass(sign * x, sign * mean, std)
        assert got.item() == pytest.approx(exact, rel=1e-9)
        assert exact < -50


# ---------------------------------------------------------------- the bound


def test_prior_kl_vanishes_when_alpha_bar_T_is_zero():
    x0, _ = image_data()
    cosine = make_schedule("cosine", 1000)
    zero_snr = make_schedule("linear", 1000, zero_terminal_snr=True)
    assert torch.all(prior_kl(zero_snr, x0) == 0)
    assert torch.all(prior_kl(cosine, x0).abs() < 1e-6)
    assert prior_kl(cosine, x0).shape == (4,)


def test_prior_kl_is_positive_for_a_short_schedule_and_matches_formula():
    x0, _ = image_data()
    short = make_schedule("linear", 10)
    ab = short.alphas_cumprod[-1]
    assert ab > 0.8  # ten small betas leave most of the signal
    kl = prior_kl(short, x0)
    # KL(N(a x0, 1 - a^2) || N(0, 1)) per value, summed over the 32 values of a sample
    per_value = 0.5 * (-1 - (1 - ab).log() + (1 - ab) + ab * x0**2)
    torch.testing.assert_close(kl, per_value.flatten(1).sum(1))
    assert torch.all(kl > 10)


def test_vlb_term_is_zero_for_the_true_x0_with_small_variance():
    sched = make_schedule("linear", 1000)
    x0, eps = image_data()
    t = torch.tensor([1, 2, 500, 999])
    x_t = add_noise(sched, x0, eps, t)
    for pred_type in ["eps", "x0", "v"]:
        out = target_for(pred_type, x0, eps, sched, t)
        assert torch.all(vlb_term(sched, out, x0, x_t, t, pred_type).abs() < 1e-8)


def test_vlb_term_large_variance_is_the_variance_mismatch_kl():
    sched = make_schedule("cosine", 100)
    x0, eps = image_data(seed=1)
    t = torch.tensor([1, 10, 50, 99])
    x_t = add_noise(sched, x0, eps, t)
    got = vlb_term(sched, x0, x0, x_t, t, "x0", variance="large")
    _, small, _ = posterior_mean_variance(sched, x0, x_t, t, "small")
    ratio = sched.betas[t] / small.flatten()  # beta / beta_tilde
    expected = 0.5 * (-1 + ratio.log() + 1 / ratio) * x0[0].numel()
    torch.testing.assert_close(got, expected)


def test_vlb_term_at_t0_is_the_decoder_nll():
    sched = make_schedule("linear", 1000)
    x0, eps = image_data(seed=2)
    t = torch.zeros(4, dtype=torch.long)
    x_t = add_noise(sched, x0, eps, t)
    out = eps + 0.1  # an imperfect eps-model
    x0_hat = predict_x0(sched, x_t, t, out, "eps")
    _, _, log_var = posterior_mean_variance(sched, x0_hat, x_t, t)
    # At t = 0 the model mean is x0_hat itself.
    nll = -discretized_gaussian_log_likelihood(x0, x0_hat, 0.5 * log_var.expand_as(x0))
    got = vlb_term(sched, out, x0, x_t, t, "eps")
    torch.testing.assert_close(got, nll.flatten(1).sum(1))
    assert torch.all(got > 0)


def test_learned_range_endpoints_are_the_fixed_variances():
    sched = make_schedule("linear", 1000)
    x0, eps = image_data(seed=3)
    t = torch.tensor([1, 5, 300, 999])
    x_t = add_noise(sched, x0, eps, t)
    pred = eps + 0.05 * torch.randn(eps.shape, generator=gen(4), dtype=eps.dtype)
    for v, fixed in [(-1.0, "small"), (1.0, "large")]:
        out = torch.cat([pred, torch.full_like(pred, v)], dim=1)  # (B, 2C, H, W)
        learned = vlb_term(sched, out, x0, x_t, t, "eps", variance="learned_range")
        torch.testing.assert_close(learned, vlb_term(sched, pred, x0, x_t, t, "eps", fixed))
    with pytest.raises(ValueError, match=r"learned_range' needs model_output with 2 \* 2 channels"):
        vlb_term(sched, pred, x0, x_t, t, "eps", variance="learned_range")
    with pytest.raises(ValueError, match="unknown variance 'fixed'"):
        vlb_term(sched, pred, x0, x_t, t, "eps", variance="fixed")


def test_hybrid_loss_value_and_stop_gradient():
    sched = make_schedule("linear", 1000)
    x0, eps = image_data(seed=5)
    t = torch.tensor([0, 3, 400, 999])
    x_t = add_noise(sched, x0, eps, t)
    out = torch.cat([eps + 0.1, torch.zeros_like(eps)], dim=1).requires_grad_(True)
    loss = hybrid_loss(sched, out, x0, eps, x_t, t, "eps", lam=0.01)
    simple = diffusion_loss(out[:, :2], eps)
    vlb = vlb_term(sched, out, x0, x_t, t, "eps", variance="learned_range")
    expected = simple + 0.01 * 1000 * (vlb / (32 * math.log(2))).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # The prediction channels get the gradient of L_simple only; the v channels get L_vlb's.
    simple_grad = 2 * (out[:, :2] - eps).detach() / eps.numel()
    torch.testing.assert_close(out.grad[:, :2], simple_grad)
    assert out.grad[:, 2:].abs().sum() > 0
    with pytest.raises(ValueError, match="hybrid_loss needs model_output with 2 \\* 2 channels"):
        hybrid_loss(sched, eps, x0, eps, x_t, t, "eps")


def _gaussian_data_setup(seed=0, batch=512, mu=0.1, s=0.2):
    """8-bit data drawn from a discretized N(mu, s^2), its exact per-sample NLL in bits, and the
    exact x0-denoiser of the (continuous) Gaussian: E[x0 | x_t]."""
    p = discretized_gaussian_log_likelihood(
        GRID, torch.full_like(GRID, mu), torch.full_like(GRID, math.log(s))
    ).exp()
    idx = torch.multinomial(p, batch, replacement=True, generator=gen(seed))
    x0 = GRID[idx].reshape(batch, 1)  # (B, 1)
    sched = make_schedule("linear", 100, beta_start=1e-3, beta_end=0.2)

    def exact_x0(x_t, t):
        a = sched.sqrt_alphas_cumprod[t].reshape(-1, 1)
        return mu + a * s**2 / (a**2 * s**2 + 1 - a**2) * (x_t - a * mu)

    return sched, x0, -p[idx].log2(), exact_x0


def test_nll_of_the_exact_denoiser_on_gaussian_data_is_close_to_the_entropy():
    """The bound of a near-optimal model sits a little above the data's true NLL, never below it
    (beyond sampling error); a biased model does clearly worse on the same noise."""
    sched, x0, true_bits, exact_x0 = _gaussian_data_setup()
    bound = nll_bits_per_dim(
        exact_x0, sched, x0, prediction_type="x0", variance="large", generator=gen(1)
    )
    gap = bound - true_bits  # (B,) per-sample, so the spread of -log p(x0) cancels
    stderr = gap.std().item() / len(gap) ** 0.5
    assert -3 * stderr < gap.mean().item() < 0.6, (gap.mean().item(), stderr)

    def biased(x_t, t):
        return exact_x0(x_t, t) + 0.02

    worse = nll_bits_per_dim(
        biased, sched, x0, prediction_type="x0", variance="large", generator=gen(1)
    )
    assert (worse - bound).mean().item() > 0.2

    # The same model as an eps-predictor gives the same bound.
    def as_eps(x_t, t):
        return predict_eps(sched, x_t, t, exact_x0(x_t, t), "x0")

    same = nll_bits_per_dim(
        as_eps, sched, x0, prediction_type="eps", variance="large", generator=gen(1)
    )
    torch.testing.assert_close(same, bound)


def test_nll_of_a_model_that_knows_x0_is_deterministic_and_subsets_rescale():
    """A model that returns the true x0 with variance "large" makes every term noise-free:
    L_{t-1} = D * KL(N(0, beta_tilde) || N(0, beta)), L_0 = the decoder NLL at x0_hat = x0."""
    sched = make_schedule("cosine", 50)
    x0, _ = image_data(seed=9, shape=(3, 1, 2, 2))
    D = 4

    def knows_x0(x_t, t):
        return x0

    def bound(timesteps):
        return nll_bits_per_dim(
            knows_x0, sched, x0, prediction_type="x0", variance="large", timesteps=timesteps
        )

    ab, ab_prev = sched.alphas_cumprod, sched.alphas_cumprod_prev
    ratio = sched.betas / ((1 - ab_prev) / (1 - ab) * sched.betas)  # beta / beta_tilde
    kl = 0.5 * (-1 + ratio.log() + 1 / ratio) * D  # (T,) nats per sample; ratio[0] is inf
    beta_tilde_1 = (1 - ab[0]) / (1 - ab[1]) * sched.betas[1]
    log_scale = torch.full_like(x0, 0.5 * beta_tilde_1.log().item())
    decoder = -discretized_gaussian_log_likelihood(x0, x0, log_scale).flatten(1).sum(1)
    rest = prior_kl(sched, x0) + decoder  # (B,)
    to_bits = 1 / (D * math.log(2))
    torch.testing.assert_close(bound(None), (rest + kl[1:].sum()) * to_bits)
    subset = torch.tensor([3, 40])
    torch.testing.assert_close(bound(subset), (rest + 49 / 2 * kl[subset].sum()) * to_bits)


def test_nll_timestep_subsets():
    sched, x0, _, exact_x0 = _gaussian_data_setup(batch=8)
    full = nll_bits_per_dim(exact_x0, sched, x0, prediction_type="x0", generator=gen(2))
    listed = nll_bits_per_dim(
        exact_x0, sched, x0, prediction_type="x0", generator=gen(2), timesteps=torch.arange(1, 100)
    )
    torch.testing.assert_close(listed, full)
    some = nll_bits_per_dim(
        exact_x0, sched, x0, prediction_type="x0", generator=gen(2), timesteps=7
    )
    assert some.shape == (8,) and torch.all(torch.isfinite(some))
    with pytest.raises(ValueError, match=r"timesteps=100 must be in \[1, 99\]"):
        nll_bits_per_dim(exact_x0, sched, x0, prediction_type="x0", timesteps=100)
    with pytest.raises(ValueError, match="distinct steps in \\[1, T\\)"):
        nll_bits_per_dim(exact_x0, sched, x0, prediction_type="x0", timesteps=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="distinct steps"):
        nll_bits_per_dim(exact_x0, sched, x0, prediction_type="x0", timesteps=torch.tensor([5, 5]))


# ---------------------------------------------------------------- importance sampling of t


def test_loss_aware_sampler():
    T = 6
    sampler = LossAwareSampler(T, history=2, uniform_prob=0.0)
    torch.testing.assert_close(
        sampler.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64)
    )
    rounds = torch.rand(3, T, generator=gen(12), dtype=torch.float64) * torch.arange(1, T + 1)
    for losses in rounds:  # the third round pushes out the first
        sampler.update(torch.arange(T), losses)
    p = sampler.probabilities()
    expected = rounds[1:].pow(2).mean(dim=0).sqrt()  # Nichol & Dhariwal: sqrt(E[L_t^2])
    torch.testing.assert_close(p, expected / expected.sum())
    t, w = sampler.sample(4000, generator=gen(13))
    assert t.shape == w.shape == (4000,) and w.dtype == torch.float32
    # E_p[w L_t] = sum_t p_t / (T p_t) L_t is the uniform mean of L_t: importance weighting is
    # unbiased. Checked on the sampled batch, within sampling error.
    mean_loss = rounds[2]
    estimate = (w.double() * mean_loss[t]).mean().item()
    assert estimate == pytest.approx(mean_loss.mean().item(), rel=0.05)
    mixed = LossAwareSampler(T, history=2, uniform_prob=0.5)
    for losses in rounds:
        mixed.update(torch.arange(T), losses)
    torch.testing.assert_close(mixed.probabilities(), 0.5 * p + 0.5 / T)
    with pytest.raises(ValueError, match="shape mismatch"):
        sampler.update(torch.arange(3), mean_loss)
