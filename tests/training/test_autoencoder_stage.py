"""The autoencoder stage as a run sees it: measured while it trains, recorded in training.json,
and never silent about a failure (the run, `ldmkit sample` and the web page say so)."""

import json
import logging

import pytest
import torch
from test_run import tiny

from ldmkit.cli import main
from ldmkit.runs import RunFolder
from ldmkit.training.run import train_run


@pytest.fixture(scope="module")
def crippled(tmp_path_factory):
    """A run whose autoencoder cannot learn (LR 1e-9): its reconstructions stay noise."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("crippled") / "r"
    logs = []
    handler = logging.Handler()
    handler.emit = lambda record: logs.append(record)
    logger = logging.getLogger("ldmkit")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        train_run(tiny(vae_train={"lr": 1e-9, "steps": 30}, unet_train={"sample_every": 0},
                       choose_guidance=False), out)  # fmt: skip
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, logs


def test_a_crippled_autoencoder_is_reported_loudly(crippled):
    out, logs = crippled
    warnings = [r.getMessage() for r in logs if r.levelno == logging.WARNING]
    loud = [w for w in warnings if "THE AUTOENCODER IS NOT USABLE" in w]
    assert len(loud) == 1, warnings
    assert "PSNR" in loud[0] and "--resume" in loud[0] and "vae_train.steps=" in loud[0]
    record = json.loads((out / "training.json").read_text())["autoencoder"]
    assert record["steps"] == 30 and record["stopped_because"] == "finished"
    assert record["final"]["psnr"] < 16 and record["problems"]
    # 96 images teach the run's classifier too little for readability to mean anything
    assert "readability" not in record["final"]
    assert any("readability not measured" in r.getMessage() for r in logs)
    assert record["measured_on"] == "96 training images"  # too few images to hold any out
    # measured while it trained: steps 1 and 26 (25 apart at least)
    assert [r["step"] for r in record["history"]] == [1, 26]
    assert RunFolder(out).warnings() == [f"autoencoder: {p}" for p in record["problems"]]
    quality_rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in quality_rows if r.get("kind") == "quality"] == [1, 26]
    # the UNet stage ran its configured steps: nothing to report there
    assert json.loads((out / "training.json").read_text())["diffusion"]["problems"] == []


def test_sample_on_a_crippled_run_warns(crippled, tmp_path, caplog):
    out, _ = crippled
    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        code = main(["sample", "--run", str(out), "--n", "2", "--steps", "2",
                     "--out", str(tmp_path / "g.png")])  # fmt: skip
    assert code == 0
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("autoencoder: reconstruction PSNR" in m and str(out) in m for m in said), said


def test_the_web_page_shows_the_problems(crippled):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from ldmkit.web import app as web

    out, _ = crippled
    with TestClient(web.create_app(out.parent)) as client:
        info = client.get("/api/run", params={"run": out.name}).json()
    assert info["warnings"] == RunFolder(out).warnings() and info["warnings"]


def test_a_healthy_record_gives_no_warning(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.warnings() == []  # no training.json (a run trained before it): nothing
    folder.write_stage_report("autoencoder", {"problems": []})
    folder.write_stage_report("diffusion", {"problems": ["the UNet got 10 steps"]})
    assert folder.warnings() == ["diffusion: the UNet got 10 steps"]
    (tmp_path / "training.json").write_text("{not json")
    assert folder.warnings() == []  # unreadable: no crash at every use of the run


def test_a_cut_short_unet_stage_says_so(tmp_path, caplog):
    """A budgeted UNet stage that got under half the steps its start promised, or under 200,
    is a problem in training.json (and so repeated at every use); a stage without a budget ran
    the steps the user chose and is not."""
    from types import SimpleNamespace

    from ldmkit.recipe import RunConfig
    from ldmkit.training.loop import StageResult
    from ldmkit.training.run import _report_diffusion

    run = SimpleNamespace(folder=RunFolder(tmp_path), cfg=RunConfig())

    def result(steps):
        return StageResult(steps, "time budget", 0.1, 400.0, None, None, planned=steps)

    with caplog.at_level(logging.WARNING, logger="ldmkit"):
        _report_diffusion(run, result(900), budget=400.0, per_step=0.1)  # promised 4000
    assert "where its start promised about 4000" in RunFolder(tmp_path).warnings()[0]
    assert any("busier" in r.getMessage() for r in caplog.records)
    _report_diffusion(run, result(150), budget=400.0, per_step=0.1)
    assert "only 150 UNet steps" in RunFolder(tmp_path).warnings()[0]
    _report_diffusion(run, result(2500), budget=400.0, per_step=0.1)  # over half: fine
    assert RunFolder(tmp_path).warnings() == []
    _report_diffusion(run, result(50), budget=None, per_step=0.1)  # the user's own steps
    assert RunFolder(tmp_path).warnings() == []
    record = RunFolder(tmp_path).stage_report()["diffusion"]
    assert record["steps"] == 50 and record["expected_steps"] == RunConfig().unet_train.steps


def test_a_weak_judge_of_large_data_is_a_warning(caplog):
    """A judge below JUDGE_MIN_ACCURACY reads nothing; on data of JUDGE_TRAIN_ON_MIN_IMAGES or
    more (where it should have learned the classes: a busy machine, hard classes) that is a
    warning, on small data a note."""
    from types import SimpleNamespace

    from ldmkit.training import run as run_module

    weak = SimpleNamespace(held_out_accuracy=run_module.JUDGE_MIN_ACCURACY - 0.3)
    strong = SimpleNamespace(held_out_accuracy=run_module.JUDGE_MIN_ACCURACY + 0.1)
    big, small = run_module.JUDGE_TRAIN_ON_MIN_IMAGES, 96
    with caplog.at_level(logging.INFO, logger="ldmkit.training.run"):
        assert run_module._reader(strong, big) is strong and not caplog.records
        assert run_module._reader(weak, big) is None
        assert run_module._reader(weak, small) is None
    levels = [r.levelno for r in caplog.records if "readability not measured" in r.getMessage()]
    assert levels == [logging.WARNING, logging.INFO]


def test_the_judges_budget_grows_with_the_runs():
    from ldmkit.training.run import JUDGE_BUDGET_S, JUDGE_BUDGET_SHARE, judge_budget

    assert judge_budget(None) == JUDGE_BUDGET_S == judge_budget(60.0)
    assert judge_budget(1800.0) == JUDGE_BUDGET_SHARE * 1800.0 > JUDGE_BUDGET_S
