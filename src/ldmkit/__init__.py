"""ldmkit: latent diffusion models you can train on a laptop CPU.

    from ldmkit import LatentDiffusion
    ldm = LatentDiffusion.from_run("runs/shapes")
    images = ldm.sample(16)

The names below are the few a user needs; they load on first use, so that `import ldmkit` (and
`ldmkit --help`) does not import torch. Everything else lives in its module (see docs/design.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "LatentDiffusion": "ldmkit.pipeline",
    "RunFolder": "ldmkit.runs",
    "RunConfig": "ldmkit.recipe",
    "TrainConfig": "ldmkit.recipe",
    "DiffusionConfig": "ldmkit.recipe",
    "UNet": "ldmkit.models",
    "UNetConfig": "ldmkit.models",
    "Autoencoder": "ldmkit.models",
    "AutoencoderConfig": "ldmkit.models",
    "api": "ldmkit.api",
}
__all__ = [
    "Autoencoder",
    "AutoencoderConfig",
    "DiffusionConfig",
    "LatentDiffusion",
    "RunConfig",
    "RunFolder",
    "TrainConfig",
    "UNet",
    "UNetConfig",
    "api",
]

if TYPE_CHECKING:
    from ldmkit import api
    from ldmkit.models import Autoencoder, AutoencoderConfig, UNet, UNetConfig
    from ldmkit.pipeline import LatentDiffusion
    from ldmkit.recipe import DiffusionConfig, RunConfig, TrainConfig
    from ldmkit.runs import RunFolder


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ldmkit' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return module if name == "api" else getattr(module, name)
