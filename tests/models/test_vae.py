import json
import math

import pytest
import torch
from torch import nn

from ldmkit.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from ldmkit.config import ConfigError, from_dict, to_dict
from ldmkit.models.distributions import DiagonalGaussian
from ldmkit.models.vae import Attention, Autoencoder, AutoencoderConfig, measure_scaling_factor


def tiny_config(levels: int = 2, **overrides) -> AutoencoderConfig:
    """f = 2 ** (levels - 1); 8 channels per level, 4 norm groups, 16x16 images."""
    kwargs = dict(
        image_channels=3,
        latent_channels=2,
        block_out_channels=(8,) * levels,
        layers_per_block=1,
        norm_groups=4,
        image_size=16,
    )
    kwargs.update(overrides)
    return AutoencoderConfig(**kwargs)


def images(config: AutoencoderConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, config.image_channels, config.image_size, config.image_size)
    return torch.rand(shape, generator=gen) * 2 - 1


# --- shapes ---


@pytest.mark.parametrize("levels, f", [(1, 1), (2, 2), (3, 4), (4, 8)])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(levels, f, channels):
    config = tiny_config(levels, image_channels=channels)
    model = Autoencoder(config)
    x = images(config)
    assert model.downsample_factor == f
    assert model.latent_shape() == (2, 16 // f, 16 // f)
    posterior = model.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == (2, 2, 16 // f, 16 // f)
    assert model.decode(posterior.sample()).shape == x.shape
    recon, post = model(x)
    assert recon.shape == x.shape and isinstance(post, DiagonalGaussian)


def test_latent_shape_of_other_sizes():
    model = Autoencoder(tiny_config(3))  # f = 4
    assert model.latent_shape(32) == (2, 8, 8)
    assert model.latent_shape((8, 12)) == (2, 2, 3)
    with pytest.raises(ValueError, match="image size 30x32 is not a multiple of .* factor 4"):
        model.latent_shape((30, 32))


def test_forward_uses_mode_or_a_reproducible_sample():
    config = tiny_config()
    model = Autoencoder(config)
    x = images(config)
    with torch.no_grad():
        recon, posterior = model(x, sample_posterior=False)
        torch.testing.assert_close(recon, model.decode(posterior.mode()), rtol=0, atol=0)
        a, _ = model(x, generator=torch.Generator().manual_seed(5))
        b, _ = model(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, recon)


def test_bad_inputs_are_refused():
    model = Autoencoder(tiny_config(3))
    with pytest.raises(ValueError, match=r"encode expects images \(B, 3, H, W\)"):
        model.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="not a multiple of the downsampling factor 4"):
        model.encode(torch.zeros(2, 3, 18, 16))
    with pytest.raises(ValueError, match=r"decode expects latents \(B, 2, h, w\)"):
        model.decode(torch.zeros(2, 4, 4, 4))
    with pytest.raises(TypeError, match="takes an AutoencoderConfig"):
        Autoencoder({"latent_channels": 4})


# --- gradients ---


def test_gradients_reach_every_parameter():
    config = tiny_config(3, layers_per_block=2)
    model = Autoencoder(config)
    x = images(config)
    recon, posterior = model(x, generator=torch.Generator().manual_seed(0))
    loss = (recon - x).square().mean() + posterior.kl().mean()
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"no gradient reaches {dead}"


# --- attention ---


def test_attention_matches_plain_softmax_reference():
    torch.manual_seed(0)
    config = tiny_config(norm_groups=2)
    attention = Attention(config, 8).double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    B, C, H, W = x.shape
    h = attention.group_norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
    q, k, v = attention.to_q(h), attention.to_k(h), attention.to_v(h)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(C), dim=-1)  # (B, HW, HW)
    out = attention.to_out(weights @ v).transpose(1, 2).reshape(B, C, H, W)
    torch.testing.assert_close(attention(x), x + out, rtol=1e-12, atol=1e-12)


def test_mid_attention_switch():
    with_attention = Autoencoder(tiny_config())
    without = Autoencoder(tiny_config(mid_attention=False))
    assert with_attention.encoder.mid_block.attention is not None
    assert without.encoder.mid_block.attention is None
    assert not any("attention" in n for n in without.state_dict())
    assert with_attention.num_parameters() > without.num_parameters()


# --- bookkeeping ---


def test_num_parameters_and_summary():
    # the PERF_ANCHORS f4 model
    model = Autoencoder(
        AutoencoderConfig(block_out_channels=(64, 128, 128), layers_per_block=2, norm_groups=32)
    )
    n = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == n
    assert round(n / 1e6, 2) == 5.12  # diffusers' AutoencoderKL with the same settings
    summary = model.summary()
    assert "\n" not in summary
    assert "f4: 3x32x32 -> 4x8x8" in summary and "5.12 M params" in summary
    model.encoder.conv_in.weight.requires_grad_(False)
    assert model.num_parameters(trainable_only=True) == n - model.encoder.conv_in.weight.numel()


def test_config_round_trips_through_a_dict():
    config = tiny_config(3, mid_attention=False, reconstruction="l2", scaling_factor=0.25)
    data = json.loads(json.dumps(to_dict(config)))
    assert from_dict(AutoencoderConfig, data) == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(block_out_channels=(8, 8, 8), image_size=30),
            "^image_size 30 is not a multiple of the downsampling factor 4; use 28 or 32$",
        ),
        (dict(block_out_channels=(8, 8, 8), image_size=2), "image_size 2 .* factor 4; use 4$"),
        (dict(image_channels=2), "image_channels must be 1 .* or 3"),
        (dict(latent_channels=0), "latent_channels must be at least 1"),
        (dict(block_out_channels=()), "block_out_channels is empty"),
        (dict(block_out_channels=(8, 6)), r"block_out_channels\[1\] = 6 .* norm_groups 4"),
        (dict(layers_per_block=0), "layers_per_block must be at least 1"),
        (dict(norm_eps=0.0), "norm_eps must be positive"),
        (dict(scaling_factor=0.0), "scaling_factor must be a positive number"),
        (dict(kl_weight=-1.0), "kl_weight must be a number >= 0"),
        (dict(disc_start=-1), "disc_start must be a step >= 0"),
        (dict(disc_weight=0.5, disc_layers=3), "disc_layers 3 shrinks a 16x16 .* disc_layers <= 2"),
        (
            dict(block_out_channels=(8,), image_size=4, disc_weight=0.5, disc_layers=1),
            "shrinks a 4x4 image to no patch at all; use disc_weight = 0$",
        ),
        (dict(image_size=4, perceptual_weight=1.0), "at least 7x7, got image_size 4"),
    ],
)
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


def test_from_dict_refuses_typos_and_bad_choices():
    with pytest.raises(ConfigError, match="unknown key 'latent_chanels'"):
        from_dict(AutoencoderConfig, {"latent_chanels": 4})
    with pytest.raises(ConfigError, match="reconstruction must be one of 'l1', 'l2'"):
        from_dict(AutoencoderConfig, {"reconstruction": "huber"})


# --- save / load ---


def test_save_load_round_trip_is_bit_exact(tmp_path):
    config = tiny_config(3, scaling_factor=0.3)
    model = Autoencoder(config)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = Autoencoder.from_pretrained(tmp_path, device="cpu")
    assert loaded.config == config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = images(config)
    with torch.no_grad():
        assert torch.equal(model(x, False)[0], loaded(x, False)[0])


def test_from_pretrained_refuses_a_truncated_weights_file(tmp_path):
    Autoencoder(tiny_config()).save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Autoencoder.from_pretrained(tmp_path)


def _edit_config(folder, **changes):
    path = folder / CONFIG_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_from_pretrained_refuses_a_config_that_does_not_match_the_weights(tmp_path):
    Autoencoder(tiny_config()).save_pretrained(tmp_path)
    _edit_config(tmp_path, layers_per_block=2)
    with pytest.raises(CheckpointError, match="does not match the model config: missing"):
        Autoencoder.from_pretrained(tmp_path)
    _edit_config(tmp_path, layers_per_block=1, latent_channels=3)
    with pytest.raises(CheckpointError, match="has shape .* saved from a different config"):
        Autoencoder.from_pretrained(tmp_path)


def test_from_pretrained_refuses_an_unknown_config_key(tmp_path):
    Autoencoder(tiny_config()).save_pretrained(tmp_path)
    _edit_config(tmp_path, attention_resolutions=[8])
    with pytest.raises(CheckpointError, match="config.json: unknown key 'attention_resolutions'"):
        Autoencoder.from_pretrained(tmp_path)


def test_from_pretrained_refuses_a_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Autoencoder.from_pretrained(tmp_path / "nowhere")


# --- scaling factor ---


class _IdentityEncoder(nn.Module):
    """encode(x) = N(x, exp(logvar)): the latents are the data, so their std is known."""

    def __init__(self, logvar: float) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives measure_scaling_factor a device
        self.logvar = logvar

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(x, torch.full_like(x, self.logvar))


def _data_with_std(std: float, n: int = 40_000) -> torch.Tensor:
    x = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = (x - x.mean()) / x.std() * std + 3.0  # pooled std exactly `std`, mean far from 0
    return x.reshape(-1, 1, 10, 10)


def test_measure_scaling_factor_of_modes_is_one_over_the_data_std():
    data = _data_with_std(2.0)
    batches = [data[:7], {"image": data[7:150]}, data[150:]]  # uneven batches, tensors and dicts
    factor = measure_scaling_factor(_IdentityEncoder(0.0), batches, use="mode")
    assert factor == pytest.approx(0.5, rel=1e-10)


def test_measure_scaling_factor_of_samples_includes_the_posterior_variance():
    data = _data_with_std(2.0)
    # Samples are data + N(0, 1): variance 4 + 1; the relative standard error of 1/std is about
    # sqrt(2 / n) / 2 for n Gaussian-ish elements, and we allow 5 of them.
    encoder = _IdentityEncoder(math.log(1.0))
    factor = measure_scaling_factor(
        encoder, data.split(100), generator=torch.Generator().manual_seed(1)
    )
    n = data.numel()
    assert factor == pytest.approx(1 / math.sqrt(5.0), rel=5 * math.sqrt(2 / n) / 2)


def test_measure_scaling_factor_on_an_autoencoder():
    config = tiny_config()
    model = Autoencoder(config)
    factor = measure_scaling_factor(model, [images(config, seed=1), images(config, seed=2)])
    assert math.isfinite(factor) and factor > 0
    with pytest.raises(ValueError, match="at least one non-empty batch"):
        measure_scaling_factor(model, [])


# --- diffusers parity (issue 7) ---


@pytest.mark.reference
@pytest.mark.parametrize(
    "channels, mid_attention",
    [((8,), True), ((8, 12), True), ((8, 12, 16), False), ((8, 12, 16, 16), True)],
)
def test_equals_diffusers_autoencoderkl_through_the_name_table(channels, mid_attention):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from ldmkit.interop.vae_names import (
        diffusers_vae_config,
        state_dict_from_diffusers,
        state_dict_to_diffusers,
        vae_config_from_diffusers,
    )

    config = AutoencoderConfig(
        image_channels=3,
        latent_channels=2,
        block_out_channels=channels,
        layers_per_block=1,
        norm_groups=4,
        mid_attention=mid_attention,
        image_size=16,
        scaling_factor=0.5,
    )
    torch.manual_seed(0)
    theirs = AutoencoderKL(**diffusers_vae_config(config)).eval()
    with torch.no_grad():  # GroupNorm starts at (1, 0); make it random so its mapping is tested
        for name, p in theirs.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    assert vae_config_from_diffusers(dict(theirs.config)) == config

    ours = Autoencoder(config).eval()
    ours.load_state_dict(state_dict_from_diffusers(theirs.state_dict()), strict=True)
    back = state_dict_to_diffusers(ours.state_dict())
    assert back.keys() == theirs.state_dict().keys()

    x = images(config)
    z = torch.randn(2, 2, 16 // config.downsample_factor, 16 // config.downsample_factor)
    with torch.no_grad():
        dist = theirs.encode(x).latent_dist
        posterior = ours.encode(x)
        torch.testing.assert_close(posterior.mean, dist.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(posterior.logvar, dist.logvar, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=0, atol=1e-5)


def test_diffusers_name_table_round_trips_every_name():
    from ldmkit.interop.vae_names import from_diffusers_name, to_diffusers_name

    names = list(Autoencoder(tiny_config(3)).state_dict())
    assert "encoder.mid_block.attentions.0.to_out.0.weight" in map(to_diffusers_name, names)
    assert "decoder.up_blocks.0.upsamplers.0.conv.bias" in map(to_diffusers_name, names)
    assert [from_diffusers_name(to_diffusers_name(n)) for n in names] == names


@pytest.mark.parametrize(
    "diffusers_config, message",
    [
        ({"act_fn": "gelu"}, "act_fn='gelu' is not supported; ldmkit supports only act_fn='silu'"),
        ({"shift_factor": 0.1}, "shift_factor=0.1 is not supported"),
        ({"use_quant_conv": False}, "use_quant_conv=False is not supported"),
        ({"down_block_types": ["DownBlock2D"]}, "down_block_types .* DownEncoderBlock2D at each"),
        ({"in_channels": 3, "out_channels": 1}, "in_channels 3 != out_channels 1"),
        ({"upcast_everything": True}, "option 'upcast_everything' is not supported"),
    ],
)
def test_unsupported_diffusers_configs_are_refused(diffusers_config, message):
    from ldmkit.interop.vae_names import vae_config_from_diffusers

    with pytest.raises(ConfigError, match=message):
        vae_config_from_diffusers(diffusers_config)


def test_diffusers_config_refuses_another_norm_eps():
    from ldmkit.interop.vae_names import diffusers_vae_config

    with pytest.raises(ConfigError, match="norm_eps 1e-05 cannot be expressed .* set norm_eps"):
        diffusers_vae_config(tiny_config(norm_eps=1e-5))
