"""The page's editing methods, each a call of `api.edit` (as `ldmkit inpaint`, `img2img`, ...
make it) on uploaded PNGs: what the page shows of each (`methods`), the checks of a request
before it is queued (`prepare`), and the call itself in the job (`run`).

Uploads are refused when they are no image, or larger than MAX_PIXELS (read from the header,
before Pillow decodes anything: its own bomb guard starts at 89 M pixels). They are kept,
named by their SHA-256, in a hidden folder of --runs (`UPLOADS`), so that a result's PNG
parameters name input files that exist: `ldmkit inpaint --from-png result.png` repeats it.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .. import api
from ..config import ConfigError
from ..data.images import ImageFileError, ImageTooLargeError, load_image, write_png
from ..options import DEFAULT_SAMPLER, VERBS
from ..pipeline import LatentDiffusion
from ..runs import RunFolder
from . import forms

if TYPE_CHECKING:
    from ..editing import EditResult

MAX_PIXELS = 4096 * 4096  # an uploaded image
UPLOADS = ".ldmkit-serve/uploads"  # under --runs (hidden: never listed as a run)
METHODS = ("inpaint", "img2img", "interpolate", "denoise", "fill")
LABELS = {"denoise": "restore: denoise", "fill": "restore: fill (the mask, or white holes)"}


class UploadError(ConfigError):
    """A request the server will not take (HTTP status `status`)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    """A checked editing request: the method, api.edit's keywords, and the uploads by the
    keyword they go to (image, mask, image_b)."""

    method: str
    options: dict[str, Any]
    uploads: dict[str, bytes]  # as received (canvas alpha dropped)
    paths: dict[str, Path]  # where they are kept
    checked: Any  # all the method's options, checked (`ldmkit.options`)


# ------------------------------------------------------------------------------ the page's form
def methods(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each method's label, what it uploads and its fields, for the page to draw (`run`:
    conditioning, class_names and guidance of the run): the fields of its declaration
    (`ldmkit.options`), then the page's own (which images; other sizes)."""
    resize = {"name": "resize", "label": "other sizes", "options": ["refuse", "resize"],
              "value": "refuse"}  # fmt: skip
    out = {}
    for method in METHODS:
        declared = VERBS[method]
        fields = forms.fields(declared, run, _values(declared, run))
        uploads = []
        if method == "interpolate":  # two seeds as two boxes, or a second image
            uploads = [
                {"name": "between", "label": "between", "options": ["seeds", "images"],
                 "value": "seeds"},
                {"name": "seed_a", "label": "seed A", "value": 0, "min": 0, "step": 1,
                 "type": "number"},
                {"name": "seed_b", "label": "seed B", "value": 1, "min": 0, "step": 1,
                 "type": "number"},
                {"name": "image_b", "label": "second image (between images)", "type": "file"},
            ]  # fmt: skip
        out[method] = {"label": LABELS.get(method, method), "image": method != "interpolate",
                     "mask": method in ("inpaint", "fill"),
                     "fields": [*uploads, *fields, resize]}  # fmt: skip
    return out


def _values(declared: Any, run: dict[str, Any]) -> dict[str, Any]:
    """The values a method's form shows over its declared defaults: the run's guidance, and the
    sampler and steps the run takes when none is given (`options.fill_run_sampling`: a distilled
    student's, `run["student_sampling"]`, else the verb's own)."""
    values: dict[str, Any] = {"guidance_scale": run["guidance"], "steps": declared.run_steps}
    sampler, steps = run.get("student_sampling") or (DEFAULT_SAMPLER, None)
    if "sampler" in declared.__dataclass_fields__:
        default = declared.__dataclass_fields__["sampler"].default
        values["sampler"] = default if default is not None else sampler
    if steps is not None:
        values["steps"] = steps
    return values


# ------------------------------------------------------------------------------ checks
def check_upload(data: bytes, what: str) -> None:
    """Refuse an upload that is no image, has too many pixels (MAX_PIXELS, or Pillow's limit
    if lower: from its header, before it is decoded) or is damaged: `data.images.load_image`,
    the reader of the command line's files, with its messages (413 for too many pixels, else
    400)."""
    try:
        load_image(io.BytesIO(data), what, limit=MAX_PIXELS).close()
    except ImageTooLargeError as e:
        raise UploadError(str(e), 413) from None
    except ImageFileError as e:
        raise UploadError(str(e)) from None


def prepare(ldm: LatentDiffusion, run: RunFolder, method: Any, params: dict[str, Any],
            uploads: dict[str, bytes], folder: Path) -> Request:  # fmt: skip
    """The request as `api.edit` takes it, checked before the job is queued with api's own
    checks (`check_edit_options`, `edit_inputs`: the CLI's messages): its uploads are checked
    for pixels, then stored in `folder` by SHA-256."""
    if method not in METHODS:
        raise UploadError(f"unknown editing method {method!r}; use one of {', '.join(METHODS)}")
    p = dict(params)
    resize = p.pop("resize", "refuse") == "resize"
    files = dict(uploads)
    if method == "interpolate":
        if p.pop("between", "seeds") == "images":
            if "image_b" not in files:
                raise UploadError("interpolating between images needs a second image: upload it")
        else:
            p["seeds"] = [p.pop("seed_a", 0), p.pop("seed_b", 1)]
            files.pop("image", None), files.pop("image_b", None)
        p.pop("seed_a", None), p.pop("seed_b", None)
    elif method not in ("inpaint", "fill"):
        files.pop("mask", None)
    if method in ("inpaint", "fill", "img2img", "denoise") and "image" not in files:
        raise UploadError(f"{method} needs an image: upload one or use a generated one")
    if method == "inpaint" and "mask" not in files:
        raise UploadError("inpaint needs a mask: draw on the image (white = regenerate)")
    given = forms.given(VERBS[method], p)  # the page's empty inputs: the defaults
    checked = api.check_edit_options(method, given, run)
    for name, data in files.items():
        check_upload(data, {"image_b": "second image"}.get(name, name))
        files[name] = _without_canvas_alpha(data, mask=name == "mask")
    paths = {name: store(data, folder) for name, data in files.items()}
    api.edit_inputs(method, ldm, {"image": None, "mask": None, "image_b": None, **paths}, resize)
    return Request(method, {**given, "resize": resize}, files, paths, checked)


def _without_canvas_alpha(data: bytes, mask: bool) -> bytes:
    """A browser canvas saves RGBA: an opaque one is re-encoded without its alpha (and a grey
    mask as one channel), so that api.edit does not note a transparency there is none of."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG" or image.mode not in ("RGBA", "LA"):
                return data
            if image.getchannel("A").getextrema() != (255, 255):
                return data
            opaque = image.convert("RGB" if image.mode == "RGBA" else "L")
    except (OSError, SyntaxError, ValueError, EOFError):  # truncated: api.edit says so in one line
        return data
    if mask and opaque.mode == "RGB":
        r, g, b = opaque.split()
        if r.tobytes() == g.tobytes() == b.tobytes():
            opaque = r
    buf = io.BytesIO()
    opaque.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ the call
def run(ldm: LatentDiffusion, run_dir: Path, request: Request,
        callback: Any = None) -> tuple[EditResult, bytes, list[bytes]]:  # fmt: skip
    """`api.edit` on the stored uploads: (the edit, its PNG as `ldmkit` writes it (the strip of
    an interpolation), one PNG per image); `callback` follows the sampler's steps."""
    result = api.edit(
        request.method, run_dir, ldm=ldm, callback=callback, **request.paths, **request.options
    )
    with tempfile.TemporaryDirectory() as tmp:
        written = api.save_edit(result, Path(tmp) / "edit.png")
        png = written[0].read_bytes()
    images = []
    for image in result.images.split(1):
        buf = io.BytesIO()
        write_png(image, buf, result.params)
        images.append(buf.getvalue())
    return result, png, images


def store(data: bytes, folder: Path) -> Path:
    """An upload, kept under its SHA-256 (the same bytes are stored once)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / hashlib.sha256(data).hexdigest()[:32]
    if not path.is_file():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path
