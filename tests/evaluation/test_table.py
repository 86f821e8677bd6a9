"""table.py: the sampler table's rows, skips, CSV, PNG and text."""

import csv

import pytest

from ldmkit.evaluation import table as table_mod
from ldmkit.evaluation.reference import reference_features
from ldmkit.pipeline import LatentDiffusion


def test_sampler_table_rows_csv_png_and_skips(tiny_run, shapes, random_net, tmp_path):
    ldm = LatentDiffusion.from_run(tiny_run, device="cpu")
    ref = reference_features(shapes, random_net, n=32, cache_dir=None)
    table = table_mod.sampler_table(
        ldm, ref, random_net, ["ddim", "heun"], [2, 3, 200], n=16, out_dir=tmp_path
    )
    assert [(r["sampler"], r["steps"]) for r in table.rows] == [
        ("ddim", 2), ("ddim", 3), ("heun", 2), ("heun", 3)
    ]  # fmt: skip
    # Heun: 2 * steps - 1 calls, less one: the cosine schedule's first step shrinks sigma more
    # than HEUN_MAX_RATIO times, and Heun takes it as an Euler step
    assert [r["nfe"] for r in table.rows] == [2, 3, 2, 4]
    assert [(s["sampler"], s["steps"]) for s in table.skipped] == [("ddim", 200), ("heun", 200)]
    assert "T = 100" in table.skipped[0]["reason"]
    with open(table.csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["sampler"] for r in rows] == ["ddim", "ddim", "heun", "heun", table_mod.FLOOR_NAME]
    for col in ("FID", "KID", "KID_std", "precision", "recall", "seconds_per_image", "n"):
        assert rows[0][col] != ""
    assert {r["feature_fingerprint"] for r in rows} == {random_net.fingerprint}
    assert rows[-1]["n"] == "16" and float(rows[-1]["FID"]) == pytest.approx(table.floor["FID"])
    assert table.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = table_mod.format_table(table)
    assert "FID-domain-cnn-random" in text and table_mod.FLOOR_NAME in text
    assert "skipped ddim at 200 steps" in text and "warning:" in text
    assert table.best_images is not None and table.best_images.shape == (16, 3, 16, 16)


def test_skip_reason_keeps_ddpm_to_strided_chains():
    assert table_mod.skip_reason("ddpm", 1000, 1000) is None
    assert table_mod.skip_reason("ddpm", 20, 1000) is None
    assert "multiple" in table_mod.skip_reason("ddpm", 30, 1000)
    assert table_mod.skip_reason("dpm++2m", 30, 1000) is None
    assert "> the model's T" in table_mod.skip_reason("euler", 2000, 1000)


def test_sampler_table_rejects_unknown_sampler_and_small_reference(tiny_run, shapes, random_net):
    ldm = LatentDiffusion.from_run(tiny_run, device="cpu")
    ref = reference_features(shapes, random_net, n=12, cache_dir=None)
    with pytest.raises(ValueError, match="unknown sampler.*nope"):
        table_mod.sampler_table(ldm, ref, random_net, ["nope"], [2], n=8)
    with pytest.raises(ValueError, match="fewer than n = 16"):
        table_mod.sampler_table(ldm, ref, random_net, ["ddim"], [2], n=16)
