"""Experiment trackers (training/trackers.py): the config, the errors, and W&B and MLflow with
their real packages, offline, read back with their own readers after a tiny training."""

import importlib.util
import json
import socket
import struct
import types
from pathlib import Path

import pytest
from test_run import TINY

from ldmkit.cli import main
from ldmkit.config import ConfigError
from ldmkit.recipe import LogConfig, run_config_from_dict
from ldmkit.runs import RunFolder
from ldmkit.training import trackers
from ldmkit.training.run import _run_log, train_run

HAVE_WANDB = importlib.util.find_spec("wandb") is not None
HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_wandb = pytest.mark.skipif(not HAVE_WANDB, reason="wandb not installed (pip install 'ldmkit[wandb]')")  # fmt: skip
needs_mlflow = pytest.mark.skipif(not HAVE_MLFLOW, reason="mlflow not installed (pip install 'ldmkit[mlflow]')")  # fmt: skip


def block_network(mp: pytest.MonkeyPatch) -> list:
    """Refuse every outbound connection of this process (loopback and local sockets allowed:
    W&B's client talks to its own service process through one); returns the refused ones."""
    tried: list[object] = []
    real_connect = socket.socket.connect

    def loopback_only(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if self.family != socket.AF_UNIX and host not in ("127.0.0.1", "::1", "localhost"):
            tried.append(address)
            raise OSError("network is unreachable (test: outbound connections blocked)")
        return real_connect(self, address)

    real_getaddrinfo = socket.getaddrinfo

    def local_names_only(host, *args, **kwargs):  # a name lookup is a packet on the network too
        if host not in (None, "127.0.0.1", "::1", "localhost"):
            tried.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "test: name lookups blocked")
        return real_getaddrinfo(host, *args, **kwargs)

    mp.setattr(socket.socket, "connect", loopback_only)
    mp.setattr(socket, "getaddrinfo", local_names_only)
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("WANDB_ERROR_REPORTING", raising=False)  # what ldmkit sets, not the test
    return tried


@pytest.fixture
def offline(monkeypatch):
    tried = block_network(monkeypatch)
    yield tried
    assert not tried, f"tried to reach the network: {tried}"


def tiny(log: dict, **over: dict):
    """test_run's tiny config with these log settings (and sections updated by `over`)."""
    d = json.loads(json.dumps(TINY))
    d["log"] = log
    for k, v in over.items():
        d[k].update(v)
    return run_config_from_dict(d)


# ------------------------------------------------------------------ config and errors
def test_the_trackers_are_read_from_text_or_a_list():
    assert LogConfig().trackers == ["tensorboard"]
    assert LogConfig(trackers="wandb, MLflow,wandb").trackers == ["wandb", "mlflow"]
    assert LogConfig(trackers="none").trackers == [] == LogConfig(trackers=[]).trackers
    cfg = run_config_from_dict({**TINY, "log": {"trackers": ["mlflow"]}})
    assert cfg.log.trackers == ["mlflow"]


def test_an_unknown_tracker_is_one_line_naming_the_choices():
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'; choose from tensorboard, wandb, mlflow"):  # fmt: skip
        run_config_from_dict({**TINY, "log": {"trackers": "wandb,neptune"}})


def test_the_cli_refuses_a_bad_tracker_in_one_line(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "r"), "--data", "builtin:shapes?n=64",
                 "--image-size", "16", "--set", "log.trackers=tensorbored"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown tracker 'tensorbored'" in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_package_says_what_to_install_before_anything_is_written(
    tmp_path, monkeypatch, name
):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))  # fmt: skip
    with pytest.raises(ConfigError, match=rf"pip install 'ldmkit\[{name}\]'"):
        train_run(tiny({"trackers": f"tensorboard,{name}"}), tmp_path / "r")
    assert not RunFolder(tmp_path / "r").exists()  # no run.json: the same command works later


def test_only_rank_0_opens_trackers(tmp_path):
    folder = RunFolder(tmp_path / "r")
    cfg = tiny({"trackers": "wandb,mlflow"})
    run_log = _run_log(folder, cfg, False, types.SimpleNamespace(is_main=False))
    assert run_log.trackers == [] and not folder.trackers_dir.exists()


def test_a_failing_tracker_is_dropped_and_the_others_go_on(tmp_path, caplog):
    from ldmkit.training.loop import RunLog

    class Broken(trackers.Tracker):
        name = "broken"

        def scalars(self, stage, step, values):
            raise RuntimeError("disk full")

    class Keeper(trackers.Tracker):
        name = "keeper"
        seen: list = []

        def scalars(self, stage, step, values):
            self.seen.append((stage, step, values))

    keeper = Keeper()
    run_log = RunLog(RunFolder(tmp_path), trackers=[Broken(), keeper])
    for step in (1, 2):
        run_log.write({"stage": "diffusion", "step": step, "loss": 0.5, "skipped": False})
    assert [t.name for t in run_log.trackers] == ["keeper"]
    assert keeper.seen == [("diffusion", 1, {"loss": 0.5}), ("diffusion", 2, {"loss": 0.5})]
    assert sum("broken failed (RuntimeError: disk full)" in r.message for r in caplog.records) == 1


# a whole process, to its exit: W&B's telemetry would export at exit, after any test ends
WHOLE_PROCESS = """
import atexit, json, socket, sys
tried = []
atexit.register(lambda: open(sys.argv[2], "w").write(json.dumps(tried)))  # runs last
real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
def connect(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if self.family != socket.AF_UNIX and host not in ("127.0.0.1", "::1", "localhost"):
        tried.append(str(address))
        raise OSError("test: outbound connections blocked")
    return real_connect(self, address)
def getaddrinfo(host, *args, **kwargs):
    if host not in (None, "127.0.0.1", "::1", "localhost"):
        tried.append(str(host))
        raise socket.gaierror(socket.EAI_NONAME, "test: name lookups blocked")
    return real_getaddrinfo(host, *args, **kwargs)
socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo

from ldmkit.recipe import run_config_from_dict
from ldmkit.runs import RunFolder
from ldmkit.training.loop import RunLog
from ldmkit.training.trackers import open_trackers

cfg = run_config_from_dict({"log": {"trackers": sys.argv[3]}})
folder = RunFolder(sys.argv[1])
run_log = RunLog(folder, trackers=open_trackers(cfg, folder, resume=False))
run_log.write({"stage": "diffusion", "step": 1, "loss": 0.5})
run_log.close("finished")
"""


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_tracked_process_reaches_no_network_up_to_its_exit(tmp_path, name):
    """Offline W&B would still look up its server for its own telemetry when the process
    exits (found with strace); ldmkit turns that off. Checked in a process of its own."""
    import os
    import subprocess
    import sys

    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} not installed (pip install 'ldmkit[{name}]')")
    env = {k: v for k, v in os.environ.items() if k != "WANDB_ERROR_REPORTING"}
    env["WANDB_SILENT"] = "true"
    out = tmp_path / "tried.json"
    subprocess.run([sys.executable, "-c", WHOLE_PROCESS, str(tmp_path / "r"), str(out), name],
                   check=True, env=env, timeout=120)  # fmt: skip
    assert json.loads(out.read_text()) == []
    assert RunFolder(tmp_path / "r").tracker_ids()[name]


# ------------------------------------------------------------------ W&B's offline files
def wandb_records(path: Path):
    """The records of a W&B transaction log (run-ID.wandb): LevelDB's log format (32 KiB
    blocks of chunks with a 7-byte header: CRC, length, type) after a 7-byte W&B header,
    each record a `wandb_internal_pb2.Record` (W&B's own protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, block = 7, [], 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def wandb_run(folder: Path) -> dict:
    """One offline run folder, read back: its id, config, history rows and summary."""
    (log_file,) = folder.glob("run-*.wandb")
    out = {"history": [], "summary": {}, "config": {}, "id": None}
    for r in wandb_records(log_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["id"] = r.run.run_id
            out["config"].update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            out["config"].update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            out["history"].append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            )
        elif kind == "summary":
            for u in r.summary.update:
                out["summary"][u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
    return out


def series(rows: list[dict], key: str, step_key: str) -> list[tuple[int, float]]:
    return [(r[step_key], r[key]) for r in rows if key in r]


def jsonl_series(run: Path, stage: str) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["stage"] == stage and "loss" in r]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A tiny training with all three trackers (offline), then resumed for 2 more UNet steps."""
    if not (HAVE_WANDB and HAVE_MLFLOW):
        pytest.skip("needs wandb and mlflow (pip install 'ldmkit[wandb,mlflow]')")
    out = tmp_path_factory.mktemp("tracked") / "r"
    mp = pytest.MonkeyPatch()
    tried = block_network(mp)
    try:
        cfg = tiny({"trackers": "tensorboard,wandb,mlflow", "run_name": "tiny"})
        first = train_run(cfg, out)
        ids = RunFolder(out).tracker_ids()
        more = tiny({"trackers": "wandb,mlflow"}, unet_train={"steps": 8})
        second = train_run(more, out, resume=True)
    finally:
        mp.undo()
    assert not tried, f"tried to reach the network: {tried}"
    assert first.unet_steps == 6 and second.unet_steps == 8
    return out, ids


def test_wandb_offline_holds_the_history_config_images_and_summary(tracked_run):
    run, ids = tracked_run
    folders = sorted(RunFolder(run).wandb_dir.glob("offline-run-*"))
    assert len(folders) == 2  # the first training and its resumption
    first, resumed = (wandb_run(f) for f in folders)
    # the same tracked run, continued
    assert first["id"] == resumed["id"] == ids["wandb"]["id"] == RunFolder(run).tracker_ids()["wandb"]["id"]  # fmt: skip
    # every loss of log.jsonl, at its stage's step
    assert series(first["history"], "autoencoder/loss", "autoencoder/step") == jsonl_series(run, "autoencoder")  # fmt: skip
    diffusion = jsonl_series(run, "diffusion")
    assert [s for s, _ in diffusion] == [2, 4, 6, 8]  # the resumed stage went on from 6
    logged = series(first["history"] + resumed["history"], "diffusion/loss", "diffusion/step")
    assert logged == [(s, pytest.approx(v)) for s, v in diffusion]
    # W&B's own step keeps growing across the resumption
    steps = [r["_step"] for r in first["history"] + resumed["history"] if "_step" in r]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    # the config, images and the summary
    assert first["config"]["seed"] == 0 and first["config"]["image_size"] == 16
    assert first["config"]["log"]["trackers"] == ["tensorboard", "wandb", "mlflow"]
    images = {k.rsplit("/", 1)[0] for r in first["history"] for k in r if k.endswith("/_type") and r[k] == "image-file"}  # fmt: skip
    assert {"diffusion/samples", "autoencoder/reconstructions", "diffusion/final", "final/samples", "final/loss"} <= images  # fmt: skip
    for f in folders[0].glob("files/media/images/**/*.png"):
        assert f.stat().st_size > 0
    assert resumed["summary"]["unet_steps"] == 8 and first["summary"]["unet_steps"] == 6
    assert first["summary"]["vae_steps"] == 4 and "autoencoder.final.psnr" in first["summary"]


def test_mlflow_store_holds_metrics_params_and_artifacts(tracked_run):
    from mlflow.tracking import MlflowClient

    run, ids = tracked_run
    store = RunFolder(run).mlflow_store
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    (exp,) = [e for e in client.search_experiments() if e.name == "ldmkit"]
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.run_id == ids["mlflow"]["run_id"]  # one run: the resumption continued it
    assert found.info.run_name == "tiny" and found.info.status == "FINISHED"
    history = client.get_metric_history(found.info.run_id, "autoencoder/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, pytest.approx(v)) for s, v in jsonl_series(run, "autoencoder")]  # fmt: skip
    steps = sorted(m.step for m in client.get_metric_history(found.info.run_id, "diffusion/loss"))
    assert steps == [2, 4, 6, 8]
    assert found.data.params["seed"] == "0" and found.data.params["unet_train.steps"] == "6"
    assert found.data.metrics["final/unet_steps"] == 8  # the summary of the resumed end
    names = {a.path for a in client.list_artifacts(found.info.run_id)}
    assert {"run.json", "summary.json", "final", "diffusion", "autoencoder"} <= names
    final = {a.path for a in client.list_artifacts(found.info.run_id, "final")}
    assert {"final/samples.png", "final/loss.png", "final/reconstructions.png"} <= final
    grids = {a.path for a in client.list_artifacts(found.info.run_id, "diffusion/samples")}
    assert {"diffusion/samples/step-00000003.png", "diffusion/samples/step-00000006.png"} <= grids
    saved = json.loads(Path(client.download_artifacts(found.info.run_id, "run.json", str(run.parent))).read_text())  # fmt: skip
    assert saved["unet_train"]["steps"] == 8  # run.json as the resumed run trained it


def test_tensorboard_stays_where_it_was(tracked_run):
    run, _ = tracked_run
    assert list((run / "tb").glob("events.out.tfevents.*"))


@needs_wandb
@needs_mlflow
def test_the_guidance_table_reaches_both_trackers(tmp_path, offline):
    from mlflow.tracking import MlflowClient

    from ldmkit.training.loop import RunLog

    folder = RunFolder(tmp_path / "r")
    cfg = tiny({"trackers": "wandb,mlflow"})
    run_log = RunLog(folder, trackers=trackers.open_trackers(cfg, folder, resume=False))
    rows = [[1.0, 30.5, 0.5, 2.0, False], [3.0, 20.25, 0.75, 2.0, True]]
    run_log.add_table("guidance", ["guidance", "FID-shapes-cnn", "accuracy", "seconds", "chosen"], rows)  # fmt: skip
    run_log.close("finished")
    (wb,) = folder.wandb_dir.glob("offline-run-*")
    (table_file,) = wb.glob("files/media/table/guidance_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][1] == "FID-shapes-cnn" and table["data"] == rows
    client = MlflowClient(tracking_uri=folder.mlflow_store.resolve().as_uri())
    run_id = folder.tracker_ids()["mlflow"]["run_id"]
    path = client.download_artifacts(run_id, "guidance.json", str(tmp_path))
    assert json.loads(Path(path).read_text())["rows"] == rows
