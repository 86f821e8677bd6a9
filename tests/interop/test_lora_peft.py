"""The diffusers/peft LoRA export of an adapter (issue 28), against diffusers and peft themselves.

An adapter with random non-zero weights (so that a key read into the wrong layer, a missing
scaling or a transposed matrix changes the output) is exported; diffusers' UNet of the same run
(`export_to_diffusers`) with the exported LoRA must give the adapted ldmkit UNet's outputs:
through diffusers' own `load_lora_adapter` for a UNet2DConditionModel (a cross-attention run),
through peft's `inject_adapter_in_model` + `set_peft_model_state_dict` for a UNet2DModel (class
and unconditional runs), with the new class row put in by `new_class_embedding`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldmkit.config import to_dict
from ldmkit.interop import InteropError, export_to_diffusers
from ldmkit.interop.lora_peft import (
    CLASS_ROWS_NAME,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    export_peft_lora,
    new_class_embedding,
)
from ldmkit.models.lora import (
    ATTENTION_TARGETS,
    CONV_TARGETS,
    LoraConfig,
    add_class_rows,
    class_rows,
    inject_lora,
    lora_parameters,
    lora_state_dict,
)
from ldmkit.models.unet import UNet, UNetConfig
from ldmkit.models.vae import Autoencoder, AutoencoderConfig
from ldmkit.recipe import RunConfig
from ldmkit.runs import AdapterFolder, AdapterInfo, DataInfo, RunFolder

ATOL = 1e-5
VAE = AutoencoderConfig(
    image_channels=3, latent_channels=2, block_out_channels=(8, 16), layers_per_block=1,
    norm_groups=4, mid_attention=False, image_size=16,
)  # fmt: skip
UNET = UNetConfig(
    sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), num_res_blocks=1,
    attention_resolutions=(4,), mid_attention=True, head_dim=4, num_heads=None,
    norm_num_groups=4, time_injection="add", prediction_type="eps",
)  # fmt: skip


def perturb(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make_run(folder: Path, cfg: UNetConfig) -> Path:
    run = RunFolder(folder)
    run.save_vae(Autoencoder(VAE))
    unet = UNet(cfg)
    perturb(unet.parameters(), 2)
    run.save_unet(unet)
    classes = [f"c{i}" for i in range(cfg.num_classes)] if cfg.num_classes else None
    run.write_data_info(DataInfo(spec="shapes", channels=3, image_size=16, class_names=classes))
    run.write_config(RunConfig(image_size=16, channels=3, vae=VAE, unet=cfg))
    return run.path


def make_adapter(run: Path, out: Path, rank: int, alpha: float, conv: bool) -> tuple[UNet, int]:
    """An adapter of `run` with random weights, as `finetune` writes it; returns the adapted
    ldmkit UNet and the new class's label (-1 without classes)."""
    folder = RunFolder(run)
    unet = folder.load_unet()
    lora = LoraConfig(rank=rank, alpha=alpha,
                      targets=ATTENTION_TARGETS + (CONV_TARGETS if conv else ()))  # fmt: skip
    inject_lora(unet, lora, "a")
    perturb(lora_parameters(unet, "a"), 3)
    label = -1
    tensors = lora_state_dict(unet, "a")
    if unet.config.num_classes:
        label = add_class_rows(unet, "a", randn(1, unet.config.time_embed_dim, seed=4))
        tensors[AdapterFolder.CLASS_ROWS] = class_rows(unet, "a").detach().clone()
    info = AdapterInfo(
        lora=lora, base_weights_hash=folder.weights_hash(), unet=to_dict(folder.config().unet),
        kind="class" if label >= 0 else "style", class_name="new" if label >= 0 else None,
        class_index=label if label >= 0 else None, base_run=str(run),
    )  # fmt: skip
    AdapterFolder(out).save(info, tensors)
    return unet.eval(), label


@pytest.mark.reference
@pytest.mark.parametrize(
    "classes, rank, alpha, conv",
    [(3, 4, 4.0, False), (3, 2, 6.0, True), (None, 4, 2.0, True)],
    ids=["class-attention", "class-locon-alpha3x", "unconditional-locon"],
)
def test_unet2d_export_loads_through_peft_with_equal_outputs(tmp_path, classes, rank, alpha, conv):
    diffusers = pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    run = make_run(tmp_path / "run", dataclasses.replace(UNET, num_classes=classes))
    ours, label = make_adapter(run, tmp_path / "A", rank, alpha, conv)
    out = export_peft_lora(run, tmp_path / "A", tmp_path / "peft")
    theirs = diffusers.UNet2DModel.from_pretrained(
        export_to_diffusers(run, tmp_path / "hf"), subfolder="unet"
    ).eval()
    z, t = randn(3, 2, 8, 8, seed=5), torch.tensor([3, 500, 999])
    labels = None
    with torch.no_grad():
        base = theirs(z, t, class_labels=torch.tensor([0, 2, 3]) if classes else None).sample
    if classes:
        from safetensors.torch import load_file

        rows = load_file(out / CLASS_ROWS_NAME)["new_rows"]
        weight = new_class_embedding(theirs.class_embedding.weight.detach(), rows)
        theirs.class_embedding = torch.nn.Embedding.from_pretrained(weight, freeze=True)
        labels = torch.tensor([0, label, label + 1])  # an old class, the new one, the null label
        assert label == classes  # the old null label's index
    else:
        assert not (out / CLASS_ROWS_NAME).exists()

    config = json.loads((out / PEFT_CONFIG_NAME).read_text())
    from safetensors.torch import load_file

    weights = load_file(out / PEFT_WEIGHTS_NAME)
    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in weights)  # fmt: skip
    assert len(weights) == 2 * len(config["target_modules"])
    peft.inject_adapter_in_model(peft.LoraConfig(**config), theirs)
    result = peft.set_peft_model_state_dict(
        theirs, {k.removeprefix("unet."): v for k, v in weights.items()}
    )
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]  # every LoRA weight was read
    theirs.eval()
    with torch.no_grad():
        got = theirs(z, t, class_labels=labels).sample
        expected = ours(z, t, class_labels=labels)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    if classes:  # the old class and the null label: the LoRA alone changed them
        assert (got[[0, 2]] - base[[0, 2]]).abs().max() > 1e-3
    else:
        assert (got - base).abs().max() > 1e-3


@pytest.mark.reference
def test_unet2d_condition_export_loads_with_diffusers_load_lora_adapter(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")  # diffusers' LoRA loading runs on peft
    run = make_run(tmp_path / "run", dataclasses.replace(UNET, context_dim=6))
    ours, _ = make_adapter(run, tmp_path / "A", 2, 4.0, True)
    out = export_peft_lora(run, tmp_path / "A", tmp_path / "peft")
    theirs = diffusers.UNet2DConditionModel.from_pretrained(
        export_to_diffusers(run, tmp_path / "hf"), subfolder="unet"
    ).eval()
    z, t, ctx = randn(2, 2, 8, 8, seed=5), torch.tensor([3, 999]), randn(2, 4, 6, seed=6)
    with torch.no_grad():
        base = theirs(z, t, ctx).sample
    theirs.load_lora_adapter(str(out), prefix="unet", weight_name=PEFT_WEIGHTS_NAME)
    with torch.no_grad():
        got = theirs(z, t, ctx).sample
        expected = ours(z, t, context=ctx)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    assert (got - base).abs().max() > 1e-3


def test_export_refusals(tmp_path):
    run = make_run(tmp_path / "run", dataclasses.replace(UNET, num_classes=3))
    make_adapter(run, tmp_path / "A", 2, 2.0, False)
    # a run whose UNet maps onto no diffusers UNet (a distilled student's guidance input)
    student_cfg = dataclasses.replace(UNET, num_classes=3, guidance_input=True)
    student = make_run(tmp_path / "student", student_cfg)
    make_adapter(student, tmp_path / "S", 2, 2.0, False)
    with pytest.raises(InteropError, match="guidance_input.*no diffusers equivalent"):
        export_peft_lora(student, tmp_path / "S", tmp_path / "o1")
    # the adapter of another run (other weights)
    other = make_run(tmp_path / "other", dataclasses.replace(UNET, num_classes=3))
    unet = UNet(RunFolder(other).config().unet)
    perturb(unet.parameters(), 9)
    RunFolder(other).save_unet(unet)
    with pytest.raises(InteropError, match="other weights|another|weights"):
        export_peft_lora(other, tmp_path / "A", tmp_path / "o2")
    with pytest.raises(InteropError, match="not an adapter|adapter.json|no adapter"):
        export_peft_lora(run, tmp_path / "run", tmp_path / "o3")
    gated = json.loads((tmp_path / "A" / "adapter.json").read_text()) | {"gate": "class"}
    shutil.copytree(tmp_path / "A", tmp_path / "G")
    (tmp_path / "G" / "adapter.json").write_text(json.dumps(gated))
    with pytest.raises(InteropError, match="acts on its class only.*--gate none"):
        export_peft_lora(run, tmp_path / "G", tmp_path / "o4")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InteropError, match="not empty"):
        export_peft_lora(run, tmp_path / "A", tmp_path / "full")


def test_cli_export_peft(tmp_path):
    run = make_run(tmp_path / "run", dataclasses.replace(UNET, num_classes=3))
    make_adapter(run, tmp_path / "A", 2, 2.0, False)
    cmd = [sys.executable, "-m", "ldmkit", "finetune", "--run", str(run), "--export-peft",
           str(tmp_path / "A"), "--out", str(tmp_path / "peft")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "peft" / PEFT_WEIGHTS_NAME).is_file()
    assert "pytorch_lora_weights.safetensors" in res.stdout
    res = subprocess.run(cmd, capture_output=True, text=True)  # --out is not empty now
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "not empty" in res.stderr
    inside = [*cmd[:-1], str(tmp_path / "A" / "peft")]  # --out inside the adapter folder
    res = subprocess.run(inside, capture_output=True, text=True)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--out" in res.stderr and "--export-peft" in res.stderr
