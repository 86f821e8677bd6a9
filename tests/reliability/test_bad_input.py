"""Every bad input of issue 8 through the CLI: one `ldmkit: error:` line that names the problem and
the fix, exit code 2, no traceback, and nothing overwritten. docs/errors.md lists them all.

Bad image *files* inside a usable folder (zero-byte, truncated, non-image, odd modes, small
images, decompression bombs) are skipped or converted by the data loader; their per-file tests
live in tests/data/test_folder.py. Here they are fed through the CLI where they are fatal.
"""

from __future__ import annotations

import json
import os
import re
import struct

import pytest
from PIL import Image
from reliability_helpers import TINY, error_line, make_run, make_text_run, run_cli, snapshot, tiny

from ldmkit.training.state import RunLock


def expect_error(capsys, pattern: str, *argv: str) -> str:
    rc, _, err = run_cli(capsys, *argv)
    line = error_line(err)
    assert rc == 2, (rc, err)
    assert re.search(pattern, line), line
    return line


def train(tmp_path, *extra: str) -> list[str]:
    # tiny(1): should a case wrongly pass validation, it fails its test fast instead of training
    return ["train", "--out", str(tmp_path / "out"), *tiny(1), *extra]


# ------------------------------------------------------------------------------------ data
def test_missing_data_folder(tmp_path, capsys):
    expect_error(capsys, r"data folder .*nope does not exist; give a folder of images",
                 *train(tmp_path, "--data", str(tmp_path / "nope")))  # fmt: skip


def test_empty_data_folder(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    expect_error(capsys, r"data folder .*d is empty; put images \(png/jpg",
                 *train(tmp_path, "--data", str(tmp_path / "d")))  # fmt: skip


def test_folder_with_no_images_but_other_files(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("hello")
    (tmp_path / "d" / "table.csv").write_text("1,2")
    expect_error(capsys, r"no images \(png/jpg.*\) in .*d: found 2 other file\(s\) such as",
                 *train(tmp_path, "--data", str(tmp_path / "d")))  # fmt: skip


def _png_bytes(tmp_path, size=(64, 64)) -> bytes:
    Image.new("RGB", size, (1, 2, 3)).save(tmp_path / "src.png")
    return (tmp_path / "src.png").read_bytes()


def test_folder_of_only_broken_image_files(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "empty.png").write_bytes(b"")  # zero-byte
    (d / "notes.jpg").write_text("this is not an image")  # non-image with an image extension
    (d / "trunc.png").write_bytes(_png_bytes(tmp_path)[:100])  # truncated
    expect_error(capsys, r"none of the 3 image files .* could be read",
                 *train(tmp_path, "--data", str(d)))  # fmt: skip


def test_decompression_bomb(tmp_path, capsys, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    Image.new("RGB", (40, 40)).save(d / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # a 40x40 image is a "bomb" here
    line = expect_error(capsys, r"none of the 1 image files .* could be read",
                        *train(tmp_path, "--data", str(d)))  # fmt: skip
    assert not (tmp_path / "out" / "run.json").exists(), line


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "setting, pattern",
    [
        ("unet_train.stepz=3", r"unknown key 'stepz' in RunConfig.unet_train; known keys: .*steps"),
        ("unet_train.steps=abc", r"RunConfig.unet_train.steps must be an integer, got 'abc'"),
        ("vae.block_out_channels=8", r"RunConfig.vae.block_out_channels must be a list, got 8"),
        ("unet_train.steps=-3", r"steps must be a whole number >= 1, got -3"),
        ("unet_train.lr=0", r"lr must be a finite number in \(0, 1\], got 0"),
        ("unet.attention_resolutions=[3]",
         r"attention resolution 3 is not a resolution the UNet reaches; it reaches 8, 4"),
        ("unet.norm_num_groups=3", r"norm_num_groups=3 does not divide block channel count 8"),
        ("conditioning=image", r"RunConfig.conditioning must be one of 'auto', 'none', 'class', 'text'"),
        ("foo", r"--set expects KEY=VALUE \(e.g. unet_train.lr=1e-3\), got 'foo'"),
    ],
)  # fmt: skip
def test_bad_config_setting(tmp_path, capsys, setting, pattern):
    expect_error(capsys, pattern, *train(tmp_path, "--set", setting))
    assert not (tmp_path / "out" / "run.json").exists()


def test_image_size_not_a_multiple_of_the_downsampling_factor(tmp_path, capsys):
    # the default f2 autoencoder (2 levels): 31 px cannot be halved
    expect_error(capsys, r"image_size 31 is not a multiple of the downsampling factor 2; use 30 or 32",
                 "train", "--out", str(tmp_path / "out"), "--image-size", "31")  # fmt: skip


def test_latent_size_not_a_multiple_of_the_unet_factor(tmp_path, capsys):
    # 20 px -> 10x10 latents with f2, but a 3-level UNet needs a multiple of 4
    expect_error(capsys, r"sample_size 10 is not divisible by 2\*\*\(levels-1\) = 4; use a multiple",
                 "train", "--out", str(tmp_path / "out"), "--image-size", "20")  # fmt: skip


def test_config_file_unknown_key_and_wrong_type(tmp_path, capsys):
    (tmp_path / "a.toml").write_text("seed = 1\n[unet_train]\nlearning_rate = 1e-3\n")
    expect_error(capsys, r"unknown key 'learning_rate' in RunConfig.unet_train; known keys: .*lr",
                 *train(tmp_path, "--config", str(tmp_path / "a.toml")))  # fmt: skip
    (tmp_path / "b.json").write_text(json.dumps({"vae_train": {"warmup_steps": "10"}}))
    expect_error(capsys, r"RunConfig.vae_train.warmup_steps must be an integer, got '10'",
                 *train(tmp_path, "--config", str(tmp_path / "b.json")))  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps({"diffusion": {"num_timesteps": 1}}))
    expect_error(capsys, r"num_timesteps must be a whole number from 2 to 100000, got 1",
                 *train(tmp_path, "--config", str(tmp_path / "c.json")))  # fmt: skip


def test_config_file_unreadable(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("seed = = 1\n")
    expect_error(
        capsys,
        r"bad.toml is not valid TOML",
        *train(tmp_path, "--config", str(tmp_path / "bad.toml")),
    )
    (tmp_path / "cfg.yaml").write_text("seed: 1\n")
    expect_error(
        capsys,
        r"cfg.yaml must end in .toml or .json",
        *train(tmp_path, "--config", str(tmp_path / "cfg.yaml")),
    )
    expect_error(capsys, r"config file .*none.toml does not exist",
                 *train(tmp_path, "--config", str(tmp_path / "none.toml")))  # fmt: skip


def test_bad_duration_and_device(tmp_path, capsys):
    expect_error(capsys, r"cannot read the duration '10x'; write e.g. 90s, 10m or 1h30m",
                 *train(tmp_path, "--time-budget", "10x"))  # fmt: skip
    expect_error(capsys, r"unknown device 'gpu0'; use auto, cpu, cuda",
                 *train(tmp_path, "--device", "gpu0"))  # fmt: skip


# ------------------------------------------------------------------------------------ run folders
def test_sample_missing_run_folder(tmp_path, capsys):
    expect_error(capsys, r"run folder .*nope does not exist; train one with `ldmkit train --out",
                 "sample", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "g.png"))  # fmt: skip


@pytest.mark.parametrize(
    "missing, pattern",
    [
        ("unet/model.safetensors", r"has no trained unet .*is missing\); finish or resume the training"),
        ("vae/model.safetensors", r"has no trained vae .*is missing\); finish or resume the training"),
        ("run.json", r"run.json is missing; is this the right folder\?"),
        ("unet/config.json", r"unet/config.json is missing; is this the right folder\?"),
    ],
)  # fmt: skip
def test_sample_run_folder_missing_a_file(tmp_path, capsys, missing, pattern):
    run = make_run(tmp_path / "run")
    (run / missing).unlink()
    before = snapshot(run)
    expect_error(
        capsys, pattern, "sample", "--run", str(run), "--n", "2", "--out", str(tmp_path / "g.png")
    )
    assert snapshot(run) == before and not (tmp_path / "g.png").exists()


def _tamper_header(path, new_end: int) -> None:
    """Rewrite a safetensors header so its first tensor claims to end at `new_end`."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] = new_end
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


@pytest.mark.parametrize("damage", ["truncated", "header lies about sizes", "garbage"])
def test_sample_corrupt_safetensors(tmp_path, capsys, damage):
    run = make_run(tmp_path / "run")
    w = run / "unet" / "model.safetensors"
    if damage == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "garbage":
        w.write_bytes(b"\x00" * 100)
    else:
        _tamper_header(w, 10**9)
    before = snapshot(run)
    expect_error(capsys, r"unet/model.safetensors is not a valid safetensors file .*truncated or corrupt",
                 "sample", "--run", str(run), "--n", "2", "--out", str(tmp_path / "g.png"))  # fmt: skip
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "channels, pattern",
    [
        ((16, 32), r"tensor .* has shape .* but the config gives .*; the weights were saved from a different config"),
        ((8, 8), r"does not match the model config: missing .*; was it saved from a different config\?"),
    ],
)  # fmt: skip
def test_sample_weights_from_a_different_config(tmp_path, capsys, channels, pattern):
    run = make_run(tmp_path / "run")
    other = make_run(tmp_path / "other", unet_channels=channels)
    (run / "unet" / "model.safetensors").write_bytes(
        (other / "unet" / "model.safetensors").read_bytes()
    )
    expect_error(capsys, r"unet/model.safetensors.*" + pattern,
                 "sample", "--run", str(run), "--n", "2", "--out", str(tmp_path / "g.png"))  # fmt: skip


def test_resume_with_a_different_config(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    before = snapshot(run)
    expect_error(capsys, r"--resume: unet.block_out_channels = \[16, 32\] differs from the run's saved \[8, 16\].*drop the setting",
                 "train", "--out", str(run), "--resume", "--set", "unet.block_out_channels=[16,32]")  # fmt: skip
    assert snapshot(run) == before


def test_resume_on_data_that_changed(tmp_path, capsys):
    run = make_run(tmp_path / "run", num_classes=3)  # its data, builtin:shapes, has 5 classes
    before = snapshot(run)
    expect_error(capsys, r"--resume: the data builtin:shapes\?n=64 has 5 classes but the run was trained with 3; resume with the same data",
                 "train", "--out", str(run), "--resume", "--quiet")  # fmt: skip
    after = snapshot(run)
    assert all(after[k] == v for k, v in before.items() if k.startswith(("vae/", "unet/")))


def test_resume_from_a_corrupt_checkpoint(tmp_path, capsys):
    run = make_run(tmp_path / "run", num_classes=5)  # as its data
    ckpt = run / "checkpoints" / "diffusion-00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"stage": "diffusion", "step": 2}')
    (ckpt / "modules.safetensors").write_bytes(b"\x08" + b"\x00" * 20)
    before = snapshot(run)
    expect_error(capsys, r"cannot resume: .*modules.safetensors is not a valid safetensors file.*delete .*diffusion-00000002",
                 "train", "--out", str(run), "--resume", "--quiet")  # fmt: skip
    after = snapshot(run)  # run.json/data.json are rewritten on resume; the weights are untouched
    assert all(
        after[k] == v for k, v in before.items() if k.startswith(("vae/", "unet/", "checkpoints/"))
    )


def test_resume_without_checkpoint(tmp_path, capsys):
    expect_error(capsys, r"--resume: .*nope holds no checkpoint to resume from; drop --resume to start anew",
                 "train", "--out", str(tmp_path / "nope"), "--resume")  # fmt: skip
    (tmp_path / "empty").mkdir()
    expect_error(capsys, r"--resume: .*empty holds no checkpoint to resume from; drop --resume",
                 "train", "--out", str(tmp_path / "empty"), "--resume")  # fmt: skip


def test_train_into_an_existing_run_overwrites_nothing(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    before = snapshot(run)
    expect_error(capsys, r"already holds a run; pass --resume to continue it, or choose another --out",
                 "train", "--out", str(run), *TINY)  # fmt: skip
    assert snapshot(run) == before


def test_second_training_on_a_locked_run_folder(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    before = snapshot(run)
    with RunLock(run):  # another training holds the folder
        for extra in ([], ["--resume"]):
            expect_error(capsys, r"another training is already writing to .*run; wait for it to finish or choose another --out",
                         "train", "--out", str(run), *extra)  # fmt: skip
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------ sampling
def test_class_for_an_unconditional_model(tmp_path, capsys):
    run = make_run(tmp_path / "run", num_classes=None)
    expect_error(capsys, r"--class: the model in .* was trained without class labels \(unconditional\); drop --class",
                 "sample", "--run", str(run), "--n", "2", "--class", "1", "--out", str(tmp_path / "g.png"))  # fmt: skip
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize(
    "num_classes, fix",
    [(None, r"drop --prompt$"), (3, r"drop --prompt \(pick a class with --class\)")],
)
def test_prompt_for_a_model_without_text_conditioning(tmp_path, capsys, num_classes, fix):
    run = make_run(tmp_path / "run", num_classes=num_classes)
    expect_error(capsys, r"--prompt: the model in .* has no text conditioning, so it cannot follow a prompt; " + fix,
                 "sample", "--run", str(run), "--n", "2", "--prompt", "a red circle", "--out", str(tmp_path / "g.png"))  # fmt: skip


def test_text_model_needs_a_nonempty_prompt_and_no_class(tmp_path, capsys):
    run = make_text_run(tmp_path / "run")
    out = ["sample", "--run", str(run), "--n", "2", "--out", str(tmp_path / "g.png")]
    expect_error(capsys, r"the model in .* follows text prompts: give --prompt TEXT", *out)
    expect_error(capsys, r"--prompt is empty; describe the image", *out, "--prompt", "  ")
    expect_error(capsys, r"--class: the model in .* follows text prompts, not classes", *out,
                 "--prompt", "a red square", "--class", "1")  # fmt: skip
    (tmp_path / "empty.txt").write_text("\n  \n")
    expect_error(capsys, r"--prompts: .*empty.txt holds no prompt; write one per line", *out,
                 "--prompts", str(tmp_path / "empty.txt"))  # fmt: skip
    assert not (tmp_path / "g.png").exists()


def test_text_model_prompts_with_unknown_words_warn_once_and_sample(tmp_path, capsys, caplog):
    run = make_text_run(tmp_path / "run")
    (tmp_path / "p.txt").write_text("a red square\na purple dog\n")
    rc, out, err = run_cli(capsys, "sample", "--run", str(run), "--n", "4", "--steps", "2",
                           "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "g.png"))  # fmt: skip
    assert rc == 0, err
    assert "one prompt per row" in out and (tmp_path / "g.png").is_file()
    unknown = [r for r in caplog.records if "not in the run's vocabulary" in r.getMessage()]
    assert len(unknown) == 1 and "'purple'" in unknown[0].getMessage()


@pytest.mark.parametrize("damage", ["missing", "garbage", "wrong kind"])
def test_text_run_with_a_broken_tokenizer(tmp_path, capsys, damage):
    run = make_text_run(tmp_path / "run")
    tok = run / "tokenizer.json"
    if damage == "missing":
        tok.unlink()
        pattern = r"tokenizer.json is missing"
    elif damage == "garbage":
        tok.write_text("{not json")
        pattern = r"tokenizer.json is not valid JSON"
    else:
        tok.write_text('{"kind": "sentencepiece", "max_length": 12, "vocab": []}')
        pattern = r"tokenizer.json is not a valid tokenizer \(TokenizerConfig.kind must be one of"
    expect_error(capsys, pattern, "sample", "--run", str(run), "--n", "2", "--prompt", "a red square",
                 "--out", str(tmp_path / "g.png"))  # fmt: skip


def test_unknown_class_name(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    expect_error(capsys, r"unknown class 'dog'; known classes: c0, c1, c2",
                 "sample", "--run", str(run), "--n", "2", "--class", "dog", "--out", str(tmp_path / "g.png"))  # fmt: skip


def test_class_index_out_of_range(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    expect_error(capsys, r"unknown class '3'; known classes: c0, c1, c2",
                 "sample", "--run", str(run), "--n", "2", "--class", "0,3", "--out", str(tmp_path / "g.png"))  # fmt: skip


@pytest.mark.parametrize("flag", ["--n", "--steps", "--batch-size", "--nrow"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_sample_counts_must_be_positive(tmp_path, capsys, flag, value):
    run = make_run(tmp_path / "run")
    expect_error(capsys, rf"{flag} must be a whole number from 1 to \d+, got {value}",
                 "sample", "--run", str(run), "--out", str(tmp_path / "g.png"), flag, value)  # fmt: skip
    assert not (tmp_path / "g.png").exists()


def test_output_path_under_a_file(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    (tmp_path / "f").write_text("keep me")
    for flag, target in (("--out", "f/grid.png"), ("--outdir", "f/imgs"), ("--outdir", "f")):
        expect_error(capsys, r"cannot write to .*f is a file, not a folder; choose another output path",
                     "sample", "--run", str(run), "--n", "2", flag, str(tmp_path / target))  # fmt: skip
    expect_error(capsys, r"cannot write to .*f is a file, not a folder; choose another output path",
                 "train", "--out", str(tmp_path / "f" / "run"), *TINY)  # fmt: skip
    assert (tmp_path / "f").read_text() == "keep me"


def test_output_path_not_writable(tmp_path, capsys, monkeypatch):
    run = make_run(tmp_path / "run")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # root ignores permissions: make the check see what a user would
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda p, m: False if str(p).startswith(str(ro)) else real(p, m)
        )
    try:
        expect_error(capsys, r"cannot write to .*ro: permission denied; choose another output path",
                     "sample", "--run", str(run), "--n", "2", "--out", str(ro / "g.png"))  # fmt: skip
        expect_error(capsys, r"cannot write to .*ro/run: permission denied; choose another output path",
                     "train", "--out", str(ro / "run"), *TINY)  # fmt: skip
    finally:
        ro.chmod(0o700)
    assert list(ro.iterdir()) == []


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, capsys, caplog):
    """A run killed before its first checkpoint has only run.json: --resume starts it over."""
    run = make_run(tmp_path / "run", num_classes=5)
    for part in ("vae", "unet"):
        for f in (run / part).iterdir():
            f.unlink()
    rc, out, err = run_cli(capsys, "train", "--out", str(run), "--resume", *tiny(1))
    assert rc == 0, err
    assert "has no checkpoint yet: starting its training from step 0" in caplog.text
    assert out.startswith("finished: autoencoder 1 steps, diffusion 1 steps")
