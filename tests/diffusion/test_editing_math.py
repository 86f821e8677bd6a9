"""The diffusion math of editing, against analytic results (Gaussian data's exact denoiser)."""

import math

import pytest
import torch

from ldmkit.diffusion.edit_math import (
    blend_known,
    invert_ddim,
    repaint_path,
    sample_repaint,
    slerp,
    strength_start,
)
from ldmkit.diffusion.samplers import get_sigmas, sample_ddim
from ldmkit.diffusion.schedules import make_schedule


def gaussian_denoiser(mu, s):
    """E[x0 | x] for x0 ~ N(mu, s^2), x = x0 + sigma * noise (exact)."""

    def denoise(x, sigma):
        return mu + s**2 / (s**2 + sigma.to(x.dtype) ** 2) * (x - mu)

    return denoise


@pytest.mark.parametrize(
    ("steps", "strength", "start"), [(20, 1.0, 0), (20, 0.5, 10), (50, 0.3, 35), (10, 0.06, 9)]
)
def test_strength_leaves_round_steps_times_strength(steps, strength, start):
    assert strength_start(steps, strength) == start
    assert steps - start == round(steps * strength)


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.01, 0.01])
def test_strength_out_of_range_or_without_a_step_is_refused(strength):
    with pytest.raises(ValueError, match="strength"):
        strength_start(20, strength)


def test_slerp_keeps_the_norm_of_gaussian_noise_where_lerp_shrinks_it():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 4, 32, 32, generator=g), torch.randn(8, 4, 32, 32, generator=g)
    expected = math.sqrt(a[0].numel())
    for w in (0.0, 0.25, 0.5, 0.75, 1.0):
        norms = slerp(a, b, w).flatten(1).norm(dim=1)
        assert torch.allclose(norms, torch.full_like(norms, expected), rtol=0.03)
    lerp_norm = (0.5 * a + 0.5 * b).flatten(1).norm(dim=1).mean()
    assert lerp_norm < 0.75 * expected  # about 1 / sqrt(2)
    assert torch.equal(slerp(a, b, 0.0), a) or torch.allclose(slerp(a, b, 0.0), a, atol=1e-5)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)


def test_slerp_of_parallel_inputs_is_the_straight_line():
    a = torch.ones(1, 3)
    assert torch.allclose(slerp(a, 2 * a, 0.5), 1.5 * a)


@pytest.mark.parametrize(("steps", "jump", "n"), [(20, 5, 3), (10, 3, 2), (12, 4, 1), (7, 10, 4)])
def test_repaint_path_starts_at_the_top_moves_by_one_and_ends_clean(steps, jump, n):
    path = repaint_path(steps, jump, n)
    assert path[0] == 0 and path[-1] == steps
    assert all(abs(q - p) == 1 for p, q in zip(path, path[1:], strict=False))
    ups = sum(q < p for p, q in zip(path, path[1:], strict=False))
    assert ups == jump * (n - 1) * len(range(jump, steps, jump))
    if n == 1:
        assert path == list(range(steps + 1))


def test_ddim_inversion_of_gaussian_data_is_exact_to_tolerance_and_improves_with_steps():
    """x0 -> invert -> DDIM back; for Gaussian data the denoiser is exact, so the only error is
    the step's discretisation, which more steps (and fixed-point refinement) shrink."""
    schedule = make_schedule("linear", 1000)
    mu, s = 0.3, 0.5
    denoise = gaussian_denoiser(mu, s)
    x0 = mu + s * torch.randn(
        64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    errors = []
    for steps in (10, 50, 200):
        sigmas = get_sigmas(schedule, steps, "trailing")
        x_T = invert_ddim(denoise, x0, sigmas)
        back = sample_ddim(denoise, x_T * math.sqrt(1 + sigmas[0].item() ** 2), sigmas)
        errors.append((back - x0).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05 and errors[0] > 10 * errors[2]  # first order: error ~ 1 / steps
    sigmas = get_sigmas(schedule, 10, "trailing")
    x_T = invert_ddim(denoise, x0, sigmas, refine=20)
    back = sample_ddim(denoise, x_T * math.sqrt(1 + sigmas[0].item() ** 2), sigmas)
    assert (back - x0).abs().max().item() < 1e-6  # an exact inverse of the sampler's steps


def test_inverted_noise_of_gaussian_data_is_unit_gaussian():
    schedule = make_schedule("linear", 1000)
    denoise = gaussian_denoiser(0.0, 0.7)
    x0 = 0.7 * torch.randn(
        20_000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    x_T = invert_ddim(denoise, x0, get_sigmas(schedule, 100, "trailing"))
    assert abs(x_T.mean().item()) < 0.03 and abs(x_T.std().item() - 1) < 0.03


def test_blending_ends_on_the_known_latent_in_the_kept_region():
    known = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., :2, :] = 1
    step = blend_known(known, mask, lambda *_: torch.ones_like(known), None)
    x = torch.full_like(known, 7.0)
    mid = step(0, x, torch.tensor(0.5, dtype=torch.float64), x)
    assert torch.equal(mid[..., 2:, :], known[..., 2:, :] + 0.5)
    assert torch.equal(mid[..., :2, :], x[..., :2, :])
    end = step(1, x, torch.tensor(0.0, dtype=torch.float64), x)
    assert torch.equal(end[..., 2:, :], known[..., 2:, :])


def test_repaint_keeps_the_known_region_and_fills_the_rest_from_the_data():
    schedule = make_schedule("linear", 1000)
    sigmas = get_sigmas(schedule, 100, "trailing")
    g = torch.Generator().manual_seed(0)
    known = torch.full((512, 1, 2, 2), 5.0, dtype=torch.float64)
    mask = torch.zeros(512, 1, 2, 2, dtype=torch.float64)
    mask[..., 0, 0] = 1
    x = torch.randn(known.shape, generator=g, dtype=torch.float64) * sigmas[0].item()
    out = sample_repaint(
        gaussian_denoiser(1.0, 0.5), x, sigmas, known=known, mask=mask,
        noise=lambda *_: torch.randn(known.shape, generator=g, dtype=torch.float64),
        jump_length=5, jump_n_sample=3,
    )  # fmt: skip
    assert torch.equal(out[..., 0, 1], known[..., 0, 1])
    filled = out[..., 0, 0]
    assert abs(filled.mean().item() - 1.0) < 0.15 and abs(filled.std().item() - 0.5) < 0.06
