"""`ldmkit serve` through Starlette's TestClient (no browser): the same images as the Python API,
PNG parameters, run names that stay inside --runs, request limits, security headers, jobs
(queue, cancel, previews), and the stop button of a training."""

from __future__ import annotations

import io
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import live_server, tiny_settings, wait_for

pytest.importorskip(
    "starlette", reason="ldmkit serve needs the serve extra: pip install -e '.[serve]'"
)

from ldmkit import api  # noqa: E402
from ldmkit.data.images import read_png_params  # noqa: E402
from ldmkit.pipeline import LatentDiffusion  # noqa: E402
from ldmkit.runs import RunFolder  # noqa: E402
from ldmkit.web import app as web  # noqa: E402
from ldmkit.web.jobs import Cancelled, Jobs, Result  # noqa: E402


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def sample(client, **params) -> dict:
    r = client.post("/api/sample", json={"run": "shapes", **params})
    assert r.status_code == 202, r.text
    return wait_for(client, r.json()["job"]["id"])


# ------------------------------------------------------------------------------ images
def test_same_parameters_and_seed_give_the_python_apis_images(client, runs, tmp_path):
    params = dict(n=6, sampler="ddim", steps=4, seed=7, classes="star", guidance=3.0)
    job = sample(client, **params)
    assert job["state"] == "done", job
    grid = client.get("/api/job/result", params={"id": job["id"]}).content

    ref = api.sample(runs / "shapes", n=6, sampler="ddim", steps=4, seed=7, classes="star",
                     guidance_scale=3.0)  # fmt: skip
    api.save_grid(ref, tmp_path / "ref.png")
    assert np.array_equal(pixels(grid), pixels((tmp_path / "ref.png").read_bytes()))
    first = client.get("/api/job/image", params={"id": job["id"], "i": 0}).content
    assert np.array_equal(pixels(first), np.asarray(LatentDiffusion.to_pil(ref.images)[0]))
    assert client.get("/api/job/image", params={"id": job["id"], "i": 6}).status_code == 404


def test_a_different_seed_gives_other_images(client):
    a, b = (sample(client, n=2, steps=3, seed=s) for s in (0, 1))
    pa, pb = (client.get("/api/job/result", params={"id": j["id"]}).content for j in (a, b))
    assert not np.array_equal(pixels(pa), pixels(pb))


def test_png_parameters_round_trip(client, runs):
    params = dict(n=2, sampler="euler", steps=3, seed=5, classes="circle", guidance=2.0)
    job = sample(client, **params)
    png = client.get("/api/job/result", params={"id": job["id"], "download": 1})
    assert png.headers["content-disposition"].startswith("attachment")
    meta = read_png_params(io.BytesIO(png.content))
    assert meta["method"] == "sample" and meta["run"] == str((runs / "shapes").resolve())
    assert meta["weights"] == RunFolder(runs / "shapes").weights_hash()
    assert meta["options"] == {"negative_prompt": None, "prompts": None, "direction": None,
                               **params}  # fmt: skip
    image = client.get("/api/job/image", params={"id": job["id"], "i": 1}).content
    assert read_png_params(io.BytesIO(image)) == meta


def test_progress_has_a_decoded_x0_preview(client):
    job = sample(client, n=2, steps=5)
    assert (job["step"], job["total"]) == (5, 5) and job["has_preview"]
    preview = client.get("/api/job/preview", params={"id": job["id"]})
    assert preview.headers["content-type"] == "image/png"
    assert pixels(preview.content).shape[0] >= 16


# ------------------------------------------------------------------------------ bad requests
@pytest.mark.parametrize(
    "field, value, message",
    [("n", 0, "--n must be a whole number from 1 to 64, got 0"),
     ("n", 65, "--n must be a whole number from 1 to 64, got 65"),
     ("steps", "20", "--steps must be a whole number"),
     ("seed", -1, "--seed must be a whole number from 0"),
     ("guidance", float("inf"), "not JSON"),
     ("sampler", "plms", "unknown sampler 'plms'"),
     ("prompts", "a star", "prompts must be a list of strings"),
     ("colour", 1, "unknown field 'colour'")],
)  # fmt: skip
def test_bad_sample_requests_get_400_with_the_clis_message(client, field, value, message):
    if value == float("inf"):  # not JSON at all: Python writes Infinity
        r = client.post("/api/sample", content=b'{"run": "shapes", "guidance": Infinity',
                        headers={"content-type": "application/json"})  # fmt: skip
    else:
        r = client.post("/api/sample", json={"run": "shapes", field: value})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"], r.json()
    assert "\n" not in r.json()["error"]


def test_a_condition_the_model_cannot_follow_is_400_before_any_job(client, runs):
    r = client.post("/api/sample", json={"run": "shapes", "prompts": ["a red star"]})
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("--prompt: the model in shapes has no text"), r.json()
    # a text-conditional run (read from its files, nothing loaded) asked without a prompt
    shutil.copytree(runs / "shapes", runs / "texty")
    RunFolder(runs / "texty").tokenizer_path.write_text("{}")
    r = client.post("/api/sample", json={"run": "texty", "n": 2})
    assert r.status_code == 400, r.text
    assert "follows text prompts: give --prompt" in r.json()["error"], r.json()
    r = client.post("/api/sample", json={"run": "texty", "classes": "star"})
    assert r.status_code == 400 and "not classes" in r.json()["error"], r.json()


@pytest.mark.parametrize("name", ["../runs", "/etc", "shapes/../../x", "", "shapes/..", "C:/x"])
def test_a_run_outside_runs_is_refused(client, name):
    for r in (client.get("/api/run", params={"run": name}),
              client.post("/api/sample", json={"run": name})):  # fmt: skip
        assert r.status_code == 400, r.text
        assert "run" in r.json()["error"]


def test_a_symbolic_link_out_of_runs_is_refused(runs, tmp_path):
    from starlette.testclient import TestClient

    outside = tmp_path / "elsewhere"
    shutil.copytree(runs / "shapes", outside / "alias")  # a run outside --runs
    os.symlink(outside, runs / "link")  # reached through a link inside
    with TestClient(web.create_app(runs)) as client:
        r = client.get("/api/run", params={"run": "link/alias"})
        assert r.status_code == 403 and "outside --runs" in r.json()["error"]
        assert [x["name"] for x in client.get("/api/runs").json()["runs"]] == ["shapes"]


def test_an_unknown_run_is_404(client):
    r = client.get("/api/run", params={"run": "nope"})
    assert r.status_code == 404 and "no run 'nope'" in r.json()["error"]


def test_an_oversize_upload_is_refused_before_it_is_read(client):
    big = b"x" * (web.MAX_BODY_BYTES + 1)
    r = client.post("/api/sample", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert "over the limit of 8 MiB" in r.json()["error"]
    ok = client.post(
        "/api/sample", content=b"x" * 100, headers={"content-type": "application/json"}
    )
    assert ok.status_code == 400  # read, and refused as not JSON


def test_a_request_without_a_size_is_refused(client):
    def chunks():
        yield b'{"run": "shapes"}'

    r = client.post("/api/sample", content=chunks())
    assert r.status_code == 411, r.text


def test_other_hosts_and_other_sites_pages_are_refused(runs):
    from starlette.testclient import TestClient

    with TestClient(web.create_app(runs, hosts=web.LOOPBACK), base_url="http://127.0.0.1") as c:
        assert c.get("/api/runs").status_code == 200
        r = c.get("/api/runs", headers={"host": "evil.example:7860"})  # DNS rebinding
        assert r.status_code == 400 and "is not this server" in r.json()["error"]
        r = c.post("/api/sample", json={"run": "shapes"}, headers={"origin": "http://evil.example"})
        assert r.status_code == 403, r.text
        r = c.post("/api/sample", json={"run": "shapes", "n": 0},
                   headers={"origin": "http://127.0.0.1"})  # fmt: skip
        assert r.status_code == 400  # this server's own page: on to the checks


# ------------------------------------------------------------------------------ offline, headers
def test_every_response_carries_the_content_security_policy(client):
    for path in ["/", "/static/app.js", "/static/style.css", "/api/runs", "/api/nope",
                 "/api/run?run=nope", "/static/nope.js"]:  # fmt: skip
        r = client.get(path)
        assert r.headers["content-security-policy"] == "default-src 'self'", path
        assert r.headers["x-content-type-options"] == "nosniff", path
    assert client.get("/api/nope").json() == {"error": "Not Found"}


def test_no_served_asset_names_another_site(client):
    static = Path(web.__file__).parent / "static"
    names = sorted(p.name for p in static.iterdir())
    assert {"index.html", "app.js", "style.css"} <= set(names)
    for name in names:
        body = client.get("/static/" + name).text
        assert "http://" not in body and "https://" not in body, name
    page = client.get("/").text
    assert "http://" not in page and "https://" not in page
    assert "<script>" not in page and "style=" not in page  # CSP: no inline script or style


def test_the_server_works_with_every_outbound_connection_blocked(runs, monkeypatch):
    import urllib.request

    tried: list[object] = []
    real_connect = socket.socket.connect

    def loopback_only(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost"):
            tried.append(address)
            raise OSError("network is unreachable (test: outbound connections blocked)")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    with live_server(runs) as url:
        page = urllib.request.urlopen(url + "/").read().decode()
        assert "app.js" in page
        for asset in ("/static/app.js", "/static/style.css", "/api/runs"):
            assert urllib.request.urlopen(url + asset).status == 200
        request = urllib.request.Request(
            url + "/api/sample", data=b'{"run": "shapes", "n": 2, "steps": 2}',
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        assert urllib.request.urlopen(request).status == 202
    assert tried == []


# ------------------------------------------------------------------------------ jobs
def test_jobs_of_a_run_run_one_at_a_time_in_order_and_cancel():
    jobs, started, release, order = Jobs(), threading.Event(), threading.Event(), []

    def blocking(job):
        order.append(job.id)
        started.set()
        while not release.wait(0.01):
            job.report(1, 2)  # raises Cancelled once cancelled
        return Result(b"png")

    first = jobs.submit("run", "sample", {}, blocking)
    assert started.wait(10)
    second = jobs.submit("run", "sample", {}, lambda job: Result(b"second"))
    third = jobs.submit("run", "sample", {}, lambda job: Result(b"third"))
    assert (first.state, second.state, jobs.position(second), jobs.position(third)) == (
        "running", "queued", 0, 1)  # fmt: skip
    jobs.cancel(second)  # waiting: never starts
    assert second.state == "cancelled" and jobs.position(third) == 0
    jobs.cancel(first)  # running: stops at its next step
    for _ in range(500):
        if third.state == "done":
            break
        time.sleep(0.01)
    assert (first.state, second.state, third.state) == ("cancelled", "cancelled", "done")
    assert order == [first.id] and third.result.png == b"third"
    jobs.close()


def test_a_full_queue_is_429_and_a_running_job_can_be_cancelled(client, monkeypatch):
    from ldmkit.web import jobs as jobs_module

    monkeypatch.setattr(jobs_module, "MAX_WAITING", 1)
    gate = threading.Event()
    real = web.Site._sample

    def slow(self, folder, job):
        while not gate.wait(0.01):
            job.report(0, 1)
        return real(self, folder, job)

    monkeypatch.setattr(web.Site, "_sample", slow)
    running = client.post("/api/sample", json={"run": "shapes", "n": 1, "steps": 2}).json()["job"]
    for _ in range(500):
        if client.get("/api/job", params={"id": running["id"]}).json()["state"] == "running":
            break
        time.sleep(0.01)
    waiting = client.post("/api/sample", json={"run": "shapes", "n": 1, "steps": 2})
    assert waiting.status_code == 202 and waiting.json()["job"]["position"] == 0
    full = client.post("/api/sample", json={"run": "shapes", "n": 1, "steps": 2})
    assert full.status_code == 429 and "already waiting" in full.json()["error"]
    r = client.post("/api/job/cancel", json={"id": running["id"]})
    assert r.status_code == 200
    assert wait_for(client, running["id"])["state"] == "cancelled"
    gate.set()
    assert wait_for(client, waiting.json()["job"]["id"])["state"] == "done"
    r = client.get("/api/job/result", params={"id": running["id"]})
    assert r.status_code == 409 and "cancelled" in r.json()["error"]


def test_cancelled_is_raised_by_report_only_after_a_cancel():
    jobs = Jobs()
    job = jobs.submit("r", "k", {}, lambda job: Result(b""))
    job.report(1, 2)
    job.cancel.set()
    with pytest.raises(Cancelled):
        job.report(2, 2)
    jobs.close()


# ------------------------------------------------------------------------------ run, training
def test_run_info_log_and_images(client):
    info = client.get("/api/run", params={"run": "shapes"}).json()
    assert info["trained"] and not info["training"] and info["conditioning"] == "class"
    assert info["class_names"] == ["circle", "square", "triangle", "star", "cross"]
    assert info["images"]["preview"] == "step-00000004" and info["images"]["loss"]
    stages = client.get("/api/run/log", params={"run": "shapes"}).json()["stages"]
    assert [row[0] for row in stages["diffusion"]] == [1, 2, 3, 4]
    for which in ("samples", "loss", "reconstructions", "preview"):
        r = client.get("/api/run/image", params={"run": "shapes", "which": which})
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n", which
    r = client.get("/api/run/image", params={"run": "shapes", "which": "../run.json"})
    assert r.status_code == 400 and "use one of samples" in r.json()["error"]


def test_stop_asks_a_running_training_to_stop_with_a_checkpoint(client, runs):
    import torch

    from ldmkit.training.state import list_checkpoints

    r = client.post("/api/run/stop", json={"run": "shapes"})
    assert r.status_code == 409 and "no training is running" in r.json()["error"]

    steps, result = [], {}

    def train():
        torch.set_num_threads(1)
        result["run"] = api.train(runs / "live", data="builtin:shapes?n=64",
                                  sets=tiny_settings(100_000), progress=steps.append)  # fmt: skip

    thread = threading.Thread(target=train)
    thread.start()
    try:
        for _ in range(3000):  # the data loads, then steps are taken
            if len(steps) > 2 or not thread.is_alive():
                break
            time.sleep(0.01)
        info = client.get("/api/run", params={"run": "live"}).json()
        assert info["training"] and not info["stop_requested"]
        assert client.post("/api/run/stop", json={"run": "live"}).json() == {"stop_requested": True}
        assert client.get("/api/run", params={"run": "live"}).json()["stop_requested"]
    finally:
        thread.join(60)
        if thread.is_alive():  # a failed assertion must not leave it training
            RunFolder(runs / "live").request_stop()
            thread.join(60)
    assert result["run"].stopped_because == "stop request"
    assert list_checkpoints(RunFolder(runs / "live").checkpoints_dir)  # saved on the way out
    assert not RunFolder(runs / "live").stop_requested()  # answered: the request is gone
    assert not client.get("/api/run", params={"run": "live"}).json()["training"]


def test_a_stale_stop_request_does_not_stop_the_next_training(tmp_path):
    import torch

    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    folder.request_stop()  # left by a training killed before it could answer it
    torch.set_num_threads(1)
    res = api.train(folder.path, data="builtin:shapes?n=64", sets=tiny_settings(2))
    assert res.stopped_because == "finished" and res.unet_steps == 2


# ------------------------------------------------------------------------------ command line
def test_serve_refuses_a_run_folder_as_runs_and_warns_for_other_hosts(runs, capsys, monkeypatch):
    from ldmkit import cli

    assert cli.main(["serve", "--runs", str(runs / "shapes")]) == 2
    assert "is a run folder; give the folder that holds it" in capsys.readouterr().err
    assert cli.main(["serve", "--runs", str(runs / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err

    served = []
    monkeypatch.setattr(web, "serve", lambda app, sock: served.append(sock.getsockname()))
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["serve", "--runs", str(runs), "--host", "0.0.0.0", "--port", str(port)]) == 0
    out, err = capsys.readouterr()
    assert "warning: --host 0.0.0.0 lets other machines" in err
    assert f"http://0.0.0.0:{port}/" in out and served[0][1] == port
    assert cli.main(["serve", "--runs", str(runs), "--port", str(port)]) == 0
    assert "warning" not in capsys.readouterr().err and served[1][0] == "127.0.0.1"


def test_a_port_in_use_is_one_line(runs, capsys):
    from ldmkit import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        rc = cli.main(["serve", "--runs", str(runs), "--port", str(s.getsockname()[1])])
    assert rc == 2
    assert "ldmkit: error: cannot listen on 127.0.0.1:" in capsys.readouterr().err
