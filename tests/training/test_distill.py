"""`ldmkit distill` end to end on a tiny class-conditional run: a halving brings the student at
N/2 DDIM steps to the teacher at N, measured through the loaded run folders (not the training
code's own measurement); the student follows its class; a chain of halvings, stop and resume;
the student as a run (its own default sampler and steps in sample and eval); the refusals."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from ldmkit import api
from ldmkit.cli import main
from ldmkit.config import ConfigError
from ldmkit.diffusion.distillation import WEIGHTINGS
from ldmkit.options import DISTILL_WEIGHTINGS
from ldmkit.pipeline import LatentDiffusion
from ldmkit.recipe import run_config_from_dict
from ldmkit.runs import RunFolder
from ldmkit.training.run import train_run

sys.path.insert(0, str(Path(__file__).parents[1] / "reliability"))
sys.path.insert(0, str(Path(__file__).parents[1] / "evaluation"))
from eval_helpers import make_tiny_run  # noqa: E402
from reliability_helpers import make_run  # noqa: E402

GUIDANCE = 3.0
TEACHER = {
    "data": "builtin:shapes?n=64", "image_size": 16,
    "vae": {"block_out_channels": [8, 8], "layers_per_block": 1, "norm_groups": 4,
            "mid_attention": False},
    "unet": {"block_out_channels": [16, 32], "attention_resolutions": [], "norm_num_groups": 8,
             "head_dim": 8, "num_res_blocks": 1, "mid_attention": False},
    "vae_train": {"steps": 4, "batch_size": 8, "sample_every": 0},
    "unet_train": {"steps": 300, "batch_size": 16, "lr": 2e-3, "sample_every": 0,
                   "checkpoint_every": 1000},
    "preview_steps": 2, "guidance_scale": GUIDANCE,
}  # fmt: skip


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A class-conditional teacher (5 shapes), trained briefly so that its classes differ."""
    torch.set_num_threads(1)  # module fixtures run before the per-test one that sets this
    out = tmp_path_factory.mktemp("distill") / "teacher"
    train_run(run_config_from_dict(TEACHER), out)
    return out


@pytest.fixture(scope="module")
def student(teacher) -> Path:
    """The teacher at 2 DDIM steps distilled into a student of 1 step."""
    torch.set_num_threads(1)
    out = teacher.parent / "student"
    res = api.distill(teacher, out, steps=1, teacher_steps=2, iterations=200, batch_size=16,
                      lr=1e-3)  # fmt: skip
    assert res.complete and res.steps == 1 and res.stopped_because == "finished"
    return out


def latents(ldm, labels, **kw):
    return ldm.sample(len(labels), class_labels=labels, seed=3, return_latents=True, fast=False,
                      **kw)  # fmt: skip


def rms(a, b):
    return float((a - b).square().mean().sqrt())


def test_one_halving_brings_the_student_to_the_teacher(teacher, student):
    """Loaded as runs: the student at 1 step (its default: DDIM, unguided) against the teacher at
    2 guided DDIM steps, from the same noise. Before training the student IS the teacher, whose
    1-step samples are the baseline: the training must cut that gap at least 3-fold (measured:
    0.50 -> 0.10 RMS in the latent space, 200 steps)."""
    t = LatentDiffusion.from_run(teacher, fast=False)
    s = LatentDiffusion.from_run(student, fast=False)
    assert (s.default_sampler, s.default_steps, s.guidance_scale) == ("ddim", 1, 1.0)
    labels = torch.arange(16) % 5
    ref = latents(t, labels, sampler="ddim", steps=2, guidance_scale=GUIDANCE)
    baseline = rms(latents(t, labels, sampler="ddim", steps=1, guidance_scale=GUIDANCE), ref)
    gap = rms(latents(s, labels), ref)
    assert gap < baseline / 3, (gap, baseline)
    record = RunFolder(student).distill_record()
    (h,) = record["halvings"]
    assert (h["from"], h["to"], h["iterations"]) == (2, 1, 200)
    assert h["gap_after"] < h["gap_before"] / 3  # the training's own measurement agrees
    assert record["guidance_scale"] == GUIDANCE and record["method"] == "progressive"
    assert record["teacher_hash"] == RunFolder(teacher).weights_hash()


def test_the_student_follows_its_class(teacher, student):
    """Each class's student samples lie nearer the teacher's samples of the same class (same
    noise) than the teacher's of any other class."""
    t = LatentDiffusion.from_run(teacher, fast=False)
    s = LatentDiffusion.from_run(student, fast=False)
    n = 8
    ref = [latents(t, [c] * n, sampler="ddim", steps=2, guidance_scale=GUIDANCE) for c in range(5)]
    got = [latents(s, [c] * n) for c in range(5)]
    dist = torch.tensor([[rms(got[c], ref[k]) for k in range(5)] for c in range(5)])
    assert torch.equal(dist.argmin(1), torch.arange(5)), dist


def test_the_student_samples_by_default_with_its_own_sampler(student, tmp_path, capsys):
    grid = tmp_path / "g.png"
    assert main(["sample", "--run", str(student), "--n", "5", "--out", str(grid)]) == 0
    assert "ddim, 1 steps" in capsys.readouterr().out and grid.is_file()
    samples = api.sample(student, n=2, steps=2, sampler="euler")  # an explicit choice wins
    assert "euler, 2 steps" in samples.description


def test_eval_measures_a_student_at_its_own_steps(student, monkeypatch):
    from ldmkit.evaluation import evaluate

    seen = {}
    monkeypatch.setattr(evaluate, "evaluate_run", lambda run, **kw: seen.update(kw) or ({}, {}))
    api.evaluate(student, n=50)
    assert (seen["samplers"], seen["steps"]) == (["ddim"], [1])


def test_a_chain_of_halvings_stop_and_resume(teacher, tmp_path):
    """4 -> 2 -> 1 steps, stopped in the first halving by a stop request and resumed: the
    halvings run in order, each narrowing its gap; the student's steps follow."""
    out = tmp_path / "chain"
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 12

    kw = dict(steps=1, teacher_steps=4, iterations=40, batch_size=16, lr=1e-3)
    first = api.distill(teacher, out, stop=stop, **kw)
    assert first.stopped_because == "stop request" and not first.complete
    assert RunFolder(out).default_sampling()[1] == 20  # no student saved yet: the defaults
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        api.distill(teacher, out, **kw)
    res = api.distill(teacher, out, resume=True, **kw)
    assert res.complete and res.stopped_because == "finished"
    record = RunFolder(out).distill_record()
    assert [(h["from"], h["to"]) for h in record["halvings"]] == [(4, 2), (2, 1)]
    assert record["halvings"][0]["iterations"] == 40
    log = [json.loads(x) for x in RunFolder(out).log_path.read_text().splitlines()]
    logged = [r["step"] for r in log if r["stage"] == "distill_4to2"]
    assert logged == [10, 20, 30, 40]  # resumed at its checkpoint (step 12), not restarted
    for h in record["halvings"]:
        assert h["gap_after"] < h["gap_before"], h
    assert RunFolder(out).default_sampling() == ("ddim", 1)
    assert {r["stage"] for r in log} == {"distill_4to2", "distill_2to1"}


def test_only_the_first_halvings_teacher_is_guided(teacher, tmp_path, monkeypatch):
    """The run's own UNet is guided (classifier-free, at the run's scale) in the first halving;
    from the second on the teacher is the previous student, whose guidance is built in: calling
    it with the unconditional branch again would compound the scale (w^k at the k-th halving;
    the MNIST students of issue 27 were over-guided by it). Spied on every network call that
    `guided_v` makes (the teacher's targets and the gap measurements): an unconditional batch is
    passed in the first halving, and never after it."""
    from ldmkit.training import distill as d

    halving, seen = {"k": 0}, []
    real = d.guided_v

    def spy(unet, z, t, cond, uncond, w):
        seen.append((halving["k"], uncond is not None, torch.is_grad_enabled()))
        return real(unet, z, t, cond, uncond, w)

    def next_halving(n, unet):
        halving["k"] += 1

    monkeypatch.setattr(d, "guided_v", spy)
    res = d.distill_run(teacher, tmp_path / "s", steps=1, teacher_steps=8, iterations=2,
                        batch_size=4, on_halving=next_halving)  # fmt: skip
    assert res.complete and halving["k"] == 3
    assert all(not grad for _, _, grad in seen)  # the student's own training call is direct
    guided = {k: any(g for kk, g, _ in seen if kk == k) for k in range(3)}
    assert guided == {0: True, 1: False, 2: False}, guided
    assert {k for k, _, _ in seen} == {0, 1, 2}  # every halving called its teacher


def test_refusals(teacher, student, tmp_path):
    def refused(match, run=teacher, **kw):
        with pytest.raises(ConfigError, match=match):
            api.distill(run, tmp_path / "x", **kw)
        assert not (tmp_path / "x" / "run.json").exists()

    refused("student of a student", run=student, steps=1, teacher_steps=2)
    refused("power of two below --teacher-steps", steps=3)
    refused("power of two below --teacher-steps", steps=64)
    refused("--teacher-steps 48 must be a power of two", teacher_steps=48)
    refused("--steps must be", steps=0)
    refused("--time-budget: cannot read the duration", time_budget="soon")
    refused("unknown weighting", weighting="min-snr")
    eps = tmp_path / "eps"
    shutil.copytree(teacher, eps)
    cfg = json.loads((eps / "run.json").read_text())
    cfg["unet"]["prediction_type"] = "eps"
    (eps / "run.json").write_text(json.dumps(cfg))
    refused("predicts eps: progressive distillation needs v-prediction", run=eps)
    three = make_run(tmp_path / "three", num_classes=3)  # its data (the shapes) has 5 classes
    refused("no longer has the 3 classes the run was trained on", run=three, steps=1,
            teacher_steps=2)  # fmt: skip
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    refused("is not empty; choose a new --out folder", steps=1, teacher_steps=2, iterations=1)
    with pytest.raises(ConfigError, match="is no distilled student"):
        api.distill(teacher, three, steps=1, teacher_steps=2, resume=True)  # a run, no student
    assert set(WEIGHTINGS) == set(DISTILL_WEIGHTINGS)


def test_resume_refuses_a_teacher_whose_weights_changed(teacher, tmp_path):
    t2 = tmp_path / "t2"
    shutil.copytree(teacher, t2, ignore=shutil.ignore_patterns("checkpoints"))
    out = tmp_path / "s"
    api.distill(t2, out, steps=1, teacher_steps=2, iterations=2, batch_size=4, stop=lambda: True)
    unet = RunFolder(t2).load_unet()
    with torch.no_grad():
        next(unet.parameters()).add_(0.01)
    RunFolder(t2).save_unet(unet)
    with pytest.raises(ConfigError, match="goes from 2 to 1 steps; resume it with"):
        api.distill(teacher, out, steps=1, teacher_steps=4, iterations=2, resume=True)
    with pytest.raises(ConfigError, match="weights changed since this distillation started"):
        api.distill(t2, out, steps=1, teacher_steps=2, iterations=2, batch_size=4, resume=True)


def test_the_cli_says_what_is_wrong_in_one_line(student, tmp_path, capsys):
    rc = main(["distill", "--run", str(student), "--out", str(tmp_path / "y"), "--steps", "1",
               "--teacher-steps", "2"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "student of a student" in err[0]


def test_text_and_unconditional_runs_distil(tmp_path):
    """A text run (random weights; its latents encoded, no cache) and an unconditional one go
    through end to end and load as runs."""
    text = make_tiny_run(tmp_path / "text", text=True)
    res = api.distill(text, tmp_path / "text-fast", steps=1, teacher_steps=2, iterations=3,
                      batch_size=4)  # fmt: skip
    assert res.complete
    ldm = LatentDiffusion.from_run(tmp_path / "text-fast")
    assert ldm.is_text_conditional and ldm.default_steps == 1
    assert ldm.sample(2, prompt="a small red star", seed=0).shape == (2, 3, 16, 16)
    plain = make_run(tmp_path / "plain", num_classes=None)
    res = api.distill(plain, tmp_path / "plain-fast", steps=2, teacher_steps=4, iterations=2,
                      batch_size=4)  # fmt: skip
    assert res.complete and [h["to"] for h in res.halvings] == [2]


def test_the_readmes_distill_command_runs(teacher, tmp_path, capsys):
    """The README's `ldmkit distill` line, on the tiny teacher with few iterations: four
    halvings, 64 -> 4 steps, then its `ldmkit sample` line."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Few-step sampling")[1].split("\n## ")[0]
    lines = [x.split("#")[0].split() for x in section.splitlines() if x.startswith("ldmkit ")]
    distill, sample = lines[0], lines[1]
    swap = {"runs/shapes": str(teacher), "runs/shapes-fast": str(tmp_path / "fast"),
            "fast.png": str(tmp_path / "fast.png")}  # fmt: skip
    argv = [swap.get(a, a) for a in distill[1:]] + ["--iterations", "3", "--batch-size", "8",
                                                    "--quiet"]  # fmt: skip
    assert main(argv) == 0
    record = RunFolder(tmp_path / "fast").distill_record()
    assert [h["from"] for h in record["halvings"]] == [64, 32, 16, 8] and record["steps"] == 4
    assert main([swap.get(a, a) for a in sample[1:]] + ["--n", "5"]) == 0
    assert "ddim, 4 steps" in capsys.readouterr().out


def test_a_time_budget_without_iterations_sets_the_length(teacher, tmp_path):
    """Without --iterations a --time-budget plans each halving (its share of the budget), and
    the halving ends on it (how closely it keeps the time is the loop's, tested there)."""
    res = api.distill(teacher, tmp_path / "b", steps=1, teacher_steps=2, time_budget="4s",
                      batch_size=8)  # fmt: skip
    (h,) = res.halvings
    assert h["ended"] == "time budget" and 20 < h["iterations"] < 100_000


def test_a_guidance_input_starts_as_the_unet_without_it():
    from ldmkit.config import ConfigError as Refused
    from ldmkit.interop.unet_names import diffusers_unet_config
    from ldmkit.models.unet import UNet, UNetConfig
    from ldmkit.training.distill import with_guidance_input

    torch.manual_seed(0)
    unet = UNet(UNetConfig(block_out_channels=(8, 16), attention_resolutions=(), norm_num_groups=4,
                           num_classes=3, sample_size=8, head_dim=8)).eval()  # fmt: skip
    for p in unet.parameters():  # nonzero everywhere, so that the output depends on everything
        p.data.normal_(0, 0.1)
    wide = with_guidance_input(unet).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 990]), torch.tensor([0, 1, 3])
    want = unet(x, t, class_labels=y)
    for w in (1.0, 4.0):
        assert torch.equal(wide(x, t, class_labels=y, guidance=torch.full((3,), w)), want)
    with pytest.raises(ValueError, match="pass guidance="):
        wide(x, t, class_labels=y)
    with pytest.raises(ValueError, match="has no guidance input"):
        unet(x, t, class_labels=y, guidance=torch.ones(3))
    with pytest.raises(Refused, match="guidance_input .* has no diffusers equivalent"):
        diffusers_unet_config(wide.config)


def test_a_student_with_a_guidance_input_follows_the_scale(teacher, tmp_path):
    """--guidance-mode input: one student for scales 1..6. Its response to the scale (samples at
    6 minus at 1, same noise) points the way the teacher's does; a student without the input
    (or before training: its embedding starts at zero) does not respond at all. Measured: cosine
    0.66, 44 % of the teacher's size, after 300 steps; the run's own scale is its default."""
    out = tmp_path / "w"
    res = api.distill(teacher, out, steps=1, teacher_steps=2, iterations=300, batch_size=16,
                      lr=1e-3, guidance_mode="input", max_guidance=6)  # fmt: skip
    record = RunFolder(out).distill_record()
    assert record["guidance_input"] and record["guidance_range"] == [1.0, 6.0]
    (h,) = res.halvings
    assert h["gap_after"] < h["gap_before"] / 3
    t = LatentDiffusion.from_run(teacher, fast=False)
    s = LatentDiffusion.from_run(out, fast=False)
    assert s.unet.config.guidance_input and s.guidance_scale == GUIDANCE
    labels = torch.arange(16) % 5
    dt = latents(t, labels, sampler="ddim", steps=2, guidance_scale=6.0) - latents(
        t, labels, sampler="ddim", steps=2, guidance_scale=1.0)  # fmt: skip
    ds = latents(s, labels, guidance_scale=6.0) - latents(s, labels, guidance_scale=1.0)
    cos = torch.nn.functional.cosine_similarity(dt.flatten(), ds.flatten(), dim=0)
    assert cos > 0.4 and ds.norm() > 0.2 * dt.norm(), (float(cos), float(ds.norm() / dt.norm()))
    with pytest.raises(ConfigError, match="unconditional: it has no guidance to take"):
        api.distill(make_run(tmp_path / "plain", num_classes=None), tmp_path / "p", steps=1,
                    teacher_steps=2, guidance_mode="input")  # fmt: skip


def test_a_text_student_with_a_guidance_input_refuses_a_negative_prompt(tmp_path):
    text = make_tiny_run(tmp_path / "text", text=True)
    api.distill(text, tmp_path / "w", steps=1, teacher_steps=2, iterations=2, batch_size=4,
                guidance_mode="input")  # fmt: skip
    ldm = LatentDiffusion.from_run(tmp_path / "w")
    assert ldm.sample(2, prompt="a red star", guidance_scale=4.0).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="a negative prompt does not apply"):
        ldm.sample(2, prompt="a red star", negative_prompt="blue")


# ------------------------------------------------------------------------------ session 10
def test_edits_take_the_runs_own_sampler_and_steps(teacher, student):
    """An edit (and an inversion) given no sampler or steps takes the run's own: a student's
    DDIM at its count; a trained run's library defaults (20 steps, 50 for invert)."""
    from ldmkit.diffusion.sampler_names import DEFAULT_SAMPLER, DEFAULT_STEPS

    def checked(kind, run, **given):
        o = api.check_edit_options(kind, given, RunFolder(run))
        return getattr(o, "sampler", None), o.steps

    assert checked("img2img", student) == ("ddim", 1)
    assert checked("inpaint", student) == ("ddim", 1)
    assert checked("invert", student) == (None, 1)
    assert checked("interpolate", student) == ("ddim", 1)
    assert checked("img2img", teacher) == (DEFAULT_SAMPLER, DEFAULT_STEPS)
    assert checked("invert", teacher) == (None, 50)
    assert checked("interpolate", teacher) == ("ddim", DEFAULT_STEPS)
    assert checked("img2img", student, steps=3, sampler="euler") == ("euler", 3)  # given wins


def test_the_pages_edit_forms_show_the_students_sampling(student):
    from ldmkit.web import edits

    run = {"conditioning": "class", "class_names": ["a"], "guidance": 1.0}
    plain = {k: {f["name"]: f.get("value") for f in m["fields"]}
             for k, m in edits.methods(run).items()}  # fmt: skip
    assert (plain["img2img"]["sampler"], plain["img2img"]["steps"]) == ("dpm++2m-sde", 20)
    assert plain["interpolate"]["sampler"] == "ddim" and plain["denoise"]["steps"] == 20
    fast = {k: {f["name"]: f.get("value") for f in m["fields"]}
            for k, m in edits.methods({**run, "student_sampling": ("ddim", 1)}).items()}  # fmt: skip
    assert (fast["img2img"]["sampler"], fast["img2img"]["steps"]) == ("ddim", 1)
    assert fast["interpolate"]["steps"] == 1 and fast["fill"]["sampler"] == "ddim"


def test_the_report_samples_a_student_with_its_own_sampling(student, teacher, monkeypatch):
    from ldmkit.evaluation import report

    seen = []

    def sections(ldm, t, *, sampler, steps, **kw):
        seen.append((sampler, steps))
        return {"samples": "", "trajectory": ""}

    monkeypatch.setattr(report, "_sample_sections", sections)
    api.report(student)
    api.report(teacher)
    api.report(student, sampler="euler", steps=3)
    assert seen == [("ddim", 1), ("dpm++2m-sde", 20), ("euler", 3)]


def test_a_fixed_scale_student_refuses_another_guidance(teacher, student, tmp_path, capsys):
    """The student distilled at the run's guidance has it built in: sampling or editing it at
    another scale is refused in one line (scale 1, its default, is fine); the teacher takes any."""
    with pytest.raises(ConfigError, match="distilled at guidance 3, which is built into"):
        api.sample(student, n=2, guidance_scale=2.0)
    with pytest.raises(ConfigError, match="--guidance-mode input"):
        api.check_edit_options("img2img", {"guidance_scale": 0.0}, RunFolder(student))
    with pytest.raises(ConfigError, match="--guidance 2: .* is a student distilled at guidance 3"):
        api.evaluate(student, n=50, guidance_scale=2.0)
    assert api.sample(student, n=2, guidance_scale=1.0).images.shape[0] == 2
    assert api.sample(teacher, n=2, steps=1, guidance_scale=2.0).images.shape[0] == 2
    rc = main(["sample", "--run", str(student), "--n", "2", "--guidance", "4",
               "--out", str(tmp_path / "g.png")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "built into its weights" in err[0], err


def test_the_student_sampler_rule_keeps_ddim_unless_lcm_is_clearly_better():
    from ldmkit.evaluation.sampler_choice import SamplerRow, pick_sampler

    def rows(ddim, lcm):
        return [SamplerRow("ddim", *ddim, 0.0), SamplerRow("lcm", *lcm, 0.0)]

    # the 4-step students of docs/performance.md (issue 27): shapes, then MNIST
    assert pick_sampler(rows((12.1, 0.671), (6.17, 0.791)), n=256) == "lcm"
    assert pick_sampler(rows((1.23, 0.983), (3.13, 0.996)), n=256) == "ddim"
    # 10 % lower FID is within the noise; 50 % lower at lower accuracy does not count
    assert pick_sampler(rows((5.0, 0.80), (4.5, 0.80)), n=256) == "ddim"
    assert pick_sampler(rows((5.0, 0.80), (2.5, 0.70)), n=256) == "ddim"


def test_a_students_sampler_is_measured_at_the_end_and_becomes_its_default(teacher, tmp_path,
                                                                           capsys):  # fmt: skip
    """`--sampler auto` (the default): a 2-step student measures ddim against lcm on the run's
    data, records both rows and its pick, and samples with the pick; `--sampler lcm` sets it
    without measuring; a 1-step student is not measured."""
    from ldmkit.evaluation.sampler_choice import SamplerRow, pick_sampler

    out = tmp_path / "auto"
    rc = main(["distill", "--run", str(teacher), "--out", str(out), "--steps", "2",
               "--teacher-steps", "4", "--iterations", "3", "--batch-size", "8", "--quiet"])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    record = RunFolder(out).distill_record()
    measured = record["sampler_choice"]
    assert set(measured) == {"ddim", "lcm", "n"} and measured["n"] == 32  # half of 64 images
    rows = [SamplerRow(k, measured[k]["fid"], measured[k]["accuracy"], 0) for k in ("ddim", "lcm")]
    assert all(r.fid > 0 and 0 <= r.accuracy <= 1 for r in rows)
    assert record["sampler"] == pick_sampler(rows, n=32)
    saved = json.loads((out / "eval" / "sampler.json").read_text())
    assert saved["sampler"] == record["sampler"] and saved["steps"] == 2
    assert f"student of 2 {record['sampler']} steps" in printed
    ldm = LatentDiffusion.from_run(out)
    assert (ldm.default_sampler, ldm.default_steps) == (record["sampler"], 2)

    fixed = tmp_path / "lcm"
    rc = main(["distill", "--run", str(teacher), "--out", str(fixed), "--steps", "2",
               "--teacher-steps", "4", "--iterations", "3", "--batch-size", "8", "--quiet",
               "--sampler", "lcm"])  # fmt: skip
    assert rc == 0 and "student of 2 lcm steps" in capsys.readouterr().out
    assert RunFolder(fixed).default_sampling() == ("lcm", 2)
    assert "sampler_choice" not in RunFolder(fixed).distill_record()
    assert not (fixed / "eval" / "sampler.json").exists()
    # both samplers ran: the lcm student's samples differ from the same student's DDIM ones
    lcm = LatentDiffusion.from_run(fixed)
    labels = torch.tensor([0, 1])
    assert not torch.equal(latents(lcm, labels), latents(lcm, labels, sampler="ddim"))


def test_a_one_step_student_keeps_ddim_unmeasured(student):
    record = RunFolder(student).distill_record()
    assert record["sampler"] == "ddim" and record["sampler_choice"] is None
    assert not (student / "eval" / "sampler.json").exists()


def test_a_bad_sampler_is_refused_in_one_line(teacher, tmp_path, capsys):
    rc = main(["distill", "--run", str(teacher), "--out", str(tmp_path / "z"), "--sampler",
               "heun"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown sampler 'heun'" in err[0], err
    assert err[0].endswith("choose one of auto, ddim, lcm")
