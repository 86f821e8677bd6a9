"""Interoperability with other libraries' model folders (issue 7): diffusers, both ways.

    from ldmkit.interop import convert_from_diffusers, export_to_diffusers
    convert_from_diffusers("sd-vae-and-unet/", "runs/imported")   # -> LatentDiffusion.from_run
    export_to_diffusers("runs/shapes", "shapes-diffusers/")      # -> diffusers from_pretrained

See `ldmkit.interop.diffusers` and docs/interop.md for the supported layouts.
"""

from ldmkit.interop.diffusers import (
    InteropError,
    SchedulerSpec,
    convert_from_diffusers,
    diffusers_scheduler_config,
    export_to_diffusers,
    load_diffusers_scheduler,
    load_diffusers_unet,
    load_diffusers_vae,
)

__all__ = [
    "InteropError",
    "SchedulerSpec",
    "convert_from_diffusers",
    "diffusers_scheduler_config",
    "export_to_diffusers",
    "load_diffusers_scheduler",
    "load_diffusers_unet",
    "load_diffusers_vae",
]
