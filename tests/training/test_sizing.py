"""The image size follows the data and the device; the models follow the size (issue 26)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit import api
from ldmkit.data import native_size
from ldmkit.recipe import (
    MAX_AUTO_SIZE,
    MIN_AUTO_SIZE,
    RunConfig,
    round_size,
    run_config_from_dict,
    size_factor,
    size_settings,
    size_step,
)
from ldmkit.runs import RunFolder
from ldmkit.training import sizing
from ldmkit.training.sizing import StepTimes, choose_size, plan_lines

TINY = ["vae_train.steps=2", "vae_train.batch_size=4", "vae_train.log_every=1",
        "vae_train.sample_every=0", "vae_train.checkpoint_every=100"]  # fmt: skip


def write_folder(root, sizes, seed=0):
    """One random colour image per (w, h) in `sizes`, as PNG files directly under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[h // 4 : h // 2, w // 4 : w // 2] = rng.integers(0, 256, 3)
        Image.fromarray(pixels).save(root / f"{i:03d}.png")
    return root


# ----------------------------------------------------------------------------- the size table
@pytest.mark.parametrize("side", [1, 8, 28, 31, 32, 33, 40, 63, 64, 70, 100, 127, 128, 200,
                                  255, 256, 300, 511, 512, 640, 4000])  # fmt: skip
def test_round_size_is_a_size_the_models_take_and_never_enlarges(side):
    size = round_size(side)
    assert MIN_AUTO_SIZE <= size <= MAX_AUTO_SIZE
    assert size % size_step(size) == 0
    if side >= MIN_AUTO_SIZE:  # rounding goes down, never up
        assert size <= side
        assert size > min(side, MAX_AUTO_SIZE) - size_step(size)  # and to the nearest step
    else:
        assert size == MIN_AUTO_SIZE
    cfg = run_config_from_dict({"image_size": size})  # every such size builds valid models
    assert cfg.vae.downsample_factor == size_factor(size)


def test_the_factor_keeps_the_latent_small_in_the_paper_range():
    for size in (64, 96, 128, 192, 256, 512):
        cfg = run_config_from_dict({"image_size": size})
        assert cfg.vae.downsample_factor in (4, 8)  # LDM's f = 4-8 from 64 px up
        assert cfg.unet.sample_size == size // cfg.vae.downsample_factor
        assert 16 <= cfg.unet.sample_size <= 64
        # attention sits at the UNet's lowest level
        lowest = cfg.unet.sample_size // 2 ** (len(cfg.unet.block_out_channels) - 1)
        assert lowest in cfg.unet.attention_resolutions


def test_up_to_32_px_the_recipe_is_the_field_defaults():
    default = run_config_from_dict({})
    for size in (8, 16, 32):
        assert size_settings(size) == {}
        cfg = run_config_from_dict({"image_size": size})
        assert cfg.vae.block_out_channels == default.vae.block_out_channels
        assert cfg.unet.block_out_channels == default.unet.block_out_channels
        assert cfg.vae_train.batch_size == default.vae_train.batch_size


def test_explicit_settings_win_over_the_size_table():
    cfg = run_config_from_dict({
        "image_size": 128, "vae_train": {"batch_size": 4}, "unet": {"attention_resolutions": [8]},
    })  # fmt: skip
    table = size_settings(128)
    assert cfg.vae_train.batch_size == 4 != table["vae_train"]["batch_size"]
    assert cfg.unet.attention_resolutions == (8,)
    assert list(cfg.vae.block_out_channels) == table["vae"]["block_out_channels"]  # not set: table


def test_the_unet_follows_the_latent_of_a_user_autoencoder():
    # an f2 autoencoder at 128 px gives 64x64 latents: the UNet is sized for those, not for 16x16
    cfg = run_config_from_dict({"image_size": 128, "vae": {"block_out_channels": [16, 32]}})
    assert cfg.unet.sample_size == 64
    assert cfg.unet.attention_resolutions == tuple(
        size_settings(128, factor=2)["unet"]["attention_resolutions"]
    )
    assert len(cfg.unet.block_out_channels) == 4


def test_the_plan_names_the_size_and_both_models():
    cfg = run_config_from_dict({"image_size": 64})
    lines = plan_lines(cfg)
    assert lines[0].startswith("64 px")
    assert "f4 -> 4x16x16 latents" in lines[1] and "batch 16" in lines[1]
    assert "UNet at 16x16" in lines[2] and "M params" in lines[2]


def test_a_video_plan_names_the_video_unet_and_its_batch_of_clips():
    """A video run's plan counts the video UNet's parameters (the per-frame layers too), not
    the image UNet's it is built around."""
    from ldmkit.models.unet import UNet
    from ldmkit.models.video import VideoUNet

    video = {"layout": "stacked", "frames": 4, "frame_channels": 16}
    cfg = run_config_from_dict({"data": "builtin:moving-shapes", "video": video})
    line = plan_lines(cfg)[2]
    n = VideoUNet(cfg.video.unet_config(cfg.unet)).num_parameters()
    assert n != UNet(cfg.unet).num_parameters()
    assert f"{n / 1e6:.2f} M params" in line
    assert "video UNet (stacked, per-frame layers of 16, 4 frames)" in line
    assert f"batch {cfg.unet_train.batch_size} clips" in line


# ---------------------------------------------------------------------------- the data's size
def test_native_size_is_the_most_common_short_side(tmp_path):
    root = write_folder(tmp_path / "mixed", [(80, 64)] * 3 + [(48, 48)] * 2 + [(300, 200)])
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG broken")
    found = native_size(str(root))
    assert found.side == 64 and "3 of 6 images" in found.how
    tie = write_folder(tmp_path / "tie", [(40, 40), (96, 96)])
    assert native_size(str(tie)).side == 96  # a tie goes to the larger size
    assert native_size("builtin:shapes").side == 32
    assert native_size("builtin:digits").side == 8
    assert native_size(str(tmp_path / "missing")) is None


def test_native_size_samples_a_large_folder_evenly(tmp_path):
    root = write_folder(tmp_path / "many", [(16, 16)] * 300 + [(24, 24)] * 400)
    found = native_size(str(root))
    assert found.side == 24 and "images read, a sample of the 700 in the folder" in found.how


# --------------------------------------------------------------------------- the choice, by api
def fake_times(fast_up_to):
    """Step times that make every size above `fast_up_to` px 100x too slow."""

    def step_times(given, size, device):
        seconds = 0.01 if size <= fast_up_to else 10.0
        return StepTimes(size, seconds, seconds)

    return step_times


def test_a_folder_of_64px_images_trains_at_64px_with_no_flag(tmp_path, caplog, monkeypatch):
    # a device that trains 64 px in time (the probe's own figures vary with the machine's load;
    # the tests below drive the choice with set step times, and one with the real probe)
    monkeypatch.setattr(sizing, "step_times", fake_times(512))
    data = write_folder(tmp_path / "photos", [(64, 64)] * 12)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        api.train(out, data=str(data), stage="autoencoder", sets=TINY)
    folder = RunFolder(out)
    assert folder.config().image_size == 64
    assert folder.load_vae().config.image_size == 64
    info = json.loads(folder.data_path.read_text())
    assert info["native_size"] == 64 and "the data's own size" in info["size_note"]
    assert any(r.message.startswith("plan: 64 px") for r in caplog.records)


def test_an_explicit_image_size_wins(tmp_path):
    data = write_folder(tmp_path / "photos", [(64, 64)] * 12)
    api.train(tmp_path / "flag", data=str(data), stage="autoencoder", sets=TINY, image_size=32)
    assert RunFolder(tmp_path / "flag").config().image_size == 32
    api.train(tmp_path / "set", data=str(data), stage="autoencoder", sets=[*TINY, "image_size=48"])
    assert RunFolder(tmp_path / "set").config().image_size == 48
    info = json.loads(RunFolder(tmp_path / "set").data_path.read_text())
    assert info["size_note"] is None  # nothing was chosen


def test_a_size_too_slow_for_the_device_is_reduced_with_the_reason_and_the_flag(
    tmp_path, monkeypatch, caplog
):
    data = write_folder(tmp_path / "large", [(256, 256)] * 2)
    probed = []

    def times(given, size, device):
        probed.append(size)
        return fake_times(64)(given, size, device)

    monkeypatch.setattr(sizing, "step_times", times)
    with caplog.at_level(logging.WARNING):
        choice = choose_size({"data": str(data), "time_budget": "30m"}, torch.device("cpu"))
    assert (choice.size, choice.native, choice.reduced) == (64, 256, True)
    assert probed == [256, 128, 64]  # the data's own size first, then halvings
    msg = caplog.records[-1].message
    assert "at 256 px this device takes ~10.00 s per autoencoder step" in msg
    assert "--time-budget 30m would give only 72 autoencoder and 108 UNet steps" in msg
    assert "training at 64 px instead" in msg and "pass --image-size 256" in msg
    # without a budget the recipe's configured steps decide
    choice = choose_size({"data": str(data)}, torch.device("cpu"))
    assert choice.size == 64 and "without a --time-budget" in choice.note
    # a fast device keeps the data's own size
    monkeypatch.setattr(sizing, "step_times", fake_times(512))
    assert choose_size({"data": str(data), "time_budget": "30m"}, torch.device("cpu")).size == 256


def test_the_real_probe_reduces_a_size_a_tiny_budget_cannot_train(tmp_path):
    data = write_folder(tmp_path / "d64", [(64, 64)] * 2)
    choice = choose_size({"data": str(data), "time_budget": "1s"}, torch.device("cpu"))
    assert choice.size == 32 and choice.reduced
    assert "s per autoencoder step" in choice.note and "--image-size 64" in choice.note


def test_small_data_is_enlarged_to_the_smallest_recipe_size(tmp_path):
    data = write_folder(tmp_path / "tiny", [(20, 20)] * 2)
    choice = choose_size({"data": str(data)}, torch.device("cpu"))
    assert choice.size == MIN_AUTO_SIZE and "enlarged" in choice.note
    assert choose_size({}, torch.device("cpu")).size == RunConfig().image_size  # builtin:shapes


def test_labelled_data_over_64px_keeps_the_judge_of_its_autoencoder(tmp_path, caplog):
    # the run's domain classifier is fully convolutional: at 96 px it still gives the
    # autoencoder its feature-matching term (evaluation may use Inception at this size)
    for k, name in enumerate(("cats", "dogs")):
        write_folder(tmp_path / "pets" / name, [(96, 96)] * 6, seed=k)
    with caplog.at_level(logging.INFO):
        api.train(tmp_path / "run", data=str(tmp_path / "pets"), stage="autoencoder", sets=TINY,
                  image_size=96)  # fmt: skip
    messages = [r.getMessage() for r in caplog.records]
    assert any("trained the domain classifier" in m for m in messages), messages
    assert not any("no domain classifier for this data" in m for m in messages)
    rows = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert any('"features"' in r for r in rows if '"loss"' in r)  # the term is in the loss
