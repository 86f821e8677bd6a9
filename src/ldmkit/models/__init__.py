"""ldmkit.models: the KL autoencoder and the denoising UNet (plain nn.Modules, no training code).

from ldmkit.models import UNet, UNetConfig, Autoencoder, AutoencoderConfig
unet = UNet(UNetConfig(sample_size=8, in_channels=4))
"""

from .distributions import DiagonalGaussian
from .unet import UNet, UNetConfig
from .vae import Autoencoder, AutoencoderConfig, measure_scaling_factor

__all__ = [
    "Autoencoder",
    "AutoencoderConfig",
    "DiagonalGaussian",
    "UNet",
    "UNetConfig",
    "measure_scaling_factor",
]
