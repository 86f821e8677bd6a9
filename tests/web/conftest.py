"""A runs folder holding one tiny trained run (a few steps of each stage, made once per session),
and the web app over it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette", reason="ldmkit serve needs the serve extra: pip install -e '.[serve]'")

# a two-stage run small enough to train in seconds on one thread: 64 shapes at 16 px
TINY = [
    "image_size=16", "vae.block_out_channels=[8,8]", "vae.norm_groups=4",
    "vae.layers_per_block=1", "vae.mid_attention=false", "unet.block_out_channels=[8,16]",
    "unet.attention_resolutions=[]", "unet.norm_num_groups=4", "unet.head_dim=8",
    "unet.num_res_blocks=1", "unet.mid_attention=false", "vae_train.batch_size=8",
    "unet_train.batch_size=8", "vae_train.log_every=1", "unet_train.log_every=1",
    "preview_steps=2", "diffusion.num_timesteps=100",
]  # fmt: skip


def tiny_settings(steps: int, sample_every: int = 0) -> list[str]:
    return TINY + [
        f"vae_train.steps={steps}", f"unet_train.steps={steps}",
        f"vae_train.sample_every={sample_every}", f"unet_train.sample_every={sample_every}",
        f"vae_train.checkpoint_every={steps}", f"unet_train.checkpoint_every={steps}",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def runs_template(tmp_path_factory) -> Path:
    from ldmkit import api

    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        api.train(root / "shapes", data="builtin:shapes?n=64", sets=tiny_settings(4, 2))
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture
def runs(runs_template, tmp_path) -> Path:
    """A fresh copy of the runs folder per test (tests write stop requests, lock files)."""
    return Path(shutil.copytree(runs_template, tmp_path / "runs"))


@pytest.fixture
def client(runs):
    from starlette.testclient import TestClient

    from ldmkit.web.app import create_app

    with TestClient(create_app(runs)) as c:
        yield c
