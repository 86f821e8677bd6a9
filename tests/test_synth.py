"""`ldmkit synth`: the folder's layout (read back by ldmkit's own loader), each PNG's parameters and
seed, resume after a kill (bit for bit the uninterrupted folder), the readable filter, and the
one-line refusals of bad input."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "reliability"))
sys.path.insert(0, str(Path(__file__).parent / "evaluation"))

from eval_helpers import make_tiny_run  # noqa: E402
from reliability_helpers import error_line, make_run, make_text_run, run_cli  # noqa: E402

from ldmkit import api  # noqa: E402
from ldmkit.config import ConfigError  # noqa: E402
from ldmkit.data.images import read_png_params  # noqa: E402
from ldmkit.pipeline import LatentDiffusion  # noqa: E402
from ldmkit.runs import read_data  # noqa: E402
from ldmkit.synth import GROUP_STRIDE, MANIFEST, draw, read_synth  # noqa: E402


@pytest.fixture(scope="module")
def class_run(tmp_path_factory) -> Path:
    """Random weights, 5 shape classes, 16 px, T = 100 (eval_helpers.make_tiny_run)."""
    return make_tiny_run(tmp_path_factory.mktemp("synth") / "run")


def files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


QUICK = {"steps": 2, "batch_size": 2}


def test_a_class_run_writes_class_folders_the_loader_reads_back(class_run, tmp_path):
    out = tmp_path / "syn"
    result = api.synth(class_run, out, per_class=3, **QUICK)
    classes = [g.name for g in result.groups]
    assert len(classes) == 5 and result.kept == 15 and result.written == 15 and result.complete
    for g in result.groups:
        assert sorted(p.name for p in (out / g.folder).iterdir()) == [
            "00000.png", "00001.png", "00002.png"]  # fmt: skip
    # ldmkit's own folder loader: class sub-folders give the labels, named after the classes
    ds = read_data(str(out), image_size=16)
    assert ds.class_names == sorted(classes) and len(ds) == 15
    assert sorted(torch.bincount(ds.labels).tolist()) == [3] * 5
    # every PNG carries its parameters; every image has a seed of its own
    seeds = set()
    for g in result.groups:
        for i in range(3):
            p = read_png_params(out / g.folder / f"{i:05d}.png")
            assert p["verb"] == "synth" and p["class"] == g.name and p["label"] == g.label
            assert p["steps"] == 2 and p["sampler"] == "dpm++2m-sde"
            assert p["weights"] and p["run"] == str(Path(class_run).resolve())
            assert p["seed"] == g.label * GROUP_STRIDE + i
            seeds.add(p["seed"])
    assert len(seeds) == 15
    images, labels, captions, group_names = read_synth(out)
    assert images.shape == (15, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.tolist() == [g for g in range(5) for _ in range(3)] and captions is None
    assert group_names == classes


def test_each_image_draws_from_its_own_seed(class_run):
    """An image's noise is its own: drawn alone or beside others, it is the same image (up to
    float rounding of a batch of another size), and another seed gives another image."""
    ldm = LatentDiffusion.from_run(class_run, fast=False)
    kw = {"sampler": "dpm++2m-sde", "steps": 3, "condition": {"class_labels": torch.tensor([1, 1, 1])},
          "guidance_scale": 2.0, "guidance_rescale": 0.0}  # fmt: skip
    batch = draw(ldm, [7, 8, 9], **kw)
    alone = draw(ldm, [8], **{**kw, "condition": {"class_labels": torch.tensor([1])}})
    torch.testing.assert_close(alone[0], batch[1], atol=1e-5, rtol=0)
    assert (batch[0] - batch[1]).abs().max() > 1e-2


def test_class_subset_draws_only_those_classes_and_the_same_images(class_run, tmp_path, capsys):
    """`--class` (names and indexes mixed, in any order) writes only those classes' folders, and
    each image is the one a synth of every class writes (a class keeps its index and its seeds);
    the manifest records the subset, so another subset does not resume the folder."""
    full = tmp_path / "full"
    everything = api.synth(class_run, full, per_class=2, **QUICK)
    names = [g.name for g in everything.groups]
    sub = tmp_path / "sub"
    rc, out, _ = run_cli(capsys, "synth", "--run", str(class_run), "--out", str(sub),
                         "--per-class", "2", "--steps", "2", "--batch-size", "2", "--quiet",
                         "--class", f"3,{names[1]}")  # fmt: skip
    assert rc == 0 and "wrote 4 images" in out and "2 folder(s)" in out, out
    picked = [g for g in everything.groups if g.label in (1, 3)]
    assert sorted(p.name for p in sub.iterdir() if not p.name.startswith(".")) == sorted(
        g.folder for g in picked
    )
    for g in picked:
        for i in range(2):
            f = f"{g.folder}/{i:05d}.png"
            assert files(sub)[f] == files(full)[f], f
    _, labels, _, group_names = read_synth(sub)
    assert labels.tolist() == [1, 1, 3, 3] and group_names == [names[1], names[3]]
    with pytest.raises(ConfigError, match="other classes"):
        api.synth(class_run, sub, per_class=2, classes="0", **QUICK)


def test_an_interrupted_synth_resumes_to_the_same_folder(class_run, tmp_path):
    """Stopped in-process after its second batch (Ctrl-C in the progress callback), the same
    call completes it: the folder equals an uninterrupted one, file for file."""
    full = tmp_path / "full"
    api.synth(class_run, full, per_class=3, **QUICK)
    cut = tmp_path / "cut"
    calls = []

    def stop(done, total):
        calls.append(done)
        if len(calls) == 3:  # the start, then two batches (2 + 1 images of the first class)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.synth(class_run, cut, per_class=3, progress=stop, **QUICK)
    assert 0 < len([p for p in cut.rglob("*.png")]) < 15
    result = api.synth(class_run, cut, per_class=3, **QUICK)
    assert result.notes[0].startswith("resumed: 3 of 15 images")
    assert result.written == 12
    assert files(cut) == files(full)


def test_a_killed_synth_resumes_without_duplicates_or_gaps(class_run, tmp_path):
    """SIGKILL while the 6th image of the first class is being written (its temporary file on
    disk, not yet renamed): no half PNG is left under a real name, and `ldmkit synth` again
    gives, bit for bit, the folder of a run that was never killed."""
    argv = ["synth", "--run", str(class_run), "--per-class", "7", "--steps", "2",
            "--batch-size", "3", "--quiet"]  # fmt: skip
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               LDMKIT_TEST_SLOW_WRITE="00005.png=60")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit", *argv, "--out", str(killed)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(killed.glob("*/.00005.png.*.tmp")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the write of 00005.png never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    pngs = sorted(p.relative_to(killed).as_posix() for p in killed.rglob("[0-9]*.png"))
    assert len(pngs) == 5 and all(p.endswith(f"0000{i}.png") for i, p in enumerate(pngs))
    assert list(killed.rglob(".*.tmp"))  # the half-written file is a hidden temporary one
    full = tmp_path / "full"
    threads = torch.get_num_threads()
    assert threads == 1  # as the killed process (conftest.py): the same float sums
    rc = __import__("ldmkit.cli", fromlist=["main"]).main([*argv, "--out", str(full)])
    assert rc == 0
    rc = __import__("ldmkit.cli", fromlist=["main"]).main([*argv, "--out", str(killed)])
    assert rc == 0
    assert not list(killed.rglob(".*.tmp"))
    assert files(killed) == files(full)
    assert len([p for p in full.rglob("*.png")]) == 35


def test_a_text_run_writes_captions_beside_its_images(tmp_path):
    run = make_tiny_run(tmp_path / "trun", text=True)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a small red circle\n\na large blue star\n")
    out = tmp_path / "syn"
    result = api.synth(run, out, n=2, prompts_file=prompts, **QUICK)
    assert [g.folder for g in result.groups] == ["000-a_small_red_circle", "001-a_large_blue_star"]
    ds = read_data(str(out), image_size=16)
    assert ds.captions == ["a small red circle"] * 2 + ["a large blue star"] * 2
    assert (
        read_png_params(out / "001-a_large_blue_star" / "00001.png")["prompt"]
        == "a large blue star"
    )
    assert read_synth(out)[2] == ds.captions


def test_an_unconditional_run_writes_one_folder(tmp_path):
    run = make_run(tmp_path / "run", num_classes=None)
    out = tmp_path / "syn"
    result = api.synth(run, out, n=3, **QUICK)
    assert sorted(p.name for p in out.iterdir()) == [
        MANIFEST,
        "00000.png",
        "00001.png",
        "00002.png",
    ]
    assert result.kept == 3 and "class" not in read_png_params(out / "00002.png")


class _Judge:
    """A stand-in classifier: reads an image as class (mean brightness bucket), so some images
    of every class are read as another."""

    def logits(self, images):
        bucket = ((images.mean((1, 2, 3)) + 1) * 10).long() % 5
        return torch.nn.functional.one_hot(bucket, 5).double()


def test_keep_readable_draws_more_and_counts_the_dropped(class_run, tmp_path):
    from ldmkit import synth

    ldm = LatentDiffusion.from_run(class_run)
    groups = synth.plan_groups("class", class_names=None, num_classes=5, count=2)
    header = {"run": "r", "weights": "w", "kind": "class", "classifier": "judge",
              "guidance": 1.0, "params": {}}  # fmt: skip
    result = synth.synthesize(ldm, tmp_path / "syn", groups, header=header, options={},
                              sampler="ddim", steps=2, seed=0, guidance_scale=1.0,
                              guidance_rescale=0.0, batch_size=4, judge=_Judge())  # fmt: skip
    judge = _Judge()
    for g in result.groups:
        kept = sorted((tmp_path / "syn" / g.folder).glob("*.png"))
        assert len(kept) == g.kept <= g.count
        assert [p.name for p in kept] == [f"{i:05d}.png" for i in range(g.kept)]  # no gaps
        for p in kept:  # the image the judge kept, as it read it before quantisation
            cand = read_png_params(p)["candidate"]
            again = draw(ldm, [g.label * GROUP_STRIDE + cand], sampler="ddim", steps=2,
                         condition={"class_labels": torch.tensor([g.label])},
                         guidance_scale=1.0, guidance_rescale=0.0)  # fmt: skip
            assert judge.logits(again).argmax(1).item() == g.label
        assert g.dropped + g.kept <= g.drawn
    assert result.dropped > 0  # the stand-in reads many images as another class
    assert all(g.done or g.exhausted for g in result.groups)
    short = [g for g in result.groups if not g.done]
    assert len(result.notes) == len(short)


def test_keep_readable_from_the_cli_reports_the_dropped(class_run, tmp_path, capsys, monkeypatch):
    from ldmkit.evaluation import feature_nets

    monkeypatch.setattr(feature_nets, "DOMAIN_MIN_STEPS", 10)
    rc, out, err = run_cli(capsys, "synth", "--run", str(class_run), "--out", str(tmp_path / "s"),
                           "--per-class", "2", "--steps", "2", "--keep", "readable", "--quiet")  # fmt: skip
    assert rc in (0, 1), err  # 1: a class the classifier never read as itself (then a note)
    assert "dropped" in out and "the classifier read as another class" in out
    manifest = (tmp_path / "s" / MANIFEST).read_text()
    assert '"keep": "readable"' in manifest and '"classifier": null' not in manifest


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_one_line(class_run, tmp_path, capsys):
    uncond = make_run(tmp_path / "uncond", num_classes=None)
    text = make_text_run(tmp_path / "text")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    done = tmp_path / "done"
    api.synth(class_run, done, per_class=1, **QUICK)
    r, o = ["synth", "--run"], "--out"
    cases = {
        "no run": ([*r, str(tmp_path / "nope"), o, str(tmp_path / "o"), "--per-class", "2"],
                   "does not exist"),
        "per-class, unconditional": ([*r, str(uncond), o, str(tmp_path / "o"), "--per-class", "2"],
                                     "--per-class: the model in"),
        "no count, unconditional": ([*r, str(uncond), o, str(tmp_path / "o")], "give --n N"),
        "n, class run": ([*r, str(class_run), o, str(tmp_path / "o"), "--n", "2"],
                         "--n: the model in"),
        "prompts, class run": ([*r, str(class_run), o, str(tmp_path / "o"), "--per-class", "2",
                                "--prompts", str(prompts)], "--prompts: the model in"),
        "text run without prompts": ([*r, str(text), o, str(tmp_path / "o"), "--n", "2"],
                                     "give --prompts FILE"),
        "readable, text run": ([*r, str(text), o, str(tmp_path / "o"), "--n", "2", "--prompts",
                                str(prompts), "--keep", "readable"], "--keep readable"),
        "zero": ([*r, str(class_run), o, str(tmp_path / "o"), "--per-class", "0"],
                 "--per-class must be a whole number from 1 to"),
        "too many": ([*r, str(class_run), o, str(tmp_path / "o"), "--per-class", "10000001"],
                     "--per-class must be a whole number from 1 to 1000000"),
        "out is a file": ([*r, str(class_run), o, str(afile), "--per-class", "2"],
                          "is a file; synth writes a folder"),
        "out holds other files": ([*r, str(class_run), o, str(busy), "--per-class", "2"],
                                  "already holds other files (notes.txt"),
        "another synth": ([*r, str(class_run), o, str(done), "--per-class", "2", "--steps", "2",
                           "--batch-size", "2"],
                          "holds images of another synth (other per_class)"),
        "unknown keep": ([*r, str(class_run), o, str(tmp_path / "o"), "--per-class", "2",
                          "--keep", "best"], "unknown keep 'best'"),
        "unknown class": ([*r, str(class_run), o, str(tmp_path / "o"), "--per-class", "2",
                           "--class", "hexagon"], "--class: unknown class 'hexagon'; known"),
        "class index too large": ([*r, str(class_run), o, str(tmp_path / "o"), "--per-class",
                                   "2", "--class", "5"], "--class: unknown class '5'"),
        "class, unconditional": ([*r, str(uncond), o, str(tmp_path / "o"), "--n", "2", "--class",
                                  "0"], "--class: the model in"),
        "out inside the run's models": ([*r, str(class_run), o, str(class_run / "unet" / "s"),
                                         "--per-class", "2"], "inside the --run folder"),
    }  # fmt: skip
    pics = tmp_path / "pics"  # a run trained on a folder: its synth goes elsewhere
    pics.mkdir()
    onfolder = make_run(tmp_path / "onfolder")
    cfg = json.loads((onfolder / "run.json").read_text())
    (onfolder / "run.json").write_text(json.dumps({**cfg, "data": str(pics)}))
    cases["out inside the run's data"] = (
        [*r, str(onfolder), o, str(pics / "more"), "--per-class", "2"],
        "is inside the run's data folder",
    )
    before = files(busy), files(done)
    for name, (argv, expected) in cases.items():
        rc, _, err = run_cli(capsys, *argv)
        line = error_line(err)
        assert rc == 2 and expected in line, (name, line)
    assert (files(busy), files(done)) == before
    assert not (tmp_path / "o").exists()


def test_the_readme_examples_run(class_run, tmp_path, capsys, monkeypatch):
    """The README's synth and `eval --cas` lines for a class run, and its Python example, on a
    tiny run (fewer images and steps: the flags appended win)."""
    import re

    from ldmkit import cli
    from ldmkit.evaluation import cas, feature_nets

    monkeypatch.setattr(cas, "MIN_STEPS", 20)
    monkeypatch.setattr(feature_nets, "DOMAIN_MIN_STEPS", 10)
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## Generated data for classifiers") :]
    section = section[: section.index("\n## ")]
    swap = lambda s: s.replace("runs/mnist", str(class_run)).replace("synth/", f"{tmp_path}/")  # noqa: E731
    commands = [swap(ln.split("  #")[0]).split()[1:] for ln in section.splitlines()
                if ln.startswith("ldmkit ") and "runs/mnist" in ln]  # fmt: skip
    assert [c[0] for c in commands] == ["synth", "synth", "synth", "eval"]
    for argv in commands:
        quick = ["--steps", "2"] + (["--per-class", "2", "--quiet"] if argv[0] == "synth" else
                                    ["--cas-per-class", "2", "--cas-seeds", "1"])  # fmt: skip
        capsys.readouterr()
        assert cli.main([*argv, *quick]) in (0, 1), capsys.readouterr().err  # 1: a class short
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    code = (
        swap(block).replace("per_class=100", "per_class=2, steps=2").replace("seeds=3", "seeds=1")
    )
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    kept, score = capsys.readouterr().out.splitlines()[-2:]
    assert kept.startswith("10 0 ['resumed: 10 of 10 images were there']"), kept
    assert [0 <= float(v) <= 1 for v in score.split()] == [True] * 3, score
