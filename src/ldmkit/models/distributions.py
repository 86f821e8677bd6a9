"""The diagonal Gaussian posterior q(z | x) of a KL-regularised autoencoder.

Kingma & Welling 2014 ("Auto-Encoding Variational Bayes"), as used by Rombach et al. 2022
(latent diffusion, `ldm/modules/distributions/distributions.py`).

Notation:

    mean, logvar   (B, C, h, w) parameters of q(z | x) = N(mean, diag(exp(logvar)))
    std, var       exp(logvar / 2), exp(logvar)
    kl()           KL(q || N(0, I)), summed over every non-batch dimension -> (B,)
    nll(x)         -log q(x), summed over every non-batch dimension -> (B,)

logvar is clamped to [-30, 20] as in latent diffusion, so that exp() neither underflows to a zero
variance (infinite nll) nor overflows early in training.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussian:
    """A batch of diagonal Gaussians N(mean, diag(exp(logvar))).

    With `deterministic=True` the distribution collapses to its mean: `sample()` returns the mean,
    and `kl()` and `nll()` are zero (latent diffusion's "deterministic" posterior).
    """

    def __init__(self, mean: Tensor, logvar: Tensor, *, deterministic: bool = False) -> None:
        if mean.shape != logvar.shape:
            raise ValueError(
                f"mean has shape {tuple(mean.shape)} but logvar has shape {tuple(logvar.shape)}; "
                "they must match"
            )
        if mean.ndim < 2:
            raise ValueError(
                f"expected a batch (B, ...) of parameters, got shape {tuple(mean.shape)}"
            )
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic
        if deterministic:
            self.var = torch.zeros_like(mean)
            self.std = torch.zeros_like(mean)
        else:
            self.var = torch.exp(self.logvar)
            self.std = torch.exp(0.5 * self.logvar)

    @classmethod
    def from_moments(cls, moments: Tensor, *, deterministic: bool = False) -> DiagonalGaussian:
        """Split (B, 2C, h, w) encoder moments into mean (first C channels) and logvar."""
        if moments.ndim < 2 or moments.shape[1] % 2:
            raise ValueError(
                f"moments must have an even number of channels (mean, logvar), got shape "
                f"{tuple(moments.shape)}"
            )
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return cls(mean, logvar, deterministic=deterministic)

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def _sum_per_sample(self, x: Tensor) -> Tensor:
        return x.sum(dim=tuple(range(1, x.ndim)))  # (B,)

    def sample(
        self, generator: torch.Generator | None = None, *, noise: Tensor | None = None
    ) -> Tensor:
        """z = mean + std * eps, eps ~ N(0, I): the reparameterisation trick (Kingma & Welling 2014).

        `noise`, when given, is that eps (the trainer draws it per sample) instead of a draw.
        """
        if noise is not None:
            if noise.shape != self.mean.shape:
                raise ValueError(
                    f"noise has shape {tuple(noise.shape)}, the posterior {tuple(self.mean.shape)}"
                )
            return self.mean + self.std * noise.to(self.mean.device)
        # eps is drawn on the generator's device (a seeded CPU generator gives the same z on any
        # device) and in at least float32 (a bf16 mean under autocast still gets float32 noise)
        device = generator.device if generator is not None else self.mean.device
        dtype = torch.promote_types(self.mean.dtype, torch.float32)
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(N(mean, var) || N(0, I)) summed per sample, shape (B,)."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        # Kingma & Welling 2014, Appendix B: -KL = 1/2 sum(1 + logvar - mean^2 - var)
        return 0.5 * self._sum_per_sample(self.mean.square() + self.var - 1.0 - self.logvar)

    def nll(self, x: Tensor) -> Tensor:
        """Negative log-likelihood -log N(x; mean, var) summed per sample, shape (B,)."""
        if x.shape != self.mean.shape:
            raise ValueError(
                f"x has shape {tuple(x.shape)} but the distribution has shape "
                f"{tuple(self.mean.shape)}"
            )
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * self._sum_per_sample(
            log_two_pi + self.logvar + (x - self.mean).square() / self.var
        )

    def __repr__(self) -> str:
        kind = "deterministic, " if self.deterministic else ""
        return f"DiagonalGaussian({kind}shape={tuple(self.mean.shape)})"
