"""ldmkit: latent diffusion models you can train on a laptop CPU."""

__version__ = "0.1.0"
