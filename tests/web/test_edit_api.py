"""The editing endpoint (POST /api/edit) through Starlette's TestClient: masks, sizes, uploads
that are refused, and every method's PNG with its parameters."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from serve_helpers import wait_for

pytest.importorskip(
    "starlette", reason="ldmkit serve needs the serve extra: pip install -e '.[serve]'"
)

from ldmkit import api  # noqa: E402
from ldmkit.data.images import read_png_params  # noqa: E402
from ldmkit.pipeline import LatentDiffusion  # noqa: E402
from ldmkit.runs import RunFolder  # noqa: E402
from ldmkit.web import edits  # noqa: E402

SIZE = 16  # the tiny run's images


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def edit(client, method: str, params: dict | None = None, **files: bytes):
    return client.post(
        "/api/edit",
        data={"run": "shapes", "method": method, "params": json.dumps(params or {})},
        files={k: (f"{k}.png", v, "image/png") for k, v in files.items()},
    )


def finished(client, response) -> tuple[dict, bytes]:
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["job"]["id"])
    assert job["state"] == "done", job
    return job, client.get("/api/job/result", params={"id": job["id"]}).content


def test_an_all_black_mask_returns_the_input_pixel_exact(client, image):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    job, out = finished(
        client, edit(client, "inpaint", {"steps": 3}, image=png(image), mask=png(mask))
    )
    assert np.array_equal(pixels(out), image)
    assert "the input is returned as it is" in job["info"]["notes"][0]


def test_inpaint_changes_only_the_masked_pixels_and_from_png_repeats_it(
    client, image, runs, tmp_path
):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:8, 2:12] = 255
    params = {"steps": 3, "seed": 4, "sampler": "ddim", "classes": "star", "guidance": 2.0}
    job, out = finished(client, edit(client, "inpaint", params, image=png(image), mask=png(mask)))
    changed = (pixels(out) != image).any(-1)
    assert changed.any() and not changed[mask == 0].any()  # mask_blur 0: outside bit for bit
    meta = read_png_params(io.BytesIO(out))
    assert meta["method"] == "inpaint" and meta["run"] == str((runs / "shapes").resolve())
    assert meta["weights"] == RunFolder(runs / "shapes").weights_hash()
    options = meta["options"]
    assert (options["seed"], options["sampler"], options["classes"], options["guidance_scale"]) == (
        4, "ddim", "star", 2.0)  # fmt: skip
    received = client.get("/api/job/input", params={"id": job["id"], "which": "mask"}).content
    assert np.array_equal(pixels(received), mask)
    # the PNG names the stored uploads: the CLI's --from-png repeats the edit bit for bit
    (tmp_path / "result.png").write_bytes(out)
    again = api.reproduce(tmp_path / "result.png")
    assert np.array_equal(LatentDiffusion.to_pil(again.images)[0], pixels(out))


def test_a_mask_of_the_wrong_size_is_400_naming_both_sizes(client, image):
    r = edit(client, "inpaint", {}, image=png(image), mask=png(np.zeros((8, 8), np.uint8)))
    assert r.status_code == 400
    error = r.json()["error"]
    assert "8x8" in error and f"{SIZE}x{SIZE}" in error and "mask" in error, error


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(client, monkeypatch):
    monkeypatch.setattr(edits, "MAX_PIXELS", 100 * 100)
    r = edit(client, "img2img", {}, image=png(np.zeros((101, 100, 3), np.uint8)))
    assert r.status_code == 413
    assert r.json()["error"].startswith("the image is 100x101 = 10100 pixels, over the limit")


def test_pillows_bomb_guard_is_caught(client, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 50)  # Pillow warns above, refuses 2x above
    r = edit(client, "img2img", {}, image=png(np.zeros((60, 60, 3), np.uint8)))
    assert r.status_code == 413 and "bomb guard" in r.json()["error"], r.text


def test_an_upload_that_is_no_image_is_400(client):
    r = edit(client, "img2img", {}, image=b"GIF89a not really")
    assert r.status_code == 400
    assert r.json()["error"] == "the image: not an image file (PNG, JPEG, ... expected)"


@pytest.mark.parametrize(
    "method, params, error",
    [("inpaint", {}, "inpaint needs a mask"),
     ("img2img", {"strength": 0}, "--strength must be a finite number in (0, 1], got 0"),
     ("img2img", {"steps": 0}, "--steps must be a whole number from 1 to 100, got 0"),
     ("img2img", {"colour": 1}, "img2img does not take colour"),
     ("interpolate", {"between": "images"}, "needs a second image"),
     ("sharpen", {}, "unknown editing method 'sharpen'")],
)  # fmt: skip
def test_bad_edit_requests_are_400_with_one_line(client, image, method, params, error):
    r = edit(client, method, params, image=png(image))
    assert r.status_code == 400 and error in r.json()["error"], r.text


@pytest.mark.parametrize(
    "method, params, width",
    [("img2img", {"strength": 0.5}, SIZE), ("denoise", {"noise_std": 0.1}, SIZE),
     ("fill", {}, SIZE), ("interpolate", {"seed_a": 1, "seed_b": 2, "frames": 4}, 4 * SIZE)],
)  # fmt: skip
def test_every_method_gives_a_png_with_its_parameters(client, image, method, params, width):
    job, out = finished(client, edit(client, method, {"steps": 3, **params}, image=png(image)))
    assert pixels(out).shape == (SIZE, width, 3)
    meta = read_png_params(io.BytesIO(out))
    assert meta["method"] == method and meta["options"]["steps"] == 3
    assert job["info"]["frames"] == width // SIZE


def test_interpolating_between_images_starts_and_ends_near_them(client, image):
    other = image[::-1].copy()
    r = edit(client, "interpolate", {"between": "images", "frames": 3, "steps": 4},
             image=png(image), image_b=png(other))  # fmt: skip
    job, out = finished(client, r)
    strip = pixels(out)
    assert strip.shape == (SIZE, 3 * SIZE, 3)
    first = client.get("/api/job/image", params={"id": job["id"], "i": 0}).content
    assert np.array_equal(pixels(first), strip[:, :SIZE])


def test_an_edit_reports_its_steps_and_a_preview(client, image):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[2:10, 2:10] = 255
    job, _ = finished(
        client, edit(client, "inpaint", {"steps": 4}, image=png(image), mask=png(mask))
    )
    assert (job["step"], job["total"]) == (4, 4)
    preview = client.get("/api/job/preview", params={"id": job["id"]})
    assert preview.status_code == 200 and preview.content.startswith(b"\x89PNG")
