import pytest
import torch
from loss_data import gen, image_data

from ldmkit.diffusion.losses import (
    diffusion_loss,
    loss_weights,
    sample_log_sigmas,
    sample_timesteps,
    training_loss,
)
from ldmkit.diffusion.process import (
    add_noise,
    predict_v,
    predict_x0,
    target_for,
)
from ldmkit.diffusion.schedules import make_schedule

# ---------------------------------------------------------------- the simple loss and weights


def test_diffusion_loss():
    g = gen(6)
    out, target = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    torch.testing.assert_close(diffusion_loss(out, target), ((out - target) ** 2).mean())
    w = torch.tensor([0.0, 1.0, 3.0])
    per_sample = ((out - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(diffusion_loss(out, target, w, reduction="none"), per_sample * w)
    torch.testing.assert_close(diffusion_loss(out, target, w), (per_sample * w).mean())
    with pytest.raises(ValueError, match=r"weights must have shape \(3,\)"):
        diffusion_loss(out, target, torch.ones(3, 1))
    with pytest.raises(ValueError, match="shape mismatch"):
        diffusion_loss(out, target[:, :1])
    with pytest.raises(ValueError, match="unknown reduction 'sum'"):
        diffusion_loss(out, target, reduction="sum")


def _losses_for_one_error(sched, t, weighting, gamma=5.0):
    """Weighted losses of an eps-, an x0- and a v-model that make the same prediction."""
    x0, eps = image_data(seed=7)
    x_t = add_noise(sched, x0, eps, t)
    eps_hat = eps + 0.3 * torch.randn(eps.shape, generator=gen(8), dtype=eps.dtype)
    preds = {
        "eps": eps_hat,
        "x0": predict_x0(sched, x_t, t, eps_hat, "eps"),
        "v": predict_v(sched, x_t, t, eps_hat, "eps"),
    }
    return {
        k: diffusion_loss(
            pred,
            target_for(k, x0, eps, sched, t),
            loss_weights(sched, t, k, weighting, gamma).double(),
            reduction="none",
        )
        for k, pred in preds.items()
    }


def test_eps_equivalent_weights_put_x0_and_v_losses_on_the_eps_scale():
    sched = make_schedule("cosine", 1000)
    t = torch.tensor([0, 100, 700, 990])
    losses = _losses_for_one_error(sched, t, "eps_equivalent")
    torch.testing.assert_close(losses["x0"], losses["eps"])
    torch.testing.assert_close(losses["v"], losses["eps"])
    # Unweighted they differ by orders of magnitude across t.
    raw = _losses_for_one_error(sched, t, "none")
    assert not torch.allclose(raw["x0"], raw["eps"], rtol=0.5)


def test_min_snr_weights_agree_across_prediction_types():
    """min-SNR-gamma is one weighting in x0 space, min(snr, gamma) |x0 err|^2 (Hang et al. 2023)."""
    sched = make_schedule("linear", 1000)
    t = torch.tensor([0, 50, 300, 999])
    losses = _losses_for_one_error(sched, t, "min_snr", gamma=5.0)
    torch.testing.assert_close(losses["eps"], losses["x0"])
    torch.testing.assert_close(losses["v"], losses["x0"])
    r = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    w = {k: loss_weights(sched, t, k, "min_snr").double() for k in ["eps", "x0", "v"]}
    torch.testing.assert_close(w["x0"], r.clamp(max=5.0), rtol=1e-6, atol=0)
    assert w["eps"][0] < 1 and w["eps"][-1] == 1  # clipped at high snr, 1 at low snr


def test_min_snr_weights_at_zero_terminal_snr_are_finite():
    sched = make_schedule("linear", 100, zero_terminal_snr=True)
    t = torch.tensor([99, 0])
    for k in ["eps", "x0", "v"]:
        w = loss_weights(sched, t, k, "min_snr")
        assert torch.all(torch.isfinite(w)) and w.dtype == torch.float32
    assert loss_weights(sched, t, "eps", "min_snr")[0] == 1.0


def test_loss_weights_bad_inputs():
    sched = make_schedule("linear", 10)
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="unknown weighting 'snr'; use one of none, min_snr"):
        loss_weights(sched, t, "eps", "snr")
    with pytest.raises(ValueError, match="unknown prediction_type 'sample'"):
        loss_weights(sched, t, "sample")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 10\)"):
        loss_weights(sched, torch.tensor([10]), "eps")


# ---------------------------------------------------------------- sampling t and sigma


def test_sample_timesteps_uniform():
    t = sample_timesteps(20000, 10, generator=gen(9))
    assert t.dtype == torch.long and t.shape == (20000,)
    counts = torch.bincount(t, minlength=10).double()
    assert t.min() == 0 and t.max() == 9
    chi2 = ((counts - 2000) ** 2 / 2000).sum().item()
    assert chi2 < 30  # 9 degrees of freedom: p < 0.001 above 27.9
    same = sample_timesteps(5, 10, generator=gen(3))
    assert torch.equal(same, sample_timesteps(5, 10, generator=gen(3)))


def test_sample_timesteps_stratified_covers_every_stratum():
    t = sample_timesteps(50, 50, generator=gen(10), method="stratified")
    assert torch.equal(t.sort().values, torch.arange(50))
    t = sample_timesteps(4, 1000, generator=gen(11), method="stratified")
    assert sorted(int(x) // 250 for x in t) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown method 'lognormal'"):
        sample_timesteps(4, 1000, method="lognormal")
    with pytest.raises(ValueError, match="must be >= 1"):
        sample_timesteps(0, 1000)


def test_sample_log_sigmas():
    z = sample_log_sigmas(20000, generator=gen(13))
    assert z.dtype == torch.float32 and z.shape == (20000,)
    assert z.mean().item() == pytest.approx(-1.2, abs=0.05)
    assert z.std().item() == pytest.approx(1.2, abs=0.05)
    # logit-normal t (SD3) is the same law: sigmoid(ln sigma) has median 1/2 for p_mean = 0.
    t = torch.sigmoid(sample_log_sigmas(20000, p_mean=0.0, p_std=1.0, generator=gen(14)))
    assert t.median().item() == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="p_std must be > 0"):
        sample_log_sigmas(4, p_std=0.0)


# ---------------------------------------------------------------- training_loss


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["none", "min_snr"])
def test_training_loss_is_the_weighted_mse_on_its_own_draws(prediction_type, weighting):
    """training_loss draws t, then eps, from the generator; the loss of a network that outputs
    zeros is then mean_b w(t_b) mean(target_b^2), written out here from the formulas."""
    s = make_schedule("cosine", 50)
    x0 = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = training_loss(
        lambda x, t: torch.zeros_like(x), s, x0, prediction_type=prediction_type,
        weighting=weighting, generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 50, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ab = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction_type]
    snr = (ab / (1 - ab)).flatten()
    w = torch.ones(6, dtype=torch.float64)
    if weighting == "min_snr":  # Hang et al. 2023: min(snr, 5) on the x0 scale
        w = (
            snr.clamp(max=5.0)
            / {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}[prediction_type]
        )
    want = (w * target.pow(2).mean(dim=(1, 2, 3))).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_training_loss_passes_conditions_and_calls_them_after_the_draws():
    s = make_schedule("linear", 20)
    x0 = torch.randn(4, 1, 2, 2)
    seen = {}

    def net(x, t, *, class_labels):
        seen["labels"] = class_labels
        return x

    gen = torch.Generator().manual_seed(3)
    order = []
    training_loss(net, s, x0, prediction_type="eps", generator=gen,
                  cond=lambda: order.append(gen.get_state().clone()) or {"class_labels": torch.arange(4)})  # fmt: skip
    g = torch.Generator().manual_seed(3)
    torch.randint(0, 20, (4,), generator=g), torch.randn(x0.shape, generator=g)
    assert torch.equal(order[0], g.get_state())  # called after t and eps were drawn
    assert torch.equal(seen["labels"], torch.arange(4))
