"""Tests of ldmkit.interop.diffusers against diffusers itself (issue 7).

diffusers builds and saves tiny random models with its own save_pretrained; ldmkit loads them and
must give the same outputs, and diffusers must load what ldmkit exports. The error tests write
config.json files by hand and need no diffusers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ldmkit.checkpoint import read_json, write_json
from ldmkit.interop import (
    InteropError,
    convert_from_diffusers,
    export_to_diffusers,
    load_diffusers_scheduler,
    load_diffusers_unet,
    load_diffusers_vae,
)
from ldmkit.models.unet import UNet, UNetConfig
from ldmkit.models.vae import Autoencoder, AutoencoderConfig
from ldmkit.recipe import DiffusionConfig, RunConfig
from ldmkit.runs import DataInfo, RunFolder

ATOL = 1e-5


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter: zero-initialised convs and (1, 0) norms would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- diffusers folders -> ldmkit


@pytest.mark.reference
@pytest.mark.parametrize("channels", [(8,), (8, 16), (8, 16, 16), (8, 16, 16, 16)])
def test_diffusers_vae_folder_loads_with_equal_outputs(tmp_path, channels):
    diffusers = pytest.importorskip("diffusers")
    levels = len(channels)
    theirs = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.4,
    )
    perturb(theirs).eval()
    theirs.save_pretrained(tmp_path / "vae")

    ours = load_diffusers_vae(tmp_path / "vae")
    f = 2 ** (levels - 1)
    assert ours.downsample_factor == f and ours.config.scaling_factor == 0.4
    x = randn(2, 3, 16, 16).clamp(-1, 1)
    z = randn(2, 2, 16 // f, 16 // f, seed=2)
    with torch.no_grad():
        dist = theirs.encode(x).latent_dist
        posterior = ours.encode(x)
        torch.testing.assert_close(posterior.mean, dist.mean, rtol=0, atol=ATOL)
        torch.testing.assert_close(posterior.logvar, dist.logvar, rtol=0, atol=ATOL)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=0, atol=ATOL)


UNET2D_CASES = {
    "no-attention": dict(
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False,
    ),
    "attention+classes": dict(
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        num_class_embeds=3,
    ),
    "ddpm-switches": dict(  # the original DDPM layout: scale-shift, [sin, cos], shifted freqs
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        attention_head_dim=None,
        resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=4,
        flip_sin_to_cos=False,
        freq_shift=1,
        downsample_padding=0,
        norm_eps=1e-6,
    ),
}


@pytest.mark.reference
@pytest.mark.parametrize("name", list(UNET2D_CASES))
def test_diffusers_unet2d_folder_loads_with_equal_outputs(tmp_path, name):
    diffusers = pytest.importorskip("diffusers")
    kwargs = UNET2D_CASES[name]
    theirs = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        **kwargs,
    )
    perturb(theirs).eval()
    theirs.save_pretrained(tmp_path / "unet")

    ours = load_diffusers_unet(tmp_path / "unet")
    x, t = randn(2, 2, 8, 8), torch.tensor([5, 900])
    labels = torch.tensor([0, 2]) if "num_class_embeds" in kwargs else None
    with torch.no_grad():
        expected = theirs(x, t, class_labels=labels).sample
        got = ours(x, t, class_labels=labels)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    if labels is not None:
        # all 3 diffusers labels stay usable; ldmkit's null label (3) is a new zero row
        assert ours.config.num_classes == 3
        assert torch.equal(ours.class_embed.weight[3], torch.zeros(ours.config.time_embed_dim))


@pytest.mark.reference
@pytest.mark.parametrize("linear", [False, True])
def test_diffusers_unet2d_condition_folder_loads_with_equal_outputs(tmp_path, linear):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        cross_attention_dim=6,
        attention_head_dim=(2, 4),  # legacy name: the number of heads; 4 channels each
        use_linear_projection=linear,
        transformer_layers_per_block=2 if linear else 1,
    )
    perturb(theirs).eval()
    theirs.save_pretrained(tmp_path / "unet")

    ours = load_diffusers_unet(tmp_path / "unet")
    assert ours.config.head_dim == 4 and ours.config.context_dim == 6
    assert torch.equal(ours.null_context, torch.zeros(1, 6))
    x, t, ctx = randn(2, 2, 8, 8), torch.tensor([5, 900]), randn(2, 3, 6, seed=3)
    with torch.no_grad():
        expected = theirs(x, t, ctx).sample
        got = ours(x, t, context=ctx)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


def save_pipeline(diffusers, folder: Path, **scheduler_kwargs) -> None:
    """A DDIMPipeline folder (unet + scheduler) with an AutoencoderKL in vae/ beside it."""
    unet = perturb(
        diffusers.UNet2DModel(
            sample_size=8,
            in_channels=2,
            out_channels=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=8,
        )
    )
    scheduler = diffusers.DDIMScheduler(**scheduler_kwargs)
    diffusers.DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    vae = diffusers.AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=(8, 16),
        latent_channels=2,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.5,
    )
    perturb(vae).save_pretrained(folder / "vae")


@pytest.mark.reference
def test_diffusers_pipeline_folder_converts_to_a_run(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from ldmkit.pipeline import LatentDiffusion

    save_pipeline(
        diffusers,
        tmp_path / "pipe",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
    )
    run = convert_from_diffusers(tmp_path / "pipe", tmp_path / "run")
    ldm = LatentDiffusion.from_run(run, device="cpu")
    assert ldm.unet.config.prediction_type == "v"
    assert ldm.latent_shape == (2, 8, 8)
    assert RunFolder(run).config().diffusion.zero_terminal_snr is True
    assert RunFolder(run).data_info().class_names is None
    torch.testing.assert_close(
        ldm.schedule.alphas_cumprod,
        diffusers.DDIMScheduler.from_pretrained(
            tmp_path / "pipe", subfolder="scheduler"
        ).alphas_cumprod.double(),
        rtol=0,
        atol=1e-6,
    )
    direct = load_diffusers_unet(tmp_path / "pipe")  # takes prediction_type from scheduler/
    assert direct.config == ldm.unet.config
    for k, v in direct.state_dict().items():
        assert torch.equal(v, ldm.unet.state_dict()[k]), k

    # a lone UNet folder converts when the autoencoder and scheduler are named beside it
    pipe = tmp_path / "pipe"
    lone = convert_from_diffusers(
        pipe / "unet", tmp_path / "lone", vae_dir=pipe / "vae", scheduler_dir=pipe / "scheduler"
    )
    assert RunFolder(lone).config().unet == RunFolder(run).config().unet


# ---------------------------------------------------------------- ldmkit runs -> diffusers

# The architecture is named in full: ldmkit's config defaults are its training recipe and may
# change; these tests need a small eps-predicting model with "add" time injection to start from.
VAE = AutoencoderConfig(
    image_channels=3,
    latent_channels=2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_groups=4,
    norm_eps=1e-6,
    mid_attention=True,
    image_size=16,
    scaling_factor=0.7,
)
UNET = UNetConfig(
    sample_size=8,
    in_channels=2,
    out_channels=2,
    block_out_channels=(8, 16),
    num_res_blocks=1,
    attention_resolutions=(4,),
    mid_attention=True,
    head_dim=4,
    num_heads=None,
    norm_num_groups=4,
    time_injection="add",
    prediction_type="eps",
)


def make_run(folder: Path, unet_cfg: UNetConfig = UNET, **diffusion) -> Path:
    """A run folder as a training writes it (through RunFolder), with random weights."""
    run = RunFolder(folder)
    run.save_vae(perturb(Autoencoder(VAE), seed=1))
    run.save_unet(perturb(UNet(unet_cfg), seed=2))
    cfg = RunConfig(
        image_size=16,
        channels=3,
        vae=VAE,
        unet=unet_cfg,
        diffusion=DiffusionConfig(**diffusion),
    )
    classes = [f"c{i}" for i in range(unet_cfg.num_classes)] if unet_cfg.num_classes else None
    run.write_data_info(DataInfo(spec=cfg.data, channels=3, image_size=16, class_names=classes))
    run.write_config(cfg)  # last, as a training does
    return run.path


@pytest.mark.reference
@pytest.mark.parametrize(
    "unet_overrides",
    [dict(), dict(num_classes=3, time_injection="scale_shift"), dict(context_dim=6)],
    ids=["plain", "classes", "cross-attention"],
)
def test_exported_run_loads_in_diffusers_with_equal_outputs(tmp_path, unet_overrides):
    diffusers = pytest.importorskip("diffusers")
    run = make_run(tmp_path / "run", dataclasses.replace(UNET, **unet_overrides))
    out = export_to_diffusers(run, tmp_path / "hf")
    vae, unet = RunFolder(run).load_vae(), RunFolder(run).load_unet()

    their_vae = diffusers.AutoencoderKL.from_pretrained(out, subfolder="vae").eval()
    assert their_vae.config.scaling_factor == 0.7
    unet_cls = diffusers.UNet2DConditionModel if "context_dim" in unet_overrides else None
    unet_cls = unet_cls or diffusers.UNet2DModel
    their_unet = unet_cls.from_pretrained(out, subfolder="unet").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    assert scheduler.config.prediction_type == "epsilon"

    x = randn(2, 3, 16, 16).clamp(-1, 1)
    z, t = randn(2, 2, 8, 8, seed=2), torch.tensor([3, 999])
    labels = torch.tensor([0, 3]) if "num_classes" in unet_overrides else None  # 3 = null
    ctx = randn(2, 4, 6, seed=3) if "context_dim" in unet_overrides else None
    with torch.no_grad():
        torch.testing.assert_close(
            vae.encode(x).mean, their_vae.encode(x).latent_dist.mean, rtol=0, atol=ATOL
        )
        torch.testing.assert_close(vae.decode(z), their_vae.decode(z).sample, rtol=0, atol=ATOL)
        if ctx is not None:
            expected = their_unet(z, t, ctx).sample
        else:
            expected = their_unet(z, t, class_labels=labels).sample
        got = unet(z, t, class_labels=labels, context=ctx)
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


@pytest.mark.reference
@pytest.mark.parametrize(
    "prediction, diffusion",
    [
        ("eps", dict(schedule="linear")),
        ("v", dict(schedule="scaled_linear", zero_terminal_snr=True)),
        ("x0", dict(schedule="cosine")),
    ],
)
def test_ddim_sampling_matches_a_diffusers_ddim_loop(tmp_path, prediction, diffusion):
    diffusers = pytest.importorskip("diffusers")
    from ldmkit.diffusion.samplers import sample
    from ldmkit.pipeline import LatentDiffusion

    unet_cfg = dataclasses.replace(UNET, prediction_type=prediction)
    run = make_run(tmp_path / "run", unet_cfg, **diffusion)
    out = export_to_diffusers(run, tmp_path / "hf")

    # ldmkit: the run's UNet and schedule through the DDIM sampler, from a fixed x_T.
    ldm = LatentDiffusion.from_run(run, device="cpu")
    x_T = randn(2, *ldm.latent_shape, seed=4)
    steps = 4
    ours = sample(
        ldm.unet, ldm.schedule, x_T, sampler="ddim", steps=steps, prediction_type=prediction
    )

    # diffusers: the exported pipeline folder with a plain DDIMScheduler loop.
    pipe = diffusers.DDIMPipeline.from_pretrained(out)
    vae = diffusers.AutoencoderKL.from_pretrained(out, subfolder="vae")
    pipe.scheduler.set_timesteps(steps)
    latents = x_T * pipe.scheduler.init_noise_sigma
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            model_output = pipe.unet(latents, t).sample
            latents = pipe.scheduler.step(model_output, t, latents).prev_sample
        images = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    # An untrained eps-model's x0 at t = 999 is ~1 / sqrt(alpha_bar) = 160 times its error, so
    # the latents reach |z| ~ 500 there: compare relative to their scale.
    scale = latents.abs().max().clamp(min=1)
    torch.testing.assert_close(ours / scale, latents / scale, rtol=0, atol=1e-5)
    torch.testing.assert_close(ldm.decode(ours), images, rtol=0, atol=1e-4)


@pytest.mark.reference
def test_sigmoid_run_exports_a_ddpm_pipeline_that_samples_alike(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from ldmkit.diffusion.samplers import sample
    from ldmkit.pipeline import LatentDiffusion

    run = make_run(tmp_path / "run", schedule="sigmoid")
    out = export_to_diffusers(run, tmp_path / "hf")
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "DDPMPipeline"

    # ancestral DDPM, 4 "leading" steps, the same generator for x_T and every step's noise
    ldm = LatentDiffusion.from_run(run, device="cpu")
    x_T = randn(2, *ldm.latent_shape, seed=4)
    gen = torch.Generator().manual_seed(5)
    ours = sample(
        ldm.unet, ldm.schedule, x_T, sampler="ddpm", steps=4, generator=gen,
        prediction_type=ldm.unet.config.prediction_type,
    )  # fmt: skip
    pipe.scheduler.set_timesteps(4)
    gen, latents = torch.Generator().manual_seed(5), x_T
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            eps = pipe.unet(latents, t).sample
            latents = pipe.scheduler.step(eps, t, latents, generator=gen).prev_sample
    assert pipe.scheduler.timesteps.tolist() == [750, 500, 250, 0]
    assert pipe.scheduler.config.prediction_type == "epsilon"  # UNET predicts eps
    scale = latents.abs().max().clamp(min=1)
    torch.testing.assert_close(ours / scale, latents / scale, rtol=0, atol=1e-5)


@pytest.mark.reference
@pytest.mark.parametrize(
    "unet_overrides, diffusion",
    [
        (dict(), dict(schedule="linear")),
        (dict(num_classes=3, prediction_type="v"), dict(schedule="cosine", num_timesteps=500)),
        (dict(context_dim=6, num_heads=2, head_dim=None), dict(schedule="sigmoid")),
    ],
    ids=["plain", "classes-v-cosine", "cross-attention-num-heads"],
)
def test_round_trip_ldmkit_diffusers_ldmkit_is_bit_exact(tmp_path, unet_overrides, diffusion):
    diffusers = pytest.importorskip("diffusers")
    run = make_run(tmp_path / "run", dataclasses.replace(UNET, **unet_overrides), **diffusion)
    hf = export_to_diffusers(run, tmp_path / "hf")
    # diffusers can read what was written ...
    pipe = diffusers.DiffusionPipeline.from_pretrained(hf)
    expected = "DDPMPipeline" if diffusion["schedule"] == "sigmoid" else "DDIMPipeline"
    assert type(pipe).__name__ == expected
    # ... and converting it back gives the same run.
    back = convert_from_diffusers(hf, tmp_path / "back")
    first, second = RunFolder(run), RunFolder(back)
    for part, a, b in (
        ("vae", first.load_vae(), second.load_vae()),
        ("unet", first.load_unet(), second.load_unet()),
    ):
        assert a.config == b.config, part
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{part}.{k}"
    keys = ("schedule", "num_timesteps", "zero_terminal_snr")
    d0, d1 = RunFolder(run).config().diffusion, RunFolder(back).config().diffusion
    assert {k: getattr(d0, k) for k in keys} == {k: getattr(d1, k) for k in keys}


@pytest.mark.reference
def test_cli_converts_both_ways(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from ldmkit.cli import main
    from ldmkit.pipeline import LatentDiffusion

    run = make_run(tmp_path / "run")
    assert main(["convert", "--to-diffusers", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model_index.json").is_file()
    args = ["convert", "--from-diffusers", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]
    assert main(args) == 0
    LatentDiffusion.from_run(tmp_path / "back", device="cpu")
    capsys.readouterr()
    assert main(args) == 2  # the run exists now
    err = capsys.readouterr().err
    assert err.startswith("ldmkit: error: ") and "already holds a run" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- configs alone (no diffusers needed)


def test_published_diffusers_unet_configs_map_onto_ldmkit():
    from ldmkit.interop.unet_names import diffusers_unet_config, unet_config_from_diffusers

    # google/ddpm-cifar10-32 (Ho et al. 2020): the original DDPM switches, one attention level
    ddpm = {
        "_class_name": "UNet2DModel",
        "act_fn": "silu",
        "attention_head_dim": None,
        "block_out_channels": [128, 256, 256, 256],
        "center_input_sample": False,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "in_channels": 3,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-06,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 32,
        "time_embedding_type": "positional",
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    }
    cfg = unet_config_from_diffusers(ddpm)
    assert cfg.attention_resolutions == (16,) and cfg.num_heads == 1
    assert (cfg.downsample_padding, cfg.freq_shift, cfg.flip_sin_to_cos) == (0, 1, False)
    assert diffusers_unet_config(cfg)[1]["down_block_types"] == tuple(ddpm["down_block_types"])
    # Stable Diffusion 2 layout: heads 5, 10, 20, 20 at 64 channels each, linear projections
    sd2 = {
        "_class_name": "UNet2DConditionModel",
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 1024,
        "sample_size": 96,
        "upcast_attention": True,
        "use_linear_projection": True,
    }
    cfg = unet_config_from_diffusers(sd2, prediction_type="v")
    assert (cfg.head_dim, cfg.num_heads, cfg.context_dim) == (64, None, 1024)
    assert cfg.attention_resolutions == (96, 48, 24) and cfg.mid_attention


# ---------------------------------------------------------------- refusals (no diffusers needed)


def write_component(folder: Path, config: dict, weights: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights is not None:
        (folder / weights).write_bytes(b"\x80\x02not really a pickle")
    return folder


UNET2D = {
    "_class_name": "UNet2DModel",
    "sample_size": 8,
    "in_channels": 2,
    "out_channels": 2,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "attention_head_dim": 4,
}
UNET2D_CONDITION = {
    **UNET2D,
    "_class_name": "UNet2DConditionModel",
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 6,
}
# Fields a diffusers config does not describe: initialisation and the trainer's loss switches.
NOT_IN_DIFFUSERS = {
    "UNetConfig": {"zero_init_residual"},
    "AutoencoderConfig": {
        "reconstruction", "kl_weight", "perceptual_weight", "feature_weight", "disc_weight", "disc_start",
        "disc_layers", "disc_channels",
    },
}  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [UNET2D, UNET2D_CONDITION, {"_class_name": "AutoencoderKL"}],
    ids=["UNet2DModel", "UNet2DConditionModel", "AutoencoderKL"],
)
def test_diffusers_configs_set_every_architecture_field(monkeypatch, config):
    """ldmkit's config defaults are its training recipe, not diffusers' defaults: a converted
    config names every architecture field itself, whatever those defaults become."""
    from ldmkit.interop import unet_names, vae_names

    if config["_class_name"] == "AutoencoderKL":
        cls, module, convert = AutoencoderConfig, vae_names, vae_names.vae_config_from_diffusers
    else:
        cls, module, convert = UNetConfig, unet_names, unet_names.unet_config_from_diffusers
    given: list[set[str]] = []

    def recording_constructor(**kwargs):
        given.append(set(kwargs))
        return cls(**kwargs)

    monkeypatch.setattr(module, cls.__name__, recording_constructor)
    convert(config)
    left_to_defaults = {f.name for f in dataclasses.fields(cls)} - given[-1]
    assert left_to_defaults == NOT_IN_DIFFUSERS[cls.__name__]


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier' is not supported"),
        ({"act_fn": "mish"}, "act_fn='mish' is not supported; ldmkit supports only act_fn='silu'"),
        (
            {"down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"]},
            "down_block_types=.* levels must be DownBlock2D or AttnDownBlock2D",
        ),
        (
            {"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]},
            "up_block_types=.* attention at the same levels",
        ),
        ({"class_embed_type": "timestep"}, "class_embed_type='timestep' is not supported"),
        ({"mid_block_type": None}, "mid_block_type=None is not supported"),
        ({"sample_size": None}, "no sample_size; pass sample_size="),
        ({"_class_name": "UVit2DModel"}, "describes a 'UVit2DModel', not UNet2DModel"),
        ({"some_new_option": 1}, "option 'some_new_option' is not supported"),
        (
            {"resnet_time_scale_shift": "scale_shift"},
            "attn_norm_num_groups=None is not supported; with resnet_time_scale_shift",
        ),
    ],
)
def test_unsupported_unet_options_are_named(tmp_path, changes, match):
    folder = write_component(tmp_path / "unet", {**UNET2D, **changes})
    with pytest.raises(InteropError, match=match):
        load_diffusers_unet(folder)


def test_unsupported_condition_unet_heads_are_named(tmp_path):
    config = {
        **UNET2D,
        "_class_name": "UNet2DConditionModel",
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 6,
        "attention_head_dim": [1, 4],  # 8 and 4 channels per head: neither fixed heads nor dim
    }
    with pytest.raises(InteropError, match=r"attention_head_dim=\[1, 4\] is not supported"):
        load_diffusers_unet(write_component(tmp_path / "unet", config))
    config.update(attention_head_dim=2, addition_embed_type="text_time")
    with pytest.raises(InteropError, match="addition_embed_type='text_time' is not supported"):
        load_diffusers_unet(write_component(tmp_path / "unet2", config))


def test_unsupported_vae_options_are_named(tmp_path):
    config = {"_class_name": "AutoencoderKL", "use_quant_conv": False, "force_upcast": True}
    with pytest.raises(InteropError, match="use_quant_conv=False is not supported"):
        load_diffusers_vae(write_component(tmp_path / "vae", config))


def test_pickle_weights_are_refused(tmp_path):
    folder = write_component(tmp_path / "unet", UNET2D, weights="diffusion_pytorch_model.bin")
    with pytest.raises(InteropError, match="is a pickle file, which ldmkit never loads; re-save"):
        load_diffusers_unet(folder)


def write_scheduler(folder: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "scheduler_config.json", {"_class_name": "DDPMScheduler", **config})
    return folder


@pytest.mark.parametrize(
    "config, match",
    [
        ({"trained_betas": [0.1, 0.2]}, "trained_betas .* is not supported"),
        ({"beta_schedule": "laplace"}, "beta_schedule='laplace' is not supported"),
        ({"prediction_type": "flow"}, "prediction_type='flow' is not supported"),
        ({"variance_type": "learned_range"}, "variance_type='learned_range' .* not supported"),
        (
            {"_class_name": "FlowMatchEulerDiscreteScheduler"},
            "scheduler class 'FlowMatchEulerDiscreteScheduler' is not supported",
        ),
    ],
)
def test_unsupported_scheduler_options_are_named(tmp_path, config, match):
    with pytest.raises(InteropError, match=match):
        load_diffusers_scheduler(write_scheduler(tmp_path / "scheduler", **config))


def test_scheduler_maps_onto_ldmkit_schedules(tmp_path, caplog):
    spec = load_diffusers_scheduler(
        write_scheduler(
            tmp_path / "a",
            beta_schedule="squaredcos_cap_v2",
            num_train_timesteps=400,
            prediction_type="sample",
            clip_sample=True,
            timestep_spacing="leading",
        )
    )
    assert (spec.schedule, spec.num_timesteps, spec.prediction_type) == ("cosine", 400, "x0")
    assert spec.sampling_options == {"clip_sample": True, "timestep_spacing": "leading"}
    assert "clip_sample=True" in caplog.text  # named, not dropped silently
    spec = load_diffusers_scheduler(
        write_scheduler(tmp_path / "b", beta_schedule="linear", beta_end=0.03)
    )
    assert (spec.beta_start, spec.beta_end) == (None, 0.03)
    assert spec.make_schedule().betas[-1].item() == pytest.approx(0.03)


def test_convert_refuses_what_a_run_cannot_hold(tmp_path):
    unet = write_component(tmp_path / "lone", UNET2D)
    with pytest.raises(InteropError, match="has no vae/ folder: ldmkit runs are latent"):
        convert_from_diffusers(unet, tmp_path / "run")

    pipe = tmp_path / "pipe"
    write_component(pipe / "unet", UNET2D)
    write_component(pipe / "vae", {"_class_name": "AutoencoderKL"})
    write_json(pipe / "model_index.json", {"_class_name": "X", "text_encoder": ["t", "CLIP"]})
    with pytest.raises(InteropError, match="component 'text_encoder' .* no ldmkit counterpart"):
        convert_from_diffusers(pipe, tmp_path / "run")

    (pipe / "model_index.json").unlink()
    with pytest.raises(InteropError, match="has no scheduler config"):
        convert_from_diffusers(pipe, tmp_path / "run")
    write_scheduler(pipe / "scheduler", beta_start=0.0002)
    with pytest.raises(InteropError, match="beta_start/beta_end 0.0002/None differ"):
        convert_from_diffusers(pipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written


def test_export_refuses_unfinished_runs_used_folders_and_edited_ldmkit_sections(tmp_path):
    run = make_run(tmp_path / "run")
    unfinished = tmp_path / "unfinished"  # a run whose training has saved no model yet
    RunFolder(unfinished).write_config(RunFolder(run).config())
    with pytest.raises(InteropError, match="has no trained vae"):
        export_to_diffusers(unfinished, tmp_path / "hf-unfinished")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    with pytest.raises(InteropError, match="not an empty folder"):
        export_to_diffusers(run, tmp_path / "used")

    hf = export_to_diffusers(run, tmp_path / "hf")
    config = read_json(hf / "unet" / "config.json")
    config["layers_per_block"] = 2
    write_json(hf / "unet" / "config.json", config)
    with pytest.raises(InteropError, match="layers_per_block=2 disagrees with the _ldmkit section"):
        load_diffusers_unet(hf)
