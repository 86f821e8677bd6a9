"""The tiny video run (a few steps of each stage on 16 moving-shapes clips of 3 frames), trained
once per session; tests copy it where they write into it."""

import pytest
import torch
from video_helpers import tiny_video

from ldmkit.recipe import run_config_from_dict
from ldmkit.training import run as run_module
from ldmkit.training.run import train_run


@pytest.fixture(scope="session")
def video_run(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("video") / "r"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "JUDGE_STEPS", 10)
        res = train_run(run_config_from_dict(tiny_video()), out)
    assert res.stopped_because == "finished" and res.vae_steps == 4 and res.unet_steps == 6
    return out
