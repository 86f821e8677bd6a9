"""End to end: the two-stage run on tiny configs, sampling from it, and exact resume."""

import json

import pytest
import torch

from ldmkit.checkpoint import load_tensors
from ldmkit.cli import main
from ldmkit.config import ConfigError
from ldmkit.pipeline import LatentDiffusion
from ldmkit.recipe import parse_duration, run_config_from_dict
from ldmkit.training.run import train_run

TINY = {
    "data": "builtin:shapes?n=96",
    "vae": {"block_out_channels": [8, 16], "layers_per_block": 1, "norm_groups": 4},
    "unet": {
        "block_out_channels": [16, 32],
        "attention_resolutions": [8],
        "norm_num_groups": 8,
        "head_dim": 8,
    },
    "vae_train": {
        "steps": 4,
        "batch_size": 8,
        "log_every": 2,
        "checkpoint_every": 2,
        "sample_every": 0,
    },
    "unet_train": {
        "steps": 6,
        "batch_size": 8,
        "grad_accum": 2,
        "log_every": 2,
        "checkpoint_every": 3,
        "sample_every": 3,
    },
    "image_size": 16,
    "preview_steps": 2,
}


def tiny(**over):
    d = json.loads(json.dumps(TINY))
    for k, v in over.items():
        d[k].update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    return run_config_from_dict(d)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)  # module fixtures run before the per-test one that sets this
    out = tmp_path_factory.mktemp("run") / "r"
    res = train_run(tiny(), out)
    assert res.stopped_because == "finished" and res.vae_steps == 4 and res.unet_steps == 6
    return out


def test_run_folder_layout(run_dir):
    for name in [
        "run.json",
        "data.json",
        "vae/model.safetensors",
        "vae/config.json",
        "unet/model.safetensors",
        "samples.png",
        "loss.png",
        "reconstructions.png",
        "log.jsonl",
        "latents.safetensors",
    ]:
        assert (run_dir / name).is_file(), name
    vae_cfg = json.loads((run_dir / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] != 1.0  # measured on the data
    data = json.loads((run_dir / "data.json").read_text())
    assert data["channels"] == 3 and data["class_names"][0] == "circle"
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "step-00000003.png",
        "step-00000006.png",
    ]


def test_sampling_is_seeded_and_batch_independent(run_dir):
    ldm = LatentDiffusion.from_run(run_dir, device="cpu")
    a = ldm.sample(4, sampler="ddim", steps=3, seed=1, batch_size=4)
    b = ldm.sample(4, sampler="ddim", steps=3, seed=1, batch_size=4)
    c = ldm.sample(4, sampler="ddim", steps=3, seed=2, batch_size=4)
    assert a.shape == (4, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    lab = ldm.sample(2, sampler="euler", steps=2, class_labels=[0, 1], guidance_scale=3.0)
    assert lab.shape == (2, 3, 16, 16)
    # with labels and no scale, the run's guidance_scale (RunConfig default 5) applies
    assert ldm.guidance_scale == 5.0
    kw = dict(sampler="ddim", steps=3, seed=1, class_labels=[0, 1, 2, 3])
    d = ldm.sample(4, **kw)
    assert torch.equal(d, ldm.sample(4, guidance_scale=5.0, **kw))
    assert not torch.equal(d, ldm.sample(4, guidance_scale=1.0, **kw))
    with pytest.raises(ValueError, match="class labels must be in 0..4"):
        ldm.sample(1, class_labels=[7])


def test_resume_is_bit_exact(tmp_path, run_dir):
    # run_dir trained 4 + 6 steps without interruption; here: the same run stopped after 3
    # diffusion steps (as if killed right after its checkpoint) and resumed for 3 more
    out = tmp_path / "r"
    train_run(tiny(unet_train={"steps": 3}), out)
    res = train_run(tiny(), out, resume=True)
    assert res.unet_steps == 6
    for part in ("vae", "unet"):
        a = load_tensors(run_dir / part / "model.safetensors")
        b = load_tensors(out / part / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_refuses_to_overwrite_a_run(run_dir):
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train_run(tiny(), run_dir)


def test_cli_sample(run_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                "--run",
                str(run_dir),
                "--n",
                "4",
                "--steps",
                "2",
                "--out",
                str(out),
                "--outdir",
                str(tmp_path / "each"),
                "--class",
                "circle,star",
                "--guidance",
                "2",
            ]
        )
        == 0
    )
    assert out.is_file() and len(list((tmp_path / "each").glob("*.png"))) == 4
    assert (
        main(["sample", "--run", str(run_dir), "--n", "2", "--class", "hexagon", "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "ldmkit: error: unknown class 'hexagon'; known classes: circle, square, triangle, star, "
        "cross (a class taught by `ldmkit finetune` needs its --adapter)"
    ]


def test_cli_sample_draws_one_row_per_class(run_dir, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "rows.png"
    assert (
        main(["sample", "--run", str(run_dir), "--n", "7", "--steps", "2", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "guidance 5, one class per row" in printed
    # 7 images of 5 classes: a row per class (2, 2, 1, 1, 1; issue 32: the fifth class was left
    # out), said in a note; 16 px cells enlarged to 64 for the labels, with 2 px padding
    assert "note: 7 images do not fill one row per class (5 classes)" in printed
    assert Image.open(out).height == 5 * (64 + 2) + 2


def test_config_errors():
    with pytest.raises(
        ConfigError, match="unknown key 'stepz' in RunConfig.unet_train; known keys:"
    ):
        run_config_from_dict({"unet_train": {"stepz": 3}})
    with pytest.raises(ConfigError, match="steps must be a whole number >= 1"):
        run_config_from_dict({"unet_train": {"steps": -1}})
    with pytest.raises(
        ConfigError, match="attention resolution 3 is not a resolution the UNet reaches"
    ):
        run_config_from_dict({"unet": {"attention_resolutions": [3]}})
    with pytest.raises(ConfigError, match="must be an integer"):
        run_config_from_dict({"image_size": "big"})
    with pytest.raises(ConfigError, match="cannot read the duration"):
        parse_duration("ten minutes")
    assert (
        parse_duration("1h30m") == 5400
        and parse_duration("90s") == 90
        and parse_duration("12") == 12
    )


def test_autoencoder_with_discriminator_and_resume(tmp_path):
    gan = {
        "disc_weight": 0.5,
        "disc_start": 1,
        "disc_layers": 2,
        "disc_channels": 8,
        "perceptual_weight": 0.1,
    }
    cfg = tiny(vae=gan, vae_train={"steps": 3})
    train_run(cfg, tmp_path / "a", stage="autoencoder")
    rows = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert "d_loss" in rows[-1] and "g_loss" in rows[-1] and "perceptual" in rows[-1]
    # the discriminator and its optimizer are part of the checkpoint, so resume stays exact
    train_run(tiny(vae=gan, vae_train={"steps": 2}), tmp_path / "b", stage="autoencoder")
    (tmp_path / "b" / "vae").rename(tmp_path / "b" / "vae-partial")  # as if killed before the end
    train_run(cfg, tmp_path / "b", stage="autoencoder", resume=True)
    a = load_tensors(tmp_path / "a" / "vae" / "model.safetensors")
    b = load_tensors(tmp_path / "b" / "vae" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_is_turned_off_where_the_cpu_lacks_it(monkeypatch, caplog, fast):
    from ldmkit import runtime
    from ldmkit.training.run import _check_bf16

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: fast)
    cfg = run_config_from_dict({"unet_train": {"bf16": True}})
    out = _check_bf16(cfg, torch.device("cpu"))
    assert out.unet_train.bf16 is fast and out.vae_train.bf16 is False
    assert ("no native bf16" in caplog.text) is (not fast)
