"""Faults during training: SIGKILL at random moments (also mid-checkpoint), SIGINT/SIGTERM,
non-finite losses, a full disk, and two trainings on one run folder.

The kill tests compare the final weights of a killed-and-resumed run with an uninterrupted one,
bit for bit: data order is a function of (seed, step) and every RNG state is checkpointed
(training/loop.py). Subprocesses run with OMP_NUM_THREADS=1, like the in-process reference
(tests/conftest.py), so float sums happen in the same order.
"""

from __future__ import annotations

import errno
import json
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    error_line,
    make_run,
    run_cli,
    snapshot,
    spawn_train,
    subprocess_env,
    tiny,
)

from ldmkit.checkpoint import load_tensors
from ldmkit.runs import RunFolder
from ldmkit.training.state import CKPT_RE, list_checkpoints

SLOW_CKPT = {"LDMKIT_TEST_SLOW_CHECKPOINT": "1.0"}  # state.py's hook: sleep mid-checkpoint-write


# ------------------------------------------------------------------------------------ helpers
def final_weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {part: load_tensors(run / part / "model.safetensors") for part in ("vae", "unet")}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    for part in wa:
        assert wa[part].keys() == wb[part].keys()
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), (
                f"{part}/{k} differs from the uninterrupted run"
            )


def assert_every_checkpoint_loads(run: Path) -> None:
    """Every checkpoint folder on disk (hidden temporaries aside) is complete and loads."""
    root = run / "checkpoints"
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.name.startswith("."):  # a write or delete cut short: removed at the next start
            continue
        assert CKPT_RE.match(p.name) and p.is_dir(), p
        state = json.loads((p / "state.json").read_text())
        assert state["step"] == int(p.name[-8:])
        for name in ("modules", "optim", "rng"):
            load_tensors(p / f"{name}.safetensors")
    for part in ("vae", "unet"):
        if (run / part / "config.json").is_file():
            json.loads((run / part / "config.json").read_text())
            load_tensors(run / part / "model.safetensors")


def last_logged(run: Path) -> tuple[str, int] | None:
    """(stage, step) of the last step the run logged (log_every=1), or None."""
    path = run / "log.jsonl"
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return (rows[-1]["stage"], rows[-1]["step"]) if rows else None


def assert_lost_at_most_one_interval(run: Path, logged: tuple[str, int] | None, every: int) -> None:
    if logged is None:
        return
    stage, step = logged
    if stage == "autoencoder" and (run / "vae" / "config.json").is_file():
        return  # the stage finished and its result is saved
    ckpts = list_checkpoints(RunFolder(run).checkpoints_dir, stage)
    saved = ckpts[-1].step if ckpts else 0
    assert step - saved <= every, (
        f"{stage}: step {step} was done but the last checkpoint is {saved}"
    )


def reached(run: Path, stage: str, step: int) -> bool:
    logged = last_logged(run)
    return logged is not None and logged[0] == stage and logged[1] >= step


def in_checkpoint_write(run: Path, stage: str) -> bool:
    """True while the run sleeps in the hook inside a checkpoint write of `stage`."""
    root = run / "checkpoints"
    if not root.is_dir() or (last_logged(run) or ("", 0))[0] != stage:
        return False
    return any((p / "modules.safetensors").is_file() for p in root.glob(".tmp-*"))


def wait_for(proc: subprocess.Popen, cond, timeout: float = 120.0) -> bool:
    """Poll until cond() or the process ends; True if cond() held while it ran."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError("the training neither reached the moment nor ended")


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted tiny run (4 + 4 steps, a checkpoint every 2), trained in-process."""
    from ldmkit import cli

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli.main(["train", "--out", str(out), *tiny(4, 2)]) == 0
    return out


# ------------------------------------------------------------------------------------ SIGKILL
def test_sigkill_mid_checkpoint_then_resume_is_bit_exact(reference, tmp_path):
    """Short form (CI): one SIGKILL inside a diffusion checkpoint write, then --resume."""
    run = tmp_path / "run"
    proc = spawn_train(run, tiny(4, 2), **SLOW_CKPT)
    assert wait_for(proc, lambda: in_checkpoint_write(run, "diffusion"))
    logged = last_logged(run)
    proc.kill()
    proc.wait()
    assert any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())  # cut mid-write
    assert_every_checkpoint_loads(run)
    assert_lost_at_most_one_interval(run, logged, every=2)
    rc, _, err = finish(spawn_train(run, [*tiny(4, 2), "--resume"]))
    assert rc == 0, err
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the stray temporary was removed
    assert_every_checkpoint_loads(run)
    assert_same_weights(run, reference)


@pytest.mark.slow
def test_sigkill_at_random_moments(tmp_path):
    """Long form: SIGKILL at seeded random moments (during steps, during checkpoint writes, at
    random delays after start, including start-up) until the run completes; every kill loses at
    most one checkpoint interval, and the result equals the uninterrupted run bit for bit."""
    from ldmkit import cli

    steps, every = 12, 3
    ref = tmp_path / "ref"
    assert cli.main(["train", "--out", str(ref), *tiny(steps, every)]) == 0
    rng = random.Random(8)
    run = tmp_path / "run"
    moments = [(st, i) for st in ("autoencoder", "diffusion") for i in range(1, steps + 1)]
    # every kind of moment in both stages; the exact moments are seeded
    plan = [("delay", ""), ("checkpoint", "autoencoder"), ("step", "autoencoder"),
            ("checkpoint", "diffusion"), ("delay", ""), ("step", "diffusion"),
            ("checkpoint", "diffusion")]  # fmt: skip
    kills = 0
    while True:
        done = last_logged(run)
        remaining = moments[moments.index(done) + 1 :] if done else moments
        while plan and plan[0][1] and plan[0][1] not in {st for st, _ in remaining}:
            plan.pop(0)  # that stage is already trained
        kind, stage = plan.pop(0) if plan else ("none", "")
        # a kill before run.json was written leaves nothing to resume: `--resume` then says
        # "holds no checkpoint to resume from; drop --resume to start anew", so start anew
        args = tiny(steps, every) + (["--resume"] if (run / "run.json").is_file() else [])
        proc = spawn_train(run, args, **(SLOW_CKPT if kind == "checkpoint" else {}))
        if kind == "checkpoint":  # inside the next checkpoint write of that stage
            hit = wait_for(proc, lambda s=stage: in_checkpoint_write(run, s))
        elif kind == "step":  # right after a random step of that stage still to come
            target = rng.choice([i for st, i in remaining if st == stage])
            hit = wait_for(proc, lambda s=stage, t=target: reached(run, s, t))
        elif kind == "delay":  # a random wall-clock moment, start-up included
            time.sleep(rng.uniform(0.5, 5.0))
            hit = proc.poll() is None
        else:
            hit = False
        if not hit:  # no kill planned, or the run ended first: it must have finished cleanly
            rc, _, err = finish(proc)
            assert rc == 0, err
            break
        logged = last_logged(run)
        proc.kill()
        proc.wait()
        kills += 1
        print(f"kill {kills}: {kind} at {logged}")  # shown with -s: the moments this seed tries
        assert_every_checkpoint_loads(run)
        assert_lost_at_most_one_interval(run, logged, every)
    assert kills >= 4
    assert_every_checkpoint_loads(run)
    assert_same_weights(run, ref)


# ------------------------------------------------------------------------------------ signals
def test_sigterm_and_sigint_save_and_resume(reference, tmp_path):
    """SIGTERM in stage 1 and SIGINT in stage 2 each save a checkpoint at the step reached and exit
    with 130; --resume then finishes with the same weights as the uninterrupted run."""
    run = tmp_path / "run"
    for sig, stage in ((signal.SIGTERM, "autoencoder"), (signal.SIGINT, "diffusion")):
        args = tiny(4, 2) + (["--resume"] if sig == signal.SIGINT else [])
        proc = spawn_train(run, args, **SLOW_CKPT)
        assert wait_for(proc, lambda: in_checkpoint_write(run, stage))  # noqa: B023
        proc.send_signal(sig)
        rc, _, err = finish(proc)
        assert rc == 130, err
        assert f"{sig.name} received: saving a checkpoint of {stage} at step 2" in err
        assert err.rstrip().splitlines()[-1].startswith("ldmkit: interrupted: checkpoint saved")
        assert "Traceback" not in err
        assert (
            list_checkpoints(RunFolder(run).checkpoints_dir, stage)[-1].step
            == last_logged(run)[1]
            == 2
        )
        assert_every_checkpoint_loads(run)
    rc, _, err = finish(spawn_train(run, [*tiny(4, 2), "--resume"]))
    assert rc == 0, err
    assert_same_weights(run, reference)


# ------------------------------------------------------------------------------------ bad loss
def test_non_finite_loss_skips_then_stops(tmp_path, capsys, caplog, monkeypatch):
    """A loss that turns NaN at step 3: each bad step is skipped with a warning, and after
    max_bad_steps in a row the run stops, naming the cause, with the step-2 checkpoint intact."""
    import ldmkit.training.stages as run_mod

    real, calls = run_mod.autoencoder_loss, [0]

    def loss_turns_nan(*a, **kw):
        loss, parts = real(*a, **kw)
        calls[0] += 1
        return (loss * float("nan") if calls[0] > 3 else loss), parts

    monkeypatch.setattr(run_mod, "autoencoder_loss", loss_turns_nan)
    run = tmp_path / "run"
    rc, out, err = run_cli(capsys, "train", "--out", str(run), *tiny(10, 2),
                           "--set", "vae_train.max_bad_steps=3")  # fmt: skip
    assert rc == 1
    assert re.search(r"the loss was not finite for max_bad_steps steps in a row; the last good "
                     r"checkpoint is intact\. Lower the learning rate", error_line(err))  # fmt: skip
    assert out.startswith("bad loss: autoencoder 6 steps")
    skipped = [r for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(skipped) == 3 and all(r.levelname == "WARNING" for r in skipped)
    assert "3 consecutive non-finite losses: stopping autoencoder" in caplog.text
    assert [c.step for c in list_checkpoints(RunFolder(run).checkpoints_dir)] == [
        2
    ]  # nothing written after the bad steps
    assert_every_checkpoint_loads(run)
    assert not (run / "vae" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------ full disk
def fill_disk_after(monkeypatch, ok_writes, partial_write=False):
    """Make safetensors writes after the first `ok_writes` fail with ENOSPC (after writing 64
    bytes of the file when `partial_write`)."""
    import safetensors.torch

    real, calls = safetensors.torch.save_file, [0]

    def disk_fills_up(tensors, filename, metadata=None):
        calls[0] += 1
        if calls[0] > ok_writes:
            if partial_write:
                Path(filename).write_bytes(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills_up)


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    # the second checkpoint: write part of the file, then run out of space
    fill_disk_after(monkeypatch, 3, partial_write=True)
    run = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--out", str(run), *tiny(6, 2))
    assert rc == 2
    assert error_line(err) == (
        "ldmkit: error: the disk is full: could not write checkpoint autoencoder-00000004; the "
        "previous checkpoints are intact. Free some space and resume with --resume"
    )
    assert [c.step for c in list_checkpoints(RunFolder(run).checkpoints_dir)] == [2]
    assert not list((run / "checkpoints").glob(".*"))  # the partial write was cleaned up
    assert_every_checkpoint_loads(run)


def test_full_disk_while_saving_the_final_weights(tmp_path, capsys, monkeypatch):
    """Outside checkpoints (here the autoencoder's final weights) a full disk is also one line."""
    fill_disk_after(monkeypatch, 3)  # after the one checkpoint of a 2-step stage
    run = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--out", str(run), *tiny(2, 2))
    assert rc == 2
    assert re.fullmatch(r"ldmkit: error: the disk is full: could not write .*vae/\.model\.safetensors\."
                        r".*\.tmp; the files already there are intact\. Free some space and run again "
                        r"\(a training continues with --resume\)", error_line(err))  # fmt: skip
    assert not list((run / "vae").glob(".*"))  # the temporary file was removed
    assert [c.step for c in list_checkpoints(RunFolder(run).checkpoints_dir)] == [2]
    assert_every_checkpoint_loads(run)


# ------------------------------------------------------------------------------------ lock
def test_second_training_gets_the_lock_message(tmp_path, capsys):
    """A training on a run folder that another process holds is refused, with or without --resume."""
    run = make_run(tmp_path / "run")
    before = snapshot(run)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ldmkit.training.state import RunLock\n"
         "with RunLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)", str(run)],
        env=subprocess_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"]):
            rc, _, err = run_cli(capsys, "train", "--out", str(run), *tiny(2, 2), *extra)
            assert rc == 2
            assert re.search(r"another training is already writing to .*run; wait for it to finish "
                             r"or choose another --out folder", error_line(err))  # fmt: skip
        assert snapshot(run) == before  # nothing written
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------ eval, sample
def spawn_cli(*argv: str, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ldmkit.cli", *argv]
    return subprocess.Popen(
        cmd, env=subprocess_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def kill_when(proc: subprocess.Popen, cond) -> None:
    try:
        assert wait_for(proc, cond), "the process ended before the moment: " + proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)


def visible(folder: Path) -> dict[str, str]:
    """snapshot() of the files a reader sees (hidden temporaries aside)."""
    return {
        k: v
        for k, v in snapshot(folder).items()
        if not any(p.startswith(".") for p in k.split("/"))
    }


@pytest.mark.parametrize(
    "moment, pattern, where",
    [("reference features", "ref-*.safetensors", "eval/reference"),  # CI: the moment
     pytest.param("domain classifier", "model.safetensors", "eval/domain-classifier",
                  marks=pytest.mark.slow),
     pytest.param("summary", "summary.json", "eval", marks=pytest.mark.slow)],
)  # fmt: skip
def test_sigkill_during_eval_leaves_nothing_to_misread(
    tmp_path, capsys, monkeypatch, moment, pattern, where
):
    """`ldmkit eval` killed while it writes a cache (or its summary) leaves only hidden
    temporaries, which no later call reads, and the next call works."""
    from ldmkit.evaluation import feature_nets, reference

    run = make_run(tmp_path / "run")
    argv = ["eval", "--run", str(run), "--n", "6", "--steps", "2", "--samplers", "ddim"]
    folder = run / where
    monkeypatch.setattr(feature_nets, "DOMAIN_MIN_STEPS", 10)
    if moment != "domain classifier":  # cached here, quickly: the child reuses it
        feature_nets.get_feature_net("domain", dataset=RunFolder(run).load_data(), run_dir=run)
    proc = spawn_cli(*argv, LDMKIT_TEST_SLOW_WRITE=f"{pattern}=120")
    kill_when(proc, lambda: any(folder.glob(f".{pattern}.*.tmp")))
    assert not list(folder.glob(pattern)), f"a {moment} file was left half-written"
    assert not (run / "eval" / "summary.json").exists()
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0, err
    [cache] = (run / "eval" / "reference").glob("ref-*.safetensors")
    assert reference._load_reference(cache, "shapes").n == 12
    assert json.loads((run / "eval" / "summary.json").read_text())["table"][0]["sampler"] == "ddim"


def test_a_reference_cache_that_lies_is_recomputed(tmp_path, capsys, monkeypatch, caplog):
    """Caches are validated on load: a file under another n's name, or with NaN features, is
    refused with a warning and recomputed."""
    from ldmkit.checkpoint import save_tensors
    from ldmkit.evaluation import feature_nets

    monkeypatch.setattr(feature_nets, "DOMAIN_MIN_STEPS", 10)
    run = make_run(tmp_path / "run")
    argv = ["eval", "--run", str(run), "--n", "6", "--steps", "2", "--samplers", "ddim"]
    assert run_cli(capsys, *argv)[0] == 0
    [cache] = (run / "eval" / "reference").glob("ref-*-n12.safetensors")
    liar = cache.with_name(cache.name.replace("-n12.", "-n40."))  # claims 40 images, holds 12
    liar.write_bytes(cache.read_bytes())
    from safetensors import safe_open

    with safe_open(str(cache), framework="pt") as f:
        meta = f.metadata()
    tensors = load_tensors(cache)
    tensors["features"][0, 0] = float("nan")
    save_tensors(cache, tensors, metadata=meta)
    rc, _, err = run_cli(capsys, *argv, "--n", "20")  # asks for 40: the liar is the only candidate
    assert rc == 0, err
    assert re.search(
        r"reference cache .*-n40.safetensors is unreadable \(it holds 12 feature rows", caplog.text
    )
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert re.search(
        r"reference cache .*-n12.safetensors is unreadable \(its features are not all finite\)",
        caplog.text,
    )


def test_sigkill_during_sample_outdir_keeps_the_earlier_images(tmp_path, capsys):
    """`ldmkit sample --outdir` writes into a hidden staging folder, then moves the images into
    place: killed while writing, the folder keeps the earlier call's images, whole, and the next
    call works (and removes the staging folder)."""
    from PIL import Image

    run = make_run(tmp_path / "run")
    outdir = tmp_path / "imgs"
    base = ["sample", "--run", str(run), "--steps", "2", "--outdir", str(outdir)]
    assert run_cli(capsys, *base, "--n", "3", "--seed", "1")[0] == 0
    before = visible(outdir)
    proc = spawn_cli(*base, "--n", "5", LDMKIT_TEST_SLOW_WRITE="00003.png=120")
    kill_when(proc, lambda: any(outdir.glob(".ldmkit-staging-*/.00003.png.*.tmp")))
    assert visible(outdir) == before
    rc, _, err = run_cli(capsys, *base, "--n", "5")
    assert rc == 0, err
    assert sorted(p.name for p in outdir.iterdir()) == [f"{i:05d}.png" for i in range(5)]
    for p in outdir.iterdir():
        with Image.open(p) as im:
            im.verify()
