"""The option declarations (ldmkit/options.py): each verb's options are declared once, and the
command line, the api and the web page derive from them. The test that shows the point adds a
field to two declarations and finds it, with no other code, as a CLI flag, a page field and a
range check in all three fronts."""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "reliability"))

from reliability_helpers import error_line, make_run, run_cli  # noqa: E402

from ldmkit import api, cli, editing, options  # noqa: E402
from ldmkit.config import ConfigError  # noqa: E402
from ldmkit.options import option  # noqa: E402

ETA = "--eta must be a finite number in [0, 1], got 2"  # the new field's range message


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("options") / "runs" / "run")


@pytest.fixture
def image(tmp_path) -> Path:
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "in.png")
    return tmp_path / "in.png"


@pytest.fixture
def extended(monkeypatch):
    """`sample` and `img2img` with one more option, eta in [0, 1], declared as any field is."""
    added = {}
    for verb in ("sample", "img2img"):
        base = options.VERBS[verb]
        more = dataclasses.make_dataclass(
            base.__name__, [("eta", float, option(0.0, "a new option", lo=0, hi=1))],
            bases=(base,), frozen=True, namespace={"__module__": base.__module__},
        )  # fmt: skip
        monkeypatch.setitem(options.VERBS, verb, more)
        added[verb] = more
    return added


# ------------------------------------------------------------------------------ the point
def test_a_new_field_is_a_cli_flag_checked_by_the_api(extended, run_dir, image, tmp_path, capsys):
    parser = cli.make_parser()
    for verb in ("sample", "img2img"):
        sub = parser._subparsers._group_actions[0].choices[verb]
        flag = {a.option_strings[0]: a for a in sub._actions}.get("--eta")
        assert flag is not None and flag.type is cli._number and "a new option" in flag.help
    rc, _, err = run_cli(capsys, "sample", "--run", str(run_dir), "--eta", "2",
                         "--out", str(tmp_path / "g.png"))  # fmt: skip
    assert rc == 2 and error_line(err) == f"ldmkit: error: {ETA}"
    rc, _, err = run_cli(capsys, "img2img", "--run", str(run_dir), "--image", str(image),
                         "--eta", "2", "--out", str(tmp_path / "e.png"))  # fmt: skip
    assert rc == 2 and error_line(err) == f"ldmkit: error: {ETA}"
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "e.png").exists()


def test_a_new_field_is_checked_by_the_api(extended, run_dir, image):
    with pytest.raises(ConfigError, match=f"^{re.escape(ETA)}$"):
        api.sample(run_dir, options=extended["sample"](n=1, steps=1, eta=2))
    with pytest.raises(ConfigError, match=f"^{re.escape(ETA)}$"):
        api.edit("img2img", run_dir, image=image, steps=1, eta=2)
    with pytest.raises(ConfigError, match="img2img does not take eta"):  # without the field
        options.Img2ImgOptions.given({"eta": 0.5})


def test_a_new_field_is_a_page_field_checked_by_the_server(extended, run_dir):
    pytest.importorskip("starlette", reason="the page needs the serve extra")
    from starlette.testclient import TestClient

    from ldmkit.web.app import create_app

    with TestClient(create_app(run_dir.parent)) as client:
        info = client.get("/api/run", params={"run": "run"}).json()
        eta = [f for f in info["sampling"] if f["name"] == "eta"]
        assert eta == [{"name": "eta", "label": "eta", "value": 0.0, "min": 0, "max": 1,
                        "step": None, "type": "number"}]  # fmt: skip
        assert "eta" in [f["name"] for f in info["editing"]["img2img"]["fields"]]
        assert "eta" not in [f["name"] for f in info["editing"]["inpaint"]["fields"]]
        r = client.post("/api/sample", json={"run": "run", "n": 1, "eta": 2})
        assert r.status_code == 400 and r.json()["error"] == ETA, r.text
        buf = io.BytesIO()
        Image.new("RGB", (16, 16)).save(buf, format="PNG")
        r = client.post("/api/edit", data={"run": "run", "method": "img2img",
                                           "params": json.dumps({"eta": 2})},
                        files={"image": ("i.png", buf.getvalue(), "image/png")})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"] == ETA, r.text


# ------------------------------------------------------------------------------ the declarations
def test_the_library_defaults_are_the_declared_ones():
    """editing's functions keep their defaults for Python callers; they must be the options' (a
    sampler or steps declared None is the run's own: for a trained run, `fill_run_sampling`
    gives the default sampler and the verb's `run_steps`)."""
    for verb, declared in options.EDITS.items():
        fn = editing.inpaint if verb == "fill" else getattr(editing, verb)
        params = inspect.signature(fn).parameters
        for f in declared.fields():
            if f.name in params:
                expected = f.default
                if expected is None and f.name in ("sampler", "steps"):
                    values = {"sampler": None, "steps": None}
                    options.fill_run_sampling(_TrainedRun(), values, declared.run_steps)
                    expected = values[f.name]
                assert params[f.name].default == expected, (verb, f.name)


class _TrainedRun:
    """A run trained by `ldmkit train` as `fill_run_sampling` sees it (no distill.json)."""

    def default_sampling(self):
        return options.DEFAULT_SAMPLER, options.DEFAULT_STEPS

    def distill_record(self):
        return None


def test_every_declared_field_has_help_and_a_check():
    for declared in options.VERBS.values():
        for f in declared.fields():
            assert f.spec.help and f.flag.startswith("--")
            assert f.kind != "other" or f.spec.check is not None, (declared.__name__, f.name)
            assert declared().check() is not None


def test_a_check_returns_the_values_the_library_takes():
    checked = options.FillOptions.given({"hole_colour": "1, 2, 3", "guidance": 2}).check()
    assert checked.hole_colour == [1, 2, 3] and checked.guidance_scale == 2.0
    seeds = options.InterpolateOptions(seeds="3,4").check().seeds
    assert seeds == [3, 4]
    with pytest.raises(ConfigError, match=r"^--strength must be a finite number in \(0, 1\]"):
        options.Img2ImgOptions(strength=0).check()
    with pytest.raises(ConfigError, match="^unknown sampler 'plms'; choose one of ddpm"):
        options.SampleOptions(sampler="plms").check()


def test_steps_go_up_to_the_runs_timesteps(run_dir):
    from ldmkit.runs import RunFolder

    t = RunFolder(run_dir).config().diffusion.num_timesteps
    options.SampleOptions(steps=t + 1).check()  # without the run: up to MAX_TIMESTEPS
    with pytest.raises(ConfigError, match=f"^--steps must be a whole number from 1 to {t}, "):
        options.SampleOptions(steps=t + 1).check(RunFolder(run_dir))


def test_a_new_train_field_is_a_train_flag_and_a_new_run_field_checked_by_both(
    monkeypatch, tmp_path, capsys
):
    """`ldmkit train`'s options are declared once too (TrainOptions): a field added to the
    declaration is a flag of `train` and a field of the page's New run form, and a bad value is
    refused by both with the same line, before anything is written."""
    pytest.importorskip("starlette", reason="the page needs the serve extra")
    from starlette.testclient import TestClient

    from ldmkit.web.app import create_app

    base = options.VERBS["train"]
    more = dataclasses.make_dataclass(
        base.__name__, [("eta", float, option(0.0, "a new option", lo=0, hi=1))],
        bases=(base,), frozen=True, namespace={"__module__": base.__module__},
    )  # fmt: skip
    monkeypatch.setitem(options.VERBS, "train", more)
    sub = cli.make_parser()._subparsers._group_actions[0].choices["train"]
    flag = {a.option_strings[0]: a for a in sub._actions}.get("--eta")
    assert flag is not None and flag.type is cli._number and "a new option" in flag.help
    rc, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "runs" / "new"), "--eta", "2")
    assert rc == 2 and error_line(err) == f"ldmkit: error: {ETA}"
    (tmp_path / "runs").mkdir(exist_ok=True)
    with TestClient(create_app(tmp_path / "runs")) as client:
        fields = client.get("/api/train").json()["fields"]
        assert fields[-1] == {"name": "eta", "label": "eta", "value": 0.0, "min": 0, "max": 1,
                              "step": None, "type": "number"}  # fmt: skip
        r = client.post("/api/train/plan", json={"run": "new", "eta": 2})
        assert r.status_code == 400 and r.json()["error"] == ETA, r.text
    assert not (tmp_path / "runs" / "new").exists()


def test_options_come_as_keywords_or_all_at_once_not_both(tmp_path):
    """`api.sample(options=)` and `api.train(options=)` take a whole declaration; a keyword
    off its default beside it is refused before anything is read or written."""
    from ldmkit import api
    from ldmkit.options import SampleOptions, TrainOptions

    with pytest.raises(TypeError, match="give sample's options as keywords or as `options`"):
        api.sample(tmp_path / "no-run", n=3, options=SampleOptions(n=2))
    with pytest.raises(TypeError, match="give train's options as keywords or as `options`"):
        api.train(tmp_path / "out", seed=3, options=TrainOptions(seed=2))
    assert not (tmp_path / "out").exists()
    given = SampleOptions(n=2)
    assert SampleOptions().or_instead(given) is given
    assert SampleOptions(n=5).or_instead(None) == SampleOptions(n=5)


def test_synth_takes_its_options_as_keywords_or_all_at_once_not_both(tmp_path):
    from ldmkit import api
    from ldmkit.options import SynthOptions

    with pytest.raises(TypeError, match="give synth's options as keywords or as `options`"):
        api.synth(tmp_path / "no-run", tmp_path / "out", n=3, options=SynthOptions(n=2))
    assert not (tmp_path / "out").exists()
