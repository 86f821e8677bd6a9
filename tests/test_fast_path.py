"""The fast sampling path: bf16 autocast chosen by the device, off on request, following the
weights when they change, and samples (unconditional, class, text) that stay close to float32.

The closeness tests force bf16 on (monkeypatched `fast_dtype`), so they run, and can fail, on a
CPU without native bf16 too (slowly there, but the model is tiny).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from ldmkit import pipeline, runtime
from ldmkit.cli import make_parser
from ldmkit.diffusion.schedules import make_schedule
from ldmkit.models.unet import UNet, UNetConfig
from ldmkit.models.vae import Autoencoder, AutoencoderConfig
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runs import RunFolder


@pytest.fixture
def bf16_here(monkeypatch):
    """Make the fast path bf16 on this CPU, whatever it has, and for any batch."""
    for module in (runtime, pipeline):
        monkeypatch.setattr(module, "fast_dtype", lambda device: torch.bfloat16)
    monkeypatch.setattr(pipeline, "FAST_MIN_GFLOP", 0.0)


@torch.no_grad()
def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised output layers would hide any difference)."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def tiny_ldm(**kwargs) -> LatentDiffusion:
    torch.manual_seed(0)
    vae = Autoencoder(AutoencoderConfig(block_out_channels=(8, 16), norm_groups=4, image_size=16))
    unet = UNet(UNetConfig(sample_size=8, block_out_channels=(16, 32), attention_resolutions=(4,),
                           norm_num_groups=8, head_dim=8))  # fmt: skip
    return LatentDiffusion(
        _perturbed(vae), _perturbed(unet), make_schedule("cosine", 1000), device="cpu", **kwargs
    )


def test_fast_path_follows_the_device(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert runtime.fast_dtype(torch.device("cpu")) is None  # a 15x slowdown is not "fast"
    assert isinstance(
        runtime.fast_autocast(torch.device("cpu")), type(runtime.contextlib.nullcontext())
    )
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert runtime.fast_dtype(torch.device("cpu")) is torch.bfloat16
    assert runtime.fast_dtype(torch.device("meta")) is None
    assert tiny_ldm().fast_dtype is torch.bfloat16
    assert tiny_ldm(fast=False).fast_dtype is None


def test_fast_path_only_for_big_enough_calls(monkeypatch):
    """Below FAST_MIN_GFLOP per network call the casts cost more than bf16 gains: float32."""
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    ldm = tiny_ldm()
    assert not ldm.uses_fast_path(1)
    per_image = ldm._gflop
    assert 0 < per_image < pipeline.FAST_MIN_GFLOP
    enough = math.ceil(pipeline.FAST_MIN_GFLOP / per_image)
    assert ldm.uses_fast_path(enough) and not ldm.uses_fast_path(enough - 1)
    assert not ldm.uses_fast_path(enough, fast=False) and not tiny_ldm(fast=False).uses_fast_path(
        enough
    )


def test_fast_samples_are_close_to_float32(bf16_here):
    """Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 % per product,
    accumulated in float32), so a prediction moves by about 1 %, and a deterministic sampler
    carries that to the end without amplifying it. The check is relative to what matters: the
    fast path moves a sample at least 10x less than changing its seed does."""
    ldm = tiny_ldm()
    kw = dict(sampler="ddim", steps=10, seed=3)
    exact = ldm.sample(8, fast=False, **kw)
    fast = ldm.sample(8, **kw)
    other_seed = ldm.sample(8, fast=False, **{**kw, "seed": 4})
    assert fast.dtype == exact.dtype == torch.float32
    drift = (fast - exact).abs().mean().item()
    assert drift > 0, "the bf16 path did not run: fast and float32 samples are identical"
    assert drift < 0.1 * (other_seed - exact).abs().mean().item()
    assert (fast - exact).abs().max().item() < 0.1  # images in [-1, 1]


def test_the_fast_path_follows_weights_changed_in_place(bf16_here):
    ldm = tiny_ldm()
    kw = dict(sampler="ddim", steps=3, seed=0)
    before = ldm.sample(2, **kw)
    assert ldm.sample(2, **kw).equal(before)  # the cached copy: the same images again
    with torch.no_grad():  # what EMA or load_state_dict do
        for p in ldm.unet.parameters():
            p.mul_(0.9)
        ldm.vae.decoder.conv_out.weight.mul_(0.9)
    after = ldm.sample(2, **kw)
    assert not after.equal(before)
    fresh = LatentDiffusion(ldm.vae, ldm.unet, ldm.schedule, device="cpu").sample(2, **kw)
    assert after.equal(fresh), "stale bf16 weights were used after the weights changed"


def test_conditioned_fast_samples_are_close(bf16_here, tmp_path):
    """With guidance's doubled batch: class labels, and a text encoder's context."""
    ldm = tiny_ldm()
    unet = UNet(UNetConfig(sample_size=8, block_out_channels=(16, 32), attention_resolutions=(4,),
                           norm_num_groups=8, head_dim=8, num_classes=3))  # fmt: skip
    classes = LatentDiffusion(ldm.vae, _perturbed(unet), ldm.schedule, device="cpu")
    kw = dict(sampler="ddim", steps=3, seed=0, class_labels=[0, 2], guidance_scale=3.0)
    exact, fast = classes.sample(2, fast=False, **kw), classes.sample(2, **kw)
    assert 0 < (fast - exact).abs().mean().item() < 0.05

    sys.path.insert(0, str(Path(__file__).parent / "reliability"))
    from reliability_helpers import make_text_run

    run = make_text_run(tmp_path / "text")
    for name in ("vae", "unet"):  # zero-initialised output layers would hide any difference
        model = getattr(RunFolder(run), f"load_{name}")()
        getattr(RunFolder(run), f"save_{name}")(_perturbed(model))
    text = LatentDiffusion.from_run(run, device="cpu")
    kw = dict(sampler="ddim", steps=3, seed=0, prompt="a red square", guidance_scale=2.0)
    exact, fast = text.sample(2, fast=False, **kw), text.sample(2, **kw)
    assert 0 < (fast - exact).abs().mean().item() < 0.05


def test_fast_off_is_float32_exactly(bf16_here):
    kw = dict(sampler="dpm++2m-sde", steps=4, seed=0)
    assert torch.equal(tiny_ldm(fast=False).sample(3, **kw), tiny_ldm().sample(3, fast=False, **kw))
    assert not torch.equal(tiny_ldm().sample(3, **kw), tiny_ldm().sample(3, fast=False, **kw))


def test_fast_decode_is_close(bf16_here):
    ldm = tiny_ldm()
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    exact, fast = ldm.decode(z, fast=False), ldm.decode(z)
    assert fast.dtype == torch.float32
    assert 0 < (fast - exact).abs().max().item() < 0.05


def test_cli_flags():
    sample = ["sample", "--run", "r", "--out", "g.png"]
    args = make_parser().parse_args(sample)
    assert args.fast is True and args.compile is False
    args = make_parser().parse_args([*sample, "--no-fast", "--compile"])
    assert args.fast is False and args.compile is True
    assert make_parser().parse_args(["train", "--out", "o", "--compile"]).compile is True


@pytest.mark.slow
def test_compiled_sampling_matches_eager():
    """torch.compile (with frozen weights) reorders float sums only: samples agree to 1e-4."""
    kw = dict(sampler="ddim", steps=3, seed=0, fast=False)
    eager = tiny_ldm().sample(2, **kw)
    compiled = tiny_ldm(compile=True).sample(2, **kw)
    assert (compiled - eager).abs().max().item() < 1e-4


@pytest.mark.slow
def test_compiled_training_runs(tmp_path):
    """unet_train.compile = true (ldmkit train --compile) trains through torch.compile."""
    from ldmkit.recipe import run_config_from_dict
    from ldmkit.training.run import train_run

    cfg = run_config_from_dict({
        "data": "builtin:shapes?n=32", "image_size": 16,
        "vae": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_groups": 4},
        "unet": {"block_out_channels": [16, 32], "attention_resolutions": [], "norm_num_groups": 8},
        "vae_train": {"steps": 2, "batch_size": 8, "sample_every": 0},
        "unet_train": {"steps": 3, "batch_size": 8, "sample_every": 0, "compile": True},
    })  # fmt: skip
    assert cfg.unet_train.compile is True
    res = train_run(cfg, tmp_path / "run")
    assert res.stopped_because == "finished" and res.unet_steps == 3
