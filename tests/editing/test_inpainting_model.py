"""A trained inpainting model (task=inpaint): the UNet takes the mask and the masked latent as
extra inputs, starts from a generation model with zero weights on them, trains on random masks,
and is used by `ldmkit inpaint`."""

import json

import torch
from PIL import Image
from reliability_helpers import run_cli, tiny

from ldmkit import editing
from ldmkit.models.unet import UNet, UNetConfig, widen_input
from ldmkit.pipeline import LatentDiffusion


def test_a_widened_unet_computes_exactly_the_base_model_whatever_the_extra_inputs():
    torch.manual_seed(0)
    base = UNet(UNetConfig(sample_size=8, in_channels=2, block_out_channels=(8, 16),
                           attention_resolutions=(4,), head_dim=4, norm_num_groups=4,
                           num_classes=3, zero_init_residual=False)).eval()  # fmt: skip
    wide = widen_input(base, 3).eval()
    assert wide.config.in_channels == 5 and wide.config.out_channels == 2
    x, t, y = torch.randn(4, 2, 8, 8), torch.tensor([1, 50, 500, 999]), torch.tensor([0, 1, 2, 3])
    extra = torch.randn(4, 3, 8, 8) * 10
    with torch.no_grad():
        assert torch.equal(
            wide(torch.cat([x, extra], 1), t, class_labels=y), base(x, t, class_labels=y)
        )


def test_task_inpaint_trains_fine_tunes_and_inpaints(tmp_path, capsys):
    out = tmp_path / "inp"
    rc, _, err = run_cli(capsys, "train", "--out", str(out), *tiny(2), "--set", "task=inpaint")
    assert rc == 0, err
    cfg = json.loads((out / "run.json").read_text())
    assert (
        cfg["task"] == "inpaint"
        and cfg["unet"]["in_channels"] == 2 * cfg["vae"]["latent_channels"] + 1
    )
    ldm = LatentDiffusion.from_run(out)
    assert ldm.is_inpainting_model and ldm.sample(2, steps=2).shape == (2, 3, 16, 16)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    result = editing.inpaint(ldm, image, mask, steps=3)
    assert result.params["blend"] is False and result.network_calls == 3
    keep = (mask == 0).expand_as(image)
    assert torch.equal(result.images[keep], image[keep])

    # fine-tune the generation model of a second run into an inpainting model
    base = tmp_path / "base"
    assert run_cli(capsys, "train", "--out", str(base), *tiny(2))[0] == 0
    tuned = tmp_path / "tuned"
    rc, _, err = run_cli(capsys, "train", "--out", str(tuned), *tiny(2), "--set", "task=inpaint",
                         "--set", f"init_from={base}")  # fmt: skip
    assert rc == 0, err
    assert (tuned / "vae" / "model.safetensors").read_bytes() == (
        base / "vae" / "model.safetensors"
    ).read_bytes()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(tmp_path / "in.png")
    Image.fromarray((mask[0, 0].numpy() * 255).astype("uint8")).save(tmp_path / "m.png")
    rc, text, err = run_cli(capsys, "inpaint", "--run", str(tuned), "--image", str(tmp_path / "in.png"),
                            "--mask", str(tmp_path / "m.png"), "--steps", "2", "--out", str(tmp_path / "o.png"))  # fmt: skip
    assert rc == 0, err


def test_init_from_refuses_a_run_with_other_classes(tmp_path, capsys):
    base = tmp_path / "base"
    assert (
        run_cli(capsys, "train", "--out", str(base), *tiny(1), "--set", "conditioning=none")[0] == 0
    )
    rc, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "t"), *tiny(1), "--set",
                         "task=inpaint", "--set", f"init_from={base}")  # fmt: skip
    assert rc == 2 and "that run has no classes, this data 5" in err
