"""Tests of ldmkit.models.unet: config validation, shapes, conditioning, gradients, persistence,
and (marked `reference`) equality with diffusers' UNet2DModel / UNet2DConditionModel."""

from __future__ import annotations

import json

import pytest
import torch

from ldmkit.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from ldmkit.config import ConfigError, from_dict, to_dict
from ldmkit.models.unet import UNet, UNetConfig

# A tiny two-level UNet: 8x8 inputs, attention at 4x4 and in the middle.
TINY = dict(
    sample_size=8,
    in_channels=4,
    block_out_channels=(8, 16),
    num_res_blocks=1,
    attention_resolutions=(4,),
    head_dim=4,
    norm_num_groups=4,
)


def tiny(**overrides) -> UNetConfig:
    return UNetConfig(**{**TINY, **overrides})


def perturbed(model: UNet, seed: int = 0) -> UNet:
    """Add noise to every parameter so zero-initialised convs no longer hide the inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(cfg: UNetConfig, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


# ---------------------------------------------------------------- config


# the latent16 reference of PERF_ANCHORS (diffusers' UNet2DModel with these settings)
LATENT16 = dict(block_out_channels=(128, 256, 256), num_res_blocks=2, attention_resolutions=(8, 4),
                norm_num_groups=32, time_injection="add")  # fmt: skip


def test_config_defaults_are_the_training_recipe():
    from ldmkit.recipe import RunConfig

    cfg = UNetConfig()
    assert RunConfig().unet == cfg  # one set of defaults: what `ldmkit train` trains
    assert cfg.out_channels == cfg.in_channels == 4
    assert cfg.time_embed_dim == 4 * 32
    assert cfg.resolutions == (16, 8, 4)
    assert (cfg.prediction_type, cfg.time_injection) == ("v", "scale_shift")


def test_latent16_reference_has_the_diffusers_parameter_count():
    cfg = UNetConfig(**LATENT16)
    assert cfg.time_embed_dim == 4 * 128
    with torch.device("meta"):  # count without allocating 27 M weights
        model = UNet(cfg)
    assert model.num_parameters() == 27_159_300  # as diffusers' UNet2DModel (27.16 M)


def test_config_round_trips_through_dict():
    cfg = tiny(num_classes=3, context_dim=6, prediction_type="v", time_injection="scale_shift")
    assert from_dict(UNetConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            dict(sample_size=32, block_out_channels=(8, 16, 16), attention_resolutions=(12,)),
            r"^attention resolution 12 is not a resolution the UNet reaches; it reaches 32, 16, 8$",
        ),
        (
            dict(block_out_channels=(8, 10)),
            "norm_num_groups=4 does not divide block channel count 10",
        ),
        (
            dict(sample_size=10, block_out_channels=(8, 16, 16)),
            r"sample_size 10 is not divisible by 2\*\*\(levels-1\) = 4",
        ),
        (
            dict(head_dim=3),
            "head_dim 3 does not divide the 16 channels of the attention at resolution 4",
        ),
        (dict(num_heads=3, head_dim=None), "num_heads 3 does not divide the 16 channels"),
        (dict(num_heads=2), "set exactly one of head_dim and num_heads"),
        (dict(block_out_channels=()), "block_out_channels is empty"),
        (dict(num_res_blocks=0), "num_res_blocks must be >= 1"),
        (dict(prediction_type="epsilon"), "prediction_type must be 'eps', 'x0' or 'v'"),
        (dict(time_injection="film"), "time_injection must be 'add' or 'scale_shift'"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(downsample_padding=2), "downsample_padding must be 0 or 1"),
        (dict(num_classes=0), "num_classes must be >= 1 or None"),
        (dict(context_dim=0), "context_dim must be >= 1 or None"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**overrides)


def test_config_from_dict_rejects_unknown_key_and_bad_literal():
    with pytest.raises(ConfigError, match="unknown key 'channel_mult'"):
        from_dict(UNetConfig, {"channel_mult": [1, 2]})
    with pytest.raises(ConfigError, match="prediction_type must be one of"):
        from_dict(UNetConfig, {"prediction_type": "sample"})


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "overrides",
    [
        dict(in_channels=1),
        dict(in_channels=3, attention_resolutions=(), mid_attention=False),
        dict(in_channels=4, out_channels=8),
        dict(in_channels=3, num_classes=10, time_injection="scale_shift"),
        dict(in_channels=4, context_dim=6, attention_resolutions=(8, 4)),
        dict(in_channels=1, context_dim=6, num_classes=2, num_heads=2, head_dim=None),
        dict(sample_size=16, block_out_channels=(8, 8, 16), attention_resolutions=(4,)),
        dict(
            sample_size=32,
            in_channels=3,
            block_out_channels=(8, 16, 16),
            attention_resolutions=(16, 8),
            downsample_padding=0,
            dropout=0.1,
        ),
    ],
)
def test_output_shape(overrides):
    cfg = tiny(**overrides)
    model = UNet(cfg)
    x, t = inputs(cfg)
    cond = {}
    if cfg.num_classes:
        cond["class_labels"] = torch.tensor([0, cfg.num_classes - 1])
    if cfg.context_dim:
        cond["context"] = torch.randn(2, 3, cfg.context_dim)
    out = model(x, t, **cond)
    assert out.shape == (2, cfg.out_channels, cfg.sample_size, cfg.sample_size)
    assert torch.isfinite(out).all()


def test_runs_at_other_sizes_and_leaves_input_untouched():
    model = perturbed(UNet(tiny()))
    x = torch.randn(2, 4, 16, 24)
    x0 = x.clone()
    assert model(x, 5).shape == (2, 4, 16, 24)
    assert torch.equal(x, x0)


def test_conv_out_is_zero_initialised():
    model = UNet(tiny())
    x, t = inputs(model.config)
    assert torch.count_nonzero(model(x, t)) == 0


def test_timestep_forms_agree():
    model = perturbed(UNet(tiny())).eval()
    x, _ = inputs(model.config)
    ref = model(x, torch.tensor([7, 7]))
    for t in (7, 7.0, torch.tensor(7), torch.tensor([7.0, 7.0])):
        torch.testing.assert_close(model(x, t), ref)
    frac = model(x, torch.tensor([7.5, 7.5]))
    assert (frac - ref).abs().max() > 0


# ---------------------------------------------------------------- conditioning


def test_class_labels_change_output_and_null_label_is_default():
    cfg = tiny(num_classes=3)
    model = perturbed(UNet(cfg)).eval()
    x, t = inputs(cfg)
    out0 = model(x, t, class_labels=torch.tensor([0, 0]))
    out1 = model(x, t, class_labels=torch.tensor([1, 0]))
    assert (out0[0] - out1[0]).abs().max() > 1e-4
    torch.testing.assert_close(out0[1], out1[1])  # per-sample conditioning

    null = model(x, t, class_labels=torch.tensor([3, 3]))  # index num_classes: the null label
    torch.testing.assert_close(model(x, t), null)
    assert (null - out0).abs().max() > 1e-4


def test_null_context_is_default_and_any_length_of_it_is_equivalent():
    cfg = tiny(context_dim=6)
    model = perturbed(UNet(cfg)).eval()
    x, t = inputs(cfg)
    out = model(x, t)
    torch.testing.assert_close(model(x, t, context=model.get_null_context(2)), out)
    # Attending to L copies of one token is attending to that token.
    torch.testing.assert_close(model(x, t, context=model.get_null_context(2, length=5)), out)
    ctx = torch.randn(2, 5, 6)
    with_ctx = model(x, t, context=ctx)
    assert (with_ctx - out).abs().max() > 1e-4
    assert (model(x, t, context=ctx + 1) - with_ctx).abs().max() > 1e-4


def test_dropout_is_active_only_in_train_mode():
    model = perturbed(UNet(tiny(dropout=0.5)))
    x, t = inputs(model.config)
    model.train()
    assert (model(x, t) - model(x, t)).abs().max() > 0
    model.eval()
    assert torch.equal(model(x, t), model(x, t))


@pytest.mark.parametrize(
    "overrides, kwargs, match",
    [
        (
            {},
            dict(class_labels=torch.tensor([0, 1])),
            "class_labels given but the UNet has no num_classes",
        ),
        ({}, dict(context=torch.randn(2, 3, 6)), "context given but the UNet has no context_dim"),
        (
            dict(num_classes=3),
            dict(class_labels=torch.tensor([0.0, 1.0])),
            "class_labels must be a long",
        ),
        (dict(context_dim=6), dict(context=torch.randn(2, 3, 5)), r"context must be \(2, L, 6\)"),
    ],
)
def test_forward_rejects_bad_conditioning(overrides, kwargs, match):
    model = UNet(tiny(**overrides))
    x, t = inputs(model.config)
    with pytest.raises(ValueError, match=match):
        model(x, t, **kwargs)


def test_forward_rejects_bad_shapes():
    model = UNet(tiny())
    with pytest.raises(ValueError, match=r"x must be \(B, 4, H, W\)"):
        model(torch.randn(2, 3, 8, 8), 1)
    with pytest.raises(ValueError, match="H and W must be multiples of 2"):
        model(torch.randn(2, 4, 7, 8), 1)
    with pytest.raises(ValueError, match=r"t must be a scalar or of shape \(2,\)"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="this UNet has no cross-attention"):
        model.get_null_context(2)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_classes=3, time_injection="scale_shift"),
        dict(context_dim=6, use_linear_projection=True),
    ],
)
def test_gradients_reach_every_parameter(overrides):
    cfg = tiny(**overrides)
    model = perturbed(UNet(cfg))
    x, t = inputs(cfg)
    labels = torch.tensor([0, 3]) if cfg.num_classes else None
    out = model(x, t, class_labels=labels)  # context None: the null context is used
    if cfg.context_dim:
        # A one-token context gives constant attention weights (no gradient to q, k): add a
        # forward with a real context of three tokens.
        out = out + model(x, t, class_labels=labels, context=torch.randn(2, 3, cfg.context_dim))
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"no gradient reaches {dead}"


# ---------------------------------------------------------------- persistence


def test_save_load_round_trip_is_bit_exact(tmp_path):
    cfg = tiny(num_classes=3, context_dim=6, prediction_type="v")
    model = perturbed(UNet(cfg)).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    loaded = UNet.from_pretrained(tmp_path)
    assert loaded.config == cfg and not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x, t = inputs(cfg)
    ctx = torch.randn(2, 3, 6)
    assert torch.equal(model(x, t, context=ctx), loaded(x, t, context=ctx))


def test_from_pretrained_refuses_truncated_weights(tmp_path):
    UNet(tiny()).save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        UNet.from_pretrained(tmp_path)


def test_from_pretrained_refuses_config_mismatch(tmp_path):
    UNet(tiny()).save_pretrained(tmp_path)
    cfg = to_dict(tiny(block_out_channels=(8, 8)))
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match="2 unexpected tensors .* saved from a different config"
    ):
        UNet.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(to_dict(tiny(block_out_channels=(8, 12)))))
    with pytest.raises(
        CheckpointError, match="has shape .* the weights were saved from a different"
    ):
        UNet.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(to_dict(tiny(num_classes=3))))
    with pytest.raises(CheckpointError, match="does not match the model config: missing 1 tensors"):
        UNet.from_pretrained(tmp_path)


def test_from_pretrained_refuses_unknown_config_key_and_missing_files(tmp_path):
    UNet(tiny()).save_pretrained(tmp_path)
    cfg = to_dict(tiny())
    cfg["channel_mult"] = [1, 2]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown key 'channel_mult'"):
        UNet.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="is missing"):
        UNet.from_pretrained(tmp_path / "nowhere")


def test_summary_and_num_parameters():
    model = UNet(tiny(num_classes=3, context_dim=6))
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    line = model.summary()
    assert "\n" not in line
    for part in (
        "M params",
        "2 levels",
        "cross-attention at 4 + mid",
        "3 classes",
        "context dim 6",
    ):
        assert part in line


# ---------------------------------------------------------------- diffusers reference

PARITY_CONFIGS = {
    "self-attn": dict(),
    "ddpm-switches+classes": dict(
        in_channels=3,
        num_classes=3,
        time_injection="scale_shift",
        attention_resolutions=(8, 4),
        downsample_padding=0,
        freq_shift=1,
        flip_sin_to_cos=False,
        norm_eps=1e-6,
    ),
    "single-head-no-mid": dict(in_channels=1, num_heads=1, head_dim=None, mid_attention=False),
    "cross-attn+classes": dict(context_dim=6, num_classes=3),
    "cross-attn-linear-depth2": dict(
        sample_size=16,
        block_out_channels=(8, 16, 16),
        context_dim=6,
        use_linear_projection=True,
        transformer_depth=2,
        attention_resolutions=(16, 4),
    ),
}


@pytest.mark.reference
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_equals_diffusers_with_mapped_weights(name):
    diffusers = pytest.importorskip("diffusers")
    from ldmkit.interop.unet_names import diffusers_unet_config, load_diffusers_unet_state_dict

    cfg = tiny(**PARITY_CONFIGS[name])
    cls_name, kwargs = diffusers_unet_config(cfg)
    torch.manual_seed(0)
    ref = getattr(diffusers, cls_name)(**kwargs).eval()
    model = UNet(cfg).eval()
    load_diffusers_unet_state_dict(model, ref.state_dict())

    x, _ = inputs(cfg)
    t = torch.tensor([3, 700])
    labels = torch.tensor([0, cfg.num_classes]) if cfg.num_classes else None
    with torch.no_grad():
        if cfg.context_dim:
            ctx = torch.randn(2, 5, cfg.context_dim)
            expected = ref(x, t, ctx, class_labels=labels).sample
            got = model(x, t, class_labels=labels, context=ctx)
        else:
            expected = ref(x, t, class_labels=labels).sample
            got = model(x, t, class_labels=labels)
    assert expected.abs().max() > 0.1  # diffusers' output conv is not zero-initialised
    extra = model.null_context.numel() if cfg.context_dim else 0
    assert model.num_parameters() == sum(p.numel() for p in ref.parameters()) + extra
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
