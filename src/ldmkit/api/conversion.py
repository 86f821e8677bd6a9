"""Converting runs to and from the diffusers layout."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .checks import check_apart, check_path, check_writable

log = logging.getLogger(__name__)


def convert_from_diffusers(
    source: str | os.PathLike, out: str | os.PathLike, *, vae: str | None = None,
    scheduler: str | None = None,
) -> Path:  # fmt: skip
    """A diffusers pipeline folder (or UNet folder) -> an ldmkit run folder."""
    from ..interop import convert_from_diffusers as convert

    given = (("--from-diffusers", source), ("--vae", vae), ("--scheduler", scheduler))
    for flag, folder in (*given, ("--out", out)):
        check_path(flag, folder)
    for flag, folder in given:
        check_apart("--out", out, flag, folder)
    check_writable(out)
    return Path(convert(source, out, vae_dir=vae, scheduler_dir=scheduler))


def export_to_diffusers(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """An ldmkit run folder -> a diffusers pipeline folder (model_index.json, unet/, vae/, ...)."""
    from ..interop import export_to_diffusers as export

    check_path("--to-diffusers", run)
    check_path("--out", out)
    check_apart("--out", out, "--to-diffusers", run)
    check_writable(out)
    return Path(export(run, out))
