"""The autoencoder's measurements (evaluation/reconstruction.py): PSNR against its formula, SSIM
against scipy's Gaussian filter, the probe on a perfect and a broken autoencoder, and the verdicts."""

import math

import pytest
import torch
from torch import nn

from ldmkit.evaluation.reconstruction import (
    PROBE_HOLD_OUT_MIN_DATA,
    QualityVerdict,
    ReconstructionProbe,
    describe,
    probe_split,
    psnr,
    ssim,
)
from ldmkit.models.distributions import DiagonalGaussian


def test_psnr_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    y = x + 0.1 * torch.randn(3, 1, 8, 8, generator=g)
    mse = (x - y).double().square().flatten(1).mean(1)
    assert torch.allclose(psnr(x, y), 10 * torch.log10(4.0 / mse))
    # a constant error of 0.02 on a range of 2: 20 log10(2 / 0.02) = 40 dB
    assert torch.allclose(psnr(x, x + 0.02), torch.full((3,), 40.0, dtype=torch.float64))


def scipy_ssim(x, y, window, sigma=1.5, data_range=2.0):
    """Wang et al.'s SSIM with scipy's Gaussian filter (truncated to the window), averaged over
    the windows that lie inside the image, per image and channel-mean."""
    from scipy.ndimage import gaussian_filter

    r = (window - 1) // 2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for a, b in zip(x.double().numpy(), y.double().numpy()):
        vals = []
        for ca, cb in zip(a, b):
            f = lambda m: gaussian_filter(m, sigma, truncate=r / sigma, mode="constant")[r:-r, r:-r]  # noqa: E731
            mu_a, mu_b = f(ca), f(cb)
            va, vb, cov = f(ca * ca) - mu_a**2, f(cb * cb) - mu_b**2, f(ca * cb) - mu_a * mu_b
            s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
                (mu_a**2 + mu_b**2 + c1) * (va + vb + c2)
            )
            vals.append(s)
        out.append(float(sum(v.mean() for v in vals) / len(vals)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.reference
@pytest.mark.parametrize("window", [7, 11])
def test_ssim_matches_scipy(window):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 24, 24, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(4, 3, 24, 24, generator=g)).clamp(-1, 1)
    ours, ref = ssim(x, y, window_size=window), scipy_ssim(x, y, window)
    assert torch.allclose(ours, ref, atol=1e-9), (ours, ref)
    assert torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64))
    assert (ours < 0.9).all()  # the noise is visible to it


def test_probe_split_holds_out_a_fixed_batch_of_large_data():
    probe, train = probe_split(5000, seed=3)
    assert len(probe) == 128 and len(train) == 5000 - 128
    assert not set(probe.tolist()) & set(train.tolist())
    assert torch.equal(probe, probe_split(5000, seed=3)[0])  # fixed by the seed
    assert not torch.equal(probe, probe_split(5000, seed=4)[0])
    small_probe, small_train = probe_split(PROBE_HOLD_OUT_MIN_DATA - 1, seed=3)
    assert small_train is None and torch.equal(small_probe, torch.arange(128))


class Identity(nn.Module):
    """An 'autoencoder' whose latent is the image itself: perfect, or broken to a grey image."""

    def __init__(self, broken: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.broken = broken

    def encode(self, x):
        return DiagonalGaussian(x, torch.zeros_like(x))

    def decode(self, z):
        return torch.zeros_like(z) if self.broken else z


class Brightness:
    """A 'classifier' of two classes: dark (mean < 0) and bright images."""

    def logits(self, images):
        m = images.float().flatten(1).mean(1)
        return torch.stack([-m, m], 1).double()


def test_probe_measures_a_perfect_and_a_broken_autoencoder():
    g = torch.Generator().manual_seed(0)
    dark = torch.randint(0, 100, (10, 1, 8, 8), generator=g, dtype=torch.uint8)
    bright = torch.randint(156, 256, (10, 1, 8, 8), generator=g, dtype=torch.uint8)
    probe = ReconstructionProbe(torch.cat([dark, bright]), Brightness(), batch_size=7)
    good = probe.measure(Identity())
    assert good["readability"] == 1.0 and good["psnr"] == 100.0  # clamped: no error at all
    assert good["ssim"] == pytest.approx(1.0)
    assert QualityVerdict.problems(good) == []
    bad = probe.measure(Identity(broken=True))  # every reconstruction the same grey
    # grey (mean 0) reads as bright (logit tie -> argmax 0 = dark): half keep their class
    assert bad["readability"] == 0.5
    assert bad["psnr"] < 12
    problems = QualityVerdict.problems(bad)
    assert any("50% of its reconstructions" in p for p in problems)
    assert any("PSNR" in p for p in problems)
    assert "readability 50%" in describe(bad)


def rows(*values, key="readability", psnr=25.0):
    return [{"psnr": psnr if key != "psnr" else v, key: v, "ssim": 0.9, "latent_std": 1.0}
            for v in values]  # fmt: skip


def test_verdict_target_and_plateau():
    v = QualityVerdict(target_readability=0.95, target_psnr=20.0)
    assert v.target_reached(rows(0.5, 0.9)) is None
    assert v.target_reached(rows(0.5, 0.96)) == "readability target"
    assert v.target_reached(rows(0.96, psnr=19.0)) is None  # readable but below the PSNR floor
    # without labels: a plateau of the PSNR (gain under 0.2 dB over 3 checks), above the floor
    rising = [{"psnr": p, "ssim": 0.9, "latent_std": 1.0} for p in (18, 20, 22, 23, 24)]
    assert v.target_reached(rising) is None
    flat = [{"psnr": p, "ssim": 0.9, "latent_std": 1.0} for p in (18, 22, 23.0, 23.1, 23.1, 23.15)]
    assert v.target_reached(flat) == "plateau"
    low_flat = [{"psnr": p, "ssim": 0.9, "latent_std": 1.0} for p in (15, 15, 15, 15, 15)]
    assert v.target_reached(low_flat) is None  # a plateau below the floor is no target


def test_problems_name_each_failure():
    ok = {"psnr": 24.0, "ssim": 0.9, "latent_std": 0.8, "readability": 0.95}
    assert QualityVerdict.problems(ok) == []
    assert QualityVerdict.problems({**ok, "latent_std": 0.0}) == [
        "its latents have collapsed (std 0)"
    ]
    assert len(QualityVerdict.problems({**ok, "psnr": math.nan})) == 1
    assert len(QualityVerdict.problems({**ok, "readability": 0.5, "psnr": 10.0})) == 2
