"""The page's editing methods: inpaint, img2img, interpolate, denoise and fill, each a call of
`ldmkit.editing` on uploaded PNGs; what the page shows of each (`methods`), the checks of a
request (`prepare`, before it is queued), and the call itself (`run`, in the job).

Uploads are refused when they are no image, or larger than MAX_PIXELS (read from the header,
before Pillow decodes anything: its own bomb guard only starts at 89 M pixels). A mask is read
as grey levels, >= 128 meaning white = regenerate.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .. import api, editing
from ..config import ConfigError, check_float
from ..data.transforms import to_float
from ..diffusion.samplers import DEFAULT_SAMPLER, SAMPLERS, check_sampler
from ..pipeline import LatentDiffusion

MAX_PIXELS = 4096 * 4096  # an uploaded image
MAX_FRAMES = 64  # frames of an interpolation
KINDS = ("inpaint", "img2img", "interpolate", "denoise", "fill")


class UploadError(ConfigError):
    """An upload the server will not read (HTTP status `status`)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------ the page's form
def _num(name: str, label: str, value: Any, lo: float, hi: float | None = None,
         step: float = 1, kind: str = "number") -> dict[str, Any]:  # fmt: skip
    return {"name": name, "label": label, "value": value, "min": lo, "max": hi, "step": step,
            "type": kind}  # fmt: skip


def methods(ldm_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's label, what it uploads and its fields, for the page to draw (ldm_info:
    conditioning, class_names, guidance of the run)."""
    sampling = [
        {
            "name": "sampler",
            "label": "sampler",
            "options": list(SAMPLERS),
            "value": DEFAULT_SAMPLER,
        },
        _num("steps", "steps", 20, 1),
        _num("seed", "seed", 0, 0),
    ]
    condition: list[dict[str, Any]] = []
    if ldm_info["conditioning"] == "class":
        condition = [{"name": "classes", "label": "class", "options": ["", *ldm_info["class_names"]],
                      "value": ""}]  # fmt: skip
    elif ldm_info["conditioning"] == "text":
        condition = [{"name": "prompt", "label": "prompt", "type": "text", "value": ""},
                     {"name": "negative_prompt", "label": "negative prompt", "type": "text",
                      "value": ""}]  # fmt: skip
    if condition:
        condition.append(_num("guidance", "guidance", ldm_info["guidance"], 0, None, 0.5))
    inpaint = [
        _num("mask_blur", "mask blur (px)", 0, 0, 16),
        _num("mask_dilate", "mask dilate (cells)", 0, 0, 8),
        _num("repaint_resample", "RePaint resamples (1 = off; ddpm, ddim)", 1, 1, 20),
        _num("repaint_jump", "RePaint jump (steps)", 10, 1, 100),
    ]
    return {
        "inpaint": {"label": "inpaint", "image": True, "mask": True, "fields": sampling + inpaint + condition},
        "img2img": {"label": "img2img", "image": True, "mask": False,
                    "fields": [_num("strength", "strength", 0.6, 0.05, 1, 0.05, "range"), *sampling, *condition]},
        "interpolate": {"label": "interpolate", "image": False, "mask": False, "fields": [
            {"name": "between", "label": "between", "options": ["seeds", "images"], "value": "seeds"},
            _num("seed_a", "seed A", 0, 0), _num("seed_b", "seed B", 1, 0),
            {"name": "image2", "label": "second image (between images)", "type": "file"},
            _num("frames", "frames", 8, 2, MAX_FRAMES),
            {**sampling[0], "value": "ddim"}, sampling[1], *condition]},
        "denoise": {"label": "restore: denoise", "image": True, "mask": False,
                    "fields": [_num("noise_std", "noise std (0..1; empty: estimate)", "", 0, 1, 0.01), *sampling, *condition]},
        "fill": {"label": "restore: fill (mask, or white pixels)", "image": True, "mask": True,
                 "fields": sampling + condition},
    }  # fmt: skip


# ------------------------------------------------------------------------------ uploads
def read_image(data: bytes, what: str = "image") -> Image.Image:
    """An uploaded image, checked for size before it is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > MAX_PIXELS:
                raise UploadError(
                    f"the {what} is {w}x{h} = {w * h} pixels, over the limit of {MAX_PIXELS}; "
                    "send a smaller image",
                    413,
                )
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise UploadError(f"the {what} is refused by Pillow's bomb guard ({e})", 413) from None
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise UploadError(
                f"the {what} is not an image Pillow can read ({e}); send a PNG"
            ) from None
    return image


def image_tensor(image: Image.Image, channels: int) -> Tensor:
    """(1, C, H, W) in [-1, 1], C = the model's channels (grey or RGB)."""
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    x = torch.from_numpy(array.copy()).reshape(*array.shape[:2], -1).permute(2, 0, 1)
    return to_float(x[None])


def mask_tensor(image: Image.Image) -> Tensor:
    """(1, 1, H, W) in {0, 1}: white (>= 128) = regenerate."""
    array = np.asarray(image.convert("L")) >= 128
    return torch.from_numpy(array).float()[None, None]


# ------------------------------------------------------------------------------ checks and calls
def prepare(ldm: LatentDiffusion, kind: str, params: dict[str, Any],
            uploads: dict[str, bytes]) -> tuple[dict[str, Any], dict[str, Tensor]]:  # fmt: skip
    """The checked parameters (as `editing` takes them) and input tensors of a request; a
    one-line ValueError for anything `editing` would refuse, before the job is queued."""
    if kind not in KINDS:
        raise UploadError(f"unknown editing method {kind!r}; use one of {', '.join(KINDS)}")
    p = dict(params)
    out: dict[str, Any] = {
        "sampler": str(p.pop("sampler", "ddim" if kind == "interpolate" else DEFAULT_SAMPLER)),
        "steps": api.check_steps("--steps", p.pop("steps", 20), ldm.schedule.num_timesteps),
        "seed": api.check_seed("--seed", p.pop("seed", 0)),
    }
    check_sampler(out["sampler"])
    out.update(_condition(ldm, p))
    tensors: dict[str, Tensor] = {}
    c = ldm.image_shape[0]
    needs_image = kind != "interpolate" or p.get("between") == "images"
    if needs_image:
        if "image" not in uploads:
            raise UploadError(f"{kind} needs an image: upload one or use a generated one")
        tensors["image"], _ = editing.check_images(
            ldm, image_tensor(read_image(uploads["image"]), c)
        )
    if kind in ("inpaint", "fill") and "mask" in uploads:
        mask = mask_tensor(read_image(uploads["mask"], "mask"))
        tensors["mask"] = editing.check_masks(ldm, mask, 1)
    elif kind == "inpaint":
        raise UploadError("inpaint needs a mask: draw on the image (white = regenerate)")
    if kind == "inpaint":
        out["mask_blur"] = api.check_count("mask_blur", p.pop("mask_blur", 0), 0, 64)
        out["mask_dilate"] = api.check_count("mask_dilate", p.pop("mask_dilate", 0), 0, 16)
        out["repaint_resample"] = api.check_count(
            "repaint_resample", p.pop("repaint_resample", 1), 1, 50
        )
        out["repaint_jump"] = api.check_count("repaint_jump", p.pop("repaint_jump", 10), 1, 1000)
    elif kind == "img2img":
        out["strength"] = check_float("strength", p.pop("strength", 0.6), 0, 1, lo_open=True)
    elif kind == "interpolate":
        out["frames"] = api.check_count("frames", p.pop("frames", 8), 2, MAX_FRAMES)
        if p.pop("between", "seeds") == "images":
            if "image2" not in uploads:
                raise UploadError("interpolating between images needs a second image: upload it")
            second = image_tensor(read_image(uploads["image2"], "second image"), c)
            second, _ = editing.check_images(ldm, second, "second image")
            tensors["images"] = torch.cat([tensors.pop("image"), second])
        else:
            out["seeds"] = (api.check_seed("seed_a", p.pop("seed_a", 0)),
                            api.check_seed("seed_b", p.pop("seed_b", 1)))  # fmt: skip
        p.pop("seed_a", None), p.pop("seed_b", None)
    elif kind == "denoise":
        std = p.pop("noise_std", None)
        out["noise_std"] = None if std is None else check_float("noise_std", std, 0, 1)
    if p:
        raise UploadError(f"unknown parameter {sorted(p)[0]!r} for {kind}")
    return out, tensors


def _condition(ldm: LatentDiffusion, p: dict[str, Any]) -> dict[str, Any]:
    """classes / prompt / negative_prompt / guidance of a request -> editing's keywords."""
    out: dict[str, Any] = {}
    classes, prompt, negative = (
        p.pop("classes", None),
        p.pop("prompt", None),
        p.pop("negative_prompt", None),
    )
    guidance = api.check_guidance("--guidance", p.pop("guidance", None))
    if classes:
        out["class_labels"] = ldm.conditioner.parse(str(classes), 1)
    if prompt:
        out["prompt"] = str(prompt)
    if negative:
        out["negative_prompt"] = str(negative)
    if guidance is not None and out:
        out["guidance_scale"] = guidance
    return out


def run(ldm: LatentDiffusion, kind: str, params: dict[str, Any],
        tensors: dict[str, Tensor]) -> editing.EditResult:  # fmt: skip
    """The editing call of a prepared request."""
    if kind == "inpaint":
        return editing.inpaint(ldm, tensors["image"], tensors["mask"], **params)
    if kind == "img2img":
        return editing.img2img(ldm, tensors["image"], **params)
    if kind == "interpolate":
        return editing.interpolate(ldm, images=tensors.get("images"), **params)
    if kind == "denoise":
        return editing.denoise(ldm, tensors["image"], **params)
    mask = tensors.get("mask")
    return editing.fill(ldm, tensors["image"], mask if mask is not None and bool(mask.any()) else None,
                        **params)  # fmt: skip
