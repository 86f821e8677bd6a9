"""Tests of ldmkit.diffusion.denoiser: VP network -> VE denoiser conversions and the t it feeds."""

from __future__ import annotations

import math

import pytest
import torch

from ldmkit.diffusion.denoiser import VPDenoiser, x0_from_eps, x0_from_v
from ldmkit.diffusion.schedules import make_schedule

SHAPE = (2, 4, 8, 8)


class Oracle:
    """A network that knows x0 and the noise: predicts them exactly and records its inputs."""

    def __init__(self, x0, eps, schedule, prediction_type):
        self.x0, self.eps, self.schedule, self.prediction_type = x0, eps, schedule, prediction_type
        self.calls = []

    def __call__(self, x_t, t, **cond):
        self.calls.append((x_t, t, cond))
        if self.prediction_type == "x0":
            return self.x0
        if self.prediction_type == "eps":
            return self.eps
        ab = self.schedule.alphas_cumprod[t.long()].view(-1, 1, 1, 1).to(x_t.dtype)
        return ab.sqrt() * self.eps - (1 - ab).sqrt() * self.x0  # v, Salimans & Ho 2022


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=g, dtype=dtype), torch.randn(
        SHAPE, generator=g, dtype=dtype
    )


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_exact_prediction_recovers_x0_and_feeds_vp_input_and_integer_t(prediction_type):
    schedule = make_schedule("scaled_linear", 1000)
    x0, eps = _data()
    t = torch.tensor([10, 700])
    sigma = schedule.sigmas[t]  # (B,)
    x = x0 + sigma.view(-1, 1, 1, 1) * eps  # VE state
    net = Oracle(x0, eps, schedule, prediction_type)
    out = VPDenoiser(net, schedule, prediction_type)(x, sigma, context="c")
    torch.testing.assert_close(out, x0, atol=1e-10, rtol=0)
    x_t, t_seen, cond = net.calls[0]
    ab = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)  # Ho 2020 eq. 4
    assert t_seen.dtype == torch.long and torch.equal(t_seen, t) and cond == {"context": "c"}


def test_scalar_sigma_between_steps_gives_fractional_t():
    schedule = make_schedule("linear", 1000)
    x0, eps = _data(torch.float32)
    net = Oracle(x0, eps, schedule, "x0")
    denoise = VPDenoiser(net, schedule, "x0")
    sigma = (schedule.sigmas[400] * schedule.sigmas[401]).sqrt()  # geometric midpoint
    denoise(x0, sigma)
    t = net.calls[-1][1]
    assert t.dtype == torch.float32 and t.shape == (2,)
    torch.testing.assert_close(t, torch.full((2,), 400.5), atol=1e-4, rtol=0)
    denoise(x0, schedule.sigmas[123].item())  # a Python float at a step: integer t
    assert net.calls[-1][1].dtype == torch.long and net.calls[-1][1].tolist() == [123, 123]


def test_conversions_match_diffusers_formulas():
    x0, eps = _data()
    sigma = torch.tensor(2.5, dtype=torch.float64)
    ab = 1 / (1 + sigma**2)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    torch.testing.assert_close(x0_from_eps(x_t / ab.sqrt(), sigma, eps), x0)
    torch.testing.assert_close(x0_from_v(x_t, sigma, v), x0)


def test_zero_terminal_snr_state_is_the_noise():
    schedule = make_schedule("linear", 1000, zero_terminal_snr=True)
    x0, eps = _data()
    sigma = torch.tensor(math.inf, dtype=torch.float64)
    # at alpha_bar = 0, x_t = eps and v = -x0; the VE state holds the VP value eps
    net = Oracle(x0, eps, schedule, "v")
    out = VPDenoiser(net, schedule, "v")(eps, sigma)
    torch.testing.assert_close(out, x0)
    x_t, t, _ = net.calls[0]
    assert torch.equal(x_t, eps) and t.tolist() == [999, 999]
    with pytest.raises(ValueError, match="eps-prediction cannot give x0 at sigma = inf"):
        VPDenoiser(Oracle(x0, eps, schedule, "eps"), schedule, "eps")(eps, sigma)


def test_bad_inputs():
    schedule = make_schedule("linear", 100)
    x0, eps = _data()
    with pytest.raises(ValueError, match="unknown prediction_type 'epsilon'; choose one of"):
        VPDenoiser(lambda x, t: x, schedule, "epsilon")
    denoise = VPDenoiser(lambda x, t: x, schedule, "x0")
    with pytest.raises(ValueError, match=r"sigma must be a scalar or of shape \(2,\)"):
        denoise(x0, torch.ones(3))
    with pytest.raises(ValueError, match="sigma = inf only exists in a zero-terminal-SNR schedule"):
        denoise(x0, math.inf)
    with pytest.raises(ValueError, match="it must predict one tensor shaped like x"):
        VPDenoiser(lambda x, t: x[:, :1], schedule, "eps")(x0, 1.0)
