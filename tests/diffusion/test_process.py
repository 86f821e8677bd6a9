import pytest
import torch

from ldmkit.diffusion.process import (
    add_noise,
    posterior_mean_variance,
    predict_eps,
    predict_v,
    predict_x0,
    snr,
    target_for,
)
from ldmkit.diffusion.schedules import make_schedule

PREDICT = {"eps": predict_eps, "x0": predict_x0, "v": predict_v}


def _data(shape=(4, 2, 3, 3), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=dtype)
    eps = torch.randn(shape, generator=g, dtype=dtype)
    return x0, eps, g


def test_add_noise_matches_closed_form_and_keeps_inputs():
    sched = make_schedule("linear", 1000)
    x0, eps, _ = _data()
    x0_before, eps_before = x0.clone(), eps.clone()
    t = torch.tensor([0, 1, 500, 999])
    x_t = add_noise(sched, x0, eps, t)
    ab = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, rtol=0, atol=1e-12)
    assert torch.equal(x0, x0_before) and torch.equal(eps, eps_before)


def test_add_noise_keeps_float32():
    sched = make_schedule("cosine", 50)
    x0, eps, _ = _data(dtype=torch.float32)
    x_t = add_noise(sched, x0, eps, torch.tensor([0, 10, 20, 49]))
    assert x_t.dtype == torch.float32
    # q(x_t | x0) preserves variance for unit-variance data: a^2 + s^2 = 1.
    big = torch.randn(20000, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(20000, generator=torch.Generator().manual_seed(2))
    x_t = add_noise(sched, big.reshape(-1, 1), noise.reshape(-1, 1), torch.full((20000,), 25))
    assert x_t.std().item() == pytest.approx(1.0, abs=0.03)


def test_snr():
    sched = make_schedule("scaled_linear", 100)
    t = torch.arange(100)
    r = snr(sched, t)
    ab = sched.alphas_cumprod
    torch.testing.assert_close(r, ab / (1 - ab))
    assert r.dtype == torch.float64 and torch.all(torch.diff(r) < 0)
    zt = make_schedule("linear", 100, zero_terminal_snr=True)
    assert snr(zt, torch.tensor([99])).item() == 0.0


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_matches_bayes_rule(name):
    """q(x_{t-1}|x_t,x0) ~ q(x_t|x_{t-1}) q(x_{t-1}|x0): a product of two Gaussians in x_{t-1}."""
    sched = make_schedule(name, 200)
    x0, eps, _ = _data()
    t = torch.tensor([1, 7, 100, 199])
    x_t = add_noise(sched, x0, eps, t)
    mean, var, log_var = posterior_mean_variance(sched, x0, x_t, t, "small")

    alpha = sched.alphas[t].reshape(-1, 1, 1, 1)
    ab_prev = sched.alphas_cumprod[t - 1].reshape(-1, 1, 1, 1)
    beta = 1 - alpha
    # x_t | x_{t-1} ~ N(sqrt(alpha) x_{t-1}, beta); x_{t-1} | x0 ~ N(sqrt(ab_prev) x0, 1 - ab_prev)
    precision = alpha / beta + 1 / (1 - ab_prev)
    bayes_var = 1 / precision
    bayes_mean = bayes_var * (alpha.sqrt() * x_t / beta + ab_prev.sqrt() * x0 / (1 - ab_prev))
    torch.testing.assert_close(mean, bayes_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(var, bayes_var, rtol=1e-10, atol=0)
    torch.testing.assert_close(log_var, bayes_var.log(), rtol=1e-10, atol=1e-10)


def test_posterior_at_t0_and_large_variance():
    sched = make_schedule("linear", 1000)
    x0, eps, _ = _data()
    t = torch.tensor([0, 0, 1, 500])
    x_t = add_noise(sched, x0, eps, t)
    mean, var, log_var = posterior_mean_variance(sched, x0, x_t, t, "small")
    # At t = 0 the step lands on the data itself: mean x0, variance 0, log-variance clipped.
    torch.testing.assert_close(mean[:2], x0[:2], rtol=0, atol=1e-12)
    assert torch.all(var[:2] == 0)
    beta_tilde_1 = (1 - sched.alphas_cumprod[0]) / (1 - sched.alphas_cumprod[1]) * sched.betas[1]
    torch.testing.assert_close(log_var[:2].flatten(), beta_tilde_1.log().expand(2))

    mean_l, var_l, log_var_l = posterior_mean_variance(sched, x0, x_t, t, "large")
    torch.testing.assert_close(mean_l, mean)
    torch.testing.assert_close(var_l[2:].flatten(), sched.betas[t[2:]])
    torch.testing.assert_close(var_l[:2].flatten(), beta_tilde_1.expand(2))
    torch.testing.assert_close(log_var_l, var_l.log())
    # beta_tilde < beta for t >= 1: "large" is the upper of the two fixed choices.
    assert torch.all(var[2:] < var_l[2:])


@pytest.mark.parametrize("src", ["eps", "x0", "v"])
@pytest.mark.parametrize("dst", ["eps", "x0", "v"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_conversions_round_trip(src, dst, name):
    sched = make_schedule(name, 1000)
    x_t, pred, _ = _data(seed=3)
    t = torch.tensor([0, 3, 600, 999])
    converted = PREDICT[dst](sched, x_t, t, pred, src)
    back = PREDICT[src](sched, x_t, t, converted, dst)
    torch.testing.assert_close(back, pred, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("pred_type", ["eps", "x0", "v"])
def test_true_targets_are_consistent(pred_type):
    """Fed the true target, every conversion recovers the true x0, eps and v."""
    sched = make_schedule("cosine", 100)
    x0, eps, _ = _data(seed=4)
    t = torch.tensor([0, 30, 60, 99])
    x_t = add_noise(sched, x0, eps, t)
    truth = {"eps": eps, "x0": x0, "v": target_for("v", x0, eps, sched, t)}
    for dst, fn in PREDICT.items():
        torch.testing.assert_close(
            fn(sched, x_t, t, truth[pred_type], pred_type), truth[dst], rtol=1e-8, atol=1e-8
        )
    torch.testing.assert_close(target_for(pred_type, x0, eps, sched, t), truth[pred_type])
    # v = a eps - s x0 directly (Salimans & Ho 2022)
    ab = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(truth["v"], ab.sqrt() * eps - (1 - ab).sqrt() * x0)


def test_v_conversions_survive_zero_terminal_snr():
    sched = make_schedule("linear", 100, zero_terminal_snr=True)
    x0, eps, _ = _data(seed=5)
    t = torch.tensor([99, 99, 50, 0])
    x_t = add_noise(sched, x0, eps, t)
    v = target_for("v", x0, eps, sched, t)
    torch.testing.assert_close(predict_x0(sched, x_t, t, v, "v"), x0)
    torch.testing.assert_close(predict_eps(sched, x_t, t, v, "v"), eps)
    # At alpha_bar = 0, x_t = eps and v = -x0.
    torch.testing.assert_close(v[:2], -x0[:2])


def test_float32_in_float32_out():
    sched = make_schedule("linear", 1000)
    x_t, pred, _ = _data(dtype=torch.float32)
    t = torch.tensor([1, 2, 3, 4])
    for fn in PREDICT.values():
        assert fn(sched, x_t, t, pred, "v").dtype == torch.float32
    mean, var, log_var = posterior_mean_variance(sched, pred, x_t, t)
    assert mean.dtype == var.dtype == log_var.dtype == torch.float32
    assert var.shape == (4, 1, 1, 1)


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise():
    sched = make_schedule("linear", 10)
    x0, eps, _ = _data()
    t = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="unknown prediction_type 'score'; use one of eps, x0, v"):
        predict_x0(sched, x0, t, eps, "score")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        target_for("epsilon", x0, eps)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 10\).*0-based"):
        add_noise(sched, x0, eps, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 10\)"):
        add_noise(sched, x0, eps, torch.tensor([-1, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer .*long"):
        add_noise(sched, x0, eps, t.double())
    with pytest.raises(ValueError, match=r"t must have shape \(4,\).*t.expand"):
        add_noise(sched, x0, eps, torch.tensor(3))
    with pytest.raises(ValueError, match=r"shape mismatch: x0 \(4, 2, 3, 3\), eps \(4, 2, 3\)"):
        add_noise(sched, x0, eps[..., 0], t)
    with pytest.raises(ValueError, match="shape mismatch"):
        predict_v(sched, x0, t, eps[:, :1], "eps")
    with pytest.raises(ValueError, match="unknown variance 'fixed_small'; use 'small'"):
        posterior_mean_variance(sched, x0, eps, t, "fixed_small")
    with pytest.raises(ValueError, match="pass schedule and t"):
        target_for("v", x0, eps)


# ---------------------------------------------------------------- diffusers as a reference


@pytest.mark.reference
def test_add_noise_and_velocity_match_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = make_schedule("scaled_linear", 1000)
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    x0, eps, _ = _data(dtype=torch.float32)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(
        add_noise(sched, x0, eps, t), ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        target_for("v", x0, eps, sched, t), ref.get_velocity(x0, eps, t), rtol=1e-5, atol=1e-5
    )


@pytest.mark.reference
@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize(
    "pred_type,ref_type", [("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction")]
)
def test_posterior_step_matches_diffusers(variance, pred_type, ref_type):
    """One DDPM step x_{t-1} = mean + std * z with x0 from the model, against DDPMScheduler.step.

    DDPMScheduler recomputes beta_t as 1 - alpha_bar_t / alpha_bar_{t-1} from float32 alpha_bar,
    which loses about four digits at small t; it is given our float64 alpha_bar so that the check
    compares formulas, not rounding.
    """
    diffusers = pytest.importorskip("diffusers")
    sched = make_schedule("linear", 1000)
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        prediction_type=ref_type,
        variance_type="fixed_" + variance,
        clip_sample=False,
    )
    ref.set_timesteps(1000)
    ref.alphas_cumprod = sched.alphas_cumprod.clone()
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    x_t, out, _ = _data(shape=(1, 2, 4, 4), seed=6)
    for step in [1, 2, 400, 999]:
        t = torch.tensor([step])
        x0_hat = predict_x0(sched, x_t, t, out, pred_type)
        mean, var, _ = posterior_mean_variance(sched, x0_hat, x_t, t, variance)
        noise = torch.randn(
            x_t.shape, generator=torch.Generator().manual_seed(step), dtype=x_t.dtype
        )
        expected = mean + var.sqrt() * noise
        result = ref.step(out, step, x_t, generator=torch.Generator().manual_seed(step))
        torch.testing.assert_close(result.pred_original_sample, x0_hat, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(result.prev_sample, expected, rtol=1e-10, atol=1e-10)
