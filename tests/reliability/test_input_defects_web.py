"""The web page's side of issue 24's input defects (tests/reliability/test_input_defects.py
has the command line's): run names the file system cannot hold, file system errors in request
handling, uploads that are no usable image, and fields of the wrong kind: each a 4xx with one
line in words, never a 500 or a Python repr.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from reliability_helpers import make_run
from test_input_defects import no_raw_text, png_header

pytest.importorskip("starlette", reason="the serve extra: pip install -e '.[serve]'")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("web-defects") / "run")


@pytest.fixture(scope="module")
def client(run_dir):
    from starlette.testclient import TestClient

    from ldmkit.web.app import create_app

    with TestClient(create_app(run_dir.parent), raise_server_exceptions=False) as c:
        yield c


def requests_naming(client, name: str) -> list:
    """Every endpoint that takes a run name, asked for `name`."""
    image = io.BytesIO()
    Image.new("RGB", (16, 16)).save(image, format="PNG")
    return [
        client.get("/api/run", params={"run": name}),
        client.get("/api/run/log", params={"run": name}),
        client.get("/api/run/image", params={"run": name, "which": "loss"}),
        client.post("/api/run/stop", json={"run": name}),
        client.post("/api/sample", json={"run": name}),
        client.post("/api/edit", data={"run": name, "method": "img2img", "params": "{}"},
                    files={"image": ("i.png", image.getvalue(), "image/png")}),
    ]  # fmt: skip


RUN_NAMES = {
    "a few thousand characters": ("a" * 3000, "run 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'... "
        "(3000 characters) has a folder name longer than the file system's limit of 255 bytes; "
        "pick one of /api/runs"),
    "a long folder under a short one": ("run/" + "b" * 256, "has a folder name longer than the "
        "file system's limit of 255 bytes; pick one of /api/runs"),
    "thousands of folders": ("x/" * 1500 + "y", "is 1501 folders deep; runs are looked for at "
        "most 3 deep under --runs: pick one of /api/runs"),
    "a NUL": ("run\0", "run 'run\\x00' holds a control character; pick a run of /api/runs"),
    "a newline": ("run\nx", "run 'run\\nx' holds a control character; pick a run of /api/runs"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(RUN_NAMES))
def test_every_bad_run_name_is_a_400_with_one_line(client, case):
    """A run name is checked once, where the web layer resolves it: every endpoint answers 400
    with the same line (it was 500 "File name too long" for a long name)."""
    name, message = RUN_NAMES[case]
    for r in requests_naming(client, name):
        assert r.status_code == 400, (r.request.url, r.text)
        error = no_raw_text(r.json()["error"])
        assert error.endswith(message) and len(error) < 300, error


def test_a_run_folder_the_server_cannot_read_is_4xx_and_the_listing_goes_on(
    client, run_dir, monkeypatch
):
    """A file system error while a run name is resolved (here: permission denied) is a 403 with
    the reason in words, and the run listing skips what it cannot read instead of failing."""
    from ldmkit.runs import RunFolder

    real = RunFolder.holds_run

    def holds_run(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    (run_dir.parent / "locked").mkdir(exist_ok=True)
    monkeypatch.setattr(RunFolder, "holds_run", staticmethod(holds_run))
    r = client.get("/api/run", params={"run": "locked"})
    assert r.status_code == 403 and r.json()["error"] == (
        "run 'locked' cannot be read (permission denied); pick another of /api/runs"
    ), r.text
    listing = client.get("/api/runs")
    assert listing.status_code == 200 and [x["name"] for x in listing.json()["runs"]] == ["run"]


def test_an_os_error_in_a_request_is_said_in_words(client, run_dir, monkeypatch):
    """Any OSError left in request handling is answered in words with a fitting status."""
    from ldmkit.runs import RunFolder

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(run_dir / "run.json"))

    monkeypatch.setattr(RunFolder, "config", refuse)
    r = client.get("/api/run", params={"run": "run"})
    assert r.status_code == 403 and r.json()["error"] == (
        f"the server cannot use {run_dir / 'run.json'}: permission denied"
    ), r.text


UPLOADS = {
    "not an image": (b"GIF89a not really", 400, "the image: not an image file (PNG, JPEG, ... "
                     "expected)"),
    "a bomb": (png_header(30000, 30000), 413, "the image is 900000000 pixels, over the limit of "
               "16777216 pixels (a decompression-bomb guard); use a smaller image"),
    "damaged": (None, 400, "the image: the image data is damaged (image file is truncated); "
                "save the image again or use another file"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(UPLOADS))
def test_an_upload_that_cannot_be_used_is_one_line_without_python_reprs(client, case):
    """The page's uploads go through the CLI's image reader: the same messages, naming "the
    image" (not `<_io.BytesIO object at 0x...>` nor the server's storage path)."""
    data, status, message = UPLOADS[case]
    if data is None:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="PNG")
        data = buf.getvalue()[:60]  # header whole, pixels cut
    r = client.post("/api/edit", data={"run": "run", "method": "img2img", "params": "{}"},
                    files={"image": ("i.png", data, "image/png")})  # fmt: skip
    assert r.status_code == status and no_raw_text(r.json()["error"]) == message, r.text


@pytest.mark.parametrize("params, message", [
    ({"hole_colour": "red"}, "--hole-colour takes 1 or 3 whole numbers in 0..255 (e.g. "
     "255,255,255 for white), got 'red'"),
    ({"classes": 5}, "classes must be a string, got 5"),
])  # fmt: skip
def test_edit_fields_of_the_wrong_kind_are_400_in_words(client, params, message):
    image = io.BytesIO()
    Image.new("RGB", (16, 16)).save(image, format="PNG")
    r = client.post("/api/edit", data={"run": "run", "method": "fill", "params": json.dumps(params)},
                    files={"image": ("i.png", image.getvalue(), "image/png")})  # fmt: skip
    assert r.status_code == 400 and no_raw_text(r.json()["error"]) == message, r.text


def test_an_image_index_of_other_digits_is_404_not_a_python_message(client):
    """?i=² (a digit to str.isdigit, not to int()) of a finished job: 404 in words."""
    import time

    job = client.post("/api/sample", json={"run": "run", "n": 1, "steps": 1}).json()["job"]
    for _ in range(600):
        state = client.get("/api/job", params={"id": job["id"]}).json()
        if state["state"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    assert state["state"] == "done", state
    r = client.get("/api/job/image", params={"id": job["id"], "i": "\u00b2"})
    assert r.status_code == 404 and r.json()["error"] == (
        f"job {job['id']} has no image '\u00b2' (1 images, done)"
    ), r.text
