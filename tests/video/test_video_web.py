"""The web page and a video run: its final clips in the run panel (an animated GIF), sample
jobs with progress whose result is the clips' GIF, the same clips as `api.sample_clips`."""

import io
import shutil

import numpy as np
import pytest
from PIL import Image, ImageSequence

pytest.importorskip("starlette", reason="ldmkit serve needs the serve extra")

from starlette.testclient import TestClient  # noqa: E402

from ldmkit import api  # noqa: E402
from ldmkit.data.animations import read_animation_params  # noqa: E402
from ldmkit.web import app as web  # noqa: E402


def frames(gif: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(gif)) as im:
        return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])


@pytest.fixture
def client(video_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(video_run, runs / "moving")
    with TestClient(web.create_app(runs)) as c:
        yield c


def test_the_run_panel_plays_a_video_runs_clips(client):
    info = client.get("/api/run", params={"run": "moving"}).json()
    assert info["trained"] and info["video"] == {"frames": 3, "fps": 5.0} and info["clips"]
    assert info["editing"] == []  # the edits are image runs' only
    r = client.get("/api/run/image", params={"run": "moving", "which": "clips"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/gif"
    assert len(frames(r.content)) == 3


def test_a_sample_job_of_a_video_run_is_the_clips_gif(client, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "web"))
    from serve_helpers import wait_for

    r = client.post("/api/sample", json={"run": "moving", "n": 2, "steps": 2, "seed": 4,
                                         "classes": "star"})  # fmt: skip
    assert r.status_code == 202, r.text
    job = wait_for(client, r.json()["job"]["id"])
    assert job["state"] == "done" and job["step"] == job["total"] == 2, job
    res = client.get("/api/job/result", params={"id": job["id"], "download": 1})
    assert res.headers["content-type"] == "image/gif"
    assert res.headers["content-disposition"].endswith('.gif"')
    ref = api.sample_clips(tmp_path / "runs" / "moving", n=2, steps=2, seed=4, classes="star")
    api.save_clips(ref, tmp_path / "ref.gif")
    assert np.array_equal(frames(res.content), frames((tmp_path / "ref.gif").read_bytes()))
    (tmp_path / "job.gif").write_bytes(res.content)
    assert read_animation_params(tmp_path / "job.gif")["steps"] == 2
    strip = client.get("/api/job/image", params={"id": job["id"], "i": 0})
    assert strip.headers["content-type"] == "image/png"
    one = client.get("/api/job/image", params={"id": job["id"], "i": 1})
    assert one.headers["content-type"] == "image/gif" and len(frames(one.content)) == 3
