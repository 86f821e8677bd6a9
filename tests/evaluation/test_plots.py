"""plots.py: trajectory, reconstructions, latent channels, samples by class, curves."""

import json
import logging
import math

import pytest
import torch
from PIL import Image

from ldmkit.data import load_dataset
from ldmkit.evaluation import plots
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runs import read_log


@pytest.fixture
def ldm(tiny_run_template):
    return LatentDiffusion.from_run(tiny_run_template, device="cpu")


@pytest.fixture(scope="module")
def images():
    return load_dataset("builtin:shapes?n=8", image_size=16, seed=0).images


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_trajectory_records_vp_latents_ending_at_the_sample(ldm):
    rec = plots.record_trajectory(ldm, sampler="ddim", steps=4, n=2)
    assert [r[0] for r in rec] == [0, 1, 2, 3]
    sigmas = [r[1] for r in rec]
    assert all(a > b for a, b in zip(sigmas, sigmas[1:])) and sigmas[-1] == 0
    final = ldm.sample(2, sampler="ddim", steps=4, class_labels=torch.arange(2),
                       return_latents=True)  # fmt: skip
    i, sigma, x_t, x0 = rec[-1]
    assert torch.allclose(x_t, final, atol=1e-6)  # sigma = 0: x_t is the sample
    assert torch.allclose(x_t, x0, atol=1e-6)
    # earlier frames are VP-scaled: x_t = x / sqrt(1 + sigma^2) keeps them near unit scale
    assert rec[0][2].std() < 3 and math.isfinite(rec[0][1])


def test_plot_denoising_trajectory_writes_a_png(ldm, tmp_path):
    path = plots.plot_denoising_trajectory(ldm, tmp_path / "t.png", sampler="euler", steps=3,
                                           n=2, frames=3)  # fmt: skip
    w, h = _png_size(path)
    assert w > 200 and h > 200


def test_plot_samples_has_one_labelled_row_per_class(ldm, tmp_path):
    path = plots.plot_samples(ldm, tmp_path / "s.png", per_class=3, steps=2)
    w, h = _png_size(path)
    rows = ldm.unet.config.num_classes  # 5 rows of 16 px cells, scale 2, padding 2
    assert h == rows * (32 + 2) + 2
    assert w > 3 * (32 + 2) + 2  # row labels widen the grid


def test_plot_reconstructions_and_latent_channels(ldm, images, tmp_path):
    w, h = _png_size(plots.plot_reconstructions(ldm, images, tmp_path / "r.png", n=4))
    assert h == 2 * (32 + 2) + 2  # originals row + reconstructions row
    w, h = _png_size(plots.plot_latent_channels(ldm, images, tmp_path / "z.png", n=2))
    assert w > h  # image + 4 channel columns, 2 rows


def test_loss_curves_and_log_reading(tiny_run_template, tmp_path, caplog):
    log = tiny_run_template / "log.jsonl"
    assert _png_size(plots.plot_loss_curves(log, tmp_path / "loss.png"))[0] > 0
    assert plots.plot_loss_curves(tmp_path / "missing.jsonl", tmp_path / "x.png") is None
    log2 = tmp_path / "log.jsonl"
    rows = [{"stage": "eval", "step": s, "FID-shapes-cnn": 10 / s} for s in (100, 200, 400)]
    log2.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    assert read_log(log2) == rows  # a last line being written is left out
    log2.write_text("[1]\n" + "\n".join(json.dumps(r) for r in rows) + '\n{"stage": "ev')
    with caplog.at_level(logging.WARNING, logger="ldmkit.runs"):
        assert read_log(log2) == rows
    assert len(caplog.records) == 1 and "line 1 is not a JSON object" in caplog.text
