"""`synth`: a labelled folder of generated images for classifiers."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from ..options import (
    SynthOptions,
)
from ..runs import RunFolder

if TYPE_CHECKING:  # the heavy modules are imported inside the functions that use them
    from ..pipeline import LatentDiffusion

from .checks import (
    check_apart,
    check_device,
    check_path,
    check_writable,
    package_version,
    run_inputs,
)

log = logging.getLogger(__name__)


_SYNTH = SynthOptions()  # the defaults of `synth`'s keywords


def read_prompts_file(flag: str, path: str | os.PathLike) -> list[str]:
    """A text file of prompts, one per line (blank lines skipped), or a one-line error."""
    check_path(flag, path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror.lower() if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{flag}: cannot read {path} ({why}); give a UTF-8 text file") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{flag}: {path} holds no prompt; write one per line")
    return lines


def synth(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    per_class: int | None = None,
    n: int | None = None,
    prompts_file: str | os.PathLike | None = None,
    classes: str | None = None,
    sampler: str = _SYNTH.sampler,
    steps: int = _SYNTH.steps,
    seed: int = _SYNTH.seed,
    guidance_scale: float | None = None,
    guidance_rescale: float = _SYNTH.guidance_rescale,
    batch_size: int = _SYNTH.batch_size,
    keep: str = _SYNTH.keep,
    device: str | None = None,
    ldm: LatentDiffusion | None = None,
    progress: Callable[[int, int], None] | None = None,
    fast: bool = True,
    options: SynthOptions | None = None,
) -> Any:
    """Write a labelled folder of images drawn from a run (`ldmkit.synth`): `per_class` images
    of each class of a class-conditional run, `n` of an unconditional one, or `n` per line of
    `prompts_file` for a text run; each PNG carries its parameters and its own seed. A folder
    that an earlier call left unfinished (killed, stopped) is completed with the same options,
    as if the call had never stopped. `keep="readable"` keeps only images the run's domain
    classifier reads as their class, drawing more (the dropped are counted). Options come as
    keywords or all at once as `options` (`options.SynthOptions`); `progress(done, total)`
    follows the images kept; `classes` ("circle,2": names or indexes) draws only those classes.
    Returns a `synth.SynthResult`."""
    from ..options import check_synth_classes
    from ..pipeline import LatentDiffusion
    from ..synth import (
        FORMAT,
        differences,
        folder_contents,
        groups_of,
        identity,
        plan_groups,
        read_manifest,
        synthesize,
    )

    check_path("--run", run)
    check_path("--out", out)
    o = SynthOptions(
        per_class=per_class, n=n, prompts_file=None if prompts_file is None else str(prompts_file),
        classes=classes, sampler=sampler, steps=steps, seed=seed, guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale, batch_size=batch_size, keep=keep,
    ).or_instead(options)  # fmt: skip
    check_path("--prompts", o.prompts_file)
    o = o.check(RunFolder(run), shown=run)
    folder = RunFolder(run)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; synth writes a folder: give a folder name")
    for flag, source in [*run_inputs(run), ("--prompts", o.prompts_file)]:
        check_apart("--out", out, flag, source, spec=False)
    check_apart("--out", out, "run's data", folder.config().data)  # not into training data
    check_writable(out)
    prompts = read_prompts_file("--prompts", o.prompts_file) if o.prompts_file else None
    kind = folder.conditioning()
    cfg = folder.config()
    groups = plan_groups(kind, class_names=folder.data_info().class_names,
                         num_classes=cfg.unet.num_classes,
                         count=o.per_class if kind == "class" else o.n, prompts=prompts,
                         only=check_synth_classes(folder, o.classes) if o.classes else None)  # fmt: skip
    scale = o.guidance_scale
    if kind == "none":  # no condition: guidance does not apply
        scale = 1.0
    elif scale is None:
        scale = cfg.sampling_guidance
    judge = None
    if o.keep == "readable":
        from ..evaluation.feature_nets import get_feature_net

        judge = get_feature_net("domain", dataset=folder.load_data(), run_dir=folder.path)
    params = {"ldmkit": package_version(), "run": str(folder.path.resolve()),
              "weights": folder.weights_hash()}  # fmt: skip
    header = {"run": params["run"], "weights": params["weights"], "kind": kind,
              "classifier": judge.fingerprint if judge is not None else None,
              "guidance": scale, "params": params}  # fmt: skip
    chosen = {k: getattr(o, k) for k in ("per_class", "n", "sampler", "steps", "seed",
              "guidance_scale", "guidance_rescale", "batch_size", "keep", "classes")}  # fmt: skip
    notes: list[str] = []
    old = read_manifest(out) if out.is_dir() else None
    if old is not None:
        new = identity({"format": FORMAT, **header, "options": chosen,
                        "groups": [vars(g) for g in groups]})  # fmt: skip
        try:
            differ = differences(new, identity(old))
        except (KeyError, TypeError):
            differ = ["its manifest (unreadable)"]
        if differ:
            raise ConfigError(
                f"--out {out} holds images of another synth (other {', '.join(differ)}); "
                "resume it with the same run and options, or choose another --out"
            )
        groups = groups_of(old)
        have = sum(min(g.kept, g.count) for g in groups)
        notes.append(f"resumed: {have} of {sum(g.count for g in groups)} images were there")
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"--out {out} already holds other files ({', '.join(folder_contents(out))}, ...); "
            "synth writes into a new or empty folder (or resumes its own): choose another --out"
        )
    if ldm is None:
        ldm = LatentDiffusion.from_run(run, device=check_device(device), fast=fast)
    result = synthesize(
        ldm, out, groups, header=header, options=chosen, sampler=o.sampler, steps=o.steps,
        seed=o.seed, guidance_scale=scale if kind != "none" else None,
        guidance_rescale=o.guidance_rescale, batch_size=o.batch_size, judge=judge,
        progress=progress,
    )  # fmt: skip
    result.notes[:0] = notes
    return result
