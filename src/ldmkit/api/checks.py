"""The checks of a user's arguments, one helper per kind of argument, used by every verb
(the CLI, the web page and the api functions): each raises a one-line ConfigError naming the
argument, the value and the accepted range; output paths are kept apart from the inputs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, check_float, check_int
from ..recipe import (
    GUIDANCE_HINT,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_TIMESTEPS,
    RunConfig,
    check_resume_settings,
    parse_duration,
    run_config_from_dict,
    settings_dict,
)
from ..runs import RunFolder

log = logging.getLogger(__name__)


log = logging.getLogger(__name__)


# One helper per kind of argument, used by every verb (and by any later front, e.g. a web page).
# Each raises a one-line ConfigError naming the argument, the value and the accepted range.
# (MAX_IMAGES, MAX_BATCH and the edits' limits are the options' own: ldmkit.options)
MAX_NROW = 1000  # images per grid row


def check_count(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """A count, size or step number given by a user: a whole number in [minimum, maximum]."""
    return check_int(name, value, minimum, maximum)


def check_seed(name: str, value: Any) -> int:
    """A random seed: a whole number from 0 to 2**32 - 1."""
    return check_int(name, value, 0, MAX_SEED)


def check_steps(name: str, value: Any, num_timesteps: int = MAX_TIMESTEPS) -> int:
    """Sampler steps: a whole number from 1 to the model's T (at most MAX_TIMESTEPS)."""
    return check_int(name, value, 1, num_timesteps)


def check_guidance(name: str, value: Any) -> float | None:
    """A classifier-free guidance scale: finite, in [0, MAX_GUIDANCE]; None keeps the run's."""
    if value is None:
        return None
    return check_float(name, value, 0, MAX_GUIDANCE, hint=GUIDANCE_HINT)


def check_duration(name: str, value: str | None) -> float | None:
    """A wall-clock duration ('90s', '10m', '1h30m') in seconds, > 0; None: no limit."""
    return None if value is None else parse_duration(value, name)


def check_device(value: str | None) -> Any:
    """A device a user asked for (auto, cpu, cuda, cuda:1, mps) that this machine has."""
    from ..runtime import resolve_device

    return resolve_device(value)


NAME_MAX = 255  # bytes of one file or folder name (Linux, macOS; Windows: 255 characters)


PATH_MAX = 4096  # bytes of a whole path (Linux)


def check_path(name: str, value: str | os.PathLike | None) -> None:
    """A path a user gave: not empty (an empty --out would mean the current folder), no NUL
    character, and names the file system can hold (each part at most NAME_MAX bytes, the whole
    at most PATH_MAX), so that no later file operation fails on the name itself."""
    if value is None:
        return
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if not text.strip():
        raise ConfigError(f"{name} must be a path, got {text!r}; give a file or folder name")
    if "\0" in text:
        raise ConfigError(
            f"{name} {shorten(text)} holds a NUL character; give a file or folder name"
        )
    if len(os.fsencode(text)) > PATH_MAX:
        raise ConfigError(
            f"{name} {shorten(text)} is longer than the file system's limit of {PATH_MAX} bytes "
            "for a path; choose a shorter one"
        )
    for part in Path(text).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise ConfigError(
                f"{name}: the name {shorten(part)} is longer than the file system's limit of "
                f"{NAME_MAX} bytes for a file or folder name; choose a shorter one"
            )


def shorten(text: str, keep: int = 40) -> str:
    """A name as a message shows it (repr): a short one whole, a long one cut, with its length
    (a name of thousands of characters would make a message nobody reads)."""
    return repr(text) if len(text) <= keep else f"{text[:keep]!r}... ({len(text)} characters)"


def check_writable(folder: str | os.PathLike) -> Path:
    """Refuse an output location that cannot be written (a file in the way, no permission)."""
    folder = Path(folder) if str(folder) else Path(".")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"cannot write to {folder}: {probe} is a file, not a folder; choose another output path"
        )
    if not os.access(probe, os.W_OK):
        raise ConfigError(
            f"cannot write to {folder}: permission denied; choose another output path"
        )
    return folder


def check_output_file(
    name: str, path: str | os.PathLike, *, image: bool = False,
    inputs: Sequence[tuple[str, Any]] = (),
) -> Path:  # fmt: skip
    """A file to write (a grid, a report): not a folder, in a writable place, and for an image
    a suffix Pillow can write (.png, .jpg, .webp, ...); not one of `inputs` ((flag, path) of
    the files and folders the verb reads: `check_apart`)."""
    check_path(name, path)
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"{name} {path} is a folder; give a file name, e.g. {path / ('grid.png' if image else 'report.html')}"
        )
    if image:
        from PIL import Image

        ok = {e for e, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
        if path.suffix.lower() not in ok:
            raise ConfigError(
                f"{name} {path} does not end in an image suffix Pillow can write; use .png "
                "(or .jpg, .webp)"
            )
    for in_name, source in inputs:
        check_apart(name, path, in_name, source, spec=False)
    check_writable(path.parent)
    return path


def check_apart(
    out_name: str, out: str | os.PathLike, in_name: str, source: Any, *, spec: bool = True
) -> None:
    """Refuse an output that is one of the inputs, so that nothing is written over or into what
    is read: an output equal to an input file, or equal to, inside or containing an input
    folder. Paths are compared resolved (symbolic links, `..`, relative and absolute spellings)
    and as files (a hard link is the same file). `source` is a data spec (DIR or mnist:DIR;
    a built-in has no path) or, with `spec=False`, a path."""
    if source is None:
        return
    if spec:
        from ..data import parse_spec

        kind, path, _ = parse_spec(str(source))
        if kind.startswith("builtin:"):
            return
    else:
        path = os.fspath(source)
    how = overlap(out, path)
    if how is None:
        return
    if how == "is" and not Path(path).is_dir():
        raise ConfigError(
            f"{out_name} {out} is the {in_name} file {path}; ldmkit would overwrite what it "
            f"reads: choose another {out_name} file"
        )
    noun = "folder" if Path(path).is_dir() else "file"
    raise ConfigError(
        f"{out_name} {out} {how} the {in_name} {noun} {path}; ldmkit would write into what it "
        f"reads: choose an {out_name} outside it"
    )


def overlap(out: str | os.PathLike, source: str | os.PathLike) -> str | None:
    """How an output path lies to an input path: "is" (the same file or folder: resolved, or
    a hard link), "is inside", "contains", or None (apart)."""
    src, dst = _resolved(source), _resolved(out)
    if dst == src or _same_file(src, dst):
        return "is"
    if src in dst.parents:
        return "is inside"
    if dst in src.parents:
        return "contains"
    return None


def _resolved(path: str | os.PathLike) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):  # a symbolic link loop, an unreadable folder
        return Path(os.path.abspath(path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one of them does not exist
        return False


def run_inputs(run: str | os.PathLike | None) -> list[tuple[str, Path]]:
    """(--run, path) of the files and folders of a run that sampling, editing and reports read
    (its config, data description, tokenizer, models and checkpoints): an output must not be
    one of them (`check_apart`)."""
    if run is None:
        return []
    f = RunFolder(run)
    return [("--run", p) for p in (f.config_path, f.data_path, f.tokenizer_path, f.vae_dir,
                                   f.unet_dir, f.text_encoder_dir, f.checkpoints_dir)]  # fmt: skip


def run_config(
    out: str | os.PathLike,
    *,
    resume: bool = False,
    config_file: str | None = None,
    sets: Sequence[str] = (),
    **flags: Any,
) -> RunConfig:
    """The RunConfig a training into `out` runs with: defaults (or, with resume, the run's saved
    run.json) <- config file <- `section.field=value` settings <- flags (data, seed, ...)."""
    folder = RunFolder(out)
    given = settings_dict(config_file, sets, flags)
    base: dict[str, Any] = {}
    if resume and folder.exists():  # a run resumes with its saved config
        base = folder.config_dict()
        check_resume_settings(base, given, str(folder.config_path))
    from ..config import deep_update

    if not base:  # a new run: a video run starts from the video recipe, under the user's settings
        base = video_recipe_layer(given)
    deep_update(base, given)
    return run_config_from_dict(base)


# issue 30: the video recipe (training/video.py VIDEO_RECIPE) for a new video run
def video_recipe_layer(given: dict[str, Any]) -> dict[str, Any]:
    """The settings `training.video.recipe_settings` gives a new run of `given` (the user's
    settings, which are laid over them) when its data is video, else none. Inflating (init_from)
    counts the levels of that run's UNet; else those of the UNet `given` alone builds."""
    from ..data.video import is_video_spec
    from ..recipe import RunConfig
    from ..training.video import recipe_settings

    spec = given.get("data", RunConfig.data)
    if not isinstance(spec, str) or not (is_video_spec(spec) or given.get("video")):
        return {}
    base_run = given.get("init_from")
    if isinstance(base_run, str) and RunFolder(base_run).config_path.is_file():
        levels = len(RunFolder(base_run).config().unet.block_out_channels)
    else:
        levels = len(run_config_from_dict(given).unet.block_out_channels)
    conditioning = given.get("conditioning") or "auto"
    return recipe_settings(spec, inflate=bool(base_run), levels=levels,
                           conditioning=str(conditioning))  # fmt: skip


def package_version() -> str:
    from .. import __version__

    return __version__
