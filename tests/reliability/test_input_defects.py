"""The input defects of issue 24, found by trying ldmkit as a new user would, each tested as a
class over every verb, flag or endpoint where it can arise: an image whose header claims a huge
size, an output that is one of the inputs, names the file system cannot hold (CLI paths and the
web page's run names), and raw Python messages (`int()`'s, `[Errno 2] ...`, a BytesIO's repr,
two range texts for one flag). docs/errors.md has a row per class naming its test here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from reliability_helpers import error_line, make_run, run_cli, snapshot
from test_input_classes import EDIT_VERBS, VERBS, base_argv, subparser

from ldmkit import api
from ldmkit.data.images import ImageTooLargeError, image_size, read_image

RAW = ("Traceback", "[Errno", "<_io.", "object at 0x", "invalid literal", "Warning:")
IMAGE_FLAGS = ("--image", "--mask", "--image-b", "--from-png")  # the flags that read an image


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("defects") / "run")


def no_raw_text(line: str) -> str:
    """A user-facing line with none of Python's own texts in it."""
    for raw in RAW:
        assert raw not in line, line
    return line


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGB pixels, with (almost) no data: a
    decompression bomb as an attacker sends it, a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))  # fmt: skip


def inputs(tmp: Path) -> dict[str, Path]:
    """A 16x16 image, a second one and a box mask (the tiny run's size)."""
    files = {"image": tmp / "in.png", "image_b": tmp / "in-b.png", "mask": tmp / "mask.png"}
    Image.new("RGB", (16, 16), (200, 30, 30)).save(files["image"])
    Image.new("RGB", (16, 16), (30, 30, 200)).save(files["image_b"])
    m = Image.new("L", (16, 16), 0)
    m.paste(255, (4, 4, 12, 12))
    m.save(files["mask"])
    return files


def edit_argv(verb: str, run: Path, files: dict[str, Path], out: Path, **given: Path) -> list[str]:
    """A valid, quick command of an edit verb reading `files`, with `given` flags replaced."""
    use = {"image": files["image"], "mask": files["mask"], "image_b": files["image_b"], **given}
    takes = {"inpaint": ("image", "mask"), "fill": ("image", "mask"), "img2img": ("image",),
             "invert": ("image",), "denoise": ("image",),
             "interpolate": ("image", "image_b")}[verb]  # fmt: skip
    argv = [verb, "--run", str(run), "--steps", "2", "--out", str(out)]
    for name in takes:
        argv += ["--" + name.replace("_", "-"), str(use[name])]
    return argv


def edit_png(run: Path, files: dict[str, Path], verb: str, out: Path) -> Path:
    """An output PNG of `verb` (its parameters name its inputs), for --from-png."""
    takes = {"inpaint": {"image", "mask"}, "fill": {"image", "mask"}, "interpolate":
             {"image", "image_b"}}.get(verb, {"image"})  # fmt: skip
    result = api.edit(verb, run, steps=2, **{k: v for k, v in files.items() if k in takes})
    api.save_edit(result, out)
    return out


def image_flag_cases() -> list[tuple[str, str]]:
    """(verb, flag) for every flag of every verb that reads an image or mask: a new verb or flag
    joins by itself."""
    cases = []
    for verb in VERBS:
        for action in subparser(verb)._actions:
            cases += [(verb, f) for f in action.option_strings if f in IMAGE_FLAGS]
    assert {v for v, _ in cases} == set(EDIT_VERBS), cases
    return cases


# ------------------------------------------------------------------ 1. decompression bombs
BOMBS = {  # Pillow refuses over 2x MAX_IMAGE_PIXELS itself and only warns between 1x and 2x
    "over twice the limit": (30000, 30000, "900000000 pixels"),
    "between the limit and twice it": (12000, 12000, "12000x12000 = 144000000 pixels"),
}


@pytest.mark.parametrize("bomb", list(BOMBS))
@pytest.mark.parametrize("verb, flag", image_flag_cases())
def test_a_decompression_bomb_is_one_line_in_every_reader(run_dir, tmp_path, capsys, verb, flag,
                                                          bomb):  # fmt: skip
    """Every flag that reads an image (--image, --mask, --image-b, --from-png of every editing
    verb) refuses an image whose header claims too many pixels with one line naming the file
    and the limit: no DecompressionBombError traceback, no Pillow warning, nothing written."""
    files = inputs(tmp_path)
    width, height, pixels = BOMBS[bomb]
    bad = tmp_path / "bomb.png"
    bad.write_bytes(png_header(width, height))
    out = tmp_path / "out" / "o.png"
    if flag == "--from-png":
        argv = [verb, "--from-png", str(bad), "--out", str(out)]
    else:
        argv = edit_argv(verb, run_dir, files, out, **{flag[2:].replace("-", "_"): bad})
    before = snapshot(tmp_path)
    rc, _, err = run_cli(capsys, *argv)
    line = no_raw_text(error_line(err))
    assert rc == 2, err
    assert line == (
        f"ldmkit: error: {bad} is {pixels}, over the limit of {Image.MAX_IMAGE_PIXELS} pixels (a "
        "decompression-bomb guard); use a smaller image"
    ), line
    assert "DecompressionBomb" not in err, err
    assert snapshot(tmp_path) == before and not out.exists()


def test_the_one_reader_refuses_bombs_for_paths_and_bytes(tmp_path):
    """data.images is the one door: the same refusal for a path, bytes, and a lower limit."""
    bad = tmp_path / "bomb.png"
    bad.write_bytes(png_header(30000, 30000))
    for source in (bad, str(bad), io.BytesIO(bad.read_bytes())):
        with pytest.raises(ImageTooLargeError, match=r"is 900000000 pixels, over the limit"):
            read_image(source)
    with pytest.raises(ImageTooLargeError, match=r"^the mask is 20x10 = 200 pixels, over the "
                       r"limit of 100 pixels"):  # fmt: skip
        image_size(io.BytesIO(png_header(20, 10)), "mask", limit=100)


# ------------------------------------------------------------------ 2. output = an input
def spellings(path: Path, tmp: Path) -> dict[str, Path]:
    """Other names of the same file: a symbolic link, a hard link, `..` and a relative path."""
    link, hard = tmp / "link.png", tmp / "hard.png"
    link.unlink(missing_ok=True)
    hard.unlink(missing_ok=True)
    os.symlink(path, link)
    os.link(path, hard)
    rel = Path(os.path.relpath(path))
    return {"same": path, "symlink": link, "hard link": hard,
            "dotdot": path.parent / ".." / path.parent.name / path.name, "relative": rel}  # fmt: skip


@pytest.mark.parametrize("spelling", ["same", "symlink", "hard link", "dotdot", "relative"])
@pytest.mark.parametrize("verb, flag", image_flag_cases())
def test_an_output_that_is_an_input_is_refused(run_dir, tmp_path, capsys, verb, flag, spelling):
    """--out equal to any file the verb reads (--image, --mask, --image-b, --from-png and the
    inputs the PNG records), under any name of it, is refused before anything runs: one line
    naming both, exit code 2, and the input unchanged."""
    files = inputs(tmp_path)
    if flag == "--from-png":
        target = edit_png(run_dir, files, verb, tmp_path / "earlier.png")
    else:
        target = files[flag[2:].replace("-", "_")]
    out = spellings(target, tmp_path)[spelling]
    if flag == "--from-png":
        argv = [verb, "--from-png", str(target), "--out", str(out)]
    else:
        argv = edit_argv(verb, run_dir, files, out)
    before = snapshot(tmp_path)
    rc, _, err = run_cli(capsys, *argv)
    line = no_raw_text(error_line(err))
    assert rc == 2, err
    assert line == (
        f"ldmkit: error: --out {out} is the {flag} file {target}; ldmkit would overwrite what it "
        "reads: choose another --out file"
    ), line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("verb", EDIT_VERBS)
def test_from_png_refuses_an_output_over_an_input_it_records(run_dir, tmp_path, capsys, verb):
    """--from-png: --out equal to one of the inputs the PNG names is refused too."""
    files = inputs(tmp_path)
    png = edit_png(run_dir, files, verb, tmp_path / "earlier.png")
    recorded = api.recorded_inputs(json.loads(Image.open(png).text["ldmkit"]))
    assert recorded, png
    before = snapshot(tmp_path)
    for flag, path in recorded.items():
        rc, _, err = run_cli(capsys, verb, "--from-png", str(png), "--out", path)
        assert rc == 2, err
        assert error_line(err) == (
            f"ldmkit: error: --out {path} is the {flag} file {path}; ldmkit would overwrite what "
            "it reads: choose another --out file"
        )
    assert snapshot(tmp_path) == before


def test_the_other_files_an_edit_writes_are_checked_too(run_dir, tmp_path, capsys):
    """invert also writes out.noise.safetensors, interpolate out.gif: neither may be an input."""
    files = inputs(tmp_path)
    noise = tmp_path / "x.noise.safetensors"
    noise.write_bytes(files["image"].read_bytes())  # an image under that name
    before = snapshot(tmp_path)
    rc, _, err = run_cli(capsys, "invert", "--run", str(run_dir), "--steps", "2", "--image",
                         str(noise), "--out", str(tmp_path / "x.png"))  # fmt: skip
    assert rc == 2 and error_line(err) == (
        f"ldmkit: error: --out {tmp_path / 'x.png'} also writes x.noise.safetensors, over the "
        f"--image file {noise}; ldmkit would overwrite what it reads: choose another --out file"
    ), err
    assert snapshot(tmp_path) == before


def test_sample_and_report_refuse_an_output_over_the_runs_files_or_prompts(run_dir, tmp_path,
                                                                           capsys):  # fmt: skip
    """A verb that reads a run may not write over its files or into its model folders, and
    sample may not write its grid over its --prompts file."""
    prompts = tmp_path / "prompts.png"  # a text file whose name Pillow could write
    prompts.write_text("a red square\n")
    before, run_before = snapshot(tmp_path), snapshot(run_dir)
    cases = [
        (["report", "--run", str(run_dir), "--out", str(run_dir / "run.json")],
         f"--out {run_dir / 'run.json'} is the --run file {run_dir / 'run.json'}; ldmkit would "
         "overwrite what it reads: choose another --out file"),
        (["report", "--run", str(run_dir), "--out", str(run_dir / "unet" / "model.safetensors")],
         f"--out {run_dir / 'unet' / 'model.safetensors'} is inside the --run folder "
         f"{run_dir / 'unet'}; ldmkit would write into what it reads"),
        (["sample", "--run", str(run_dir), "--out", str(run_dir / "vae" / "g.png")],
         f"--out {run_dir / 'vae' / 'g.png'} is inside the --run folder {run_dir / 'vae'}; "
         "ldmkit would write into what it reads: choose an --out outside it"),
        (["sample", "--run", str(run_dir), "--prompt", "x", "--prompts", str(prompts), "--out",
          str(prompts)],
         f"--out {prompts} is the --prompts file {prompts}; ldmkit would overwrite what it reads"),
        (["inpaint", "--run", str(run_dir), "--image", str(tmp_path / "a.png"), "--mask",
          str(tmp_path / "m.png"), "--out", str(run_dir / "unet" / "x.png")],
         f"--out {run_dir / 'unet' / 'x.png'} is inside the --run folder {run_dir / 'unet'}"),
    ]  # fmt: skip
    for argv, message in cases:
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and error_line(err).startswith(f"ldmkit: error: {message}"), (argv, err)
    assert snapshot(tmp_path) == before and snapshot(run_dir) == run_before


def test_save_edit_refuses_an_input_from_python_too(run_dir, tmp_path):
    """The check lives in the api (save_edit), not only in the CLI."""
    files = inputs(tmp_path)
    result = api.edit("img2img", run_dir, image=files["image"], steps=2)
    before = sha(files["image"])
    with pytest.raises(ValueError, match=r"--out .*in.png is the --image file .*in.png; ldmkit "
                       r"would overwrite what it reads"):  # fmt: skip
        api.save_edit(result, files["image"])
    assert sha(files["image"]) == before


# ------------------------------------------------------------------ 3. names too long
def path_flag_cases() -> list[tuple[str, str]]:
    """(verb, flag) for every flag of every verb that takes a file or folder."""
    paths = {"--out", "--outdir", "--run", "--runs", "--data", "--config", "--prompts", "--ref",
             "--held-out", "--from-diffusers", "--to-diffusers", "--vae", "--scheduler",
             "--data-root", "--train-config",
             *IMAGE_FLAGS}  # fmt: skip
    return [(verb, a.option_strings[-1]) for verb in VERBS for a in subparser(verb)._actions
            if a.option_strings and a.option_strings[-1] in paths]  # fmt: skip


@pytest.mark.parametrize("verb, flag", path_flag_cases())
def test_a_name_too_long_for_the_file_system_is_one_line(run_dir, tmp_path, capsys, verb, flag):
    """A path with a name of 300 characters, in any path flag of any verb: one line naming the
    flag and the limit (no OSError "File name too long" traceback), nothing written."""
    long = tmp_path / ("a" * 300 + ".png")
    argv = base_argv(verb, run_dir, tmp_path)
    if verb == "convert" and flag in ("--from-diffusers", "--vae", "--scheduler"):
        argv = ["convert", "--from-diffusers", str(tmp_path / "d"), "--out", str(tmp_path / "c")]
    if verb == "convert" and flag == "--to-diffusers":
        argv = ["convert", "--out", str(tmp_path / "c")]
    before = snapshot(tmp_path)
    rc, _, err = run_cli(capsys, *argv, flag, str(long))
    line = no_raw_text(error_line(err))
    assert rc == 2, err
    assert line.startswith(f"ldmkit: error: {flag}: the name 'aaaaaaaa"), line
    assert line.endswith("is longer than the file system's limit of 255 bytes for a file or "
                         "folder name; choose a shorter one"), line  # fmt: skip
    assert snapshot(tmp_path) == before


def test_a_path_too_long_and_a_nul_are_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^--out '/x/x/x.*\.\.\. \(6002 characters\) is longer "
                       r"than the file system's limit of 4096 bytes for a path"):  # fmt: skip
        api.check_path("--out", "/x" * 3000 + "/o")
    with pytest.raises(ValueError, match=r"^--image 'a\\x00b' holds a NUL character"):
        api.check_path("--image", "a\0b")


# ------------------------------------------------------------------ 4. raw Python messages
@pytest.mark.parametrize("value", ["red", "300,0,0", "1,2", "255,,255", "2.5", "-1"])
def test_hole_colour_that_is_no_colour(run_dir, tmp_path, capsys, value):
    files = inputs(tmp_path)
    before = snapshot(tmp_path)
    rc, _, err = run_cli(capsys, *edit_argv("fill", run_dir, files, tmp_path / "o.png"),
                         "--hole-colour", value)  # fmt: skip
    assert rc == 2 and no_raw_text(error_line(err)) == (
        "ldmkit: error: --hole-colour takes 1 or 3 whole numbers in 0..255 (e.g. 255,255,255 "
        f"for white), got {value!r}"
    ), err
    assert snapshot(tmp_path) == before


def test_hole_colour_as_text_or_list_from_python(run_dir, tmp_path):
    files = inputs(tmp_path)
    a = api.edit("fill", run_dir, image=files["image"], steps=2, hole_colour="200, 30, 30")
    b = api.edit("fill", run_dir, image=files["image"], steps=2, hole_colour=[200, 30, 30])
    assert a.params["options"]["hole_colour"] == [200, 30, 30] and a.images.equal(b.images)


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan", "abc"])
def test_strength_says_one_range(run_dir, tmp_path, capsys, value):
    """One range text, (0, 1], for every refused strength (it said (0, 1] for 0 and [0, 1] for
    -0.5)."""
    files = inputs(tmp_path)
    rc, _, err = run_cli(capsys, *edit_argv("img2img", run_dir, files, tmp_path / "o.png"),
                         "--strength", value)  # fmt: skip
    shown = repr(float(value)) if value not in ("0", "abc") else repr(0 if value == "0" else value)
    assert rc == 2 and error_line(err) == (
        f"ldmkit: error: --strength must be a finite number in (0, 1], got {shown}"
    ), err


@pytest.mark.parametrize("verb", [*EDIT_VERBS, "sample", "report"])
def test_an_output_in_a_folder_that_does_not_exist_is_created(run_dir, tmp_path, capsys, verb):
    """Every verb that writes a file creates its missing folders (as train, --outdir and
    eval do), instead of failing on a temporary file the user never named."""
    files = inputs(tmp_path)
    out = tmp_path / "new" / "deeper" / ("r.html" if verb == "report" else "o.png")
    if verb in EDIT_VERBS:
        argv = edit_argv(verb, run_dir, files, out)
    else:
        argv = [a if a != str(tmp_path / ("r.html" if verb == "report" else "g.png")) else str(out)
                for a in base_argv(verb, run_dir, tmp_path)]  # fmt: skip
    rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert out.is_file() and not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert "Errno" not in err


def test_an_os_error_reaching_the_cli_is_said_in_words(run_dir, tmp_path, capsys, monkeypatch):
    """A file system error the checks could not foresee (here: a permission error while the
    PNG is written) is one line in words, not Python's "[Errno 13] ..."."""
    from ldmkit.data import images

    def refuse(path, write):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images, "atomic_write", refuse)
    files = inputs(tmp_path)
    out = tmp_path / "o.png"
    rc, _, err = run_cli(capsys, *edit_argv("img2img", run_dir, files, out))
    assert rc == 2 and no_raw_text(error_line(err)) == (
        f"ldmkit: error: cannot use {out}: permission denied; check the path and try again"
    ), err
