"""Training losses of the KL autoencoder: reconstruction, KL, MS-SSIM, PatchGAN with hinge loss.

Sources:
    Rombach et al. 2022 (LDM), `ldm/modules/losses/contperceptual.py`: the objective
        L = nll + kl_weight * KL + lambda * disc_weight * L_G, with nll the per-pixel
        reconstruction error (plus the perceptual term) summed over pixels and averaged over the
        batch, and KL summed over latent elements and averaged over the batch. kl_weight = 1e-6
        only means what it means in LDM under these sums, so we keep them.
    Esser et al. 2021 ("Taming Transformers", VQGAN), eq. 7: the adaptive weight
        lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_G|| + delta), taken at the decoder's last
        layer G_L, so the GAN gradient never swamps the reconstruction gradient.
    Isola et al. 2017 (pix2pix): the N-layer PatchGAN discriminator. Lim & Ye 2017 / Miyato et al.
        2018: the hinge loss, L_D = 1/2 (E relu(1 - D(x)) + E relu(1 + D(x_hat))), L_G = -E D(x_hat).
    Wang, Simoncelli & Bovik 2003: multi-scale SSIM (MS-SSIM), our perceptual term.

Why MS-SSIM and not LPIPS. LDM's perceptual term is LPIPS, a VGG16 with learned linear heads;
it needs downloaded weights, which ldmkit must not require. MS-SSIM needs no network: it compares
local means, contrasts and correlations of x and x_hat over a Gaussian window at several scales,
so it penalises lost edges and texture contrast that an L1 loss averages away. Zhao et al. 2017
("Loss Functions for Image Restoration with Neural Networks") found L1 + MS-SSIM the best of the
network-free losses. What it is not: it knows nothing of semantics and is no substitute for LPIPS'
learned features, it does not reward plausible high-frequency detail the way a GAN does, and on
very small images it runs at few scales (only scales whose side is at least the 7-pixel window).
We rejected fixed random conv features (seed-dependent, no evidence they track perception at
these sizes) and discriminator feature matching (absent until the discriminator starts, and a
moving target after).

The trainer calls two functions per step, each returning (loss, dict of float logs); with
`ae = Autoencoder(config)` and `disc = make_discriminator(config)` (None when switched off):

    recon, posterior = ae(x)
    loss, logs = autoencoder_loss(x, recon, posterior, config, step=step,
                                  last_layer=ae.last_layer, discriminator=disc)
    ae_opt.zero_grad(); loss.backward(); ae_opt.step()
    if disc is not None:
        d_loss, d_logs = discriminator_loss(disc, x, recon, config, step=step)
        disc_opt.zero_grad(); d_loss.backward(); disc_opt.step()  # zero_grad also drops the
                                                                  # GAN term's grads in disc

The logs are floats, so each entry is a device sync (`.item()`); that is once per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.models.distributions import DiagonalGaussian
from ldmkit.models.vae import SSIM_WINDOW, AutoencoderConfig

# Wang et al. 2003, Sec. 3.2: exponents of the 5 scales, finest first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


# ----------------------------------------------------------------------------------------------
# Reconstruction and perceptual terms


def reconstruction_error(x: Tensor, recon: Tensor, kind: Literal["l1", "l2"] = "l1") -> Tensor:
    """Per-element error |x - recon| ("l1") or (x - recon)^2 ("l2"), same shape as x."""
    if x.shape != recon.shape:
        raise ValueError(f"x {tuple(x.shape)} and recon {tuple(recon.shape)} must have one shape")
    if kind == "l1":
        return (x - recon).abs()
    if kind == "l2":
        return (x - recon).square()
    raise ValueError(f"reconstruction must be 'l1' or 'l2', got {kind!r}")


def _gaussian_1d(size: int, sigma: float, like: Tensor) -> Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def _ssim_terms(x: Tensor, y: Tensor, g: Tensor, data_range: float) -> tuple[Tensor, Tensor]:
    """Per-image mean SSIM and mean contrast-structure term cs, each (B,). Valid windows only."""
    B, C = x.shape[:2]
    k = g.numel()
    # The 2-D Gaussian window is separable: blur rows, then columns, all five maps in one call.
    maps = torch.cat([x, y, x * x, y * y, x * y])  # (5B, C, H, W)
    maps = F.conv2d(maps, g.view(1, 1, k, 1).expand(C, 1, k, 1), groups=C)
    maps = F.conv2d(maps, g.view(1, 1, 1, k).expand(C, 1, 1, k), groups=C)
    mu_x, mu_y, xx, yy, xy = maps.split(B)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2  # Wang et al. 2004, eq. 7, 9
    var_x = xx - mu_x.square()
    var_y = yy - mu_y.square()
    cov = xy - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x.square() + mu_y.square() + c1)
    return (luminance * cs).mean(dim=(1, 2, 3)), cs.mean(dim=(1, 2, 3))


def ms_ssim(
    x: Tensor,
    y: Tensor,
    *,
    data_range: float = 2.0,
    window_size: int = SSIM_WINDOW,
    sigma: float = 1.5,
    max_scales: int = 5,
) -> Tensor:
    """MS-SSIM (Wang et al. 2003, eq. 7) per image, (B,), in [0, 1]; 1 means identical.

    Uses as many of the 5 scales as keep the coarsest side >= `window_size`, with the published
    exponents of those scales renormalised to sum to 1. Negative cs / SSIM values are clipped at
    a small positive floor before the fractional powers, which keeps the gradient finite.

    Args:
        x, y: (B, C, H, W) images; `data_range` is max - min of the pixel range (2 for [-1, 1]).
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"ms_ssim needs two (B, C, H, W) tensors of one shape, got {x.shape}, {y.shape}"
        )
    side = min(x.shape[-2:])
    if side < window_size:
        raise ValueError(
            f"images of side {side} are smaller than the {window_size}-pixel SSIM window; "
            "use a smaller window_size or turn the perceptual loss off (perceptual_weight = 0)"
        )
    scales = 1
    while scales < max_scales and side // 2**scales >= window_size:
        scales += 1
    weights = [w / sum(MS_SSIM_WEIGHTS[:scales]) for w in MS_SSIM_WEIGHTS[:scales]]
    g = _gaussian_1d(window_size, sigma, x)
    floor = 1e-6
    result = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(scales):
        ssim, cs = _ssim_terms(x, y, g, data_range)
        if i < scales - 1:
            result = result * cs.clamp(min=floor) ** weights[i]
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        else:  # luminance only at the coarsest scale (Wang et al. 2003, eq. 7)
            result = result * ssim.clamp(min=floor) ** weights[i]
    return result


def perceptual_loss(x: Tensor, recon: Tensor) -> Tensor:
    """1 - MS-SSIM(x, recon) per image, (B,), for images in [-1, 1]. See the module docstring."""
    return 1.0 - ms_ssim(x, recon, data_range=2.0)


def feature_matching_loss(
    activations: Callable[[Tensor], list[Tensor]], x: Tensor, recon: Tensor
) -> Tensor:
    """Per image (B,): the squared distance between the activations of x and of its
    reconstruction in a frozen network, each layer's channels unit-normalised at every position
    and the distances averaged over positions and summed over layers (LPIPS's form, Zhang et al.
    2018, with equal channel weights). x's activations carry no gradient."""
    with torch.no_grad():
        targets = activations(x)
    total = torch.zeros(x.shape[0], dtype=recon.dtype, device=recon.device)
    for a, b in zip(activations(recon), targets):
        a = a / (a.square().sum(1, keepdim=True) + 1e-10).sqrt()
        b = b / (b.square().sum(1, keepdim=True) + 1e-10).sqrt()
        total = total + (a - b).square().sum(1).mean((1, 2))
    return total


# ----------------------------------------------------------------------------------------------
# Discriminator


class PatchDiscriminator(nn.Module):
    """N-layer PatchGAN (Isola et al. 2017): one real/fake logit per overlapping patch.

    `layers` stride-2 4x4 convs (channels doubling up to 8x), one stride-1 conv, and a 1-channel
    stride-1 conv; BatchNorm and LeakyReLU(0.2) between them as in pix2pix and LDM. An image of
    side S gives logits (B, 1, S // 2**layers - 2, ...). Weights start at N(0, 0.02) (pix2pix).
    """

    def __init__(self, image_channels: int, *, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        mults = [min(2**i, 8) for i in range(layers + 1)]
        seq: list[nn.Module] = [
            nn.Conv2d(image_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1
            seq += [
                nn.Conv2d(channels * mults[i - 1], channels * mults[i], 4, stride, 1, bias=False),
                nn.BatchNorm2d(channels * mults[i]),
                nn.LeakyReLU(0.2),
            ]
        seq.append(nn.Conv2d(channels * mults[layers], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)  # (B, 1, S // 2**layers - 2, ...)


def make_discriminator(config: AutoencoderConfig) -> PatchDiscriminator | None:
    """The config's discriminator, or None when it is switched off (disc_weight = 0)."""
    if config.disc_weight == 0:
        return None
    return PatchDiscriminator(
        config.image_channels, channels=config.disc_channels, layers=config.disc_layers
    )


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss 1/2 (E relu(1 - D(x)) + E relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(
    nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, *, delta: float = 1e-4
) -> Tensor:
    """Esser et al. 2021, eq. 7: ||grad nll|| / (||grad g_loss|| + delta) at `last_layer`.

    Clamped to [0, 1e4] and detached, as in taming-transformers and LDM (which use delta = 1e-4).
    Both losses must still hold their graphs; the graphs are kept for the backward pass.
    """
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (nll_grad.norm() / (g_grad.norm() + delta)).clamp(0.0, 1e4).detach()


def _gan_active(config: AutoencoderConfig, discriminator: nn.Module | None, step: int) -> bool:
    return discriminator is not None and config.disc_weight > 0 and step >= config.disc_start


# ----------------------------------------------------------------------------------------------
# The two losses a trainer calls


def autoencoder_loss(
    x: Tensor,
    recon: Tensor,
    posterior: DiagonalGaussian,
    config: AutoencoderConfig,
    *,
    step: int = 0,
    last_layer: Tensor | None = None,
    discriminator: nn.Module | None = None,
    activations: Callable[[Tensor], list[Tensor]] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The autoencoder's loss for one batch: nll + kl_weight * KL (+ adaptive GAN term).

    With `activations` (a frozen network's, e.g. the run's domain classifier) and
    `config.feature_weight > 0`, the per-image `feature_matching_loss` joins the per-pixel
    error as the perceptual term does.

    The GAN term is added only when `discriminator` is given, `config.disc_weight > 0` and
    `step >= config.disc_start` (without a discriminator `step` does nothing); it then needs `last_layer` (`Autoencoder.last_layer`). Under
    `torch.no_grad()` (validation) the adaptive weight cannot be taken and is 0, as in LDM, so
    the total is nll + kl_weight * KL there. The GAN term backpropagates into the discriminator's
    parameters too: zero the discriminator's gradients before its own update.

    Returns:
        (total, logs) with total a scalar tensor and logs {"loss", "nll", "rec", "kl",
        "perceptual", "g_loss", "gan_weight"} as floats ("perceptual" and the GAN entries only
        when those terms are on).
    """
    B = x.shape[0]
    rec = reconstruction_error(x, recon, config.reconstruction)  # (B, C, H, W)
    logs: dict[str, float] = {"rec": rec.detach().mean().item()}
    nll = rec
    if config.perceptual_weight > 0:
        p = perceptual_loss(x, recon)  # (B,)
        logs["perceptual"] = p.detach().mean().item()
        # LDM adds the per-image perceptual loss to every pixel's error before summing.
        nll = nll + config.perceptual_weight * p[:, None, None, None]
    if activations is not None and config.feature_weight > 0:
        fm = feature_matching_loss(activations, x, recon)  # (B,)
        logs["features"] = fm.detach().mean().item()
        nll = nll + config.feature_weight * fm[:, None, None, None]
    nll = nll.sum() / B  # summed over pixels, averaged over the batch (LDM)
    kl = posterior.kl().sum() / B
    total = nll + config.kl_weight * kl
    logs |= {"nll": nll.item(), "kl": kl.item()}

    if _gan_active(config, discriminator, step):
        g_loss = -discriminator(recon).mean()
        if torch.is_grad_enabled() and nll.requires_grad:
            if last_layer is None:
                raise ValueError(
                    "the GAN loss needs last_layer for its adaptive weight; pass "
                    "last_layer=autoencoder.last_layer"
                )
            weight = adaptive_gan_weight(nll, g_loss, last_layer) * config.disc_weight
        else:
            weight = torch.zeros((), dtype=nll.dtype, device=nll.device)
        total = total + weight * g_loss
        logs |= {"g_loss": g_loss.item(), "gan_weight": weight.item()}
    logs["loss"] = total.item()
    return total, logs


def discriminator_loss(
    discriminator: nn.Module,
    x: Tensor,
    recon: Tensor,
    config: AutoencoderConfig,
    *,
    step: int,
) -> tuple[Tensor, dict[str, float]]:
    """Hinge loss of the discriminator on real x and detached reconstructions.

    Before `config.disc_start` the loss is multiplied by 0 (LDM's `adopt_weight`), so the graph
    stays connected but nothing is learned.

    Returns:
        (loss, {"d_loss", "logits_real", "logits_fake"}).
    """
    logits_real = discriminator(x.detach())
    logits_fake = discriminator(recon.detach())
    factor = 1.0 if _gan_active(config, discriminator, step) else 0.0
    loss = factor * hinge_d_loss(logits_real, logits_fake)
    logs = {
        "d_loss": loss.item(),
        "logits_real": logits_real.detach().mean().item(),
        "logits_fake": logits_fake.detach().mean().item(),
    }
    return loss, logs
