import math

import pytest
import torch

from ldmkit.diffusion.schedules import NoiseSchedule, make_schedule


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine", "sigmoid"])
def test_alphas_cumprod_monotone_and_in_range(name):
    s = make_schedule(name, 1000)
    ab = s.alphas_cumprod
    assert ab.dtype == torch.float64
    assert torch.all(ab[1:] < ab[:-1])
    assert 0 < ab[-1] < ab[0] < 1
    assert torch.all(torch.diff(s.sigmas) > 0)


def test_linear_endpoints():
    s = make_schedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)


def test_scaled_linear_is_linear_in_sqrt():
    s = make_schedule("scaled_linear", 1000)
    r = s.betas.sqrt()
    assert torch.allclose(
        torch.diff(r), torch.full((999,), (0.012**0.5 - 0.00085**0.5) / 999, dtype=torch.float64)
    )


def test_cosine_matches_paper_formula():
    T, s_ = 1000, 0.008
    sched = make_schedule("cosine", T)

    def f(t):
        return math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2

    for t in [0, 10, 500, 900]:
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert sched.betas.max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr(name):
    s = make_schedule(name, 1000, zero_terminal_snr=True)
    base = make_schedule(name, 1000)
    assert s.alphas_cumprod[-1].item() == 0.0
    assert s.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
    assert math.isinf(s.sigmas[-1].item())
    assert s.log_snr[-1].item() == -math.inf


def test_sigma_to_t_inverts_discrete_sigmas():
    s = make_schedule("linear", 1000)
    t = torch.tensor([0, 1, 17, 500, 999])
    assert torch.allclose(s.sigma_to_t(s.sigmas[t]), t.double(), atol=1e-6)
    mid = (s.sigmas[10].log() + s.sigmas[11].log()) / 2
    assert s.sigma_to_t(mid.exp()).item() == pytest.approx(10.5, abs=1e-9)


@pytest.mark.reference
@pytest.mark.parametrize(
    "name,dname",
    [
        ("linear", "linear"),
        ("scaled_linear", "scaled_linear"),
        ("cosine", "squaredcos_cap_v2"),
        ("sigmoid", "sigmoid"),
    ],
)
def test_matches_diffusers_betas(name, dname):
    diffusers = pytest.importorskip("diffusers")
    kw = {}
    if name == "scaled_linear":
        kw = dict(beta_start=0.00085, beta_end=0.012)
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=dname, **kw)
    ours = make_schedule(name, 1000)
    assert torch.allclose(ours.betas.float(), ref.betas, rtol=1e-5, atol=1e-7)


@pytest.mark.reference
def test_zero_snr_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        rescale_betas_zero_snr=True,
    )
    ours = make_schedule("scaled_linear", 1000, zero_terminal_snr=True)
    assert torch.allclose(ours.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="num_timesteps must be >= 2"):
        make_schedule("linear", 1)
    with pytest.raises(ValueError, match="betas must lie in"):
        NoiseSchedule(torch.tensor([0.1, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="cosine schedule takes no beta_start"):
        make_schedule("cosine", beta_start=0.1)


def test_schedule_from_fields_reads_mappings_and_attributes():
    import dataclasses

    from ldmkit.diffusion.schedules import schedule_from_fields

    @dataclasses.dataclass
    class Spec:
        schedule: str = "linear"
        num_timesteps: int = 50
        beta_start: float | None = 2e-4
        beta_end: float | None = None
        zero_terminal_snr: bool = True

    want = make_schedule("linear", 50, beta_start=2e-4, zero_terminal_snr=True)
    for spec in (Spec(), dataclasses.asdict(Spec())):
        torch.testing.assert_close(schedule_from_fields(spec).betas, want.betas, atol=0, rtol=0)
    cos = schedule_from_fields({"schedule": "cosine", "num_timesteps": 20})  # defaults filled in
    torch.testing.assert_close(cos.betas, make_schedule("cosine", 20).betas, atol=0, rtol=0)
    with pytest.raises(ValueError, match="needs num_timesteps"):
        schedule_from_fields({"schedule": "cosine"})
