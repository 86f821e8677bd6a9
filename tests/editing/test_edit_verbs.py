"""The editing verbs through the CLI and the API: reproducible PNGs, exact paste-back in the
written files, and one-line errors for bad images, masks and options."""

import numpy as np
import pytest
from PIL import Image
from reliability_helpers import error_line, run_cli

from ldmkit import api
from ldmkit.data.images import read_png_params, write_png


@pytest.fixture
def files(tmp_path):
    g = np.random.default_rng(0)
    Image.fromarray(g.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[3:9, 5:13] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize(
    "verb, args",
    [
        ("inpaint", ["--image", "in.png", "--mask", "mask.png", "--mask-blur", "1"]),
        ("img2img", ["--image", "in.png", "--strength", "0.5", "--class", "c1"]),
        ("interpolate", ["--seeds", "3,4", "--frames", "3"]),
        ("interpolate", ["--class", "c0,c2", "--frames", "3"]),
        ("denoise", ["--image", "in.png", "--noise-std", "0.1"]),
        ("invert", ["--image", "in.png"]),
    ],
)
def test_from_png_reproduces_an_edit_bit_for_bit(run_dir, files, capsys, monkeypatch, verb, args):
    monkeypatch.chdir(files)
    rc, out, err = run_cli(
        capsys, verb, "--run", str(run_dir), "--steps", "3", "--out", "a.png", *args
    )
    assert rc == 0, err
    params = read_png_params(files / "a.png")
    assert params["method"] == verb and params["weights"] and "UNet calls" in out
    rc, _, err = run_cli(capsys, verb, "--from-png", "a.png", "--out", "b.png")
    assert rc == 0, err
    assert (files / "a.png").read_bytes() == (files / "b.png").read_bytes()


def test_written_inpainting_keeps_unmasked_pixels_and_a_black_mask_keeps_all(
    run_dir, files, capsys
):
    rc, _, err = run_cli(capsys, "inpaint", "--run", str(run_dir), "--image", str(files / "in.png"),
                         "--mask", str(files / "mask.png"), "--steps", "2", "--out", str(files / "o.png"))  # fmt: skip
    assert rc == 0, err
    src, out = pixels(files / "in.png"), pixels(files / "o.png")
    keep = np.asarray(Image.open(files / "mask.png")) == 0
    assert (src[keep] == out[keep]).all() and not (src[~keep] == out[~keep]).all()
    Image.new("L", (16, 16), 0).save(files / "black.png")
    rc, out_text, err = run_cli(capsys, "inpaint", "--run", str(run_dir), "--image", str(files / "in.png"),
                                "--mask", str(files / "black.png"), "--out", str(files / "same.png"))  # fmt: skip
    assert rc == 0 and "all black" in out_text and "(0 UNet calls)" in out_text
    assert (pixels(files / "same.png") == src).all()


def test_from_png_refuses_changed_inputs_and_foreign_pngs(run_dir, files, capsys):
    argv = ["inpaint", "--run", str(run_dir), "--image", str(files / "in.png"), "--mask",
            str(files / "mask.png"), "--steps", "2", "--out", str(files / "a.png")]  # fmt: skip
    assert run_cli(capsys, *argv)[0] == 0
    rc, _, err = run_cli(
        capsys, "img2img", "--from-png", str(files / "a.png"), "--out", str(files / "b.png")
    )
    assert rc == 2 and "written by `ldmkit inpaint`; run `ldmkit inpaint --from-png" in error_line(
        err
    )
    Image.new("L", (16, 16), 255).save(files / "mask.png")
    rc, _, err = run_cli(
        capsys, "inpaint", "--from-png", str(files / "a.png"), "--out", str(files / "b.png")
    )
    assert rc == 2 and "input mask" in error_line(err) and "changed" in error_line(err)
    rc, _, err = run_cli(
        capsys, "inpaint", "--from-png", str(files / "in.png"), "--out", str(files / "b.png")
    )
    assert rc == 2 and "carries no ldmkit parameters" in error_line(err)
    rc, _, err = run_cli(
        capsys, "img2img", "--from-png", str(files / "a.png"), "--out", str(files / "b.png")
    )
    # the verb is checked first: the mask changed since, yet the error names the verb to run
    line = error_line(err)
    assert rc == 2 and "was written by `ldmkit inpaint`; run `ldmkit inpaint --from-png" in line
    assert "input mask" not in line


def test_from_png_refuses_a_retrained_run(run_dir, files, capsys, tmp_path):
    import shutil

    run = shutil.copytree(run_dir, tmp_path / "copy")
    argv = ["img2img", "--run", str(run), "--image", str(files / "in.png"), "--steps", "2",
            "--strength", "1", "--out", str(files / "a.png")]  # fmt: skip
    assert run_cli(capsys, *argv)[0] == 0
    unet = run / "unet" / "model.safetensors"
    unet.write_bytes(unet.read_bytes()[:-4] + b"\0\0\0\0")
    rc, _, err = run_cli(
        capsys, "img2img", "--from-png", str(files / "a.png"), "--out", str(files / "b.png")
    )
    assert rc == 2 and "other weights now" in error_line(err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inpaint", "--image", "in.png"], "inpaint needs --mask"),
        (["inpaint", "--image", "in.png", "--mask", "small.png"], "the mask is 8x8 but 16x16 is needed"),
        (["img2img", "--image", "big.png"], "the image is 20x16 but 16x16 is needed"),
        (["inpaint", "--image", "tall.png", "--mask", "mask.png"], "the image is 8x20 but 16x16 is needed"),
        (["img2img", "--image", "in.png", "--strength", "0.01"], "leaves no step"),
        (["img2img", "--image", "in.png", "--strength", "0"], "--strength"),
        (["img2img", "--image", "nothere.png"], "no such file"),
        (["img2img", "--image", "notimage.png"], "not an image file"),
        (["img2img", "--image", "in.png", "--mask", "mask.png"], "unrecognized arguments"),
        (["img2img", "--image", "in.png", "--prompt", "a cat"], "no text conditioning"),
        (["img2img", "--image", "in.png", "--class", "nope"], "unknown class 'nope'"),
        (["img2img", "--image", "in.png", "--out", "x.jpg"], "edits are written as PNG"),
        (["interpolate", "--seeds", "1"], "--seeds takes two seeds"),
        (["interpolate", "--image", "in.png"], "needs two"),
        (["interpolate", "--seeds", "1,2", "--class", "c0,c1"], "exactly one kind"),
        (["inpaint", "--image", "in.png", "--mask", "mask.png", "--sampler", "dpm++2m",
          "--repaint-resample", "2"], "use --sampler ddpm or ddim"),
        (["denoise"], "denoise needs --image"),
        (["fill", "--image", "in.png", "--hole-colour", "300,0,0"], "--hole-colour"),
    ],
)  # fmt: skip
def test_bad_edits_get_one_line(run_dir, files, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(files)
    Image.new("L", (8, 8)).save("small.png")
    Image.new("RGB", (20, 16)).save("big.png")
    Image.new("RGB", (8, 20)).save("tall.png")
    (files / "notimage.png").write_text("hello")
    out = [] if "--out" in argv else ["--out", "o.png"]
    rc, _, err = run_cli(capsys, argv[0], "--run", str(run_dir), "--steps", "2", *argv[1:], *out)
    assert rc == 2
    assert message in error_line(err) if "unrecognized" not in message else message in err


def test_resize_fits_other_sizes_and_conversions_are_stated(run_dir, files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    Image.new("L", (32, 32), 90).save("grey.png")
    Image.new("RGB", (32, 32), (255, 255, 255)).save("colourmask.png")
    rc, out, err = run_cli(capsys, "inpaint", "--run", str(run_dir), "--image", "grey.png", "--mask",
                           "colourmask.png", "--resize", "--steps", "2", "--out", "o.png")  # fmt: skip
    assert rc == 0, err
    assert "converted to RGB" in out and "resized from 32x32 to 16x16" in out
    assert "read as grey" in out and Image.open("o.png").size == (16, 16)


def test_png_params_round_trip_and_api_edit_equals_the_cli(run_dir, files, capsys):
    import torch

    buf = files / "p.png"
    write_png(torch.zeros(1, 3, 4, 4), buf, {"method": "x", "nested": {"a": [1, 2]}})
    assert read_png_params(buf) == {"method": "x", "nested": {"a": [1, 2]}}
    result = api.edit("img2img", run_dir, image=files / "in.png", strength=0.5, steps=2, seed=1)
    api.save_edit(result, files / "api.png")
    rc, _, _ = run_cli(capsys, "img2img", "--run", str(run_dir), "--image", str(files / "in.png"),
                       "--strength", "0.5", "--steps", "2", "--seed", "1", "--out", str(files / "cli.png"))  # fmt: skip
    assert rc == 0 and (pixels(files / "api.png") == pixels(files / "cli.png")).all()


def test_an_image_larger_than_the_model_is_inpainted_crop_by_crop(run_dir, tmp_path, capsys):
    g = np.random.default_rng(1)
    big = g.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    mask = np.zeros((24, 40), np.uint8)
    mask[2:5, 3:37] = 255  # a long scratch across several crops
    Image.fromarray(mask).save(tmp_path / "scratch.png")
    rc, out, err = run_cli(capsys, "inpaint", "--run", str(run_dir), "--image", str(tmp_path / "big.png"),
                           "--mask", str(tmp_path / "scratch.png"), "--steps", "2", "--out", str(tmp_path / "o.png"))  # fmt: skip
    assert rc == 0, err
    assert "the image is 40x24: inpainted in" in out
    result = pixels(tmp_path / "o.png")
    keep = mask == 0
    assert result.shape == big.shape and (result[keep] == big[keep]).all()
    assert not (result[~keep] == big[~keep]).all()
    rc, _, err = run_cli(
        capsys, "inpaint", "--from-png", str(tmp_path / "o.png"), "--out", str(tmp_path / "p.png")
    )
    assert rc == 0 and (tmp_path / "o.png").read_bytes() == (tmp_path / "p.png").read_bytes()
