"""The GPU path's pieces, checked on the CPU (issue 26): bf16 settled per device, gradient
checkpointing that changes memory but not results, and the GPU benchmark's code path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ldmkit.models.layers import set_gradient_checkpointing
from ldmkit.models.unet import UNet, UNetConfig
from ldmkit.models.vae import Autoencoder, AutoencoderConfig
from ldmkit.recipe import run_config_from_dict
from ldmkit.training.run import _check_bf16


@pytest.mark.parametrize(
    ("setting", "supported", "expected"),
    [(None, True, True), (None, False, False), (True, False, False), (False, True, False)],
)
def test_bf16_auto_is_on_for_a_cuda_gpu_that_runs_it(
    monkeypatch, caplog, setting, supported, expected
):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    cfg = run_config_from_dict({"unet_train": {"bf16": setting}, "vae_train": {"bf16": setting}})
    out = _check_bf16(cfg, torch.device("cuda"))
    assert out.unet_train.bf16 is expected and out.vae_train.bf16 is expected
    assert ("does not run bf16" in caplog.text) is (setting is True and not supported)


def test_bf16_auto_is_off_on_a_cpu(monkeypatch):
    from ldmkit import runtime

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    out = _check_bf16(run_config_from_dict({}), torch.device("cpu"))
    assert out.unet_train.bf16 is False and out.vae_train.bf16 is False  # opt-in on a CPU


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind", ["unet", "vae"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kind):
    torch.manual_seed(0)
    if kind == "unet":
        model = UNet(UNetConfig(sample_size=8, block_out_channels=(16, 32), norm_num_groups=8,
                                attention_resolutions=(4,), num_classes=3, dropout=0.1,
                                zero_init_residual=False))  # fmt: skip
        z, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([0, 3])
        loss_fn = lambda m: m(z, t, class_labels=y).square().mean()  # noqa: E731
    else:
        model = Autoencoder(
            AutoencoderConfig(block_out_channels=(8, 16), norm_groups=4, image_size=16)
        )
        x, noise = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 8, 8)
        loss_fn = lambda m: m(x, noise=noise)[0].square().mean()  # noqa: E731
    model.train()
    torch.manual_seed(1)  # dropout draws the same masks in both runs
    plain_loss, plain = _grads(model, loss_fn)
    assert set_gradient_checkpointing(model, True) >= 4
    torch.manual_seed(1)
    ckpt_loss, ckpt = _grads(model, loss_fn)
    assert torch.equal(plain_loss, ckpt_loss)
    assert len(plain) == len(ckpt) and len(plain) > 10
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # and it is really on: the blocks' inner activations are not kept for the backward pass
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda x: saved.append(x.numel()) or x, lambda x: x
    ):
        loss_fn(model)
    with_ckpt = sum(saved)
    set_gradient_checkpointing(model, False)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(
        lambda x: saved.append(x.numel()) or x, lambda x: x
    ):
        loss_fn(model)
    assert with_ckpt < 0.7 * sum(saved)


def test_a_run_trains_with_gradient_checkpointing(tmp_path):
    from ldmkit import api
    from ldmkit.runs import RunFolder

    sets = ["vae_train.steps=2", "unet_train.steps=2", "vae_train.batch_size=4",
            "unet_train.batch_size=4", "choose_guidance=false", "conditioning=none",
            "vae_train.gradient_checkpointing=true", "unet_train.gradient_checkpointing=true",
            "vae.block_out_channels=[8, 8]", "vae.norm_groups=4"]  # fmt: skip
    res = api.train(tmp_path / "run", data="builtin:shapes?n=16", image_size=16, sets=sets)
    assert (res.vae_steps, res.unet_steps) == (2, 2)
    cfg = RunFolder(tmp_path / "run").config()
    assert cfg.unet_train.gradient_checkpointing and cfg.vae_train.bf16 is False


def test_gpu_check_quick_runs_on_a_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    import gpu_check

    gpu_check.main(["--out", str(tmp_path), "--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    rows = [ln.strip("|").split("|") for ln in out.splitlines() if re.match(r"\| \d+ \|", ln)]
    assert [(int(r[0]), r[2].strip()) for r in rows] == [
        (32, "autoencoder"),
        (32, "diffusion"),
        (64, "autoencoder"),
        (64, "diffusion"),
    ]
    for r in rows:
        assert int(r[3]) == 4 and float(r[6]) > 0 and float(r[8]) > 0  # steps, img/s, TFLOP/s
