import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.models.distributions import DiagonalGaussian
from ldmkit.models.losses import (
    PatchDiscriminator,
    adaptive_gan_weight,
    autoencoder_loss,
    discriminator_loss,
    hinge_d_loss,
    make_discriminator,
    ms_ssim,
    perceptual_loss,
    reconstruction_error,
)
from ldmkit.models.vae import Autoencoder, AutoencoderConfig


def tiny_config(**overrides) -> AutoencoderConfig:
    kwargs = dict(
        image_channels=3,
        latent_channels=2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_groups=4,
        image_size=16,
        disc_layers=2,
        disc_channels=8,
    )
    kwargs.update(overrides)
    return AutoencoderConfig(**kwargs)


def pair(seed: int = 0, shape=(2, 3, 16, 16)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen) * 2 - 1
    return x, x + 0.2 * torch.randn(shape, generator=gen)


# --- closed forms ---


def test_hinge_discriminator_loss_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.3, 1.0])  # relu(1 + fake) = 0, 1.3, 2
    expected = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1.3 + 2) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected, rel=1e-6)


def test_adaptive_weight_equals_the_gradient_norm_ratio():
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    a = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([0.5, -1.0, 4.0], dtype=torch.float64)
    nll = (a * w**2).sum()  # d/dw = 2 a w
    g_loss = (b * w).sum()  # d/dw = b
    expected = (2 * a * w).norm() / (b.norm() + 1e-4)  # Esser et al. 2021, eq. 7
    weight = adaptive_gan_weight(nll, g_loss, w)
    assert not weight.requires_grad
    assert weight.item() == pytest.approx(expected.item(), rel=1e-12)
    big = adaptive_gan_weight(1e9 * nll, g_loss, w)
    assert big.item() == 1e4  # clamped as in taming-transformers


def test_reconstruction_errors():
    x = torch.tensor([[1.0, -2.0]])
    recon = torch.tensor([[0.5, 1.0]])
    assert reconstruction_error(x, recon, "l1").tolist() == [[0.5, 3.0]]
    assert reconstruction_error(x, recon, "l2").tolist() == [[0.25, 9.0]]
    with pytest.raises(ValueError, match="reconstruction must be 'l1' or 'l2'"):
        reconstruction_error(x, recon, "huber")
    with pytest.raises(ValueError, match="must have one shape"):
        reconstruction_error(x, recon[:, :1])


# --- MS-SSIM ---


def test_ms_ssim_is_one_for_identical_images_and_falls_with_noise():
    x, _ = pair(shape=(2, 3, 32, 32))
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=gen)
    assert torch.allclose(ms_ssim(x, x), torch.ones(2))
    scores = [ms_ssim(x, x + s * noise) for s in (0.05, 0.2, 0.8)]
    assert torch.all(scores[0] > scores[1]) and torch.all(scores[1] > scores[2])
    assert torch.all(perceptual_loss(x, x + 0.2 * noise) == 1 - scores[1])


def test_ms_ssim_gradient_is_finite_even_for_anticorrelated_images():
    x, _ = pair(shape=(1, 1, 16, 16))
    y = (-x).clone().requires_grad_(True)  # negative cs: clipped before the fractional power
    perceptual_loss(x, y).sum().backward()
    assert torch.isfinite(y.grad).all()


def test_ms_ssim_refuses_images_smaller_than_the_window():
    x = torch.zeros(1, 1, 6, 6)
    with pytest.raises(ValueError, match="smaller than the 7-pixel SSIM window"):
        ms_ssim(x, x)


def _ssim_by_windows(x, y, sigma=1.5, k=7, data_range=2.0):
    """Mean SSIM and cs over every valid k x k window, from centred weighted moments.

    Wang et al. 2004, eq. 13-15 and 7-9, written window by window (unfold), independent of the
    blur-based E[x^2] - mu^2 form the library uses.
    """
    c = torch.arange(k, dtype=x.dtype) - (k - 1) / 2
    g = torch.exp(-(c**2) / (2 * sigma**2))
    w = torch.outer(g, g) / g.sum() ** 2  # (k, k), sums to 1
    px = x.unfold(2, k, 1).unfold(3, k, 1)  # (B, C, H-k+1, W-k+1, k, k)
    py = y.unfold(2, k, 1).unfold(3, k, 1)
    mx = (w * px).sum((-2, -1))
    my = (w * py).sum((-2, -1))
    dx, dy = px - mx[..., None, None], py - my[..., None, None]
    vx, vy, cov = (
        (w * dx * dx).sum((-2, -1)),
        (w * dy * dy).sum((-2, -1)),
        (w * dx * dy).sum((-2, -1)),
    )
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    cs = (2 * cov + c2) / (vx + vy + c2)
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    return (lum * cs).mean((1, 2, 3)), cs.mean((1, 2, 3))


def test_ms_ssim_matches_a_window_by_window_reference():
    x, y = pair(shape=(2, 3, 32, 32))
    x, y = x.double(), y.double()  # y = x + noise: positive cs, so no clipping is involved
    ssim1, _ = _ssim_by_windows(x, y)
    torch.testing.assert_close(ms_ssim(x, y, max_scales=1), ssim1)
    # 32 -> 16 -> 8 keeps three scales at or above the 7-pixel window (Wang et al. 2003, eq. 7)
    beta = torch.tensor([0.0448, 0.2856, 0.3001], dtype=torch.float64)
    beta = beta / beta.sum()
    expected = torch.ones(2, dtype=torch.float64)
    xs, ys = x, y
    for i in range(3):
        ssim, cs = _ssim_by_windows(xs, ys)
        expected = expected * (ssim if i == 2 else cs) ** beta[i]
        xs, ys = F.avg_pool2d(xs, 2), F.avg_pool2d(ys, 2)
    torch.testing.assert_close(ms_ssim(x, y), expected)


# --- the discriminator ---


@pytest.mark.parametrize("size, layers, side", [(16, 2, 2), (32, 3, 2), (28, 3, 1), (32, 1, 14)])
def test_patch_discriminator_output_shape(size, layers, side):
    d = PatchDiscriminator(1, channels=4, layers=layers)
    assert d(torch.zeros(2, 1, size, size)).shape == (2, 1, side, side)


def test_make_discriminator_follows_the_switch():
    assert make_discriminator(tiny_config()) is None  # disc_weight defaults to 0
    d = make_discriminator(tiny_config(disc_weight=0.5))
    assert isinstance(d, PatchDiscriminator)
    assert d(torch.zeros(2, 3, 16, 16)).shape == (2, 1, 2, 2)


# --- the combined losses ---


def _posterior(seed: int = 2) -> DiagonalGaussian:
    gen = torch.Generator().manual_seed(seed)
    return DiagonalGaussian(
        torch.randn(2, 2, 8, 8, generator=gen), torch.randn(2, 2, 8, 8, generator=gen)
    )


def test_autoencoder_loss_without_gan_is_nll_plus_weighted_kl():
    x, recon = pair()
    q = _posterior()
    config = tiny_config(kl_weight=0.01)
    total, logs = autoencoder_loss(x, recon, q, config)  # no discriminator: no step needed
    nll = (x - recon).abs().sum() / 2  # summed over pixels, averaged over the batch
    assert total.item() == pytest.approx((nll + 0.01 * q.kl().mean()).item(), rel=1e-6)
    assert set(logs) == {"loss", "rec", "nll", "kl"}
    assert logs["kl"] == pytest.approx(q.kl().mean().item(), rel=1e-6)

    l2, _ = autoencoder_loss(x, recon, q, tiny_config(kl_weight=0.0, reconstruction="l2"), step=0)
    assert l2.item() == pytest.approx(((x - recon).square().sum() / 2).item(), rel=1e-6)


def test_autoencoder_loss_adds_the_perceptual_term_to_every_pixel():
    x, recon = pair()
    q = _posterior()
    total, logs = autoencoder_loss(x, recon, q, tiny_config(perceptual_weight=0.5), step=0)
    plain, _ = autoencoder_loss(x, recon, q, tiny_config(), step=0)
    pixels = 3 * 16 * 16
    extra = 0.5 * perceptual_loss(x, recon).sum() * pixels / 2
    assert (total - plain).item() == pytest.approx(extra.item(), rel=1e-5)
    assert "perceptual" in logs


def test_autoencoder_loss_with_gan_uses_the_adaptive_weight():
    config = tiny_config(disc_weight=0.5, disc_start=10, kl_weight=1e-3)
    model = Autoencoder(config)
    disc = make_discriminator(config)
    x, _ = pair()
    recon, q = model(x, generator=torch.Generator().manual_seed(0))

    before, logs = autoencoder_loss(
        x, recon, q, config, step=9, last_layer=model.last_layer, discriminator=disc
    )
    assert "g_loss" not in logs  # the discriminator has not started

    total, logs = autoencoder_loss(
        x, recon, q, config, step=10, last_layer=model.last_layer, discriminator=disc
    )
    nll = (x - recon).abs().sum() / 2
    g_loss = -disc(recon).mean()
    weight = adaptive_gan_weight(nll, g_loss, model.last_layer) * 0.5
    assert logs["gan_weight"] == pytest.approx(weight.item(), rel=1e-5)
    assert logs["g_loss"] == pytest.approx(g_loss.item(), rel=1e-5)
    expected = before + weight * g_loss
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)

    total.backward()
    assert model.last_layer.grad is not None and disc.main[0].weight.grad is not None

    with pytest.raises(ValueError, match="needs last_layer"):
        autoencoder_loss(x, recon, q, config, step=10, discriminator=disc)


def test_autoencoder_loss_under_no_grad_gives_the_gan_term_no_weight():
    config = tiny_config(disc_weight=0.5, disc_start=0)
    model = Autoencoder(config)
    disc = make_discriminator(config)
    x, _ = pair()
    with torch.no_grad():
        recon, q = model(x)
        total, logs = autoencoder_loss(x, recon, q, config, step=0, discriminator=disc)
    assert logs["gan_weight"] == 0.0
    assert total.item() == pytest.approx(logs["nll"] + config.kl_weight * logs["kl"], rel=1e-6)


def test_discriminator_loss_is_hinge_after_start_and_zero_before():
    config = tiny_config(disc_weight=0.5, disc_start=5)
    disc = make_discriminator(config).eval()  # eval: BatchNorm gives the same logits every call
    x, recon = pair()
    recon.requires_grad_(True)
    before, _ = discriminator_loss(disc, x, recon, config, step=4)
    assert before.item() == 0.0
    loss, logs = discriminator_loss(disc, x, recon, config, step=5)
    expected = hinge_d_loss(disc(x), disc(recon))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(logs) == {"d_loss", "logits_real", "logits_fake"}
    loss.backward()
    assert recon.grad is None  # reconstructions are detached: no gradient into the autoencoder
    # (the last bias may get an exact 0: with every logit in (-1, 1) its hinge gradients cancel)
    dead = [n for n, p in disc.named_parameters() if p.grad is None]
    assert not dead, f"no gradient reaches {dead}"
    assert all(p.grad.abs().sum() > 0 for n, p in disc.named_parameters() if "weight" in n)


# ------------------------------------------------------------------ feature matching
def two_layer_activations():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, 2, 1), nn.ReLU())
    net.requires_grad_(False)
    return lambda x: [net[:2](x), net(x)]


def test_feature_matching_loss_is_lpips_form_by_hand():
    from ldmkit.models.losses import feature_matching_loss

    act = two_layer_activations()
    x, y = pair(4)
    got = feature_matching_loss(act, x, y)
    want = torch.zeros(2)
    for a, b in zip(act(y), act(x)):  # by hand: unit-normalise channels, squared distance
        a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-5)
        b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-5)
        want += ((a - b) ** 2).sum(1).mean((1, 2))
    assert got.shape == (2,) and torch.allclose(got, want, atol=1e-4)
    assert torch.allclose(feature_matching_loss(act, x, x), torch.zeros(2), atol=1e-6)


def test_feature_matching_term_joins_the_loss_and_trains_only_the_reconstruction():
    from ldmkit.models.losses import feature_matching_loss

    act = two_layer_activations()
    x, y = pair(5)
    recon = y.clone().requires_grad_(True)
    post = DiagonalGaussian(torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8))
    off, logs_off = autoencoder_loss(
        x, recon, post, tiny_config(feature_weight=0.0), activations=act
    )
    on, logs_on = autoencoder_loss(x, recon, post, tiny_config(feature_weight=2.0), activations=act)
    assert "features" not in logs_off
    fm = feature_matching_loss(act, x, y)
    # added to every pixel's error, like the perceptual term: weight * fm * pixels, per image
    assert float((on - off).detach()) == pytest.approx(
        float(2.0 * fm.sum() * 3 * 16 * 16 / 2), rel=1e-4
    )
    assert logs_on["features"] == pytest.approx(float(fm.mean()), rel=1e-5)
    on.backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    with pytest.raises(Exception, match="feature_weight"):
        tiny_config(feature_weight=-1.0)
