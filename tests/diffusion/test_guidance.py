"""Tests of ldmkit.diffusion.guidance: classifier-free guidance as a denoiser wrapper."""

from __future__ import annotations

import pytest
import torch

from ldmkit.diffusion.guidance import classifier_free_guidance

SHAPE = (2, 3, 4, 4)


class CondDenoiser:
    """A toy conditional denoiser: x0 depends on x, sigma (scalar or (B,)) and a label (B,)."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, sigma, *, label):
        self.batch_sizes.append(x.shape[0])
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]).view(-1, 1, 1, 1)
        return torch.tanh(x) / (1 + sigma**2) + label.view(-1, 1, 1, 1).to(x.dtype) * 0.3


def _setup():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    cond, uncond = {"label": torch.tensor([1, 2])}, {"label": torch.tensor([5, 5])}
    return x, cond, uncond


@pytest.mark.parametrize("sigma", [torch.tensor(1.5), torch.tensor([0.5, 3.0])])
def test_scales_one_and_zero_and_one_batched_call(sigma):
    x, cond, uncond = _setup()
    d = CondDenoiser()
    c, u = d(x, sigma, **cond), d(x, sigma, **uncond)
    torch.testing.assert_close(
        classifier_free_guidance(d, 1.0, cond=cond, uncond=uncond)(x, sigma), c
    )
    torch.testing.assert_close(
        classifier_free_guidance(d, 0.0, cond=cond, uncond=uncond)(x, sigma), u
    )
    d.batch_sizes.clear()
    out = classifier_free_guidance(d, 7.5, cond=cond, uncond=uncond)(x, sigma)
    assert d.batch_sizes == [4]  # cond and uncond in one call
    torch.testing.assert_close(out, u + 7.5 * (c - u))


def test_guidance_rescale():
    x, cond, uncond = _setup()
    d = CondDenoiser()
    sigma = torch.tensor(1.0)
    c, u = d(x, sigma, **cond), d(x, sigma, **uncond)
    cfg = u + 5.0 * (c - u)
    full = classifier_free_guidance(d, 5.0, cond=cond, uncond=uncond, rescale=1.0)(x, sigma)
    # phi = 1: each sample's std is the conditional one (Lin et al. 2024 eq. 15)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)))
    half = classifier_free_guidance(d, 5.0, cond=cond, uncond=uncond, rescale=0.5)(x, sigma)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * cfg)


def test_bad_inputs():
    d = CondDenoiser()
    with pytest.raises(ValueError, match="cond and uncond must have the same keys"):
        classifier_free_guidance(d, 2.0, cond={"label": torch.zeros(2)}, uncond={})
    with pytest.raises(ValueError, match=r"rescale must lie in \[0, 1\]"):
        classifier_free_guidance(d, 2.0, cond={}, uncond={}, rescale=1.5)
