"""Generated data for classifiers: a labelled folder of images drawn from a run, written so that
ldmkit's folder loader (and torchvision's ImageFolder) reads it, and resumable.

    DIR/<class>/00000.png ...       a class-conditional run: one sub-folder per class
    DIR/000-<prompt>/00000.png      a text run: one sub-folder per prompt, the caption beside
        00000.txt                   each image (the loader's captions)
    DIR/00000.png ...               an unconditional run
    DIR/.ldmkit-synth.json          the manifest: run, weights, options, groups and progress
                                    (hidden: the loader ignores it)

Every PNG carries its parameters in the "ldmkit" text chunk (`data.images.write_png`): the run,
its weights' hash, the sampler, steps, guidance, the class or prompt, and the image's own seed.

Determinism, and so resume: image j of group g (a class, a prompt, or the one group of an
unconditional run) is candidate j of that group; it draws its starting noise and every
sampler noise from one generator seeded `seed + g * GROUP_STRIDE + j` (a seed of its own), and
it is drawn in batch j // batch_size of its group, always with the same companions (a batch's
floats depend on its size). A batch's files are written each atomically (temporary file, then
rename: a kill never leaves a half PNG), then the manifest records the batch as done. A killed
call leaves at most one batch half written; the next call with the same options starts again at
that batch and writes the same bytes to the same names, so the folder ends up equal, bit for bit,
to that of an uninterrupted call: no duplicates, no gaps.

With `keep="readable"` a drawn image is kept only when the run's domain classifier (the one
`ldmkit eval` caches in RUN/eval/domain-classifier/) reads it as its class; kept images are
numbered in the order drawn, and a group draws more candidates until it holds its count (at most
MAX_DRAWS times the count). The dropped are counted per class in the manifest and the result.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoint import atomic_write, read_json, write_json
from .data.images import write_png
from .diffusion.samplers import SAMPLERS, run_sampler
from .pipeline import LatentDiffusion
from .utils import safe_filename

log = logging.getLogger(__name__)

MANIFEST = ".ldmkit-synth.json"
GROUP_STRIDE = 1_000_003  # seeds of group g start at seed + g * GROUP_STRIDE
MAX_DRAWS = 10  # a group draws at most this many candidates per image it keeps
FORMAT = 1  # the manifest's format


@dataclass
class Group:
    """One sub-folder: a class, a prompt, or the whole of an unconditional run."""

    label: int  # the class index (or the prompt's index); 0 unconditional
    name: str  # the class name, the prompt, or ""
    folder: str  # relative to the synth folder ("" for the root)
    count: int  # images it holds when done
    # progress: candidates drawn in whole batches, images kept, images dropped
    drawn: int = 0
    kept: int = 0
    dropped: int = 0

    @property
    def done(self) -> bool:
        return self.kept >= self.count

    @property
    def exhausted(self) -> bool:
        return self.drawn >= self.count * MAX_DRAWS


@dataclass
class SynthResult:
    """What `synthesize` wrote: the folder, its groups (with kept and dropped counts), images
    written by this call, and notes (resumed, short groups)."""

    folder: Path
    groups: list[Group]
    written: int
    notes: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return sum(g.kept for g in self.groups)

    @property
    def dropped(self) -> int:
        return sum(g.dropped for g in self.groups)

    @property
    def complete(self) -> bool:
        return all(g.done for g in self.groups)


def image_name(i: int) -> str:
    return f"{i:05d}.png"


def plan_groups(ldm_kind: str, *, class_names: Sequence[str] | None, num_classes: int,
                count: int, prompts: Sequence[str] | None = None) -> list[Group]:  # fmt: skip
    """The sub-folders of a synth folder: one per class (named after the class), one per prompt
    (numbered, then the prompt), or the root alone."""
    if ldm_kind == "class":
        names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        folders = [safe_filename(n, max_len=60) for n in names]
        if len(set(folders)) < len(folders):  # two names alike once made file names
            folders = [f"{i:03d}-{f}" for i, f in enumerate(folders)]
        return [Group(i, n, f, count) for i, (n, f) in enumerate(zip(names, folders))]
    if ldm_kind == "text":
        assert prompts
        return [Group(i, p, f"{i:03d}-{safe_filename(p, max_len=60)}", count)
                for i, p in enumerate(prompts)]  # fmt: skip
    return [Group(0, "", "", count)]


# ---------------------------------------------------------------------------------- the manifest
def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    return read_json(path) if path.is_file() else None


def identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """What must agree for a call to resume a folder: everything but the progress."""
    groups = [{k: g[k] for k in ("label", "name", "folder", "count")} for g in manifest["groups"]]
    keys = ("format", "run", "weights", "kind", "guidance", "options", "classifier")
    return {**{k: manifest[k] for k in keys}, "groups": groups}


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The names of the identity entries (options one by one) that differ."""
    out = []
    for key in a:
        if key == "options":
            out += [k for k in a[key] if a[key].get(k) != b.get(key, {}).get(k)]
        elif key != "groups" and a[key] != b.get(key):
            out.append(key)
    if not out and a["groups"] != b.get("groups"):  # else they follow from the options
        out.append("prompts" if a["kind"] == "text" else "classes")
    return out


# ---------------------------------------------------------------------------------- drawing
class _ImageNoise:
    """Unit Gaussian noise for a batch, each image from its own generator (the samplers'
    `noise_sampler`)."""

    def __init__(self, gens: list[torch.Generator], shape: Sequence[int], device: Any) -> None:
        self.gens, self.shape, self.device = gens, tuple(shape), device

    def __call__(self, *_: Any) -> Tensor:
        return torch.cat([torch.randn((1, *self.shape), generator=g) for g in self.gens]).to(
            self.device
        )


def draw(ldm: LatentDiffusion, seeds: Sequence[int], *, sampler: str, steps: int,
         condition: dict[str, Any], guidance_scale: float | None, guidance_rescale: float,
         fast: bool | None = None) -> Tensor:  # fmt: skip
    """One batch of images (B, C, H, W) in [-1, 1], image i from a generator seeded seeds[i]
    (its starting noise, then its sampler noise): its randomness is its own."""
    from .runtime import fast_autocast

    b = len(seeds)
    cond = ldm.conditions(b, condition.get("class_labels"), condition.get("prompt"), None,
                          guidance_scale)  # fmt: skip
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x_T = torch.cat([torch.randn((1, *ldm.latent_shape), generator=g) for g in gens])
    fast_here = ldm.uses_fast_path(b, fast)
    denoise = ldm.denoiser(cond, guidance_rescale=guidance_rescale, fast=fast_here)
    takes = "noise_sampler" in inspect.signature(SAMPLERS[sampler]).parameters
    noise = {"noise_sampler": _ImageNoise(gens, ldm.latent_shape, ldm.device)} if takes else {}
    with torch.no_grad(), fast_autocast(ldm.device, fast_here):
        z = run_sampler(denoise, x_T.to(ldm.device), ldm.sigmas(sampler, steps), sampler=sampler,
                        **noise)  # fmt: skip
    return ldm.decode(z, fast=fast_here).float().cpu()


def synthesize(
    ldm: LatentDiffusion,
    out: str | os.PathLike,
    groups: list[Group],
    *,
    header: dict[str, Any],
    options: dict[str, Any],
    sampler: str,
    steps: int,
    seed: int,
    guidance_scale: float | None,
    guidance_rescale: float,
    batch_size: int,
    judge: Any = None,
    progress: Callable[[int, int], None] | None = None,
    fast: bool | None = None,
) -> SynthResult:
    """Fill `out` with the groups' images (see the module doc), resuming the progress its
    manifest records. `header` (run, weights, kind, classifier) and `options` form the
    manifest's identity, which the caller has checked against a manifest already there;
    `judge` (a domain classifier) keeps only the images it reads as their class."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.rglob(".*.tmp"):  # a temporary file of a killed write
        stale.unlink(missing_ok=True)
    manifest = {"format": FORMAT, **header, "options": options,
                "groups": [asdict(g) for g in groups]}  # fmt: skip
    total = sum(g.count for g in groups)
    done = sum(min(g.kept, g.count) for g in groups)
    write_json(out / MANIFEST, manifest)
    written = 0
    if progress is not None:
        progress(done, total)
    kind = header["kind"]
    for g in groups:
        while not g.done and not g.exhausted:
            needed = g.count - g.kept
            if judge is None:
                b = min(batch_size, needed)
            else:  # a quarter more than still needed, within the draws allowed
                b = min(batch_size, g.count * MAX_DRAWS - g.drawn, needed + needed // 4 + 1)
            first = g.drawn
            seeds = [seed + g.label * GROUP_STRIDE + j for j in range(first, first + b)]
            condition: dict[str, Any] = {}
            if kind == "class":
                condition["class_labels"] = torch.full((b,), g.label, dtype=torch.long)
            elif kind == "text":
                condition["prompt"] = [g.name] * b
            images = draw(ldm, seeds, sampler=sampler, steps=steps, condition=condition,
                          guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                          fast=fast)  # fmt: skip
            keep = [True] * b
            if judge is not None:
                pred = judge.logits(images).argmax(1)
                keep = (pred == g.label).tolist()
            for i in range(b):
                if not keep[i]:
                    g.dropped += 1
                    continue
                if g.kept >= g.count:  # a batch may find more than the group still needs
                    continue
                params = {
                    **header["params"], "verb": "synth", "sampler": sampler, "steps": steps,
                    "guidance_scale": header["guidance"], "guidance_rescale": guidance_rescale,
                    "seed": seeds[i], "candidate": first + i,
                    "batch": {"first_seed": seeds[0], "size": b},
                    **({"class": g.name, "label": g.label} if kind == "class" else {}),
                    **({"prompt": g.name} if kind == "text" else {}),
                }  # fmt: skip
                path = out / g.folder / image_name(g.kept)
                if kind == "text":
                    caption = g.name
                    atomic_write(path.with_suffix(".txt"),
                                 lambda tmp, c=caption: Path(tmp).write_text(c + "\n", "utf-8"))  # fmt: skip
                write_png(images[i : i + 1], path, params)
                g.kept += 1
                written += 1
            g.drawn += b
            manifest["groups"] = [asdict(x) for x in groups]
            write_json(out / MANIFEST, manifest)  # the batch is done
            done = sum(min(x.kept, x.count) for x in groups)
            if progress is not None:
                progress(done, total)
    result = SynthResult(out, groups, written)
    for g in groups:
        if not g.done:
            result.notes.append(
                f"{g.name or 'the run'}: only {g.kept} of {g.count} images were read as their "
                f"class after {g.drawn} draws ({g.dropped} dropped); the classifier rarely "
                "reads this class in the model's images"
            )
    return result


def groups_of(manifest: dict[str, Any]) -> list[Group]:
    return [Group(**g) for g in manifest["groups"]]


def read_synth(folder: str | os.PathLike) -> tuple[Tensor, Tensor, list[str] | None, list[str]]:
    """A synth folder's images as a data set: (uint8 (N, C, H, W), labels (N,) long, captions or
    None, group names), labels as the manifest's groups say (not the folders' sorted order)."""
    from PIL import Image

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise ValueError(f"{folder} holds no {MANIFEST}; it was not written by `ldmkit synth`")
    arrays, labels, captions = [], [], []
    for g in groups_of(manifest):
        for i in range(g.kept):
            with Image.open(folder / g.folder / image_name(i)) as im:
                a = np.asarray(im)
            arrays.append(a[:, :, None] if a.ndim == 2 else a)
            labels.append(g.label)
            captions.append(g.name)
    if not arrays:
        raise ValueError(f"{folder} holds no images yet")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    names = [g.name for g in groups_of(manifest)]
    return images, torch.tensor(labels), captions if manifest["kind"] == "text" else None, names


def folder_contents(out: Path) -> list[str]:
    """Up to three entries of a folder (for a message)."""
    return sorted(p.name for p in out.iterdir())[:3]


__all__ = ["MANIFEST", "Group", "SynthResult", "draw", "plan_groups", "read_synth", "synthesize"]
