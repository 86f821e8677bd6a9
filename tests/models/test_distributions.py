import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldmkit.models.distributions import DiagonalGaussian


def _random_posterior(gen: torch.Generator, shape=(2, 4, 8, 8)) -> DiagonalGaussian:
    mean = torch.randn(shape, generator=gen, dtype=torch.float64)
    logvar = 2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return DiagonalGaussian(mean, logvar)


def test_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    q = _random_posterior(gen)
    reference = kl_divergence(Normal(q.mean, q.std), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert q.kl().shape == (2,)
    torch.testing.assert_close(q.kl(), reference, rtol=1e-12, atol=1e-12)


def test_nll_matches_torch_distributions():
    gen = torch.Generator().manual_seed(1)
    q = _random_posterior(gen)
    x = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    reference = -Normal(q.mean, q.std).log_prob(x).sum(dim=(1, 2, 3))
    assert q.nll(x).shape == (2,)
    torch.testing.assert_close(q.nll(x), reference, rtol=1e-12, atol=1e-12)


def test_samples_have_the_posterior_mean_and_variance():
    n = 40_000
    mean = torch.tensor([[-1.0, 0.0, 2.5]], dtype=torch.float64)
    var = torch.tensor([[4.0, 0.25, 1.0]], dtype=torch.float64)  # std != var, so a mix-up shows
    q = DiagonalGaussian(mean.expand(n, 3), var.log().expand(n, 3))
    z = q.sample(torch.Generator().manual_seed(2))  # (n, 3): n independent draws per column
    # 5 standard errors: se(mean) = sqrt(var / n); se(var) = var * sqrt(2 / (n - 1)) for a Gaussian
    assert torch.all((z.mean(0) - mean[0]).abs() < 5 * (var[0] / n).sqrt())
    assert torch.all((z.var(0) - var[0]).abs() < 5 * var[0] * math.sqrt(2 / (n - 1)))


def test_sample_is_reproducible_with_a_generator_and_differentiable():
    mean = torch.zeros(2, 4, 3, 3, requires_grad=True)
    logvar = torch.zeros(2, 4, 3, 3, requires_grad=True)
    q = DiagonalGaussian(mean, logvar)
    a = q.sample(torch.Generator().manual_seed(3))
    b = q.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    a.sum().backward()  # reparameterised: gradients reach mean and logvar
    assert torch.all(mean.grad == 1) and logvar.grad.abs().sum() > 0


def test_logvar_is_clamped_like_ldm():
    q = DiagonalGaussian(torch.zeros(1, 2), torch.tensor([[100.0, -100.0]]))
    assert q.logvar.tolist() == [[20.0, -30.0]]
    torch.testing.assert_close(q.var, torch.tensor([[math.exp(20.0), math.exp(-30.0)]]))


def test_from_moments_splits_mean_then_logvar():
    moments = torch.linspace(-3, 3, 2 * 6 * 2 * 2).reshape(2, 6, 2, 2)  # inside the clamp
    q = DiagonalGaussian.from_moments(moments)
    assert torch.equal(q.mean, moments[:, :3]) and torch.equal(q.logvar, moments[:, 3:])
    assert torch.equal(q.mode(), q.mean)


def test_deterministic_posterior_is_its_mean():
    mean = torch.randn(2, 3, 4, 4)
    q = DiagonalGaussian(mean, torch.ones_like(mean), deterministic=True)
    assert torch.equal(q.sample(), mean)
    assert torch.equal(q.kl(), torch.zeros(2)) and torch.equal(q.nll(mean), torch.zeros(2))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="mean has shape .* but logvar has shape"):
        DiagonalGaussian(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="even number of channels"):
        DiagonalGaussian.from_moments(torch.zeros(2, 5, 4, 4))
    q = DiagonalGaussian(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="x has shape"):
        q.nll(torch.zeros(2, 4))
