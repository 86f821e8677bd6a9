"""The page's New run form (web/trainer.py): its fields are `ldmkit train`'s declared options,
a request is checked as the CLI checks its flags (the same messages), its data stays under
--data-root, the plan comes before the start, one training runs at a time, and the run folder
is the one `ldmkit train` writes. Through Starlette's TestClient; tiny trainings of 4 steps."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import tiny_config

pytest.importorskip(
    "starlette", reason="ldmkit serve needs the serve extra: pip install -e '.[serve]'"
)

from ldmkit import api, cli, options  # noqa: E402
from ldmkit.runs import RunFolder  # noqa: E402

DATA = "builtin:shapes?n=64"


@pytest.fixture
def server(runs, tmp_path):
    """(client, runs, data root) of a server that trains tiny runs (--train-config)."""
    import torch
    from starlette.testclient import TestClient

    from ldmkit.web.app import create_app

    (tmp_path / "data" / "pets").mkdir(parents=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app = create_app(runs, data_root=tmp_path / "data",
                     train_config=tiny_config(tmp_path / "tiny.json"))  # fmt: skip
    try:
        with TestClient(app) as c:
            yield c, runs, tmp_path / "data"
    finally:
        torch.set_num_threads(threads)


def wait_training(client, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        training = client.get("/api/train").json()["training"]
        if training["state"] not in ("starting", "running"):
            return training
        time.sleep(0.05)
    raise AssertionError(f"the training did not end in {timeout} s: {training}")


def test_the_form_is_the_train_verbs_declared_options(server):
    client, _, root = server
    form = client.get("/api/train").json()
    names = [f["name"] for f in form["fields"]]
    assert names == [f.web_name for f in options.TrainOptions.fields()]
    assert names == ["data", "time_budget", "seed", "image_size", "conditioning"]
    # ... and the same declarations are `ldmkit train`'s flags
    sub = cli.make_parser()._subparsers._group_actions[0].choices["train"]
    flags = {a.option_strings[0]: a for a in sub._actions}
    for f in options.TrainOptions.fields():
        assert f.flag in flags and flags[f.flag].help.startswith(f.spec.help), f.flag
    conditioning = next(f for f in form["fields"] if f["name"] == "conditioning")
    assert conditioning["options"] == ["auto", "none", "class", "text"]
    assert form["data_root"] == str(root.resolve()) and form["training"] is None


def test_the_plan_comes_before_anything_is_written(server):
    client, runs, _ = server
    r = client.post("/api/train/plan", json={"run": "new", "data": DATA, "seed": 3})
    assert r.status_code == 200, r.text
    lines = r.json()["lines"]
    assert lines[0] == "data: shapes, 64 images"
    assert lines[1].startswith("16 px, 3 channels")  # the config's image size
    assert any(line.startswith("autoencoder f2 -> 4x8x8 latents") for line in lines)
    assert "conditioning: class-conditional on 5 classes" in "\n".join(lines)
    assert lines[-1].startswith("time: no --time-budget: this training will take about")
    r = client.post("/api/train/plan", json={"run": "new", "data": DATA, "time_budget": "5m"})
    last = r.json()["lines"][-1]
    assert re.match(r"time: --time-budget 5m: ~\d+ autoencoder steps, ~\d+ diffusion steps at "
                    r"these speeds \(autoencoder ~[\d.]+ s/step, diffusion ~[\d.]+ s/step", last)  # fmt: skip
    r = client.post("/api/train/plan", json={"run": "new", "data": DATA, "time_budget": "2s"})
    assert r.json()["lines"][-1].startswith("warning: --time-budget 2s is too short for this run")
    assert not (runs / "new").exists()


# a bad value of each field: the page's 400 is `ldmkit train`'s error line
BAD = [("image_size", 3, "--image-size", "3"), ("seed", -1, "--seed", "-1"),
       ("time_budget", "0", "--time-budget", "0"), ("time_budget", "soon", "--time-budget", "soon"),
       ("conditioning", "colour", "--conditioning", "colour")]  # fmt: skip


@pytest.mark.parametrize("field, value, flag, typed", BAD)
def test_a_bad_value_is_400_with_the_clis_message(server, capsys, field, value, flag, typed):
    client, runs, _ = server
    r = client.post("/api/train/plan", json={"run": "new", "data": DATA, field: value})
    assert r.status_code == 400
    rc = cli.main(["train", "--out", str(runs / "cli"), "--data", DATA, flag, typed])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err == "ldmkit: error: " + r.json()["error"]
    if field != "conditioning":  # argparse's own choices message for the CLI
        assert flag in err


def test_data_outside_the_data_root_is_refused(server, tmp_path):
    client, _, root = server
    for data in ("../elsewhere", str(tmp_path), "/etc", "mnist:../x"):
        r = client.post("/api/train/plan", json={"run": "new", "data": data})
        assert r.status_code == 400, data
        assert (
            "is outside --data-root" in r.json()["error"]
            and str(root.resolve()) in r.json()["error"]
        )
    r = client.post("/api/train/plan", json={"run": "new", "data": "pets"})  # inside: read
    assert r.status_code == 400 and r.json()["error"].startswith("data folder ")  # the reader's
    assert "is outside --data-root" not in r.json()["error"]  # (an empty folder)
    for i in range(8):
        Image.new("RGB", (16, 16), (30 * i, 200, 9)).save(root / "pets" / f"{i}.png")
    for data in ("pets", str(root / "pets")):
        r = client.post("/api/train/plan", json={"run": "new", "data": data})
        assert r.status_code == 200, r.text
        assert r.json()["lines"][0] == "data: pets, 8 images"


def test_without_a_data_root_only_built_in_data(runs, tmp_path):
    from starlette.testclient import TestClient

    from ldmkit.web.app import create_app

    with TestClient(create_app(runs)) as client:
        r = client.post("/api/train/plan", json={"run": "new", "data": str(tmp_path)})
        assert r.status_code == 400
        assert r.json()["error"].endswith("reads no data folders; start it with `ldmkit serve "
                                          "--data-root DIR` to train on the folders in DIR, or use "
                                          "builtin:shapes")  # fmt: skip
        assert client.get("/api/train").json()["data_root"] is None


def test_a_run_name_that_exists_or_leaves_runs_is_refused(server):
    client, runs, _ = server
    r = client.post("/api/train/plan", json={"run": "shapes", "data": DATA})
    assert r.status_code == 400
    assert r.json()["error"] == (f"{runs.resolve() / 'shapes'} already holds a run; pass --resume "
                                 "to continue it, or choose another --out folder")  # fmt: skip
    assert client.post("/api/train", json={"run": "shapes", "data": DATA}).status_code == 400
    for name in ("../out", "/tmp/x", "a/../../b"):
        assert client.post("/api/train", json={"run": name, "data": DATA}).status_code == 400
    r = client.post("/api/train", json={"run": "new", "datta": DATA})
    assert r.status_code == 400 and r.json()["error"].startswith("unknown field 'datta'")


def test_a_started_run_is_the_folder_the_cli_writes(server, runs_template):
    client, runs, _ = server
    r = client.post("/api/train", json={"run": "web", "data": DATA})
    assert r.status_code == 202, r.text
    assert r.json()["training"]["run"] == "web" and RunFolder(runs / "web").exists()
    training = wait_training(client)
    assert training == {"run": "web", "state": "finished", "error": None,
                        "stopped_because": "finished"}  # fmt: skip
    # the template run: api.train (= `ldmkit train`) with the same settings and data
    cli_run, web_run = RunFolder(runs_template / "shapes"), RunFolder(runs / "web")
    assert web_run.config_dict() == cli_run.config_dict()
    assert web_run.has_model("vae") and web_run.has_model("unet")

    def files(folder: Path) -> set[str]:
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
                if "tb" not in p.relative_to(folder).parts}  # fmt: skip

    assert files(web_run.path) == files(cli_run.path)
    names = [run["name"] for run in client.get("/api/runs").json()["runs"]]
    assert "web" in names


def test_one_training_at_a_time(runs, tmp_path):
    """A second training while one runs is 409 and writes nothing; the page's stop ends the
    first (with a checkpoint), and then a new one may start."""
    import torch
    from starlette.testclient import TestClient

    from ldmkit.web.app import create_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    long = tiny_config(tmp_path / "long.json", steps=100_000)
    try:
        with TestClient(create_app(runs, train_config=long)) as client:
            r = client.post("/api/train", json={"run": "first", "data": DATA})
            assert r.status_code == 202, r.text
            second = client.post("/api/train", json={"run": "second", "data": DATA})
            assert second.status_code == 409
            assert second.json()["error"] == (
                "a training is running already (first); this server runs one at a time: wait "
                "for it to end, or stop it in its Training tab"
            )
            assert not (runs / "second").exists()
            assert client.post("/api/run/stop", json={"run": "first"}).status_code == 200
            assert wait_training(client)["stopped_because"] == "stop request"
            assert client.post("/api/train", json={"run": "third", "data": DATA}).status_code == 202
            assert client.post("/api/run/stop", json={"run": "third"}).status_code == 200
            assert wait_training(client)["state"] == "finished"
    finally:
        torch.set_num_threads(threads)


def test_serve_refuses_a_data_root_or_train_config_it_cannot_use(runs, tmp_path, capsys):
    for flag, value, message in [
        ("--data-root", tmp_path / "none", "is not a folder; give the folder that holds the data "
         "folders the page may train on"),
        ("--train-config", tmp_path / "none.toml", "is not a file; give a TOML or JSON file of "
         "RunConfig fields (as ldmkit train --config reads)"),
    ]:  # fmt: skip
        rc = cli.main(["serve", "--runs", str(runs), flag, str(value), "--port", "1"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err == f"ldmkit: error: {flag} {value} {message}"


def test_the_readmes_serve_command_with_a_data_root_starts_a_site(tmp_path, monkeypatch):
    """The README's web section shows `ldmkit serve ... --data-root ... --train-config ...`:
    its flags parse, and the site it makes trains on that folder."""
    import re
    import shlex

    from ldmkit.web.app import Site

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    line = re.search(
        r"^ldmkit serve --runs runs --data-root \S+ --train-config .*$", readme, re.M
    ).group(0)
    argv = shlex.split(line.split("#")[0])[1:]
    args = cli.make_parser().parse_args(argv)
    monkeypatch.chdir(tmp_path)
    for folder in ("runs", args.data_root):
        Path(folder).mkdir(parents=True, exist_ok=True)
    Path(args.train_config).write_text("[unet_train]\nsteps = 100\n")
    site = Site(args.runs, data_root=args.data_root, train_config=args.train_config)
    assert site.data_root == (tmp_path / args.data_root).resolve()
    assert api.check_data_root("pets", site.data_root) == str(site.data_root / "pets")
