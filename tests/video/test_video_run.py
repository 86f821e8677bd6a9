"""A video run end to end at toy size: `ldmkit train` on moving shapes makes a run folder with
the autoencoder trained on frames and a video UNet; `ldmkit sample` writes animations and strip
PNGs with their parameters, and continues given first frames; `ldmkit eval` measures it; the
image-only verbs refuse it in one line."""

import json

import numpy as np
import pytest
import torch
from video_helpers import FRAMES, tiny_video

from ldmkit.cli import main
from ldmkit.config import ConfigError
from ldmkit.data.animations import read_animation, read_animation_params, save_animation
from ldmkit.data.images import read_png_params
from ldmkit.recipe import run_config_from_dict
from ldmkit.runs import RunFolder
from ldmkit.training import run as run_module
from ldmkit.training.run import train_run


def test_the_video_run_folder(video_run):
    f = RunFolder(video_run)
    assert f.is_video() and f.has_model("vae") and f.has_model("video_unet")
    assert not (video_run / "unet").exists()
    cfg = f.config()
    assert cfg.video.frames == FRAMES and cfg.video.fps == 5 and cfg.unet.num_classes == 5
    info = f.data_info()
    assert (info.num_clips, info.frames, info.num_images) == (16, FRAMES, 16 * FRAMES)
    model = f.load_video_unet()
    assert model.config.frames == FRAMES and model.config.unet == cfg.unet
    gif = read_animation(f.final_clips_path)  # all final clips in one animation
    assert gif.shape[0] == FRAMES
    assert f.final_frames_path.is_file() and f.reconstructions_path.is_file()
    stages = f.stage_report()
    assert stages["autoencoder"]["steps"] == 4 and stages["diffusion"]["steps"] == 6
    assert sorted(p.name for p in f.samples_dir.iterdir()) == ["step-00000003.png",
                                                               "step-00000006.png"]  # fmt: skip


def test_resume_continues_the_video_stage(video_run, tmp_path):
    import shutil

    copy = tmp_path / "r"
    shutil.copytree(video_run, copy)
    cfg = run_config_from_dict(tiny_video(unet_train={"steps": 9}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "JUDGE_STEPS", 10)
        res = train_run(cfg, copy, resume=True)
    assert res.vae_steps == 0 and res.unet_steps == 9  # from its step-6 checkpoint
    rows = [r for r in RunFolder(copy).read_log() if r.get("stage") == "video"]
    assert max(r["step"] for r in rows) == 9


def test_image_only_verbs_refuse_a_video_run(video_run, tmp_path, capsys):
    with pytest.raises(ConfigError, match="is a video run; this command works on image runs"):
        RunFolder(video_run).require_trained()
    img = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (16, 16)).save(img)
    for argv in (["img2img", "--run", str(video_run), "--image", str(img), "--out",
                  str(tmp_path / "o.png")],
                 ["distill", "--run", str(video_run), "--out", str(tmp_path / "s")]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is a video run" in err[0], err


def test_sample_writes_animations_and_strips_with_their_parameters(video_run, tmp_path, capsys):
    out = tmp_path / "clips.gif"
    assert main(["sample", "--run", str(video_run), "--n", "3", "--steps", "2", "--class",
                 "star", "--out", str(out), "--outdir", str(tmp_path / "each")]) == 0  # fmt: skip
    assert "3 clips of 3 frames" in capsys.readouterr().out
    params = read_animation_params(out)
    assert params["steps"] == 2 and params["classes"] == "star" and params["fps"] == 5
    assert (
        read_png_params(out.with_suffix(".png"))["weights"] == RunFolder(video_run).weights_hash()
    )
    each = sorted((tmp_path / "each").glob("clip-*.gif"))
    assert len(each) == 3 and read_animation(each[2]).shape == (FRAMES, 3, 16, 16)
    assert read_animation_params(each[2])["label"] == "star"
    again = tmp_path / "again.gif"
    assert main(["sample", "--run", str(video_run), "--n", "3", "--steps", "2", "--class",
                 "star", "--out", str(again)]) == 0  # fmt: skip
    assert np.array_equal(read_animation(out), read_animation(again))  # seeded


def test_sample_continues_given_first_frames(video_run, tmp_path):
    from ldmkit import api
    from ldmkit.models.vae import Autoencoder  # noqa: F401  (the run's own, below)
    from ldmkit.video_sampling import decode_clips, encode_frames

    first = np.random.default_rng(0).integers(0, 255, (FRAMES, 3, 16, 16), dtype=np.uint8)
    save_animation(tmp_path / "first.webp", first)  # lossless
    clips = api.sample_clips(video_run, n=2, steps=2, first_frames=str(tmp_path / "first.webp"),
                             given_frames=2)  # fmt: skip
    vae = RunFolder(video_run).load_vae()
    s = vae.config.scaling_factor
    expect = decode_clips(vae, encode_frames(vae, torch.from_numpy(first[None, :2]), s), s)
    # the given frames come back as the autoencoder reconstructs them (to a uint8 step)
    assert (clips.clips[:, :2].int() - expect.int()).abs().max() <= 1
    assert clips.given == 2 and clips.params["given"] == 2


def test_bad_video_sampling_input_is_one_line(video_run, tmp_path, capsys):
    save_animation(tmp_path / "f.gif", np.zeros((2, 3, 16, 16), np.uint8))
    cases = [
        (["--first-frames", str(tmp_path / "f.gif"), "--given", "3"], "--given must be"),
        (["--given", "1"], "--given counts frames of --first-frames"),
        (["--out", str(tmp_path / "x.png")], "name a .gif or .webp file"),
        (["--nrow", "2", "--out", str(tmp_path / "x.gif")], "--nrow lays out image grids"),
    ]
    for extra, message in cases:
        argv = ["sample", "--run", str(video_run), "--n", "1", "--steps", "1", *extra]
        if "--out" not in extra:
            argv += ["--out", str(tmp_path / "o.gif")]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)


def test_eval_measures_a_video_run(video_run, capsys, monkeypatch):
    from ldmkit.evaluation import feature_nets

    monkeypatch.setattr(feature_nets, "DOMAIN_MIN_STEPS", 10)
    assert main(["eval", "--run", str(video_run), "--n", "4", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "per-frame FID" in out and "FVD is not available offline" in out
    summary = json.loads((RunFolder(video_run).eval_dir / "video.json").read_text())
    assert summary["clips"] == 4 and summary["frames"] == FRAMES and "4 clips" in summary["sampled"]
    assert 0 <= summary["class_constant"] <= 1 and summary["fid_frames"] >= 0


def test_bad_video_training_settings(tmp_path):
    with pytest.raises(ConfigError, match="video.freeze_spatial trains the temporal layers only"):
        run_config_from_dict(tiny_video(video={"freeze_spatial": True}))
    with pytest.raises(ConfigError, match="video.layout='sideways': choose temporal or stacked"):
        run_config_from_dict(tiny_video(video={"layout": "sideways"}))
    with pytest.raises(ConfigError, match="stacked sees a clip's frames as the channels"):
        run_config_from_dict(tiny_video(video={"layout": "stacked"}, init_from=str(tmp_path)))
    cfg = run_config_from_dict(tiny_video(data="builtin:shapes?n=8"))
    with pytest.raises(ConfigError, match=r"video.\* is set but builtin:shapes\?n=8 is image data"):
        train_run(cfg, tmp_path / "r")


def test_video_flags_refused_by_an_image_run(tmp_path):
    from ldmkit.options import check_video_options
    from ldmkit.recipe import RunConfig

    folder = RunFolder(tmp_path)
    folder.write_config(RunConfig())
    assert not folder.is_video()
    for name, flag in (
        ("first_frames", "--first-frames"),
        ("given_frames", "--given"),
        ("fps", "--fps"),
    ):
        values = {"first_frames": None, "given_frames": None, "fps": None, name: 2}
        with pytest.raises(ConfigError, match=f"{flag}: r is an image run; {flag} applies to"):
            check_video_options(folder, "r", values)
    check_video_options(folder, "r", {"first_frames": None, "given_frames": None, "fps": None})


def test_eval_refuses_an_image_tables_flags(video_run, capsys):
    assert main(["eval", "--run", str(video_run), "--full"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--full is for an image run's table" in err[0]


def test_the_plan_of_a_video_run(tmp_path):
    from ldmkit import api
    from ldmkit.options import TrainOptions

    plan = api.train_plan(tmp_path / "new", options=TrainOptions(data="builtin:moving-shapes?n=8"),
                          sets=["video.frames=4", "image_size=16"])  # fmt: skip
    assert plan.lines[0] == "data: moving-shapes, 8 clips of 4 frames"
    assert any(line.startswith("video: a video UNet on clips of 4 frames") for line in plan.lines)


def test_held_out_eval_needs_held_out_data(video_run):
    from ldmkit import api

    with pytest.raises(ConfigError, match="--held-out: this run's data holds nothing out"):
        api.evaluate_video(video_run, n=2, held_out=True)


def test_inflate_grows_the_video_unet_from_an_image_run(tmp_path, capsys, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
    from test_run import tiny

    monkeypatch.setattr(run_module, "JUDGE_STEPS", 10)
    image = tmp_path / "image"
    train_run(tiny(data="builtin:shapes?n=32", unet_train={"sample_every": 0}), image)
    config = tmp_path / "video.json"
    d = tiny_video()
    for key in ("data", "image_size", "vae", "unet"):  # the image run decides these
        d.pop(key)
    config.write_text(json.dumps(d))
    out = tmp_path / "grown"
    argv = ["train", "--data", "builtin:moving-shapes?n=16", "--out", str(out), "--config",
            str(config), "--inflate", str(image), "--set", "video.freeze_spatial=true", "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "clips: " in capsys.readouterr().out
    grown = RunFolder(out)
    assert grown.config().init_from == str(image) and grown.config().video.freeze_spatial
    assert grown.data_info().num_clips == 16
    base, video = RunFolder(image).load_unet(), grown.load_video_unet()
    # the spatial layers frozen: the image run's UNet, bit for bit; the temporal ones trained
    for name, p in base.state_dict().items():
        assert torch.equal(video.unet.state_dict()[name], p), name
    zero_at_start = [v for k, v in video.state_dict().items()
                     if not k.startswith("unet.") and k.endswith(("to_out.weight", "conv_out.weight"))]  # fmt: skip
    assert zero_at_start and all(v.abs().sum() > 0 for v in zero_at_start)  # they trained
    # its autoencoder is the image run's, as it was (no stage 1)
    assert RunFolder(out).stage_report().get("autoencoder") is None
    assert torch.equal(grown.load_vae().encoder.conv_in.weight,
                       RunFolder(image).load_vae().encoder.conv_in.weight)  # fmt: skip


def test_the_readme_commands_run(video_run, tmp_path, monkeypatch, capsys):
    """The README's video section, on the tiny run (its train command is the fixture's run; the
    others run as written, with few steps and images)."""
    import re
    import shlex
    import shutil
    from pathlib import Path

    from ldmkit.evaluation import feature_nets

    monkeypatch.setattr(feature_nets, "DOMAIN_MIN_STEPS", 10)
    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = text.split("## Video (experimental)")[1].split("\n## ")[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines()]
    assert [c[1] for c in commands] == ["train", "sample", "sample", "eval"]
    assert commands[0][commands[0].index("--out") + 1] == "runs/moving"
    shutil.copytree(video_run, tmp_path / "runs" / "moving")
    monkeypatch.chdir(tmp_path)
    for argv in commands[1:]:
        extra = ["--steps", "2"] + (["--n", "4"] if argv[1] == "eval" else [])
        assert main([*argv[1:], *extra]) == 0, argv
    assert read_animation(tmp_path / "clips" / "clip-00000.gif").shape[0] == FRAMES
    assert (tmp_path / "clips" / "clips.png").is_file()
    assert read_animation(tmp_path / "continued.gif").shape[0] == FRAMES
    assert (RunFolder(tmp_path / "runs" / "moving").eval_dir / "video.json").is_file()


@pytest.mark.parametrize("shell", [0, 8], ids=["plain", "frame-shell"])
def test_a_stacked_video_run_trains_samples_continues_and_is_evaluated(
    tmp_path, capsys, monkeypatch, shell
):
    """video.layout=stacked through the run: the saved model is the stacked one, conditioned
    on (shape, direction), with per-frame layers when video.frame_channels is set; sample
    --direction, given first frames and eval all work on it."""
    from ldmkit import api
    from ldmkit.evaluation import feature_nets

    out = tmp_path / "r"
    cfg = tiny_video(video={"layout": "stacked", "motion_classes": 8, "frame_channels": shell})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_module, "JUDGE_STEPS", 10)
        res = train_run(run_config_from_dict(cfg), out)
    assert res.stopped_because == "finished" and res.unet_steps == 6
    model = RunFolder(out).load_video_unet()
    assert model.config.layout == "stacked" and model.config.motion_classes == 8
    assert model.config.frame_channels == shell and (model.frame_shell is not None) == bool(shell)
    assert model.unet.config.in_channels == FRAMES * model.config.unet.in_channels
    gif = tmp_path / "left.gif"
    assert main(["sample", "--run", str(out), "--n", "2", "--steps", "2", "--class", "star",
                 "--direction", "left", "--out", str(gif)]) == 0  # fmt: skip
    assert read_animation_params(gif)["steps"] == 2
    first = np.random.default_rng(0).integers(0, 255, (FRAMES, 3, 16, 16), dtype=np.uint8)
    save_animation(tmp_path / "first.webp", first)
    clips = api.sample_clips(out, n=2, steps=2, first_frames=str(tmp_path / "first.webp"),
                             given_frames=1)  # fmt: skip
    assert tuple(clips.clips.shape) == (2, FRAMES, 3, 16, 16)
    monkeypatch.setattr(feature_nets, "DOMAIN_MIN_STEPS", 10)
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--n", "4", "--steps", "2"]) == 0
    assert "per-frame FID" in capsys.readouterr().out
