"""The editing verbs: `edit` (inpaint, fill, img2img, invert, interpolate, denoise), the files
it reads and writes (`save_edit`), and `reproduce` (the same edit again from its PNG).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError
from ..options import (
    EDITS,
    VERBS,
    check_conditions,
)
from ..runs import RunFolder

if TYPE_CHECKING:  # the heavy modules are imported inside the functions that use them
    from ..editing import EditResult

from .checks import (
    check_apart,
    check_device,
    check_output_file,
    check_path,
    overlap,
    package_version,
    run_inputs,
)

log = logging.getLogger(__name__)


EDIT_METHODS = tuple(EDITS)  # inpaint, fill, img2img, invert, interpolate, denoise


_MASKED = ("inpaint", "fill")


def check_edit_options(method: str, options: dict[str, Any], run: Any = None) -> Any:
    """The options of an edit (`options.EDITS[method]`, e.g. `InpaintOptions`) with `options`
    ({name: value}, the page's names too) over the defaults, checked once, with the CLI's flag
    names in the messages; with the run (a `RunFolder`), also against it (steps up to its T)."""
    if method not in EDIT_METHODS:
        raise ConfigError(f"unknown edit {method!r}; choose one of {', '.join(EDIT_METHODS)}")
    return VERBS[method].given(options).check(run)


def _input(name: str, path: str | os.PathLike) -> dict[str, str]:
    from ..utils import file_sha256

    check_path(name, path)
    if Path(path).is_dir():
        raise ConfigError(f"{name} {path} is a folder; give an image file")
    if not Path(path).is_file():
        raise ConfigError(f"{name} {path}: no such file")
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def edit(
    method: str,
    run: str | os.PathLike,
    *,
    image: str | os.PathLike | None = None,
    mask: str | os.PathLike | None = None,
    image_b: str | os.PathLike | None = None,
    resize: bool = False,
    classes: str | None = None,
    prompt: str | Sequence[str] | None = None,
    negative_prompt: str | None = None,
    device: str | None = None,
    ldm: Any = None,
    callback: Any = None,
    **options: Any,
) -> EditResult:
    """Edit an image file with a run's model (`ldmkit.editing`): method is one of
    EDIT_METHODS. `image` (and `image_b`, the second end of an image interpolation) and `mask`
    (white = regenerate; optional for fill, which then finds white holes) are files; `resize`
    fits them to the model's size instead of refusing another size. `classes` ("star", or two
    for an interpolation: "circle,star") or `prompt` (two for an interpolation) condition it.
    `options` are the method's (see `check_edit_options`); `ldm` reuses a loaded model;
    `callback(i, x, sigma, x0)` follows the sampler's steps (not for invert)."""
    from ..pipeline import LatentDiffusion

    if method not in EDIT_METHODS:
        raise ConfigError(f"unknown edit {method!r}; choose one of {', '.join(EDIT_METHODS)}")
    check_path("--run", run)
    folder = RunFolder(run).require_trained()
    condition = {"classes": classes, "prompt": prompt, "negative_prompt": negative_prompt}
    given = {**options, **{k: v for k, v in condition.items() if v is not None}}
    checked = check_edit_options(method, given, folder)
    # the options as given (under their field names), checked: a colour as numbers, ...
    options = {f.name: getattr(checked, f.name) for f in checked.fields()
               if f.name in options or f.web_name in options}  # fmt: skip
    classes, prompt, negative_prompt = (getattr(checked, k) for k in condition)
    ldm = ldm if ldm is not None else LatentDiffusion.from_run(run, device=check_device(device))
    files = {"image": image, "mask": mask, "image_b": image_b}
    inputs, tensors, notes = edit_inputs(method, ldm, files, resize)
    condition = _edit_condition(method, ldm, run, classes, prompt, negative_prompt, options)
    progress = {"callback": callback} if callback is not None and method != "invert" else {}
    result = _run_edit(method, ldm, tensors, {**options, **condition, **progress})
    params = {
        "ldmkit": package_version(), "method": method, "run": str(Path(run).resolve()),
        "weights": folder.weights_hash(), "inputs": inputs,
        "options": {"resize": resize, "classes": classes, "prompt": prompt,
                    "negative_prompt": negative_prompt, **options},
        "details": result.params,
    }  # fmt: skip
    return dataclasses.replace(result, params=params, notes=notes + result.notes)


def edit_inputs(
    method: str, ldm: Any, files: dict[str, Any], resize: bool
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The input files of an edit, checked and read: ({name: path and SHA-256}, {name: tensor},
    notes). An image larger than the model's in both directions is kept at its size for the
    masked edits (inpainted crop by crop); "tiled" in the tensors says so."""
    from ..data.images import read_image, read_mask

    image, mask, image_b = files["image"], files["mask"], files["image_b"]
    if method != "interpolate" and image is None:
        raise ConfigError(f"{method} needs --image FILE (the image to edit)")
    if method == "inpaint" and mask is None:
        raise ConfigError("inpaint needs --mask FILE (white = regenerate, black = keep)")
    if mask is not None and method not in _MASKED:
        raise ConfigError(f"{method} takes no --mask (inpaint and fill do)")
    if (image is None) != (image_b is None) and method == "interpolate":
        raise ConfigError("interpolating images needs two: --image A --image-b B")
    inputs = {name: _input("--" + name.replace("_", "-"), path)
              for name, path in files.items() if path is not None}  # fmt: skip
    c, h, w = ldm.image_shape
    notes: list[str] = []
    tensors: dict[str, Any] = {"tiled": False}
    for name in ("image", "image_b"):
        if name in inputs:
            size = (w, h)
            if method in _MASKED and not resize:  # a larger image is inpainted crop by crop
                size = _larger_size(inputs[name]["path"], (w, h))
                tensors["tiled"] = size != (w, h)
            tensors[name], more = read_image(
                inputs[name]["path"], channels=c, size=size, resize=resize
            )
            notes += more
    if "mask" in inputs:
        size = tuple(tensors["image"].shape[-1:-3:-1])
        tensors["mask"], more = read_mask(inputs["mask"]["path"], size=size, resize=resize)
        notes += more
    return inputs, tensors, notes


def _run_edit(method: str, ldm: Any, tensors: dict[str, Any], call: dict[str, Any]) -> Any:
    """editing.<method> on the read inputs with the checked options and condition."""
    from .. import editing
    from ..data.masks import detect_holes

    c = ldm.image_shape[0]
    if "hole_colour" in call:
        call["hole_colour"] = [int(v) / 127.5 - 1 for v in call["hole_colour"]]
    if method == "interpolate":
        if "image" in tensors:
            call["images"] = _cat([tensors["image"], tensors["image_b"]])
        elif "seeds" in call:
            call["seeds"] = tuple(call["seeds"])
        return editing.interpolate(ldm, **call)
    if tensors["tiled"]:
        mask = tensors.get("mask")
        if mask is None:
            colour = torch_tensor(call.pop("hole_colour", [1.0] * c))
            colour = colour[:1] if c == 1 else colour.expand(c)
            mask = detect_holes(tensors["image"], colour)
        return editing.inpaint_large(ldm, tensors["image"], mask, **call)
    if method in _MASKED:
        fn = editing.inpaint if method == "inpaint" else editing.fill
        return fn(ldm, tensors["image"], tensors.get("mask"), **call)
    return getattr(editing, method)(ldm, tensors["image"], **call)


def _larger_size(path: str, model: tuple[int, int]) -> tuple[int, int]:
    """The size of an image file when it is at least the model's in both directions (it is then
    inpainted crop by crop), else the model's size (which read_image then checks). The header is
    read by `data.images.image_size`, with its one-line errors (a decompression bomb, ...)."""
    from ..data.images import image_size

    size = image_size(path, "image")
    return size if size[0] >= model[0] and size[1] >= model[1] else model


def torch_tensor(values: Sequence[float]) -> Any:
    import torch

    return torch.tensor(list(values), dtype=torch.float32)


def _edit_condition(
    method: str, ldm: Any, run: Any, classes: str | None, prompt: Any, negative: str | None,
    options: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """class_labels / prompt / negative_prompt for editing.<method>, checked against the model.
    Without any, a conditional model edits unconditionally. An interpolation without --seeds or
    a second image takes two classes ("circle,star") or two prompts as its ends."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt else None
    if prompts or classes is not None or negative is not None:
        check_conditions(ldm, run, classes, prompts, negative)
    limit = 2 if method == "interpolate" else 1
    out: dict[str, Any] = {"negative_prompt": negative} if negative else {}
    if classes is not None:
        labels = ldm.conditioner.parse(classes, len(classes.split(","))).tolist()
        if len(labels) > limit:
            raise ConfigError(
                f"--class: give {'one or two classes' if limit == 2 else 'one class'}, got {classes!r}"
            )
        out["class_labels"] = labels
    if prompts:
        if len(prompts) > limit:
            raise ConfigError(
                f"--prompt: give {'one or two prompts' if limit == 2 else 'one prompt'}, got {len(prompts)}"
            )
        out["prompt"] = prompts if len(prompts) == 2 else prompts[0]
    if "guidance_scale" not in options and (classes or prompts):
        out["guidance_scale"] = ldm.guidance_scale
    return out


def _cat(tensors: Sequence[Any]) -> Any:
    import torch

    return torch.cat(list(tensors))


def edit_outputs(out: Path, method: str, count: int = 1) -> list[Path]:
    """The files `save_edit` writes for --out: out.png (out-1.png, ... for several images), and
    out.gif for an interpolation, out.noise.safetensors for an inversion."""
    if method == "interpolate":
        return [out, out.with_suffix(".gif")]
    paths = (
        [out] if count == 1 else [out.with_name(f"{out.stem}-{i + 1}.png") for i in range(count)]
    )
    if method == "invert":
        paths.append(out.with_suffix(".noise.safetensors"))
    return paths


def check_edit_output(
    out: str | os.PathLike, method: str | None, inputs: dict[str, Any],
    run: str | os.PathLike | None = None, count: int = 1,
) -> Path:  # fmt: skip
    """--out of an edit, before anything runs and again when it is written: a PNG path in a
    writable place none of whose files (`edit_outputs`) is an input: `inputs` ({flag: path}:
    --image, --mask, --image-b, --from-png) or the run's files (`run_inputs`)."""
    path = check_output_file("--out", out, image=True)
    if path.suffix.lower() != ".png":
        raise ConfigError(
            f"--out {path}: edits are written as PNG (they carry their parameters); use .png"
        )
    # an input given as a folder is refused as such when it is read (`edit_inputs`)
    given = [(flag, p) for flag, p in inputs.items() if p is not None and not Path(p).is_dir()]
    sources = [*given, *run_inputs(run)]
    for written in edit_outputs(path, str(method), count):
        for flag, source in sources:
            if written != path and overlap(written, source) is not None:
                raise ConfigError(
                    f"--out {path} also writes {written.name}, over the {flag} "
                    f"{'folder' if Path(source).is_dir() else 'file'} {source}; ldmkit would "
                    "overwrite what it reads: choose another --out file"
                )
            check_apart("--out", written, flag, source, spec=False)
    return path


def recorded_inputs(params: dict[str, Any]) -> dict[str, Any]:
    """{--image: path, ...}: the input files an edit's PNG parameters record."""
    inputs = params.get("inputs")
    if not isinstance(inputs, dict):
        return {}
    return {"--" + str(k).replace("_", "-"): e["path"] for k, e in inputs.items()
            if isinstance(e, dict) and isinstance(e.get("path"), str)}  # fmt: skip


def save_edit(result: EditResult, out: str | os.PathLike) -> list[Path]:
    """Write an edit: one PNG per image carrying `result.params` (out.png, or out-1.png, ...
    for several), and for an interpolation also the strip as an animated GIF beside it
    (out.gif); for an inversion, the noise as out.noise.safetensors."""
    from ..checkpoint import atomic_write, save_tensors
    from ..data.images import write_png
    from ..data.transforms import pil_image, to_uint8

    params = result.params
    images = result.images
    out = check_edit_output(out, params["method"], recorded_inputs(params), params.get("run"),
                            count=len(images))  # fmt: skip
    written: list[Path] = []
    if params["method"] == "interpolate":
        strip = _cat([_cat(list(images.split(1))).permute(1, 2, 0, 3).flatten(2)[None]])
        write_png(strip, out, result.params)
        written.append(out)
        frames = [pil_image(a) for a in to_uint8(images).permute(0, 2, 3, 1).numpy()]
        gif = out.with_suffix(".gif")
        atomic_write(gif, lambda tmp: frames[0].save(
            tmp, format="GIF", save_all=True, append_images=frames[1:] + frames[-2:0:-1],
            duration=120, loop=0))  # fmt: skip
        written.append(gif)
        return written
    paths = edit_outputs(out, params["method"], len(images))
    for img, path in zip(images.split(1), paths):
        write_png(img, path, result.params)
        written.append(path)
    if "noise" in result.extra:
        noise_path = out.with_suffix(".noise.safetensors")
        save_tensors(noise_path, {"noise": result.extra["noise"].contiguous()})
        written.append(noise_path)
    return written


def reproduce(png: str | os.PathLike, *, device: str | None = None, ldm: Any = None) -> EditResult:
    """Run again the edit whose parameters a PNG carries (written by `save_edit`): the same run
    (its weights unchanged), the same input files (unchanged), the same options. On the same
    machine the result is bit for bit the same."""
    from ..data.images import read_png_params
    from ..utils import file_sha256

    check_path("--from-png", png)
    params = read_png_params(png)
    try:
        method, run, inputs, options = (params["method"], params["run"], params["inputs"],
                                        dict(params["options"]))  # fmt: skip
    except (KeyError, TypeError) as e:
        raise ConfigError(
            f"--from-png {png}: its parameters lack {e}; it was not written by an ldmkit edit"
        ) from e
    folder = RunFolder(run).require_trained()
    if folder.weights_hash() != params.get("weights"):
        raise ConfigError(
            f"--from-png {png}: the run {run} has other weights now than when the PNG was made "
            "(retrained or replaced); the edit cannot be reproduced"
        )
    for name, entry in inputs.items():
        if not Path(entry["path"]).is_file() or file_sha256(entry["path"]) != entry["sha256"]:
            raise ConfigError(
                f"--from-png {png}: its input {name} {entry['path']} is missing or changed since"
            )
    files = {name: entry["path"] for name, entry in inputs.items()}
    return edit(method, run, device=device, ldm=ldm, **files, **options)
