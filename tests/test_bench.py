"""The benchmarks' --quick forms run and print well-formed tables, and the two libraries' models
agree. Never a timed assertion: speed is printed, not tested."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(autouse=True)
def _bench_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))


def table(text: str, *columns: str) -> list[list[str]]:
    """The rows of the printed table whose header starts with `columns`."""
    lines = text.splitlines()
    header = re.compile(r"\s+".join(map(re.escape, columns)) + r"\b")
    start = next(i for i, ln in enumerate(lines) if header.match(ln))
    rows = []
    for ln in lines[start + 1 :]:
        if not ln.strip():  # benchlib.print_table ends a table with a blank line
            break
        rows.append(ln.split())
    return rows


def test_vs_diffusers_quick(capsys):
    pytest.importorskip("diffusers")
    import vs_diffusers

    # one thread, as every test (conftest.py): on a shared host two spin on tiny ops
    vs_diffusers.main(
        ["--quick", "--threads", "1", "--rows", "parity,forward,sample,small,overhead"]
    )
    out = capsys.readouterr().out
    assert re.search(r"avx512_bf16=(yes|no) amx_bf16=(yes|no) avx512f=(yes|no) avx2=(yes|no)", out)
    assert re.search(r"load avg \d+\.\d\d", out)
    parity = table(out, "model", "part")
    assert {r[1] for r in parity} >= {"unet", "vae"}
    for r in parity:
        assert float(r[-1]) < 1e-4, f"ldmkit and diffusers differ: {r}"
    rows = table(out, "row", "model")
    kinds = {r[0] for r in rows}
    assert {"forward", "sample", "small"} <= kinds
    for r in rows:
        ratio = float(r[r.index("quick") + 4])  # batch, ldmkit, diffusers, ratio
        assert ratio > 0 and all(
            float(v) > 0 for v in r[r.index("quick") + 1 : r.index("quick") + 4]
        )
    diffs = re.findall(r"max \|diff\| (\S+)", out)  # one per sampling row ("sample", "small")
    assert len(diffs) == sum(r[0] in ("sample", "small") for r in rows) >= 2, out
    for diff in diffs:
        assert float(diff) < 1e-2, "a sampler and its diffusers scheduler disagree"
    overhead = [ln for ln in out.splitlines() if ln.startswith(("ldmkit ", "diffusers "))]
    assert len(overhead) == 6 and all(float(ln.split()[-1]) >= 0 for ln in overhead)


def test_vs_diffusers_profile_quick(capsys):
    pytest.importorskip("diffusers")
    import vs_diffusers

    vs_diffusers.main(["--quick", "--threads", "1", "--rows", "profile"])
    out = capsys.readouterr().out
    kinds = table(out, "kind of op", "% of time")
    shares = {" ".join(r[:-1]): float(r[-1]) for r in kinds}
    assert "convolution" in shares, out
    assert sum(shares.values()) == pytest.approx(100, abs=0.5)
    convs = table(out, "input CxHxW * weight OxIxK")
    assert convs and all(float(r[-2]) > 0 for r in convs)  # each shape's GFLOP/s
    assert re.search(r"convolutions alone: \d+ % of a forward's time", out)


def test_data_path_quick(capsys):
    import data_path

    data_path.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    rows = {" ".join(r[:-2]): (float(r[-2]), float(r[-1])) for r in table(out, "part of a step")}
    assert set(rows) == {"full", "no network", "batches"}
    assert rows["full"][1] == pytest.approx(100)
    assert all(ms > 0 for ms, _ in rows.values())


def test_scaling_quick(capsys, tmp_path):
    import scaling

    scaling.main(["--quick", "--threads", "1", "--out", str(tmp_path / "s.png")])
    out = capsys.readouterr().out
    rows = table(out, "latent", "batch")
    assert [(r[0], r[1]) for r in rows] == [("8", "1"), ("8", "2"), ("8", "4")]
    assert re.search(r"knee at batch [124]\b", out)
    if "matplotlib is not installed" not in out:
        assert (tmp_path / "s.png").stat().st_size > 0


@pytest.mark.slow
def test_quality_per_minute_quick(capsys, tmp_path):
    pytest.importorskip("diffusers")
    import quality_per_minute

    quality_per_minute.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = table(out, "contender", "budget")
    assert [r[0] for r in rows] == ["ldmkit", "diffusers", "ldmkit-class"]
    assert all(float(r[2]) >= 0 for r in rows)  # FID
    assert len(list(tmp_path.glob("*.png"))) == 3


def test_distill_quick(capsys, tmp_path):
    """A tiny teacher distilled 16 -> 1 steps: every row of the table, FIDs and CPU times."""
    import distill

    distill.main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    out = capsys.readouterr().out
    assert re.search(r"avx512_bf16=(yes|no) amx_bf16=(yes|no) avx512f=(yes|no) avx2=(yes|no)", out)
    rows = table(out, "model", "sampler", "steps")
    expected = [*[("teacher", "dpm++2m-sde", k) for k in (1, 2, 4, 8, 20)],
                *[("teacher", "ddim", k) for k in (8, 16)],
                *[(f"student-{k}", sampler, k) for k in (8, 4, 2, 1)
                  for sampler in ("ddim", "lcm")]]  # fmt: skip
    assert [(r[0], r[1], int(r[2])) for r in rows] == expected
    assert all(float(r[4]) >= 0 and float(r[7]) > 0 for r in rows)  # FID-cnn, CPU seconds
    assert all(0 <= float(r[6]) <= 1 for r in rows)  # accuracy
    assert out.count('"from"') == 4  # the four halvings, 16 -> 8 -> 4 -> 2 -> 1
    assert (tmp_path / "student-table.md").is_file() and (tmp_path / "grids").is_dir()
    # a second call (another teacher copy given) reuses the teacher's rows and the students
    first = (tmp_path / "teacher-rows.json").read_text()
    distill.main(["--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path), "--n", "64",
                  "--threads", "1"])  # fmt: skip
    again = capsys.readouterr().out
    assert (tmp_path / "teacher-rows.json").read_text() == first
    assert again.count("distillation 16 -> 1") == 0 and again.count('"model"') == 8
    assert [r[:7] for r in table(again, "model", "sampler", "steps")] == [r[:7] for r in rows]
    # a second student (--name) writes grids of its own and leaves the first's alone
    grids = tmp_path / "grids"
    assert {"student-4.png", "student-4-lcm.png"} <= {f.name for f in grids.iterdir()}
    before = (grids / "student-4.png").read_bytes()
    distill.main(["--quick", "--out", str(tmp_path), "--threads", "1", "--name", "other",
                  "--student-samplers", "ddim"])  # fmt: skip
    capsys.readouterr()
    assert {f"other-{k}.png" for k in (8, 4, 2, 1)} <= {f.name for f in grids.iterdir()}
    assert (grids / "student-4.png").read_bytes() == before
    # the sampler choice over seeds on those students (bench/student_sampler.py)
    import student_sampler

    from ldmkit.evaluation.sampler_choice import SamplerRow, pick_sampler

    student_sampler.main(["--bench", str(tmp_path), "--seeds", "2"])
    out = capsys.readouterr().out
    rows = table(out, "student", "steps", "picks")
    n = int(re.search(r"n = (\d+) per sampler", out).group(1))
    assert [(r[0], r[1]) for r in rows] == [("student-8", "8"), ("student-4", "4"),
                                            ("student-2", "2")]  # fmt: skip
    for r in rows:  # two picks; seed 0's is the rule's pick of the figures printed
        picks = r[2:4]
        ddim = SamplerRow("ddim", float(r[4]), float(r[6]), 0.0)
        lcm = SamplerRow("lcm", float(r[5]), float(r[7]), 0.0)
        assert set(picks) <= {"ddim", "lcm"} and picks[0] == pick_sampler([ddim, lcm], n=n)
    # --teacher RUN is copied: the run given is left as it was
    given = tmp_path / "teacher"
    before = {p: p.stat().st_mtime_ns for p in given.rglob("*")}
    distill.main(["--quick", "--teacher", str(given), "--out", str(tmp_path / "b"),
                  "--threads", "1", "--ddim-rows", ""])  # fmt: skip
    assert (tmp_path / "b" / "teacher" / "run.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in given.rglob("*")} == before


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_augment_study_quick(capsys, tmp_path):
    """The plumbing of the augmentation study: real folder -> generator -> synth -> classifiers
    on real, real + generated at each ratio and generated alone, a table, JSON and a plot."""
    import json

    import augment_study

    augment_study.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert re.search(r"avx512_bf16=(yes|no)", out) and re.search(r"load avg \d+\.\d\d", out)
    rows = table(out, "data", "real/class", "real", "+1:1", "+1:2", "gen")
    assert [r[:2] for r in rows] == [["shapes", "4"]]
    for cell in rows[0][2:-1]:
        assert 0 <= float(cell.split("+-")[0]) <= 1, rows
    assert all(re.search(r"\([+-]\d\.\d{3}\)$", c) for c in rows[0][3:-1]), rows
    assert re.fullmatch(r"(ok|WEAK|no-signal),\d+-steps", rows[0][-1]), rows
    saved = json.loads((tmp_path / "augment_study.json").read_text())
    (cell,) = saved["cells"]
    assert cell["generated"] == 4 * 2 * 5  # k x the largest ratio, per class of 5
    assert set(cell["accuracy"]) == {"real", "+1:1", "+1:2", "gen"}
    assert (tmp_path / "shapes-4" / "run" / "unet").is_dir()
    real = sorted(p.parent.name for p in (tmp_path / "shapes-4" / "real").rglob("*.png"))
    assert len(real) == 20 and len(set(real)) == 5  # k real images per class, no more
    if "matplotlib is not installed" not in out:
        assert (tmp_path / "augment_study.png").stat().st_size > 0
    # resumable: a second call redoes only what state.json lacks (here one classifier), keeps
    # the generator and its images, and measures the same accuracy again (seeded)
    state_path = tmp_path / "shapes-4" / "state.json"
    state = json.loads(state_path.read_text())
    before = state["acc"]["+1:2"].pop("0")
    state_path.write_text(json.dumps(state))
    unet = {p: p.stat().st_mtime_ns for p in (tmp_path / "shapes-4" / "run").rglob("*")}
    augment_study.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    assert json.loads(state_path.read_text())["acc"]["+1:2"]["0"] == before
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "shapes-4" / "run").rglob("*")} == unet


def test_vae_convergence_quick(capsys):
    import vae_convergence

    vae_convergence.main(["--quick", "--variants", "feat0.3-b16", "--curve", "--fid", "40"])
    out = capsys.readouterr().out
    curve = table(out, "feat0.3-b16: step", "CPU-s")
    steps = [int(r[0]) for r in curve]
    assert len(curve) >= 2 and steps == sorted(steps) and steps[-1] <= 30
    assert all(0 < float(r[2]) < 100 for r in curve)  # PSNR
    # readability, where the run's classifier reads well enough (not in 30 quick steps)
    assert all(r[4] == "-" or 0 <= float(r[4]) <= 1 for r in curve)
    assert re.search(r"avx512_bf16=(yes|no)", out) and "target readability 95%" in out
    rows = table(out, "variant", "CPU-s")
    assert [r[0] for r in rows] == ["feat0.3-b16"]
    # 30 steps reach no target: "> 300", then the step column's "-"
    assert rows[0][1:4] == [">", "300", "-"]
    assert 0.0 <= float(rows[0][-6]) <= 1.0  # the independent reader's share
    end_step, end_psnr, recon_fid, floor = rows[0][-5], rows[0][-4], rows[0][-2], rows[0][-1]
    assert int(end_step) == steps[-1]
    assert float(end_psnr) == pytest.approx(float(curve[-1][2]), abs=0.05)
    # 30 steps of an autoencoder are far from the real images: its reconstructions' FID is
    # above the real-vs-real floor measured on the same images
    assert float(recon_fid) > float(floor) > 0


def test_busy_machine_judges_a_finished_run_at_each_guidance(capsys, tmp_path):
    """--judge: no training; one row per --guidance scale, the run's own choice starred."""
    import busy_machine

    sys.path.insert(0, str(Path(__file__).parent / "evaluation"))
    from eval_helpers import make_tiny_run

    run = make_tiny_run(tmp_path / "run")
    busy_machine.main(["--judge", str(run), "--guidance", "1,2", "--n", "20", "--epochs", "1"])
    out = capsys.readouterr().out
    rows = table(out, "run", "AE", "steps")
    assert [r[5].rstrip("*") for r in rows] == ["1", "2"] and [r[-1] for r in rows] == ["-"] * 2
    assert all(0 <= float(r[6]) <= 1 and float(r[7]) >= 0 for r in rows)
    assert "(judged again: --judge)" in out and "1 epochs" in out


def test_guidance_pick_prints_each_seeds_pick_under_both_rules(capsys, tmp_path):
    import guidance_pick

    sys.path.insert(0, str(Path(__file__).parent / "evaluation"))
    from eval_helpers import make_tiny_run

    from ldmkit.evaluation.guidance_choice import GUIDANCE_SCALES, GuidanceRow, pick_scale

    run = make_tiny_run(tmp_path / "run")
    argv = ["--run", str(run), "--settings", "8x2,10x2", "--seeds", "2", "--first-seed", "3"]
    guidance_pick.main(argv)
    out = capsys.readouterr().out
    assert "picks, seeds 3-4" in out
    rows = table(out, "images", "x", "steps")
    assert [r[0] for r in rows] == ["8x2", "10x2"]
    for r in rows:  # "s each", then two picks per rule, each one of the scales measured
        assert len(r) == 2 + 2 * 2 and all(float(v) in GUIDANCE_SCALES for v in r[2:])
    # each printed measurement, picked again here, gives the pick in the table
    lines = [ln for ln in out.splitlines() if ln.lstrip().startswith(("8x2 seed", "10x2 seed"))]
    assert [ln.split()[2] for ln in lines] == ["3:", "4:"] * 2
    for i, ln in enumerate(lines):
        measured = re.findall(r"([\d.]+): FID ([\d.]+) acc ([\d.]+)", ln)
        table_rows = [GuidanceRow(float(g), float(f), float(a), 0.0) for g, f, a in measured]
        n = int(ln.split()[0].split("x")[0])
        assert float(rows[i // 2][2 + i % 2]) == pick_scale(table_rows, n=n)
        assert float(rows[i // 2][4 + i % 2]) == guidance_pick.lowest_fid(table_rows)


@pytest.mark.slow
def test_busy_machine_quick(capsys, tmp_path):
    import busy_machine

    busy_machine.main(["--quick", "--hog", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = table(out, "run", "AE", "steps")
    assert len(rows) == 1 and rows[0][0] == "shapes-hog1"
    assert rows[0][-1] in ("yes", "no") and 0 <= float(rows[0][6]) <= 1
    assert float(rows[0][8]) > 0  # the reconstructions' FID against the reference's first half


def test_sizes_quick(capsys):
    import sizes

    sizes.main(["--sizes", "32", "64", "--threads", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert re.search(r"avx512_bf16=(yes|no) amx_bf16=(yes|no) avx512f=(yes|no) avx2=(yes|no)", out)
    rows = [ln.strip("|").split("|") for ln in out.splitlines() if re.match(r"\| \d+ \|", ln)]
    assert [int(r[0]) for r in rows] == [32, 64]
    assert [int(r[1]) for r in rows] == [2, 4]  # the downsampling factor follows the size
    assert [r[2].strip() for r in rows] == ["4x16x16", "4x16x16"]
    for r in rows:
        assert all(float(v) > 0 for v in r[6:10]), r


def test_finetune_quick(capsys, tmp_path):
    """bench/finetune.py --quick: a tiny base run of four shapes, two adapters of the fifth
    (with and without prior preservation), and its table."""
    import finetune

    finetune.main(["--quick", "--out", str(tmp_path / "bench"), "--guidance", "5"])
    out = capsys.readouterr().out
    rows = table(out, "variant", "new_acc", "new_fid")
    assert [r[0] for r in rows] == ["base", "attn-r4,", "locon-r8,", "locon-r8,"]
    assert [r[2] for r in rows[1:]] == ["1", "1", "0"]  # prior weights
    for r in rows[1:]:
        assert 0 <= float(r[3]) <= 1 and 0 <= float(r[5]) <= 1  # accuracies
        assert float(r[8]) > 0 and r[10] == "6"  # adapter KB, steps
        assert 0 <= float(r[11]) <= 1  # the new class's accuracy at guidance 5
    assert float(rows[2][8]) > float(rows[1][8])  # LoCon rank 8 is the larger adapter
    assert "base run classes: ['circle', 'square', 'star', 'triangle']" in out


def test_finetune_quick_text(capsys, tmp_path):
    """bench/finetune.py --quick --text: a tiny text base run of four shapes' captions, the
    fifth's word learned gated and ungated (with prior prompts from its captions), its table."""
    import finetune

    finetune.main(["--quick", "--text", "--out", str(tmp_path / "bench"),
                   "--variants", "locon-r8-gate@0,locon-r8@1"])  # fmt: skip
    out = capsys.readouterr().out
    rows = table(out, "variant", "new_acc", "new_fid")
    assert [r[0] for r in rows] == ["base", "locon-r8-gate,", "locon-r8,"]
    assert rows[0][1:3] == ["(cross", "unknown)"] and 0 <= float(rows[0][3]) <= 1
    gated, free = rows[1], rows[2]
    assert gated[5:7] == rows[0][5:7]  # the old prompts' accuracy and FID: the base's exactly
    for r in (gated, free):
        assert 0 <= float(r[3]) <= 1 and float(r[8]) > 0 and r[10] == "6"
    assert "new word: 'cross' (the held-out cross)" in out


def test_video_motion_probe_quick(capsys, tmp_path):
    import video_motion_probe

    video_motion_probe.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    rows = table(capsys.readouterr().out, "clips", "direction", "moving")
    assert [r[0] for r in rows] == ["real", "samples"]
    assert float(rows[0][1]) == 1.0 and float(rows[0][2]) == 1.0  # real clips read right
    assert 0 <= float(rows[1][1]) <= 1 and rows[1][5] == "3"  # three training steps
    assert len(list(tmp_path.glob("*.gif"))) == 8


def test_video_shapes_quick(capsys, tmp_path):
    import video_shapes

    video_shapes.main(["--quick", "--arms", "inflate-frozen,scratch,stacked", "--threads", "1",
                       "--out", str(tmp_path)])  # fmt: skip
    out = capsys.readouterr().out
    rows = table(out, "clips", "asked", "direction")
    assert [r[:2] for r in rows] == [
        ["real", "seen"], ["real-autoencoded", "seen"], ["inflate-frozen", "seen"],
        ["inflate-frozen", "held-out"], ["scratch", "seen"], ["scratch", "held-out"],
        ["stacked", "seen"], ["stacked", "held-out"],
    ]  # fmt: skip
    real = rows[0]
    assert float(real[2]) == 1.0 and float(real[3]) == 1.0  # the tracker reads real clips right
    assert rows[-1][7] == "3" and 0 <= float(rows[-1][2]) <= 1  # three steps, a share
    curve = table(out, "arm", "step", "train_s")
    assert {r[0] for r in curve} == {"inflate-frozen", "scratch", "stacked"}
    assert len(list(tmp_path.glob("*.gif"))) == 6 and (tmp_path / "results.json").exists()
    # the saved models evaluate to the same table without training
    video_shapes.main(["--quick", "--arms", "scratch", "--threads", "1", "--load", str(tmp_path)])
    again = table(capsys.readouterr().out, "clips", "asked", "direction")
    assert again == [rows[0], rows[1], rows[4], rows[5]]


def test_unet_recipe_trains_variants_on_the_runs_autoencoder_and_judges_them(capsys, tmp_path):
    """Each variant: RUN's autoencoder as it is, its settings on top of RUN's config, a fresh
    UNet of the asked steps; judge: one row per variant and scale, accuracy per class."""
    import unet_recipe
    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).parent / "evaluation"))
    from eval_helpers import make_tiny_run

    from ldmkit.checkpoint import read_json

    run, out = make_tiny_run(tmp_path / "run"), tmp_path / "variants"
    unet_recipe.main(["train", "--run", str(run), "--out", str(out), "--steps", "3",
                      "--variants", "recipe,wsd"])  # fmt: skip
    for name in ("recipe", "wsd"):
        assert load_file(out / name / "vae" / "model.safetensors").keys()
        for k, v in load_file(run / "vae" / "model.safetensors").items():
            assert torch.equal(v, load_file(out / name / "vae" / "model.safetensors")[k]), k
    assert read_json(out / "wsd" / "run.json")["unet_train"]["lr_schedule"] == "wsd"
    assert (
        read_json(out / "recipe" / "run.json")["unet_train"]["lr_schedule"]
        == (read_json(run / "run.json")["unet_train"]["lr_schedule"])
    )
    with pytest.raises(SystemExit, match="unknown variant"):
        unet_recipe.main(["train", "--run", str(run), "--out", str(out), "--variants", "nope"])
    capsys.readouterr()
    unet_recipe.main(["judge", "--run", str(run), "--out", str(out), "--n", "10",
                      "--epochs", "1", "--guidance", "1,2"])  # fmt: skip
    rows = table(capsys.readouterr().out, "variant", "UNet", "steps")
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("recipe", "3", "1"),
        ("recipe", "3", "2"),
        ("wsd", "3", "1"),
        ("wsd", "3", "2"),
    ]
    classes = len(read_json(run / "data.json")["class_names"])
    for r in rows:
        assert 0 <= float(r[4]) <= 1 and len(r) == 5 + classes + 1 and float(r[-1]) >= 0


def test_video_predict_scores_and_quick_table(capsys):
    """The frame-prediction bench: its PSNR against an analytic value (a constant error of 0.4
    on [-1, 1]: 10 log10(4 / 0.16) dB), and its table on a toy run: the run, the autoencoder
    and copy-last."""
    import math

    import numpy as np
    import video_predict

    truth = np.zeros((2, 3, 1, 8, 8), dtype=np.uint8)
    got = np.full_like(truth, 51)  # 51 / 127.5 - 1 = -0.6 against -1
    per = video_predict.scores(got, truth)
    assert len(per) == 3
    assert all(abs(p - 10 * math.log10(4 / 0.16)) < 1e-9 for p, _ in per)
    assert video_predict.scores(truth, truth)[0][0] == 100.0  # identical: capped
    video_predict.main(["--quick", "--threads", "1"])
    rows = table(capsys.readouterr().out, "frames", "frame 2")
    assert [r[0] for r in rows] == ["run", "autoencoder", "copy-last"]


def test_video_shape_reader_writes_the_frames_and_reads_autoencoders(capsys, tmp_path):
    import numpy as np
    import video_shape_reader as vsr

    from ldmkit.evaluation.features import DomainClassifier, DomainClassifierConfig
    from ldmkit.models.vae import Autoencoder, AutoencoderConfig

    vsr.main(["--write-frames", str(tmp_path / "frames"), "--frame-clips", "5", "--frames", "3",
              "--size", "16", "--threads", "1"])  # fmt: skip
    written = sorted(tmp_path.glob("frames/*/*.png"))
    assert len(written) == 15 and {p.parent.name for p in written} <= set(vsr.KINDS)
    assert "wrote 15 frames of 5 clips (seed 0)" in capsys.readouterr().out

    # the scores against a reader whose answers are known: frames 0 and 1 right, frame 2 not
    class Known:
        def logits(self, x):
            pred = torch.tensor([0, 0, 1] * (len(x) // 3))
            return torch.nn.functional.one_hot(pred, 5).double()

    clips = np.zeros((4, 3, 3, 8, 8), dtype=np.uint8)
    right, constant = vsr.clip_scores(Known(), clips, np.zeros(4, dtype=int))
    assert right == pytest.approx(2 / 3) and constant == 0.0

    torch.manual_seed(0)
    DomainClassifier(DomainClassifierConfig(num_classes=5)).save_pretrained(tmp_path / "clf")
    Autoencoder(AutoencoderConfig(image_size=16, block_out_channels=(8, 8), norm_groups=4)
                ).save_pretrained(tmp_path / "vae")  # fmt: skip
    vsr.main(["--classifier", str(tmp_path / "clf"), "--autoencoder", str(tmp_path / "vae"),
              "--real-clips", "4", "--frames", "3", "--size", "16", "--threads", "1"])  # fmt: skip
    rows = table(capsys.readouterr().out, "clips", "frames right")
    assert [r[0] for r in rows] == ["real", str(tmp_path / "vae")]
    assert rows[0][-1] == "-" and 0 < float(rows[1][-1]) < 60  # a random autoencoder's PSNR
    assert all(0 <= float(v) <= 1 for r in rows for v in r[1:3])
