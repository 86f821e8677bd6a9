"""Property-based fuzzing of the command line (issue 18): random combinations of flags and values
for every verb on a tiny run. Whatever the combination, `ldmkit` exits with 0 or 2 (a training
also with 1 or 130, which none of these trigger), says an error in one line, raises nothing
(a traceback), writes no file outside the verb's output path and changes no existing file the
verb is not meant to change.

CI runs a short, derandomised form (a fixed list of examples, a few seconds); the `slow` form
draws many more.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from reliability_helpers import error_line, make_run, run_cli, tiny

# Values: mostly bad ones (refused in milliseconds), and a few small legal ones that really run
NUMBER = st.sampled_from(["0", "-1", "1", "2", "3", "nan", "inf", "-inf", "1e30", "2.5", "abc",
                          "", "99999999999999999999", "0x10", "1_0"])  # fmt: skip
DEVICE = st.sampled_from(["cpu", "auto", "gpu0", "cuda:99", "meta", ""])
SAMPLER = st.sampled_from(["ddim", "euler", "heun", "dpm++2m-sde", "ddpm", "langevin", "bogus", ""])
PATH = st.sampled_from(["{new}/a", "{run}", "{run}/sub", "{data}", "{data}/in", "{file}",
                        "{file}/x", "{new}/a.png", "{run}/x.png", ""])  # fmt: skip

SPEC = {
    "train": {
        "--out": (PATH, True), "--data": (st.sampled_from(["builtin:shapes?n=64", "{data}", "{new}",
        "builtin:nope", "mnist:", "{file}"]), False), "--seed": (NUMBER, False),
        "--image-size": (st.sampled_from(["16", "8", "15", "0", "nan", "4096", "abc"]), False),
        "--time-budget": (st.sampled_from(["1h", "0", "0s", "-5m", "10x", "nan", "3s"]), False),
        "--device": (DEVICE, False), "--stage": (st.sampled_from(["all", "vae", "unet", "x"]), False),
        "--resume": (st.just(None), False),
        "--set": (st.sampled_from(["unet_train.lr=NaN", "vae_train.steps=0", "seed=-1",
                  "guidance_scale=1e9", "diffusion.num_timesteps=1", "unet.dropout=Infinity",
                  "conditioning=class", "conditioning=none", "device=gpu0", "vae_train.lr=0.002",
                  "unet_train.batch_size=65536", "preview_steps=0", 'time_budget="0s"']), False),
    },
    "sample": {
        "--run": (PATH, True), "--n": (NUMBER, False), "--steps": (NUMBER, False),
        "--seed": (NUMBER, False), "--guidance": (NUMBER, False), "--batch-size": (NUMBER, False),
        "--nrow": (NUMBER, False), "--sampler": (SAMPLER, False), "--device": (DEVICE, False),
        "--class": (st.sampled_from(["c0", "c1,c2", "dog", "0", "7", "", ","]), False),
        "--prompt": (st.sampled_from(["a cat", ""]), False), "--out": (PATH, True),
        "--outdir": (PATH, False),
    },
    "eval": {
        "--run": (PATH, True), "--n": (st.sampled_from(["6", "7", "5", "0", "nan", "abc"]), True),
        "--steps": (st.sampled_from(["2", "2,3", "0", "abc", "-1", "", ",", "1e30"]), True),
        "--samplers": (st.sampled_from(["ddim", "ddim,euler", "bogus", "", ","]), True),
        "--seed": (NUMBER, False), "--batch-size": (NUMBER, False), "--guidance": (NUMBER, False),
        "--device": (DEVICE, False), "--out": (PATH, False), "--ref": (PATH, False),
        "--features": (st.sampled_from(["domain", "inception:{file}", "x"]), False),
        "--fresh": (st.just(None), False),
    },
    "report": {
        "--run": (PATH, True), "--steps": (NUMBER, False), "--seed": (NUMBER, False),
        "--sampler": (SAMPLER, False), "--device": (DEVICE, False), "--out": (PATH, False),
    },
    "convert": {
        "--to-diffusers": (PATH, True), "--out": (PATH, True),
    },
}  # fmt: skip
OUTPUTS = {"train": ["--out"], "sample": ["--out", "--outdir"], "eval": ["--out"],
           "report": ["--out"], "convert": ["--out"]}  # fmt: skip
DEFAULT_OUTPUT = {"eval": "{run}/eval", "report": "{run}/report.html"}  # without --out
CACHES = {"eval": "{run}/eval"}  # written whatever --out says: the run's evaluation caches


@st.composite
def command(draw) -> list[str]:
    """A verb and some of its flags: required ones usually, others at random, in random order."""
    verb = draw(st.sampled_from(sorted(SPEC)))
    pairs = []
    for flag, (values, required) in SPEC[verb].items():
        if draw(st.integers(0, 9)) < (9 if required else 3):
            pairs.append([flag] if flag in ("--resume", "--fresh") else [flag, draw(values)])
    pairs = draw(st.permutations(pairs))
    extra = tiny(1)[2:] if verb == "train" else []  # tiny models: a legal training takes a second
    if verb in ("sample", "eval", "report"):
        extra = ["--steps", "2"] if verb != "eval" else []
    return [verb, *extra, *(x for p in pairs for x in p)]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A work folder: a tiny run, a folder of images and a plain file."""
    root = tmp_path_factory.mktemp("fuzz")
    make_run(root / "run")
    for i, cls in enumerate(["cat", "dog"] * 4):
        (root / "data" / cls).mkdir(parents=True, exist_ok=True)
        Image.effect_noise((20, 20), 40 + 10 * i).convert("RGB").save(
            root / "data" / cls / f"{i}.png"
        )
    (root / "file").write_text("not a folder")
    return root


def files(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def last(argv: list[str], flag: str) -> str | None:
    """The value argparse keeps for `flag` (its last occurrence)."""
    idx = [i for i, a in enumerate(argv) if a == flag and i + 1 < len(argv)]
    return argv[idx[-1] + 1] if idx else None


def check_command(template: Path, capsys, argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(template, work, dirs_exist_ok=True)
        places = {
            "run": work / "run",
            "data": work / "data",
            "new": work / "new",
            "file": work / "file",
        }
        argv = [a.format(**places) for a in argv]
        before = files(work)
        cwd = os.getcwd()
        os.chdir(work)  # a relative or empty path must not reach the repository
        try:
            rc, _, err = run_cli(capsys, *argv)  # an exception here is the traceback we look for
        finally:
            os.chdir(cwd)
        assert rc in (0, 2), (argv, rc, err)
        if rc == 2:
            error_line(err)
        verb = argv[0]
        outputs = [last(argv, f) for f in OUTPUTS[verb]] + [
            DEFAULT_OUTPUT[verb].format(**places) if verb in DEFAULT_OUTPUT and not last(argv, "--out") else None,
            CACHES[verb].format(**places) if verb in CACHES else None,
        ]  # fmt: skip
        allowed = [Path(o).resolve() for o in outputs if o] if rc == 0 else []
        after = files(work)
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        for rel in changed:  # nothing outside the output path
            path = (work / rel).resolve()
            assert any(path == a or a in path.parents for a in allowed), (argv, rc, rel, err)
        if verb == "train" and "--resume" not in argv:  # a new training changes no existing file
            assert not {k for k in changed if k in before}, (argv, changed)


COMMON = dict(derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


@pytest.fixture(autouse=True)
def _quick_domain_classifier(monkeypatch):
    from ldmkit.evaluation import feature_nets

    monkeypatch.setattr(feature_nets, "DOMAIN_MIN_STEPS", 10)


@settings(max_examples=30, **COMMON)
@given(argv=command())
def test_fuzz_the_command_line(template, capsys, argv):
    check_command(template, capsys, argv)


@pytest.mark.slow
@settings(max_examples=400, **COMMON)
@given(argv=command())
def test_fuzz_the_command_line_long(template, capsys, argv):
    check_command(template, capsys, argv)
