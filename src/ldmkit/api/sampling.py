"""`sample` (checked through `options.SampleOptions`), and writing its images: `save_grid`,
`save_images`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from ..options import (
    SampleOptions,
)
from ..runs import RunFolder

if TYPE_CHECKING:  # the heavy modules are imported inside the functions that use them
    from torch import Tensor

    from ..pipeline import LatentDiffusion

from .checks import MAX_NROW, check_count, check_device, check_path

log = logging.getLogger(__name__)

ANNOUNCE_FROM = 10_000  # image-steps from which `sample` first logs how long it will take


@dataclass
class Samples:
    """Images drawn from a run, with how to lay them out and how they were made."""

    images: Tensor  # (n, C, H, W) in [-1, 1]
    per_row: int | None  # images per grid row; None: a square grid
    row_labels: list[str] | None  # one per grid row (class names), or None
    description: (
        str  # e.g. "50 images, dpm++2m-sde, 20 steps, seed 0, guidance 5, one class per row"
    )
    # what the user should know about the layout (uneven rows of classes, classes left out)
    notes: list[str] = field(default_factory=list)
    # images in each grid row when the rows are uneven (the short rows end blank); None: whole
    row_counts: list[int] | None = None


_SAMPLE = SampleOptions()  # the defaults of `sample`'s keywords


def sample(
    run: str | os.PathLike,
    *,
    n: int = _SAMPLE.n,
    sampler: str = _SAMPLE.sampler,
    steps: int = _SAMPLE.steps,
    seed: int = _SAMPLE.seed,
    classes: str | None = None,
    prompts: Sequence[str] | None = None,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
    guidance_rescale: float = _SAMPLE.guidance_rescale,
    batch_size: int = _SAMPLE.batch_size,
    adapters: Sequence[str] | None = None,
    adapter_scales: Sequence[float] | None = None,
    device: str | None = None,
    ldm: LatentDiffusion | None = None,
    callback: Callable[..., Any] | None = None,
    fast: bool = True,
    compile: bool = False,
    options: SampleOptions | None = None,
) -> Samples:
    """Draw n images from a run. Its options (`options.SampleOptions`, checked once) come as
    the keywords n ... batch_size, or all at once as `options`. A class-conditional model draws
    one row per class unless `classes` ("star", "3" or "circle,star") picks them; a
    text-conditional model draws one row per prompt (`negative_prompt` replaces "" as
    guidance's unconditional branch); `guidance_scale` defaults to the run's. `fast`:
    bf16 autocast where the device runs it natively; `compile`: torch.compile the UNet (see
    `LatentDiffusion`).

    `adapters`: folders written by `ldmkit finetune` (their new classes join `classes`' names),
    at `adapter_scales` (one for all or one each; default 1).

    `ldm`: the run's model when the caller has it loaded already (a server's cache);
    `callback(i, x, sigma, x0_pred)`: the sampler's, after every step (progress, previews)."""
    from ..models.conditioning import row_layout
    from ..options import adapter_scales as scales_of
    from ..pipeline import LatentDiffusion

    check_path("--run", run)
    for path in adapters or []:
        check_path("--adapter", path)
    o = SampleOptions(
        n=n, sampler=sampler, steps=steps, seed=seed, classes=classes, prompts=prompts,
        negative_prompt=negative_prompt, guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale, batch_size=batch_size,
        adapters=None if adapters is None else tuple(adapters),
        adapter_scales=None if adapter_scales is None else tuple(adapter_scales),
    ).or_instead(options)  # fmt: skip
    o = o.check(RunFolder(run), shown=run)
    with_adapters = list(zip(o.adapters or [], scales_of(o.adapters, o.adapter_scales)))
    if ldm is not None and with_adapters:
        raise ConfigError("sample: adapters load with the run; do not pass a loaded model (ldm=)")
    if ldm is None:
        ldm = LatentDiffusion.from_run(run, device=check_device(device), fast=fast,
                                       compile=compile, adapters=with_adapters)  # fmt: skip
    n, steps, guidance, prompts = o.n, o.steps, o.guidance_scale, o.prompts
    if n * steps >= ANNOUNCE_FROM:  # a long job says how long before it starts
        from ..utils import format_seconds

        seconds = ldm.estimate_seconds(
            n, sampler=o.sampler, steps=steps, batch_size=o.batch_size, guidance_scale=guidance
        )
        log.info(
            "sampling %d images (%s, %d steps) will take about %s here (timed on one batch)",
            n, o.sampler, steps, format_seconds(seconds),
        )  # fmt: skip
    kwargs = dict(sampler=o.sampler, steps=steps, seed=o.seed, guidance_scale=guidance,
                  guidance_rescale=o.guidance_rescale, batch_size=o.batch_size,
                  callback=callback)  # fmt: skip
    how = f"{n} images, {o.sampler}, {steps} steps, seed {o.seed}"
    if with_adapters:
        how += ", adapters " + ", ".join(f"{Path(a).name} x{s:g}" for a, s in with_adapters)
    g = ldm.guidance_scale if guidance is None else guidance
    cond = ldm.conditioner
    # one row per prompt or class, each present, exactly n images (`row_layout`, the one rule
    # of the CLI's and the page's grids); uneven rows or rows left out come back as a note
    if prompts:
        layout = row_layout(n, len(prompts), "prompt", prompts)
        texts = [prompts[i] for i in layout.labels()]
        images = ldm.sample(n, prompt=texts, negative_prompt=o.negative_prompt, **kwargs)
        return Samples(
            images, layout.per_row, list(prompts[: layout.rows]),
            how + f", guidance {g:g}, one prompt per row", _notes(layout), _counts(layout),
        )  # fmt: skip
    if o.classes is not None:
        images = ldm.sample(n, class_labels=cond.parse(o.classes, n), **kwargs)
        return Samples(images, None, None, how + f", guidance {g:g}")
    if not cond.enabled:
        images, per_row, row_labels = ldm.sample_grid(n, **kwargs)
        return Samples(images, per_row, row_labels, how)
    layout = row_layout(n, cond.num_classes, "class", cond.class_names)
    images = ldm.sample(n, class_labels=_labels(layout.labels()), **kwargs)
    names = cond.class_names[: layout.rows] if cond.class_names else None
    return Samples(images, layout.per_row, names, how + f", guidance {g:g}, one class per row",
                   _notes(layout), _counts(layout))  # fmt: skip


def _notes(layout: Any) -> list[str]:
    return [layout.note] if layout.note else []


def _counts(layout: Any) -> list[int] | None:
    return None if layout.whole else list(layout.counts)


def _labels(labels: list[int]) -> Tensor:
    import torch

    return torch.tensor(labels, dtype=torch.long)


def save_grid(samples: Samples, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write the samples as one grid PNG; `nrow` overrides the layout (and drops row labels)."""
    from ..evaluation.grids import save_grid as write_grid

    if nrow is not None:
        check_count("--nrow", nrow, 1, MAX_NROW)
    per_row, labels = (nrow, None) if nrow else (samples.per_row, samples.row_labels)
    counts = None if nrow else samples.row_counts
    write_grid(samples.images, path, nrow=per_row, row_labels=labels, row_counts=counts)
    return Path(path)


def save_images(samples: Samples, folder: str | os.PathLike) -> Path:
    """Write one PNG per image, 00000.png, 00001.png, ... into `folder`.

    The images are written into a hidden staging folder inside `folder`, then moved into place:
    a kill leaves the folder's earlier images as they were (and a hidden folder that the next
    call removes), never a half-written PNG.
    """
    import shutil
    import tempfile

    from ..data.transforms import to_uint8
    from ..evaluation.grids import save_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(".ldmkit-staging-*"):  # left by a call that was killed
        shutil.rmtree(old, ignore_errors=True)
    arrays = to_uint8(samples.images.clamp(-1, 1)).permute(0, 2, 3, 1).cpu().numpy()
    names = [f"{i:05d}.png" for i in range(len(arrays))]
    staging = Path(tempfile.mkdtemp(prefix=".ldmkit-staging-", dir=folder))
    try:
        for name, a in zip(names, arrays):
            save_image(a, staging / name)
        for name in names:
            os.replace(staging / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stale = sorted(p.name for p in folder.glob("[0-9]" * 5 + ".png") if int(p.stem) >= len(names))
    if stale:
        log.warning(
            "%s also holds %d image(s) of an earlier call (%s ...): they are not from this one",
            folder, len(stale), stale[0],
        )  # fmt: skip
    return folder
