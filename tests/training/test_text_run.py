"""Text-to-image end to end on a captioned folder: offline, reloadable, and it learns the prompt."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.pipeline import LatentDiffusion
from ldmkit.recipe import run_config_from_dict
from ldmkit.runs import RunFolder
from ldmkit.training.run import train_run

CAPTIONS = {"red": "a red square", "blue": "a blue circle"}


def captioned_folder(root, n=32, size=16):
    """n images: a large red square or a large blue circle on black, captioned in captions.jsonl
    (large and saturated, so that color is most of the images' variance and a short training
    can learn to follow it)."""
    root.mkdir(parents=True)
    yy, xx = np.mgrid[:size, :size] + 0.5
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        kind = "red" if i % 2 == 0 else "blue"
        cx, cy = rng.uniform(0.4, 0.6, 2) * size
        r = size * 0.4
        inside = (
            (abs(xx - cx) < r) & (abs(yy - cy) < r)
            if kind == "red"
            else (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        )
        img = np.zeros((size, size, 3), np.uint8)
        img[inside] = (220, 30, 30) if kind == "red" else (30, 30, 220)
        Image.fromarray(img).save(root / f"{i:03d}.png")
        lines.append(json.dumps({"file": f"{i:03d}.png", "caption": CAPTIONS[kind]}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def text_config(data, unet_steps, **over):
    cfg = {
        "data": str(data), "image_size": 16, "conditioning": "text", "seed": 0,
        "vae": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_groups": 4},
        "unet": {"block_out_channels": [16, 32], "attention_resolutions": [8, 4], "norm_num_groups": 8,
                 "head_dim": 8},
        "text": {"width": 16, "layers": 1, "heads": 2, "max_length": 8},
        "vae_train": {"steps": 60, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "log_every": 20,
                      "checkpoint_every": 1000, "sample_every": 0},
        "unet_train": {"steps": unet_steps, "batch_size": 16, "lr": 2e-3, "warmup_steps": 10,
                       "log_every": 20, "checkpoint_every": 1000, "sample_every": 0},
        "preview_steps": 2,
    }  # fmt: skip
    cfg.update(over)
    return run_config_from_dict(cfg)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("ldmkit tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_text_run_trains_saves_and_reloads_offline(tmp_path, no_network):
    data = captioned_folder(tmp_path / "data")
    train_run(text_config(data, 2, vae_train={"steps": 2, "batch_size": 8}), tmp_path / "run")
    folder = RunFolder(tmp_path / "run")
    assert folder.has_text() and folder.has_model("text_encoder")
    assert json.loads(folder.tokenizer_path.read_text())["vocab"][:2] == ["a", "blue"]
    assert folder.config().unet.context_dim == 16 and folder.config().unet.num_classes is None
    prompts = ["a red square", "a blue circle"]
    a, b = (LatentDiffusion.from_run(folder.path, device="cpu") for _ in range(2))
    with torch.no_grad():
        ea, eb = (m.conditioner.prompts(prompts, torch.device("cpu"))["context"] for m in (a, b))
    assert torch.equal(ea, eb)
    sa = a.sample(2, prompt=prompts, steps=3, seed=4)
    assert torch.equal(sa, b.sample(2, prompt=prompts, steps=3, seed=4))
    assert sa.shape == (2, 3, 16, 16) and torch.isfinite(sa).all()


def test_conditioning_text_needs_captions(tmp_path):
    from ldmkit.config import ConfigError

    data = tmp_path / "plain"
    data.mkdir()
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(data / f"{i}.png")
    with pytest.raises(ConfigError, match="conditioning 'text' needs captions"):
        train_run(text_config(data, 1), tmp_path / "run")


def red_minus_blue(ldm, prompt, guidance, seed):
    x = ldm.sample(8, prompt=prompt, steps=10, seed=seed, guidance_scale=guidance, sampler="ddim")
    return (x[:, 0] - x[:, 2]).mean().item()  # mean red minus mean blue, images in [-1, 1]


def _learns_the_prompt(tmp_path, unet_steps, seeds):
    data = captioned_folder(tmp_path / "data", n=64)
    train_run(text_config(data, unet_steps), tmp_path / "run")
    ldm = LatentDiffusion.from_run(tmp_path / "run", device="cpu")
    gaps = {
        g: [red_minus_blue(ldm, CAPTIONS["red"], g, s) - red_minus_blue(ldm, CAPTIONS["blue"], g, s)
            for s in seeds]
        for g in (1.0, 3.0)
    }  # fmt: skip
    assert sum(gap > 0 for gap in gaps[1.0]) > len(seeds) / 2, gaps  # "red" is redder, most seeds
    assert np.mean(gaps[3.0]) > np.mean(gaps[1.0]) > 0, gaps  # and guidance widens the gap
    return gaps


def test_a_short_training_follows_red_and_blue(tmp_path):
    _learns_the_prompt(tmp_path, unet_steps=150, seeds=range(3))


@pytest.mark.slow
def test_a_longer_training_follows_red_and_blue_on_every_seed(tmp_path):
    gaps = _learns_the_prompt(tmp_path, unet_steps=600, seeds=range(8))
    assert all(g > 0 for g in gaps[1.0] + gaps[3.0]), gaps
