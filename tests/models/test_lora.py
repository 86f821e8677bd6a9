"""Tests of ldmkit.models.lora: zero start (bit for bit), scales, merging, new class rows, the
state dict round trip, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from ldmkit.config import ConfigError, from_dict, to_dict
from ldmkit.models.lora import (
    LoraConfig,
    LoraLayer,
    adapter_names,
    add_class_rows,
    class_gates,
    class_rows,
    gate_by_class,
    inject_lora,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    set_lora_scale,
)
from ldmkit.models.unet import UNet, UNetConfig

TINY = dict(sample_size=8, in_channels=4, block_out_channels=(8, 16), num_res_blocks=1,
            attention_resolutions=(4,), head_dim=4, norm_num_groups=4, num_classes=3)  # fmt: skip


def perturbed(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Noise on every parameter, so zero-initialised layers (and LoRA's B) no longer hide anything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def base_unet(**overrides) -> UNet:
    torch.manual_seed(0)
    return perturbed(UNet(UNetConfig(**{**TINY, **overrides}))).eval()


def inputs(batch: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([3, 50, 700])[:batch]
    return x, t, torch.tensor([0, 1, 2])[:batch]


def out(unet, labels=None):
    x, t, y = inputs()
    with torch.no_grad():
        return unet(x, t, class_labels=y if labels is None else labels)


@pytest.mark.parametrize("targets", [None, ("to_q", "to_k", "to_v", "to_out", "conv1", "conv2")])
def test_an_injected_adapter_starts_as_the_base_model_bit_for_bit(targets):
    base = base_unet()
    adapted = copy.deepcopy(base)
    cfg = LoraConfig(rank=2) if targets is None else LoraConfig(rank=2, targets=targets)
    n = inject_lora(adapted, cfg, "a")
    # attention blocks at 4x4: 1 down, 2 up, 1 mid, 4 projections each; LoCon: 2 convs x 8 resnets
    assert n == (16 if targets is None else 16 + 2 * 8)
    assert torch.equal(out(adapted), out(base))


def test_a_trained_adapter_changes_the_output_and_scale_zero_is_the_base_again():
    base = base_unet()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, LoraConfig(rank=2), "a")
    perturbed(torch.nn.ParameterList(lora_parameters(adapted, "a")), seed=3)
    assert (out(adapted) - out(base)).abs().max() > 1e-3
    set_lora_scale(adapted, "a", 0.0)
    assert torch.equal(out(adapted), out(base))
    # scale s: the path's contribution is linear in s
    set_lora_scale(adapted, "a", 1.0)
    full = out(adapted) - out(base)
    set_lora_scale(adapted, "a", 0.5)
    # not exactly half: the path is nonlinear through the layers after it; but far from 0 and full
    half = out(adapted) - out(base)
    assert 0.2 < float(half.norm() / full.norm()) < 0.8


def test_merge_equals_the_adapted_model_and_leaves_a_plain_unet():
    base = base_unet()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, LoraConfig(rank=3, alpha=6, targets=("to_q", "to_v", "conv1")), "a")
    inject_lora(adapted, LoraConfig(rank=2), "b")
    perturbed(torch.nn.ParameterList(lora_parameters(adapted, "a")), seed=4)
    perturbed(torch.nn.ParameterList(lora_parameters(adapted, "b")), seed=5)
    set_lora_scale(adapted, "b", 0.7)
    first = add_class_rows(adapted, "a", 1)
    assert first == 3 and adapted.config.num_classes == 4
    with torch.no_grad():
        class_rows(adapted, "a").add_(1.0)
    labels = torch.tensor([3, 1, 4])  # the new class, an old one, the null label
    expected = out(adapted, labels)
    merged = merge_lora(adapted)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert torch.allclose(out(merged, labels), expected, atol=2e-6, rtol=0)
    # the merged state dict loads into a plain UNet of num_classes + 1
    plain = UNet(UNetConfig(**{**TINY, "num_classes": 4})).eval()
    plain.load_state_dict(merged.state_dict())
    assert torch.equal(out(plain, labels), out(merged, labels))


def test_new_class_rows_leave_the_old_classes_and_the_null_label_as_they_were():
    base = base_unet()
    grown = copy.deepcopy(base)
    add_class_rows(grown, "a", 1)
    null_before = base(*inputs()[:2], class_labels=torch.full((3,), 3))
    null_after = grown(*inputs()[:2], class_labels=torch.full((3,), 4))
    assert torch.equal(out(grown), out(base))
    assert torch.equal(null_after, null_before)
    # started at the mean of the old rows
    rows = base.class_embed.weight[:3].mean(0)
    assert torch.allclose(class_rows(grown, "a")[0], rows)
    with pytest.raises(ConfigError, match="no class embedding"):
        add_class_rows(base_unet(num_classes=None), "a", 1)


def test_the_state_dict_round_trip_and_refusals():
    base = base_unet()
    cfg = LoraConfig(rank=2)
    trained = copy.deepcopy(base)
    inject_lora(trained, cfg, "a")
    perturbed(torch.nn.ParameterList(lora_parameters(trained, "a")), seed=6)
    state = lora_state_dict(trained, "a")
    assert len(state) == 32 and "mid.attention.attn.to_q.lora_down.weight" in state
    fresh = copy.deepcopy(base)
    inject_lora(fresh, cfg, "x")
    load_lora_state_dict(fresh, state, "x")
    assert torch.equal(out(fresh), out(trained))
    assert adapter_names(fresh) == ["x"]
    # another architecture: other keys or shapes
    other = base_unet(block_out_channels=(8, 8))
    inject_lora(other, cfg, "x")
    with pytest.raises(ConfigError, match="another architecture"):
        load_lora_state_dict(other, state, "x")
    other = base_unet(attention_resolutions=(8, 4))
    inject_lora(other, cfg, "x")
    with pytest.raises(ConfigError, match="another architecture"):
        load_lora_state_dict(other, state, "x")
    with pytest.raises(ConfigError, match="already"):
        inject_lora(fresh, cfg, "x")
    with pytest.raises(ConfigError, match="no layer named"):
        inject_lora(base_unet(attention_resolutions=(), mid_attention=False), cfg, "y")


def test_the_config_is_typed_and_round_trips_through_json():
    cfg = LoraConfig(rank=8, alpha=16, targets=("to_q", "conv1"))
    assert cfg.scaling == 2.0
    assert from_dict(LoraConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="unknown LoRA target"):
        LoraConfig(targets=("qkv",))
    with pytest.raises(ConfigError):
        from_dict(LoraConfig, {"rank": 4, "alphaa": 1})


def test_only_the_adapter_and_new_rows_receive_gradients():
    unet = base_unet()
    for p in unet.parameters():
        p.requires_grad_(False)
    inject_lora(unet, LoraConfig(rank=2), "a")
    add_class_rows(unet, "a", 1)
    trained = lora_parameters(unet, "a") + [class_rows(unet, "a")]
    for p in trained:
        p.requires_grad_(True)
    x, t, _ = inputs()
    unet(x, t, class_labels=torch.tensor([3, 3, 3])).square().mean().backward()
    assert all(p.grad is not None for p in trained)
    assert all(
        p.grad is None for n, p in unet.named_parameters() if "paths" not in n and "rows" not in n
    )


@pytest.mark.parametrize("targets", [("to_q", "to_k", "to_v", "to_out"),
                                     ("to_q", "to_k", "to_v", "to_out", "conv1", "conv2")])  # fmt: skip
def test_a_class_gated_adapter_acts_on_its_class_only_in_a_mixed_batch(targets):
    """gate_by_class: in one batch of old classes, the new class and the null label, only the
    new class's samples change; every other sample is the base model's bit for bit; ungated,
    the same adapter changes them all. Merging a gated adapter is refused."""
    base = base_unet()
    unet = copy.deepcopy(base)
    inject_lora(unet, LoraConfig(rank=2, targets=targets), "a")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in lora_parameters(unet, "a"):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    label = add_class_rows(unet, "a", 1)
    assert label == 3
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(5, 4, 8, 8, generator=g), torch.tensor([3, 50, 700, 900, 10])
    mixed = torch.tensor([0, 3, 1, 4, 3])  # old, new, old, null, new
    base_labels = torch.tensor([0, 0, 1, 3, 0])  # the base's own labels where they exist
    with torch.no_grad():
        ungated = unet(x, t, class_labels=mixed)
        gate_by_class(unet, "a", [label])
        assert class_gates(unet) == {"a": (3,)}
        gated = unet(x, t, class_labels=mixed)
        plain = base(x, t, class_labels=base_labels)
        alone = unet(x[[1]], t[[1]], class_labels=mixed[[1]])
    old = [0, 2, 3]
    assert torch.equal(gated[old], plain[old])  # old classes and the null label: bit for bit
    assert (ungated[old] - plain[old]).abs().max() > 1e-3  # the ungated adapter moves them
    assert torch.equal(gated[[1, 4]], ungated[[1, 4]])  # the new class: the adapter acts
    torch.testing.assert_close(alone, gated[[1]], rtol=0, atol=1e-5)  # whatever the batch
    with pytest.raises(ConfigError, match="acts on its own class only"):
        merge_lora(unet)
    set_lora_scale(unet, "a", 0.0)
    merge_lora(unet)  # at scale 0 there is nothing to bake
