"""Behaviour regression: the fingerprint of a short seeded training run is pinned.

A tiny run (shapes, 16 px, 8 autoencoder and 12 UNet steps, both EMAs at decay 0.5 so the EMA
matters within 12 steps) is trained, then sampled. Its fingerprint is every logged loss, the sum
of every weight tensor of both saved models, and 192 pixels of four DDIM samples. The expected
values are in behaviour_fingerprint.json; the tolerances absorb the kernel differences between
CPUs (measured here: one thread vs two, ATen's AVX2 kernels instead of AVX-512, oneDNN limited to
AVX2 all stayed below loss rel 1.1e-6, weight-sum abs 1.1e-4, pixel abs 1.5e-5), and are 10-20x
smaller than any change of behaviour. The tests below show that: a 1 % change of the loss weights,
an off-by-one in the timestep draw or +0.01 on the EMA decay each break it.

A deliberate change of behaviour updates the expected values, visibly, in its own commit:
    python tests/test_behaviour.py --update
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import pytest

EXPECTED = Path(__file__).with_name("behaviour_fingerprint.json")
LOSS_RTOL = 2e-5  # per logged loss, relative
SUM_ATOL, SUM_RTOL = 1e-3, 1e-5  # per weight-tensor sum
PIXEL_ATOL = 2e-4  # images in [-1, 1]

RUN = {
    "data": "builtin:shapes?n=64", "image_size": 16, "seed": 0,
    # feature_weight 0: the feature-matching term needs the run's classifier, whose 300 training
    # steps amplify the float rounding of thread counts and CPUs past these tolerances (seen:
    # 3e-5 relative between 1 and 2 threads); its own tests are in tests/models
    "vae": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_groups": 4,
            "feature_weight": 0.0},
    "unet": {"block_out_channels": [16, 32], "attention_resolutions": [8], "norm_num_groups": 8,
             "head_dim": 8},
    "vae_train": {"steps": 8, "batch_size": 8, "log_every": 1, "checkpoint_every": 100,
                  "sample_every": 0, "ema_decay": 0.5, "warmup_steps": 2},
    "unet_train": {"steps": 12, "batch_size": 8, "grad_accum": 2, "log_every": 1,
                   "checkpoint_every": 100, "sample_every": 0, "ema_decay": 0.5, "warmup_steps": 2},
    "preview_steps": 2,
}  # fmt: skip


def fingerprint() -> dict:
    """Train the pinned run in a temporary folder and measure it."""
    from ldmkit.checkpoint import WEIGHTS_NAME, load_tensors
    from ldmkit.pipeline import LatentDiffusion
    from ldmkit.recipe import run_config_from_dict
    from ldmkit.runs import RunFolder
    from ldmkit.training.run import train_run

    with tempfile.TemporaryDirectory() as tmp:
        train_run(run_config_from_dict(RUN), tmp)
        folder = RunFolder(tmp)
        rows = [json.loads(line) for line in folder.log_path.read_text().splitlines()]
        rows = [r for r in rows if "loss" in r]  # not the autoencoder's quality rows
        sums = {
            part: {k: float(v.double().sum()) for k, v in load_tensors(d / WEIGHTS_NAME).items()}
            for part, d in (("vae", folder.vae_dir), ("unet", folder.unet_dir))
        }
        images = LatentDiffusion.from_run(tmp, device="cpu", fast=False).sample(
            4, sampler="ddim", steps=4
        )
    return {
        "losses": [[r["stage"], r["step"], r["loss"]] for r in rows],
        "sums": sums,
        "pixels": images[:, :, ::4, ::4].flatten().tolist(),  # (4, 3, 4, 4) of (4, 3, 16, 16)
    }


def differences(got: dict, want: dict) -> list[str]:
    """What differs beyond the tolerances (empty: the same behaviour)."""
    out = []
    if [r[:2] for r in got["losses"]] != [r[:2] for r in want["losses"]]:
        out.append("the logged steps differ")
    for (stage, step, a), (_, _, b) in zip(got["losses"], want["losses"]):
        if not math.isclose(a, b, rel_tol=LOSS_RTOL):
            out.append(f"{stage} loss at step {step}: {a!r} != {b!r}")
    for part, tensors in want["sums"].items():
        if set(got["sums"][part]) != set(tensors):
            out.append(f"{part}: other tensors")
            continue
        for k, b in tensors.items():
            a = got["sums"][part][k]
            if abs(a - b) > SUM_ATOL + SUM_RTOL * abs(b):
                out.append(f"{part} {k}: sum {a!r} != {b!r}")
    bad = [
        i for i, (a, b) in enumerate(zip(got["pixels"], want["pixels"])) if abs(a - b) > PIXEL_ATOL
    ]
    if bad or len(got["pixels"]) != len(want["pixels"]):
        out.append(f"{len(bad)} sample pixels differ (first at index {bad[:1]})")
    return out


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads(EXPECTED.read_text())


def test_a_short_seeded_run_keeps_its_fingerprint(expected):
    diff = differences(fingerprint(), expected)
    assert not diff, "behaviour changed:\n" + "\n".join(diff[:10])


def _scaled_loss_weights(monkeypatch):
    from ldmkit.diffusion import losses

    real = losses.loss_weights
    monkeypatch.setattr(losses, "loss_weights", lambda *a, **k: real(*a, **k) * 1.01)


def _timesteps_off_by_one(monkeypatch):
    from ldmkit.diffusion import losses

    real = losses.sample_timesteps
    monkeypatch.setattr(
        losses, "sample_timesteps", lambda b, T, **k: (real(b, T, **k) + 1).clamp(max=T - 1)
    )


def _ema_decay_plus(monkeypatch):
    from ldmkit.training.ema import EMA

    real = EMA.current_decay
    monkeypatch.setattr(EMA, "current_decay", lambda self: real(self) + 0.01)


@pytest.mark.parametrize("change", [_scaled_loss_weights, _timesteps_off_by_one, _ema_decay_plus])
def test_the_fingerprint_catches_small_changes_of_behaviour(change, monkeypatch, expected):
    change(monkeypatch)
    assert differences(fingerprint(), expected), f"{change.__name__} went unnoticed"


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_behaviour.py --update   (rewrites the expected values)")
    EXPECTED.write_text(json.dumps(fingerprint(), indent=1) + "\n")
    print(f"wrote {EXPECTED}")
