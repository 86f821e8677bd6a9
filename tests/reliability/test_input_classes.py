"""Whole classes of bad input (issue 18), each tested as a class over every verb and argument
where it can arise, not by one example: counts and sizes, non-finite numbers (flags and config
fields), non-finite weights and samples, durations, devices, output that overlaps input, labels a
folder has, and long defaults. docs/errors.md has a row per class naming its test here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import types
import typing
from pathlib import Path

import pytest
import torch
from PIL import Image
from reliability_helpers import error_line, make_run, run_cli, snapshot, tiny

from ldmkit import cli
from ldmkit.api import sampling as sampling_api
from ldmkit.checkpoint import CheckpointError, load_tensors, save_tensors
from ldmkit.config import ConfigError
from ldmkit.recipe import RunConfig, parse_duration, resolve_config, run_config_from_dict
from ldmkit.runs import RunFolder, read_data

VERBS = tuple(cli.make_parser()._subparsers._group_actions[0].choices)  # a new verb joins by itself
BAD = ["0", "-1", "nan", "inf", "1e30", "99999999999999999999", "abc"]  # 0 is legal for some
UNREADABLE_TIME = "cannot read the duration"  # the message of a malformed --time-budget
RANGE = r"(from -?\d+ to \d+|>= -?\d|in [\[(][^ ]+, [^ ]+[\])]|above 0)"


@pytest.fixture(autouse=True)
def _quick_domain_classifier(monkeypatch):
    """`ldmkit eval` trains its domain classifier for 10 steps here, not 300: these tests check
    arguments, not features."""
    from ldmkit.evaluation import feature_nets

    monkeypatch.setattr(feature_nets, "DOMAIN_MIN_STEPS", 10)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("classes") / "run")


def subparser(verb: str) -> typing.Any:
    return cli.make_parser()._subparsers._group_actions[0].choices[verb]


def numeric_flags(verb: str) -> list[str]:
    """Every flag of `verb` that takes a number (cli._number) or a duration."""
    return [a.option_strings[0] for a in subparser(verb)._actions
            if a.type is cli._number or a.dest == "time_budget"]  # fmt: skip


def base_argv(verb: str, run: Path, tmp: Path) -> list[str]:
    """A valid, quick command of `verb`: a flag under test is appended (argparse: last wins)."""
    commands = {
        "train": ["train", "--out", str(tmp / "out"), *tiny(1)],
        "sample": ["sample", "--run", str(run), "--n", "2", "--steps", "2", "--out", str(tmp / "g.png")],
        "eval": ["eval", "--run", str(run), "--n", "6", "--steps", "2", "--samplers", "ddim",
                 "--out", str(tmp / "eval")],
        "report": ["report", "--run", str(run), "--steps", "2", "--out", str(tmp / "r.html")],
        "convert": ["convert", "--to-diffusers", str(run), "--out", str(tmp / "diffusers")],
        "serve": ["serve", "--runs", str(run.parent)],  # every value tried for --port is refused
        "synth": ["synth", "--run", str(run), "--per-class", "1", "--steps", "2", "--quiet",
                  "--out", str(tmp / "synth")],
    }  # fmt: skip
    if verb == "distill":  # a teacher with the 5 classes of its data (the shapes)
        teacher = tmp / "teacher5"
        if not teacher.exists():
            make_run(teacher, num_classes=5)
        commands[verb] = ["distill", "--run", str(teacher), "--out", str(tmp / "fast"),
                          "--teacher-steps", "2", "--steps", "1", "--iterations", "1",
                          "--batch-size", "4", "--quiet"]  # fmt: skip
    if verb in EDIT_VERBS:
        image, mask = edit_inputs(tmp)
        extra = {
            "inpaint": ["--image", image, "--mask", mask],
            "fill": ["--image", image],
            "img2img": ["--image", image],
            "invert": ["--image", image],
            "interpolate": ["--seeds", "1,2", "--frames", "2"],
            "denoise": ["--image", image],
        }
        commands[verb] = [verb, "--run", str(run), "--steps", "2", "--out", str(tmp / "e.png"),
                          *extra[verb]]  # fmt: skip
    if verb == "finetune":  # issue 28: LoCon, since make_run's UNet has no attention
        commands[verb] = ["finetune", "--run", str(run), "--data", few_images(tmp), "--name", "new",
                          "--out", str(tmp / "adapter"), "--steps", "2", "--prior-images", "2",
                          "--targets", "attention+conv", "--quiet"]  # fmt: skip
    if verb not in commands:
        pytest.fail(f"a new verb {verb!r}: add a quick valid command of it here")
    return commands[verb]


EDIT_VERBS = ("inpaint", "fill", "img2img", "invert", "interpolate", "denoise")


def edit_inputs(tmp: Path) -> tuple[str, str]:
    """A 16x16 image and a box mask for the editing verbs."""
    image, mask = tmp / "in.png", tmp / "mask.png"
    if not image.exists():
        Image.new("RGB", (16, 16), (200, 30, 30)).save(image)
        m = Image.new("L", (16, 16), 0)
        m.paste(255, (4, 4, 12, 12))
        m.save(mask)
    return str(image), str(mask)


def few_images(tmp: Path) -> str:
    """A folder of three 16x16 images for `finetune`."""
    folder = tmp / "few"
    if not folder.exists():
        folder.mkdir()
        for i in range(3):
            Image.new("RGB", (16, 16), (200, 30 * i, 30)).save(folder / f"{i}.png")
    return str(folder)


def legal(flag: str, value: str) -> bool:
    """The values of BAD that are legal for `flag` (everything else must be refused)."""
    zero_ok = {"--seed", "--guidance", "--guidance-rescale", "--mask-blur", "--mask-dilate",
               "--refine", "--noise-std", "--prior-weight", "--adapter-scale"}  # fmt: skip
    return (flag in zero_ok and value == "0") or (
        flag == "--time-budget" and value == "99999999999999999999"  # 3e15 years: no limit
    )


# ------------------------------------------------------------------------- 1, 2: numbers of verbs
def test_every_numeric_flag_goes_through_one_parser():
    """No verb parses a number with argparse's int/float (whose errors name no range): every
    numeric flag is read by cli._number and checked by an api helper, so the table below sees it."""
    for verb in VERBS:
        for a in subparser(verb)._actions:
            assert a.type not in (int, float), (verb, a.option_strings)
    found = {v: set(numeric_flags(v)) for v in VERBS}
    assert found["sample"] >= {"--n", "--steps", "--seed", "--guidance", "--batch-size", "--nrow"}
    assert found["train"] >= {"--time-budget", "--seed", "--image-size"}
    assert found["eval"] >= {"--n", "--seed", "--batch-size", "--guidance"}  # --steps: a list
    assert found["report"] >= {"--steps", "--seed"}


CASES = [(verb, flag, value) for verb in VERBS for flag in numeric_flags(verb) for value in BAD]
CASES += [("eval", "--steps", v) for v in BAD]  # a comma list: each item is checked


@pytest.mark.parametrize("verb, flag, value", CASES)
def test_every_numeric_argument_of_every_verb(run_dir, tmp_path, capsys, verb, flag, value):
    """0, a negative, NaN, inf, a huge value and a non-number, for every numeric flag of every
    verb: exit code 2 and one line naming the flag, the value and the accepted range, or (a legal
    value) a normal run. Never a traceback."""
    rc, _, err = run_cli(capsys, *base_argv(verb, run_dir, tmp_path), flag, value)
    if legal(flag, value):
        assert rc == 0, err
        return
    line = error_line(err)
    assert rc == 2, err
    shown = {value, repr(cli._number(value))}
    assert flag in line and any(v in line for v in shown), line
    assert re.search(RANGE, line) or UNREADABLE_TIME in line, line


def test_flag_values_that_look_like_flags_get_one_line(capsys):
    for argv in (["sample", "--run", "R", "--n"], ["train", "--out"], ["eval", "--run", "R", "--bogus"],
                 ["sample", "--run", "R", "--n", "--steps", "3"], ["train", "--stage", "nope", "--out", "x"]):  # fmt: skip
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and error_line(err).endswith("--help`"), err


# ------------------------------------------------------------------------- 2: numbers of configs
def _numeric_fields(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted name, int or float) of every numeric field of a config, nested configs included."""
    hints = typing.get_type_hints(cls, globalns=vars(sys.modules[cls.__module__]))
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _numeric_fields(tp, f"{prefix}{f.name}.")
            continue
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is tuple:
            tp = typing.get_args(tp)[0]
            out += [(f"{prefix}{f.name}", list)] if tp is int else []
        elif tp in (int, float):
            out.append((f"{prefix}{f.name}", tp))
    return out


# derived from the runs' own UNet/VAE (image size, latent channels): set only through those
DERIVED = {"vae.image_size", "unet.sample_size", "unet.in_channels", "unet.out_channels"}
CONFIG_FIELDS = [(k, tp) for k, tp in _numeric_fields(RunConfig) if k not in DERIVED]
TINY_CFG = {
    "data": "builtin:shapes?n=64", "image_size": 16,
    "vae": {"block_out_channels": [8, 8], "norm_groups": 4, "layers_per_block": 1, "mid_attention": False},
    "unet": {"block_out_channels": [8, 16], "attention_resolutions": [], "norm_num_groups": 4,
             "head_dim": 8, "num_res_blocks": 1, "mid_attention": False},
}  # fmt: skip


def test_the_config_table_covers_every_section():
    sections = {k.split(".")[0] for k, _ in CONFIG_FIELDS if "." in k}
    assert sections == {"vae", "unet", "diffusion", "text", "vae_train", "unet_train"}
    assert len(CONFIG_FIELDS) > 50


@pytest.mark.parametrize("key, kind", CONFIG_FIELDS, ids=[k for k, _ in CONFIG_FIELDS])
def test_every_numeric_config_field(key, kind):
    """Every numeric field of run.json, set (as --set or a config file would) to 0, -1, NaN,
    inf, a huge value or text: a one-line ConfigError naming the field, or a config whose models
    build and run a forward pass. Nothing hangs, allocates without bound or crashes."""
    for value in (0, -1, float("nan"), float("inf"), -float("inf"), 10**12, 1e30, "abc"):
        data = json.loads(json.dumps(TINY_CFG))
        *sections, name = key.split(".")
        cur = data
        for s in sections:
            cur = cur.setdefault(s, {})
        cur[name] = [value] if kind is list else value
        try:
            cfg = resolve_config(run_config_from_dict(data), 3, 5)
        except ConfigError as e:
            named = (name, name.replace("_", " "), name.rstrip("s").replace("_", " "))
            assert any(n in str(e) for n in named) or "block_out_channels" in str(e), (
                key,
                value,
                e,
            )
            assert "\n" not in str(e)
            continue
        assert not (isinstance(value, float) and not math.isfinite(value)), (key, value)
        from ldmkit.models.unet import UNet
        from ldmkit.models.vae import Autoencoder

        z = Autoencoder(cfg.vae).encode(torch.zeros(2, 3, 16, 16)).mode()
        out = UNet(cfg.unet)(z, torch.tensor([1, 2]), class_labels=torch.tensor([0, 1]))
        assert out.shape == z.shape
        cfg.diffusion.make_schedule()


@pytest.mark.parametrize("key", [k for k, tp in CONFIG_FIELDS if tp is float])
def test_non_finite_config_floats_through_the_cli(tmp_path, capsys, key):
    for text in ("NaN", "Infinity", "-Infinity", "1e999"):
        rc, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "o"), *tiny(1), "--set",
                             f"{key}={text}")  # fmt: skip
        line = error_line(err)
        assert rc == 2 and key.split(".")[-1] in line and "finite" in line, line
    assert not (tmp_path / "o" / "run.json").exists()


# ------------------------------------------------------------------------- 3: non-finite weights
@pytest.mark.parametrize("part", ["unet", "vae"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(tmp_path, capsys, part, bad):
    run = make_run(tmp_path / "run")
    path = run / part / "model.safetensors"
    tensors = load_tensors(path)
    name = sorted(tensors)[len(tensors) // 2]
    tensors[name].view(-1)[0] = bad
    save_tensors(path, tensors)
    for argv in (["sample", "--run", str(run), "--n", "2", "--out", str(tmp_path / "g.png")],
                 ["report", "--run", str(run), "--out", str(tmp_path / "r.html")]):  # fmt: skip
        rc, _, err = run_cli(capsys, *argv)
        line = error_line(err)
        assert (
            rc == 2 and f"{part}/model.safetensors: tensor {name} holds non-finite values" in line
        )
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "r.html").exists()


def test_a_checkpoint_with_non_finite_weights_is_refused_on_resume(tmp_path):
    from ldmkit.checkpoint import load_state_dict_strict

    module = torch.nn.Linear(2, 2)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    state["bias"][1] = float("-inf")
    with pytest.raises(
        CheckpointError, match=r"ckpt: tensor bias holds non-finite values \(0 NaN, 1 inf of 2\)"
    ):
        load_state_dict_strict(module, state, "ckpt")  # fmt: skip


@pytest.mark.parametrize(
    "sampler", ["ddpm", "ddim", "euler", "heun", "dpm++2m", "dpm++2m-sde", "langevin"]
)
def test_a_sampler_that_diverges_stops_and_writes_nothing(tmp_path, capsys, monkeypatch, sampler):
    """A model that turns NaN after its first calls: every sampler stops at the step where the
    state stops being finite, names itself and the step, and no file is written."""
    from ldmkit.models.unet import UNet

    run = make_run(tmp_path / "run")
    real, calls = UNet.forward, []

    def forward(self, x, t, **kw):
        calls.append(1)
        out = real(self, x, t, **kw)
        return out if len(calls) < 3 else out * float("nan")

    monkeypatch.setattr(UNet, "forward", forward)
    rc, _, err = run_cli(capsys, "sample", "--run", str(run), "--n", "2", "--steps", "4",
                         "--sampler", sampler, "--out", str(tmp_path / "g.png"),
                         "--outdir", str(tmp_path / "imgs"))  # fmt: skip
    line = error_line(err)
    assert rc == 2 and re.search(
        rf"sampler {re.escape(sampler)} produced non-finite values \(NaN or inf\) at step [1-4] of 4",
        line,
    ), line
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "imgs").exists()


def test_an_autoencoder_that_decodes_to_nan_writes_nothing(tmp_path, capsys, monkeypatch):
    from ldmkit.models.vae import Autoencoder

    run = make_run(tmp_path / "run")
    monkeypatch.setattr(
        Autoencoder, "decode", lambda self, z: torch.full((len(z), 3, 16, 16), float("nan"))
    )
    rc, _, err = run_cli(
        capsys,
        "sample",
        "--run",
        str(run),
        "--n",
        "2",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "g.png"),
    )
    assert rc == 2 and "the autoencoder decoded the latents into non-finite values" in error_line(
        err
    )
    assert not (tmp_path / "g.png").exists()


def test_a_training_preview_that_diverges_is_skipped_not_fatal(
    tmp_path, capsys, caplog, monkeypatch
):
    from ldmkit.diffusion.samplers import NonFiniteSampleError
    from ldmkit.pipeline import LatentDiffusion

    def diverge(self, n, **kw):
        raise NonFiniteSampleError("sampler ddim produced non-finite values (NaN or inf) at step 1")

    monkeypatch.setattr(LatentDiffusion, "sample_grid", diverge)
    out = tmp_path / "o"
    rc, _, err = run_cli(capsys, "train", "--out", str(out), *tiny(1))
    assert rc == 0, err
    assert "no preview grid: sampler ddim produced non-finite values" in caplog.text
    assert (out / "unet" / "model.safetensors").is_file() and not (out / "samples.png").exists()


# ------------------------------------------------------------------------- 4: durations
@pytest.mark.parametrize("text", ["0", "0s", "0m", "0h0m", "0.0s", "-5m", "-1"])
def test_a_zero_or_negative_duration_is_an_error(tmp_path, capsys, text):
    for argv in ([f"--time-budget={text}"], ["--set", f'time_budget="{text}"']):
        rc, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "o"), *tiny(1), *argv)
        line = error_line(err)
        assert rc == 2 and re.search(
            r"time.budget must be a duration above 0 .*got '" + re.escape(text), line
        ), line
    with pytest.raises(ConfigError, match="must be a duration above 0"):
        parse_duration(text)
    assert not (tmp_path / "o" / "run.json").exists()


def test_a_budget_too_short_to_plan_says_so_before_training(tmp_path, capsys, caplog):
    """A warning up front, not a refusal: a step timed on a busy machine can read far slower
    than training runs, and the stages still stop at their deadlines with a checkpoint."""
    out = tmp_path / "o"
    rc, _, err = run_cli(capsys, "train", "--out", str(out), *tiny(1), "--time-budget", "3s")
    assert rc == 0, err
    warned = [
        r.getMessage() for r in caplog.records if "is too short for this run" in r.getMessage()
    ]
    assert len(warned) == 1 and re.search(
        r"--time-budget 3s is too short for this run on this machine: each stage runs 25 steps before it can plan \(autoencoder ~.* s/step, diffusion ~.* s/step, measured now\), so the budget must be at least [\d.]+ (s|min|h)",
        warned[0],
    ), warned
    assert (out / "vae" / "model.safetensors").is_file()  # it trained, and stopped in time


def test_training_without_a_budget_says_how_long_it_will_take(tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    rc, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "o"), *tiny(2))
    assert rc == 0, err
    assert re.search(
        r"no --time-budget: this training will take about [\d.]+ (s|min|h) \(autoencoder 2 steps, diffusion 2 steps at autoencoder ~.* s/step, diffusion ~.* s/step, measured now",
        caplog.text,
    )


# ------------------------------------------------------------------------- 5: devices
DEVICES = ["gpu0", "meta", "cuda:99", "cuda:-1", ""]
if not torch.cuda.is_available():
    DEVICES += ["cuda", "cuda:0"]
if not torch.backends.mps.is_available():
    DEVICES += ["mps"]


@pytest.mark.parametrize("verb", ["train", "sample", "eval", "report"])
@pytest.mark.parametrize("device", DEVICES)
def test_one_device_check_in_every_verb(run_dir, tmp_path, capsys, verb, device):
    rc, _, err = run_cli(capsys, *base_argv(verb, run_dir, tmp_path), "--device", device)
    line = error_line(err)
    assert rc == 2, err
    assert re.search(r"unknown device|was asked for but", line), line
    assert "cpu" in line, line  # the fix
    assert not (tmp_path / "out" / "run.json").exists() and not (tmp_path / "g.png").exists()


def test_a_device_set_in_the_config_is_checked_too(tmp_path, capsys):
    rc, _, err = run_cli(
        capsys, "train", "--out", str(tmp_path / "o"), *tiny(1), "--set", "device=gpu0"
    )
    assert rc == 2 and "unknown device 'gpu0'" in error_line(err)


# ------------------------------------------------------------------------- 6: output over input
def _image_folder(root: Path, n: int = 4, classes: tuple[str, ...] = ()) -> Path:
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        sub = root / classes[i % len(classes)] if classes else root
        sub.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (20, 20, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(sub / f"{i}.png")
    return root


@pytest.mark.parametrize("relation", ["equal", "inside", "containing"])
def test_train_refuses_an_output_overlapping_the_data(tmp_path, capsys, relation):
    data = _image_folder(tmp_path / "parent" / "data")
    out = {"equal": data, "inside": data / "run", "containing": tmp_path / "parent"}[relation]
    before = snapshot(tmp_path)
    rc, _, err = run_cli(capsys, "train", "--data", str(data), "--out", str(out), *tiny(1)[2:])
    line = error_line(err)
    how = {"equal": "is", "inside": "is inside", "containing": "contains"}[relation]
    assert rc == 2 and f"--out {out} {how} the --data folder {data}; ldmkit would write" in line
    assert snapshot(tmp_path) == before and not (out / "run.json").exists()


def test_convert_and_eval_refuse_an_output_over_their_input(run_dir, tmp_path, capsys):
    src = tmp_path / "diffusers"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    for argv, pattern in (
        (["convert", "--from-diffusers", str(src), "--out", str(src)], "is the --from-diffusers folder"),
        (["convert", "--from-diffusers", str(src), "--out", str(src / "run")], "is inside the --from-diffusers folder"),
        (["convert", "--to-diffusers", str(run_dir), "--out", str(run_dir / "d")], "is inside the --to-diffusers folder"),
        (["eval", "--run", str(run_dir), "--ref", str(src), "--out", str(src / "e")], "is inside the --ref folder"),
    ):  # fmt: skip
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and pattern in error_line(err), err
    assert snapshot(tmp_path) == before


def test_outputs_that_are_no_usable_path(run_dir, tmp_path, capsys):
    """Found by the fuzz test: an empty path (the current folder), a folder where a file is
    written, an image name Pillow cannot write, and --stage diffusion without an autoencoder are
    refused before anything is computed or written."""
    before = snapshot(tmp_path)
    for argv, pattern in (
        (["train", "--out", "", *tiny(1)], r"--out must be a path, got ''"),
        (["train", "--out", str(tmp_path / "o"), *tiny(1), "--data", ""], r"--data must be a path, got ''"),
        (["sample", "--run", str(run_dir), "--out", ""], r"--out must be a path, got ''"),
        (["sample", "--run", str(run_dir), "--outdir", " "], r"--outdir must be a path, got ' '"),
        (["sample", "--run", str(run_dir), "--out", str(tmp_path)], r"--out .* is a folder; give a file name, e.g. .*grid.png"),
        (["sample", "--run", str(run_dir), "--out", str(tmp_path / "g.txt")], r"does not end in an image suffix Pillow can write; use .png"),
        (["report", "--run", str(run_dir), "--out", str(tmp_path)], r"is a folder; give a file name, e.g. .*report.html"),
        (["eval", "--run", str(run_dir), "--out", ""], r"--out must be a path, got ''"),
        (["train", "--out", str(tmp_path / "o"), *tiny(1), "--stage", "diffusion"], r"--stage diffusion trains the UNet on the run's autoencoder, but .*o has none yet"),
        (["train", "--out", str(tmp_path / "o"), *tiny(1)[2:], "--set", "data="], r"data must be a data spec or a folder, got ''"),
    ):  # fmt: skip
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2 and re.search(pattern, error_line(err)), (argv, err)
    assert snapshot(tmp_path) == before and not (tmp_path / "o").exists()


def test_the_folder_reader_skips_folders_that_hold_a_run(tmp_path, caplog):
    data = _image_folder(tmp_path / "data", n=3)
    run = make_run(data / "old-run")
    Image.new("RGB", (20, 20)).save(run / "samples.png")  # a run's output, not data
    (run / "samples").mkdir()
    Image.new("RGB", (20, 20)).save(run / "samples" / "step-00000001.png")
    ds = read_data(str(data), image_size=16)
    assert len(ds) == 3
    warnings = [r.message for r in caplog.records if "hold an ldmkit run" in r.message]
    assert len(warnings) == 1 and "old-run" in warnings[0]
    assert RunFolder.holds_run(run) and not RunFolder.holds_run(data)


# ------------------------------------------------------------------------- 7: labels of a folder
def test_class_folders_train_class_conditional_with_auto(tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    data = _image_folder(tmp_path / "animals", n=8, classes=("cat", "dog"))
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--data", str(data), "--out", str(out), *tiny(1)[2:])
    assert rc == 0, err
    info = json.loads((out / "data.json").read_text())
    assert info["class_names"] == ["cat", "dog"] and info["labels_from"] == "sub-folder names"
    assert json.loads((out / "unet" / "config.json").read_text())["num_classes"] == 2
    assert "class-conditional on 2 classes (cat, dog) from the sub-folder names of" in caplog.text
    assert "set conditioning=none" in caplog.text


def test_class_folders_can_be_ignored_and_loose_folders_are_unlabelled(tmp_path, capsys):
    data = _image_folder(tmp_path / "animals", n=8, classes=("cat", "dog"))
    flat = _image_folder(tmp_path / "flat", n=8)
    for spec, extra in ((data, ["--set", "conditioning=none"]), (flat, [])):
        out = tmp_path / f"run-{spec.name}"
        rc, _, err = run_cli(
            capsys, "train", "--data", str(spec), "--out", str(out), *tiny(1)[2:], *extra
        )
        assert rc == 0, err
        assert json.loads((out / "unet" / "config.json").read_text())["num_classes"] is None
        assert json.loads((out / "data.json").read_text())["labels_from"] is None


def test_conditioning_class_on_a_folder_without_class_folders_names_the_layout(tmp_path, capsys):
    flat = _image_folder(tmp_path / "flat", n=4)
    rc, _, err = run_cli(capsys, "train", "--data", str(flat), "--out", str(tmp_path / "o"), *tiny(1)[2:],
                         "--set", "conditioning=class")  # fmt: skip
    line = error_line(err)
    assert rc == 2 and re.search(
        r"is not inside a class sub-folder, but labels from folders need every image in .*flat/<class name>/ \(e.g. .*flat/cat/1.png",
        line,
    ), line


# ------------------------------------------------------------------------- 8: long defaults
def test_eval_defaults_finish_in_minutes_and_the_full_table_is_one_flag_away(
    run_dir, capsys, monkeypatch
):
    from ldmkit.evaluation import evaluate, table

    seen = {}

    def fake(run, **kw):
        seen.update(kw)
        raise ConfigError("stop here")

    monkeypatch.setattr(evaluate, "evaluate_run", fake)
    run_cli(capsys, "eval", "--run", str(run_dir))
    assert (seen["samplers"], seen["steps"], seen["n"]) == (["dpm++2m-sde"], [20], 500)
    run_cli(capsys, "eval", "--run", str(run_dir), "--full")
    assert (tuple(seen["samplers"]), tuple(seen["steps"]), seen["n"]) == (
        table.FULL_SAMPLERS,
        table.FULL_STEPS,
        table.FULL_N,
    )
    run_cli(capsys, "eval", "--run", str(run_dir), "--full", "--n", "50", "--steps", "10")
    assert (seen["steps"], seen["n"]) == ([10], 50)


def test_long_jobs_say_how_long_before_they_start(run_dir, tmp_path, capsys, caplog, monkeypatch):
    caplog.set_level("INFO")
    rc, _, err = run_cli(capsys, *base_argv("eval", run_dir, tmp_path))
    assert rc == 0, err
    assert re.search(
        r"sampler table: 1 row\(s\) of 6 images \(ddim at 2 steps\): the sampling will take about [\d.]+ (s|min|h) here",
        caplog.text,
    )
    monkeypatch.setattr(sampling_api, "ANNOUNCE_FROM", 4)
    rc, _, err = run_cli(capsys, *base_argv("sample", run_dir, tmp_path))
    assert rc == 0, err
    assert re.search(
        r"sampling 2 images \(dpm\+\+2m-sde, 2 steps\) will take about [\d.]+ (s|min|h) here",
        caplog.text,
    )
