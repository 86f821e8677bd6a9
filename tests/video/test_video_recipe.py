"""The video recipe on `ldmkit train` and the motion classes (issue 30).

A new video run starts from `training/video.VIDEO_RECIPE`, laid under the user's settings
(api.checks.run_config: a config file, --set and flags win); on moving shapes a class-conditional
run is also conditioned on the direction its clips' captions name (`video.motion_classes` = 8,
joint labels c * 8 + m). `ldmkit sample --direction` asks such a run for a direction, and
`ldmkit eval` asks it for the direction of each data clip it measures against."""

import json

import pytest
import torch
from video_helpers import FRAMES, tiny_video

from ldmkit import api
from ldmkit.api.checks import run_config
from ldmkit.cli import main
from ldmkit.config import ConfigError
from ldmkit.data.moving_shapes import DIRECTION_NAMES, generate_moving_shapes
from ldmkit.recipe import RunConfig
from ldmkit.runs import RunFolder
from ldmkit.training import run as run_module
from ldmkit.training.video import VIDEO_RECIPE as R
from ldmkit.training.video import recipe_settings

TINY_UNET = ["unet.block_out_channels=[16,32]", "unet.attention_resolutions=[8]",
             "unet.norm_num_groups=8", "unet.head_dim=8"]  # fmt: skip


def test_a_new_video_run_starts_from_the_recipe(tmp_path):
    c = run_config(tmp_path / "r", data="builtin:moving-shapes")
    v = c.video
    # from scratch: the stacked layout, without mixed noise, at the scratch batch and widths
    assert v.layout == R["scratch_layout"] == "stacked"
    assert v.frames == R["frames"] and v.noise_mixing == R["scratch_noise_mixing"]
    assert list(c.unet.block_out_channels) == R["scratch_unet_channels"]
    assert v.temporal_levels == tuple(R["model"]["temporal_levels"]) and v.temporal_mid
    assert v.temporal_heads == R["model"]["temporal_heads"]
    assert v.frame_embedding == R["model"]["frame_embedding"]
    # from scratch: the scratch LR, the temporal layers at the scratch multiplier, nothing frozen
    assert v.temporal_lr_mult == R["scratch_temporal_lr_mult"] and not v.freeze_spatial
    assert v.motion_classes == len(DIRECTION_NAMES)  # moving shapes: the 8 directions
    t = c.unet_train
    assert (t.lr, t.batch_size, t.warmup_steps, t.ema_decay) == (
        R["lr"]["scratch"], R["scratch_batch_size"], R["warmup_steps"], R["ema_decay"])  # fmt: skip
    assert c.diffusion.class_dropout == R["class_dropout"]
    assert c.guidance_scale == R["guidance_scale"]
    # the recipe's numbers differ from the image defaults, so the test above could fail
    d = RunConfig()
    assert d.guidance_scale != R["guidance_scale"] and d.unet_train.ema_decay != R["ema_decay"]


def test_the_users_settings_win_over_the_recipe(tmp_path):
    sets = ["video.frames=4", "video.noise_mixing=0.5", "video.motion_classes=0",
            "unet_train.lr=5e-4", "unet_train.batch_size=2", "guidance_scale=3",
            "diffusion.class_dropout=0.2"]  # fmt: skip
    c = run_config(tmp_path / "r", data="builtin:moving-shapes", sets=sets)
    assert (c.video.frames, c.video.noise_mixing, c.video.motion_classes) == (4, 0.5, 0)
    assert (c.unet_train.lr, c.unet_train.batch_size, c.guidance_scale) == (5e-4, 2, 3.0)
    assert c.diffusion.class_dropout == 0.2
    assert c.unet_train.ema_decay == R["ema_decay"]  # what the user left: the recipe's
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"video": {"temporal_lr_mult": 7}, "unet_train": {"lr": 2e-4}}))
    c = run_config(tmp_path / "r", data="builtin:moving-shapes", config_file=str(config),
                   sets=["unet_train.lr=3e-4"])  # fmt: skip
    assert c.video.temporal_lr_mult == 7 and c.unet_train.lr == 3e-4


def test_image_runs_text_runs_small_unets_and_inflating(tmp_path):
    image = run_config(tmp_path / "r", data="builtin:shapes")
    assert image.video is None and image.guidance_scale is None
    assert image.unet_train == RunConfig().unet_train
    text = run_config(tmp_path / "r", data="builtin:moving-shapes", conditioning="text")
    assert text.video.motion_classes == 0  # directions need class labels
    mnist = recipe_settings("builtin:moving-mnist", inflate=False, levels=3)
    assert "motion_classes" not in mnist["video"]
    # a 2-level UNet has no level 2: the recipe's lowest level is its level 1
    small = run_config(tmp_path / "r", data="builtin:moving-shapes", sets=TINY_UNET)
    assert small.video.temporal_levels == (1,)
    # growing an image run: the inflate LR, its spatial layers frozen, the temporal layers faster
    base = RunFolder(tmp_path / "image")
    base.path.mkdir()
    base.write_config(RunConfig())
    grown = run_config(
        tmp_path / "r", data="builtin:moving-shapes", sets=[f"init_from={base.path}"]
    )
    assert grown.unet_train.lr == R["lr"]["inflate"] and grown.video.layout == "temporal"
    assert grown.unet_train.batch_size == R["batch_size"]
    assert grown.video.noise_mixing == R["model"]["noise_mixing"]
    assert grown.video.freeze_spatial == R["inflate_freeze_spatial"]
    assert grown.video.temporal_lr_mult == R["model"]["temporal_lr_mult"]


def test_clip_motion_is_the_captions_direction_and_the_label_joint():
    from ldmkit.training.video_run import _clip_conditions, _clip_motion, _video_data

    cfg = run_config_dict(video={"frames": FRAMES, "motion_classes": 8})
    cfg, ds, n = _video_data(cfg)
    motion = _clip_motion(cfg, ds, "class")
    truth = generate_moving_shapes(16, frames=FRAMES, image_size=16, seed=0)
    assert n == 16 and motion.tolist() == truth.direction.tolist()
    joint = _clip_conditions(cfg, ds.labels, motion)
    assert joint.tolist() == [int(c) * 8 + int(m) for c, m in zip(truth.labels, truth.direction)]
    # refusals, before anything is written
    with pytest.raises(ConfigError, match="needs a class-conditional run, but this one is "):
        _clip_motion(cfg, ds, "text")
    bad = run_config_dict(video={"frames": FRAMES, "motion_classes": 4})
    bad, ds4, _ = _video_data(bad)
    with pytest.raises(ConfigError, match="motion_classes=4: the motion classes are the 8"):
        _clip_motion(bad, ds4, "class")
    ds.captions = ["a red star" for _ in ds.captions]
    with pytest.raises(ConfigError, match="clip 0 of .* has no caption naming its direction"):
        _clip_motion(cfg, ds, "class")


def run_config_dict(**over):
    from ldmkit.recipe import run_config_from_dict

    return run_config_from_dict(tiny_video(**over))


@pytest.fixture(scope="module")
def motion_run(tmp_path_factory):
    """`ldmkit train` on moving shapes at toy size: the recipe under the tiny settings, one
    recipe number overridden with --set."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("motion")
    d = tiny_video()
    d.pop("data")
    (tmp / "tiny.json").write_text(json.dumps(d))
    out = tmp / "r"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "JUDGE_STEPS", 10)
        argv = ["train", "--data", "builtin:moving-shapes?n=16", "--out", str(out), "--config",
                str(tmp / "tiny.json"), "--set", "video.noise_mixing=1.5", "--quiet"]  # fmt: skip
        assert main(argv) == 0
    return out


def test_a_cli_video_run_saves_the_recipe_and_the_users_override(motion_run):
    saved = json.loads((motion_run / "run.json").read_text())
    v, t = saved["video"], saved["unet_train"]
    assert v["noise_mixing"] == 1.5  # --set won
    assert v["frames"] == FRAMES and v["temporal_heads"] == 2  # the config file won
    assert v["motion_classes"] == 8 and v["temporal_levels"] == [1] and v["temporal_mid"]
    assert t["batch_size"] == 4 and t["warmup_steps"] == R["warmup_steps"]
    assert t["ema_decay"] == R["ema_decay"] and t["lr"] == R["lr"]["scratch"]
    assert saved["guidance_scale"] == R["guidance_scale"]
    assert saved["diffusion"]["class_dropout"] == R["class_dropout"]
    model = RunFolder(motion_run).load_video_unet()
    assert model.config.motion_classes == 8 and model.config.num_classes == 5 * 8
    assert model.config.noise_mixing == 1.5
    # a resumed run keeps its saved settings: the recipe is not laid again
    again = run_config(motion_run, resume=True, data="builtin:moving-shapes?n=16")
    assert again.video.noise_mixing == 1.5 and again.unet_train.batch_size == 4


def test_sample_asks_for_directions_with_joint_labels(motion_run, monkeypatch, tmp_path):
    import ldmkit.video_sampling as vs

    seen = []
    real = vs.sample_video

    def spy(*args, cond=None, uncond=None, **kw):
        seen.append((cond["class_labels"].tolist(), uncond["class_labels"].tolist()))
        return real(*args, cond=cond, uncond=uncond, **kw)

    monkeypatch.setattr(vs, "sample_video", spy)
    clips = api.sample_clips(motion_run, n=3, steps=1, classes="star", directions="left,up")
    names = RunFolder(motion_run).data_info().class_names
    star, cfg = names.index("star"), RunFolder(motion_run).load_video_unet().config
    left, up = DIRECTION_NAMES.index("left"), DIRECTION_NAMES.index("up")
    assert seen[-1][0] == [cfg.joint_label(star, m) for m in (left, up, left)]
    assert seen[-1][1] == [40, 40, 40]  # the null label of joint labels: C * M
    assert clips.labels == ["star moving left", "star moving up", "star moving left"]
    assert clips.params["directions"] == "left,up"
    api.sample_clips(motion_run, n=9, steps=1)  # default: every class and direction in turn
    assert seen[-1][0] == [cfg.joint_label(i % 5, i % 8) for i in range(9)]
    out = tmp_path / "c.gif"
    argv = ["sample", "--run", str(motion_run), "--n", "2", "--steps", "1", "--direction",
            "down-right", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0 and out.is_file()
    assert seen[-1][0] == [cfg.joint_label(i, DIRECTION_NAMES.index("down-right"))
                           for i in range(2)]  # fmt: skip


def test_eval_asks_for_and_measures_the_data_clips_directions(motion_run, monkeypatch):
    import ldmkit.api.video as api_video
    from ldmkit.evaluation import feature_nets
    from ldmkit.evaluation import video as video_eval

    monkeypatch.setattr(feature_nets, "DOMAIN_MIN_STEPS", 10)
    asked, measured = [], []
    real_sample, real_score = api_video.sample_clips, video_eval.score_clips

    def sample_spy(run, *, options, **kw):
        asked.append(options)
        return real_sample(run, options=options, **kw)

    def score_spy(clips, **kw):
        measured.append(kw["directions"])
        return real_score(clips, **kw)

    monkeypatch.setattr(api_video, "sample_clips", sample_spy)
    monkeypatch.setattr(video_eval, "score_clips", score_spy)
    result = api.evaluate_video(motion_run, n=4, steps=1)
    o = asked[-1]
    assert o.directions is not None and o.directions.split(",") == measured[-1]
    assert all(d in DIRECTION_NAMES for d in measured[-1]) and len(measured[-1]) == 4
    assert result["direction_accuracy"] is not None


def test_bad_directions_are_one_line(motion_run, video_run, tmp_path, capsys):
    cases = [
        (motion_run, "sideways", "--direction 'sideways': not a direction; use one of left"),
        (motion_run, "left,", "--direction '': not a direction"),
        (video_run, "left", "was trained without motion classes (video.motion_classes=0)"),
    ]
    for run, value, message in cases:
        argv = ["sample", "--run", str(run), "--n", "1", "--steps", "1", "--direction", value,
                "--out", str(tmp_path / "o.gif")]  # fmt: skip
        assert main(argv) == 2, value
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    from ldmkit.options import check_video_options

    image = RunFolder(tmp_path / "image")
    image.path.mkdir()
    image.write_config(RunConfig())
    with pytest.raises(ConfigError, match="--direction: image is an image run; --direction"):
        check_video_options(image, "image", {"directions": "left"})


def test_the_page_offers_a_direction_for_a_run_with_motion_classes(motion_run, video_run, tmp_path):
    pytest.importorskip("starlette", reason="ldmkit serve needs the serve extra")
    import io
    import shutil
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image, ImageSequence
    from starlette.testclient import TestClient

    from ldmkit.web import app as web

    sys.path.insert(0, str(Path(__file__).parents[1] / "web"))
    from serve_helpers import wait_for

    def frames(gif: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(gif)) as im:
            return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])

    runs = tmp_path / "runs"
    shutil.copytree(motion_run, runs / "motion")
    shutil.copytree(video_run, runs / "still")
    with TestClient(web.create_app(runs)) as client:
        fields = {
            f["name"]: f
            for f in client.get("/api/run", params={"run": "motion"}).json()["sampling"]
        }
        assert fields["direction"]["options"] == ["", *DIRECTION_NAMES]
        assert fields["direction"]["value"] == ""  # empty: every direction in turn
        other = client.get("/api/run", params={"run": "still"}).json()["sampling"]
        assert "direction" not in {f["name"] for f in other}  # no motion classes: no field
        r = client.post("/api/sample", json={"run": "motion", "n": 2, "steps": 1, "seed": 3,
                                             "classes": "star", "direction": "up-left"})  # fmt: skip
        assert r.status_code == 202, r.text
        job = wait_for(client, r.json()["job"]["id"])
        assert job["state"] == "done", job
        got = client.get("/api/job/result", params={"id": job["id"], "download": 1}).content
        bad = client.post("/api/sample", json={"run": "motion", "n": 1, "direction": "sideways"})
        assert bad.status_code == 400 and "--direction 'sideways': not a direction" in bad.text
    ref = api.sample_clips(runs / "motion", n=2, steps=1, seed=3, classes="star",
                           directions="up-left")  # fmt: skip
    assert ref.labels == ["star moving up-left"] * 2
    api.save_clips(ref, tmp_path / "ref.gif")
    assert np.array_equal(frames(got), frames((tmp_path / "ref.gif").read_bytes()))
