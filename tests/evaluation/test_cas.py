"""The Classification Accuracy Score: the fixed classifier learns a small real set, a "generator"
that returns other real images scores about the real accuracy, one that returns noise about
chance; `eval --cas` end to end on a tiny run, and its one-line refusals."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldmkit.data import load_dataset
from ldmkit.evaluation import cas

sys.path.insert(0, str(Path(__file__).parents[1] / "reliability"))
from reliability_helpers import error_line, make_run, run_cli  # noqa: E402


@pytest.fixture(autouse=True)
def _fewer_steps(monkeypatch):
    """200 steps at least, not 1000: the digits at 16 px are learnt in that many (measured:
    0.976 held-out accuracy after 200 steps on 500 images)."""
    monkeypatch.setattr(cas, "MIN_STEPS", 200)


@pytest.fixture(scope="module")
def digits():
    """sklearn's 8x8 digits at 16 px: 500 to train on, 500 others, 500 to test on."""
    ds = load_dataset("builtin:digits", image_size=16, seed=0)
    p = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    part = lambda a, b: (ds.images[p[a:b]], ds.labels[p[a:b]])  # noqa: E731
    return part(0, 500), part(500, 1000), part(1000, 1500)


def test_the_classifier_learns_a_small_real_set(digits):
    (x, y), _, (xt, yt) = digits
    model = cas.train_classifier(x, y, 10, seed=0)
    assert cas.accuracy(model, xt, yt) > 0.9
    again = cas.train_classifier(x, y, 10, seed=0)  # seeded: the same weights
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))  # fmt: skip


def test_real_images_as_the_generator_score_the_real_accuracy(digits):
    (x, y), (xo, yo), (xt, yt) = digits
    r = cas.scores(xo, yo, x, y, xt, yt, 10, seeds=(0,))
    assert r["real"]["mean"] > 0.9 and abs(r["cas"]["mean"] - r["real"]["mean"]) < 0.05, r
    per_class = int(torch.bincount(yo).max())  # the real side: as many per class
    assert r["n_generated"] == 500 and r["n_real"] == len(cas.balanced(y, per_class, 0, 10))
    assert r["chance"] == 0.1 and r["classifier"]["widths"] == [16, 32, 64, 128]


def test_noise_as_the_generator_scores_chance(digits):
    (x, y), (_, yo), (xt, yt) = digits
    noise = torch.randint(0, 256, (500, 1, 16, 16), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))  # fmt: skip
    r = cas.scores(noise, yo, x, y, xt, yt, 10, seeds=(0, 1))
    assert r["cas"]["mean"] < 0.2 < 0.9 < r["real"]["mean"], r
    assert len(r["cas"]["runs"]) == 2 and r["cas"]["std"] >= 0


def test_balanced_draws_per_class_and_labels_map_by_name():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    idx = cas.balanced(labels, 2, 0, 3)
    assert sorted(labels[idx].tolist()) == [0, 0, 1, 1, 2]
    mapped = cas.map_labels(torch.tensor([0, 1]), ["b", "a"], ["a", "b", "c"])
    assert mapped.tolist() == [1, 0]
    with pytest.raises(ValueError, match="has classes the run does not"):
        cas.map_labels(torch.tensor([0]), ["z"], ["a"])


def test_eval_cas_on_a_tiny_run(tiny_run, capsys):
    rc, out, err = run_cli(capsys, "eval", "--run", str(tiny_run), "--cas", "--cas-per-class",
                           "3", "--cas-seeds", "2", "--steps", "2")  # fmt: skip
    assert rc == 0, err
    assert out.startswith("CAS ") and "real data" in out and "chance 0.200; 2 seeds" in out
    saved = json.loads((Path(tiny_run) / "eval" / "cas.json").read_text())
    assert saved["n_generated"] == 15 and len(saved["cas"]["runs"]) == 2
    assert saved["held_out"]["spec"].startswith("builtin:shapes")
    assert 0 <= saved["cas"]["mean"] <= 1 and 0 <= saved["real"]["mean"] <= 1
    # a second call reuses the generated images (the same folder, nothing drawn again)
    synth_dir = Path(saved["synth_folder"])
    before = {p: p.stat().st_mtime_ns for p in synth_dir.rglob("*.png")}
    rc, _, err = run_cli(capsys, "eval", "--run", str(tiny_run), "--cas", "--cas-per-class",
                         "3", "--cas-seeds", "1", "--steps", "2")  # fmt: skip
    assert rc == 0, err
    assert {p: p.stat().st_mtime_ns for p in synth_dir.rglob("*.png")} == before
    # the report shows it
    rc, _, err = run_cli(capsys, "report", "--run", str(tiny_run), "--steps", "2")
    assert rc == 0, err
    page = (Path(tiny_run) / "report.html").read_text()
    saved = json.loads((Path(tiny_run) / "eval" / "cas.json").read_text())
    assert "Classification Accuracy Score" in page
    assert f"{saved['cas']['mean']:.3f} \u00b1 {saved['cas']['std']:.3f} (15 images)" in page


def test_eval_cas_without_held_out_data_says_what_it_needs(tmp_path, capsys):
    data = tmp_path / "pics"
    for c in ("c0", "c1"):  # make_run names its classes c0, c1
        (data / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(data / c / f"{i}.png")
    run = make_run(tmp_path / "run", num_classes=2)
    cfg = json.loads((run / "run.json").read_text())
    cfg["data"] = str(data)
    (run / "run.json").write_text(json.dumps(cfg))
    rc, _, err = run_cli(capsys, "eval", "--run", str(run), "--cas")
    line = error_line(err)
    assert rc == 2 and "--cas needs labelled real images the model never saw" in line, line
    assert "pass --held-out DATA" in line
    # with held-out data given, it runs
    held = tmp_path / "held"
    shutil.copytree(data, held)
    rc, out, err = run_cli(capsys, "eval", "--run", str(run), "--cas", "--held-out", str(held),
                           "--cas-per-class", "2", "--cas-seeds", "1", "--steps", "2")  # fmt: skip
    assert rc == 0 and "tested on 6 held-out real images" in out, err


def test_eval_cas_refuses_what_it_cannot_score(tmp_path, capsys):
    uncond = make_run(tmp_path / "u", num_classes=None)
    cases = [
        (["--run", str(uncond), "--cas"], "--cas: the model in"),
        (["--run", str(uncond), "--cas-seeds", "2"], "--cas-seeds goes with --cas"),
        (["--run", str(uncond), "--cas", "--cas-per-class", "0"],
         "--cas-per-class must be a whole number from 1 to"),
        (["--run", str(uncond), "--cas", "--steps", "2,3"], "--steps: --cas draws its images with one"),
        (["--run", str(uncond), "--cas", "--n", "8"], "--n is for the sampler table; --cas takes"),
    ]  # fmt: skip
    for argv, expected in cases:
        rc, _, err = run_cli(capsys, "eval", *argv)
        line = error_line(err)
        assert rc == 2 and expected in line, line
