"""Several processes (training/distributed.py): the same result on 1 or N, only rank 0 writes, a
run resumes with another number of processes, a stop leaves a consistent checkpoint.

The tests that start processes run `torchrun` (as `python -m torch.distributed.run`) on
127.0.0.1 with an OS-chosen free port (rendezvous endpoint port 0), the gloo backend on the CPU,
one thread per process, and a timeout. Each start costs ~5 s on a 2-core CPU (three Python
processes import torch), so CI runs one of them (2 processes, stopped after 2 diffusion steps,
then resumed in this process); the rest are marked slow.

Tolerances, 1 vs 2 processes. The same samples get the same randomness (step.MicroBatch) and
the same data, so only the order of float sums differs: a micro-batch's gradient is summed over
4 samples in one process, over 2 + 2 (then all-reduced) in two. Measured on the run below:
logged losses within 1.2e-7 (relative), weights within 1e-6, except the attention key biases,
5.9e-5. Their gradient is zero in exact arithmetic (q . b_k is the same for every key of a
query, and softmax ignores a constant), so in float it is rounding noise, which Adam divides by
its own root mean square and turns into steps of up to lr whose sign depends on the order of the
sums. The tests allow 1e-6 (losses), 1e-5 (weights) and 1e-3 (key biases).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldmkit import cli
from ldmkit.checkpoint import load_tensors
from ldmkit.config import ConfigError
from ldmkit.recipe import TrainConfig
from ldmkit.runs import RunFolder
from ldmkit.training.distributed import local_micro_batch
from ldmkit.training.state import CKPT_RE, list_checkpoints

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")
LOSS_RTOL, WEIGHT_ATOL, KEY_BIAS_ATOL = 1e-6, 1e-5, 1e-3

# 64 shapes at 16 px; attention in both models (its key biases are the loosest weights above);
# grad_accum 2 in the diffusion stage, so no_sync is on the path; a checkpoint every 2 steps
CONFIG = {
    "data": "builtin:shapes?n=64", "image_size": 16, "preview_steps": 2,
    "vae": {"block_out_channels": [8, 8], "norm_groups": 4, "layers_per_block": 1,
            "mid_attention": True},
    "unet": {"block_out_channels": [8, 16], "attention_resolutions": [4], "norm_num_groups": 4,
             "head_dim": 8, "num_res_blocks": 1, "mid_attention": False},
    "vae_train": {"steps": 4, "batch_size": 8, "warmup_steps": 2, "lr_schedule": "constant",
                  "sample_every": 0, "log_every": 1, "checkpoint_every": 2},
    "unet_train": {"steps": 4, "batch_size": 8, "grad_accum": 2, "warmup_steps": 2,
                   "lr_schedule": "constant", "sample_every": 0, "log_every": 1,
                   "checkpoint_every": 2},
}  # fmt: skip


# ------------------------------------------------------------------------------------ helpers
def spawn_torchrun(nproc: int, *argv: str, watch: Path, report: Path, **env: str):
    """`torchrun ddp_worker.py ARGV` with `nproc` processes on 127.0.0.1 (port chosen by the OS)."""
    report.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1",
        "--monitor-interval=0.1", str(WORKER), *argv,
    ]  # fmt: skip
    full_env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LDMKIT_TEST_WATCH=str(watch),
        LDMKIT_TEST_REPORT=str(report),
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        **env,
    )  # fmt: skip
    return subprocess.Popen(
        cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    """Wait for torchrun; on a timeout stop it (it stops its workers) and fail."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on, then kills after 30 s
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"torchrun did not end within {timeout} s:\n{err[-3000:]}") from None
    return proc.returncode, out, err


def torchrun_train(nproc: int, run: Path, config: Path, *args: str, **env: str):
    report = run.parent / f"{run.name}-writes"
    proc = spawn_torchrun(nproc, "train", "--out", str(run), "--config", str(config), "--quiet",
                          *args, watch=run, report=report, **env)  # fmt: skip
    return (*finish(proc), report)


def train_here(run: Path, config: Path, *args: str) -> None:
    """The same command in this process (one process, one thread: conftest.py)."""
    assert cli.main(["train", "--out", str(run), "--config", str(config), "--quiet", *args]) == 0


def log_rows(run: Path) -> list[dict]:
    """The loss rows of log.jsonl (not the autoencoder's quality rows)."""
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str):
    assert a.keys() == b.keys(), what
    for k in a:
        atol = KEY_BIAS_ATOL if k.endswith("to_k.bias") else WEIGHT_ATOL
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{what} {k}: {m}")  # noqa: B023


def assert_same_models(a: Path, b: Path) -> None:
    for part in ("vae", "unet"):
        wa, wb = (load_tensors(r / part / "model.safetensors") for r in (a, b))
        assert_close_weights(wa, wb, part)


def assert_same_losses(a: list[dict], b: list[dict]) -> None:
    assert [(r["stage"], r["step"]) for r in a] == [(r["stage"], r["step"]) for r in b]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=LOSS_RTOL), (x, y)


def checkpoint_weights(run: Path, stage: str, step: int) -> dict[str, torch.Tensor]:
    return load_tensors(run / "checkpoints" / f"{stage}-{step:08d}" / "modules.safetensors")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(CONFIG))
    return path


@pytest.fixture(scope="module")
def one_process(config, tmp_path_factory) -> Path:
    """The reference: 4 autoencoder and 4 diffusion steps, in this process."""
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test setting
    run = tmp_path_factory.mktemp("one") / "run"
    train_here(run, config)
    return run


@pytest.fixture(scope="module")
def two_processes(config, tmp_path_factory) -> tuple[Path, Path, str]:
    """The same run with 2 processes, stopped after 2 diffusion steps: (run, writes, stderr)."""
    run = tmp_path_factory.mktemp("two") / "run"
    rc, _, err, report = torchrun_train(2, run, config, "--set", "unet_train.steps=2")
    assert rc == 0, err[-3000:]
    return run, report, err


# ------------------------------------------------------------------------------------ 2 processes
def test_two_processes_train_as_one(one_process, two_processes):
    """The autoencoder, the diffusion checkpoint at step 2 (model and EMA) and every logged loss
    of 2 processes match one process's within the tolerances above."""
    run, _, _ = two_processes
    a, b = (load_tensors(r / "vae" / "model.safetensors") for r in (one_process, run))
    assert_close_weights(a, b, "vae")
    assert_close_weights(
        checkpoint_weights(one_process, "diffusion", 2), checkpoint_weights(run, "diffusion", 2),
        "diffusion checkpoint",
    )  # fmt: skip
    assert json.loads((run / "vae" / "config.json").read_text())["scaling_factor"] == pytest.approx(
        json.loads((one_process / "vae" / "config.json").read_text())["scaling_factor"], rel=1e-6
    )
    assert_same_losses(log_rows(one_process)[:6], log_rows(run))


def test_only_rank_0_writes(two_processes):
    """Rank 1 opened no file for writing, made, renamed or removed nothing in the run folder;
    rank 0 wrote the config, the log (one row per step), checkpoints and models."""
    run, report, _ = two_processes
    assert (report / "rank1.txt").read_text() == ""
    rank0 = (report / "rank0.txt").read_text()
    for name in ("run.json", "log.jsonl", "vae/model.safetensors", "latents.safetensors", ".lock"):
        assert str(run / name) in rank0, name
    assert [(r["stage"], r["step"]) for r in log_rows(run)] == [
        ("autoencoder", 1), ("autoencoder", 2), ("autoencoder", 3), ("autoencoder", 4),
        ("diffusion", 1), ("diffusion", 2),
    ]  # fmt: skip


def test_a_run_saved_by_two_processes_resumes_in_one(one_process, two_processes, config, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_processes[0], run)
    train_here(run, config, "--resume")
    assert_same_models(run, one_process)
    assert_same_losses(log_rows(run), log_rows(one_process))


@pytest.mark.slow
def test_a_run_saved_by_one_process_resumes_in_two(one_process, config, tmp_path):
    run = tmp_path / "run"
    train_here(run, config, "--set", "unet_train.steps=2")
    rc, _, err, report = torchrun_train(2, run, config, "--resume")
    assert rc == 0, err[-3000:]
    assert (report / "rank1.txt").read_text() == ""
    assert_same_models(run, one_process)
    assert_same_losses(log_rows(run), log_rows(one_process))


# ------------------------------------------------------------------------------------ stopping
def in_diffusion_checkpoint_write(run: Path) -> bool:
    """Rank 0 sleeps in state.py's test hook inside a diffusion checkpoint write."""
    rows = log_rows(run) if (run / "log.jsonl").is_file() else []
    if not rows or rows[-1]["stage"] != "diffusion":
        return False
    return any((p / "modules.safetensors").is_file() for p in (run / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_sigterm_to_torchrun_leaves_a_consistent_checkpoint(one_process, config, tmp_path):
    """SIGTERM to torchrun's process group while rank 0 writes the step-2 checkpoint (rank 1
    waits for it): torchrun passes the signal on, both ranks agree to stop at step 2, the
    checkpoint is complete, and a resume in one process ends where the uninterrupted run does."""
    run = tmp_path / "run"
    proc = spawn_torchrun(
        2, "train", "--out", str(run), "--config", str(config), "--quiet", watch=run,
        report=tmp_path / "writes", LDMKIT_TEST_SLOW_CHECKPOINT="1.0",
    )  # fmt: skip
    end = time.monotonic() + 180
    while not in_diffusion_checkpoint_write(run):
        assert proc.poll() is None and time.monotonic() < end, "the run never reached the moment"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    rc, _, err = finish(proc)
    assert rc != 0  # torchrun reports the signal
    assert "SIGTERM received: saving a checkpoint of diffusion at step 2" in err
    assert (tmp_path / "writes" / "rank1.txt").read_text() == ""
    assert [c.step for c in list_checkpoints(RunFolder(run).checkpoints_dir, "diffusion")] == [2]
    for p in (run / "checkpoints").iterdir():
        if not p.name.startswith("."):
            assert CKPT_RE.match(p.name)
            for name in ("modules", "optim", "rng"):
                load_tensors(p / f"{name}.safetensors")
    assert log_rows(run)[-1] == {**log_rows(run)[-1], "stage": "diffusion", "step": 2}
    train_here(run, config, "--resume")
    assert_same_models(run, one_process)


# ------------------------------------------------------------------------------------ errors
def test_a_batch_that_does_not_split_is_a_one_line_error(monkeypatch, capsys, tmp_path, config):
    """Checked before the process group starts: every rank raises the same error at once, rank 0
    prints it, the others stay silent (so torchrun's output holds it once)."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    for rank, printed in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        capsys.readouterr()
        rc = cli.main(["train", "--out", str(tmp_path / "run"), "--config", str(config), "--quiet"])
        out, err = capsys.readouterr()
        assert rc == 2 and out == ""
        expected = (
            "ldmkit: error: vae_train.batch_size 8 does not split over 3 processes: use 1, 2, 4 "
            "or 8 processes, or a vae_train.batch_size that is a multiple of 3 (e.g. 9)\n"
        )
        assert err == (expected if printed else "")
    assert not (tmp_path / "run").exists()


def test_the_batch_error_names_the_process_counts_that_work():
    cfg = TrainConfig(batch_size=32, grad_accum=2)
    assert local_micro_batch(cfg, 4) == 4
    with pytest.raises(ConfigError, match=r"train.batch_size 32 \(grad_accum 2\) does not split "
                       r"over 3 processes: use 1, 2, 4, 8 or 16 processes, or a train.batch_size "
                       r"that is a multiple of 6 \(e.g. 36\)"):  # fmt: skip
        local_micro_batch(cfg, 3)


@pytest.mark.parametrize(
    "setting,backend,message",
    [
        ({}, "nccl", "--dist-backend nccl needs CUDA devices; use gloo on the CPU"),
        ({}, "mpi", "unknown distributed backend 'mpi'; use auto, gloo, nccl"),
        ({"device": "mps"}, "auto", "--device mps: several processes train on cpu or cuda only"),
    ],
)
def test_settings_several_processes_cannot_use(monkeypatch, setting, backend, message):
    """Refused before the process group starts (so no rank waits for another)."""
    from ldmkit.recipe import run_config_from_dict
    from ldmkit.training.distributed import start

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=re.escape(message)):
        start(run_config_from_dict({**CONFIG, **setting}), backend)


@pytest.mark.slow
def test_the_discriminator_trains_in_one_process_only(tmp_path, config):
    rc, _, err, _ = torchrun_train(
        2, tmp_path / "run", config, "--set", "vae.disc_weight=0.5", "--set", "vae.disc_layers=2"
    )
    assert rc != 0
    assert [x for x in err.splitlines() if "ldmkit: error:" in x] == [
        "ldmkit: error: vae.disc_weight > 0: the PatchGAN discriminator (BatchNorm, adaptive "
        "weight) trains in one process only; train the autoencoder without torchrun (--stage "
        "vae), then resume the run with torchrun"
    ]


@pytest.mark.slow
def test_torchrun_m_ldmkit_prints_a_split_error_once(tmp_path, config):
    """`torchrun -m ldmkit train` with 3 processes and a batch of 8: one `ldmkit: error:` line
    in all of torchrun's output, and no process waits for another."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=3",
           "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1",
           "-m", "ldmkit", "train", "--out", str(tmp_path / "run"), "--config", str(config)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    lines = [x for x in (res.stdout + res.stderr).splitlines() if "ldmkit: error:" in x]
    assert lines == [
        "ldmkit: error: vae_train.batch_size 8 does not split over 3 processes: use 1, 2, 4 or 8 "
        "processes, or a vae_train.batch_size that is a multiple of 3 (e.g. 9)"
    ]


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank_and_rank_0_names_it(tmp_path, config):
    run = tmp_path / "run"
    rc, _, err, report = torchrun_train(2, run, config, LDMKIT_TEST_FAIL_RANK="1")
    assert rc != 0
    lines = [x for x in err.splitlines() if "ldmkit: error:" in x]
    assert lines == ["ldmkit: error: rank 1: an injected fault on rank 1"]
    assert (report / "rank1.txt").read_text() == ""
