"""Tests of ldmkit.models.layers against hand-written references (float64, tiny shapes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldmkit.models.layers import (
    Attention,
    AttentionBlock,
    BasicTransformerBlock,
    Downsample,
    FeedForward,
    ResnetBlock,
    SpatialTransformer,
    Upsample,
    timestep_embedding,
    zero_module,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (zero-initialised ones included) random values."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return module


def _softmax_attention(q, k, v, heads):
    """softmax(Q K^T / sqrt(d)) V, head by head, written out without any fused kernel."""
    B, N, inner = q.shape
    d = inner // heads
    outs = []
    for i in range(heads):
        qh, kh, vh = (z[:, :, i * d : (i + 1) * d] for z in (q, k, v))
        w = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)  # (B, N, L)
        outs.append(w @ vh)
    return torch.cat(outs, dim=-1)


# ---------------------------------------------------------------- timestep embedding


@pytest.mark.parametrize("dim", [32, 33])
@pytest.mark.parametrize("flip, shift", [(True, 0), (False, 1)])
def test_timestep_embedding_matches_closed_form(dim, flip, shift):
    t = torch.tensor([0.0, 1.0, 2.5, 17.0, 999.0])
    emb = timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift)
    assert emb.shape == (5, dim) and emb.dtype == torch.float32
    half = dim // 2
    ref = torch.zeros(5, dim, dtype=torch.float64)
    for b, tb in enumerate(t.tolist()):
        for i in range(half):
            w = 10000.0 ** (-i / (half - shift))
            s, c = math.sin(tb * w), math.cos(tb * w)
            ref[b, i], ref[b, half + i] = (c, s) if flip else (s, c)
    # float32 arguments up to 999 rad carry ~1e-4 absolute error
    torch.testing.assert_close(emb.double(), ref, atol=3e-4, rtol=0)
    torch.testing.assert_close(emb[:4].double(), ref[:4], atol=1e-5, rtol=0)
    if dim % 2:
        assert torch.all(emb[:, -1] == 0)


def test_timestep_embedding_long_equals_float_and_rejects_2d():
    t = torch.tensor([0, 5, 999])
    torch.testing.assert_close(timestep_embedding(t, 16), timestep_embedding(t.float(), 16))
    with pytest.raises(ValueError, match="1-D tensor"):
        timestep_embedding(torch.zeros(2, 1), 16)


# ---------------------------------------------------------------- resnet block


@pytest.mark.parametrize("injection", ["add", "scale_shift"])
@pytest.mark.parametrize("cin, cout", [(8, 8), (8, 16)])
def test_resnet_block_matches_formula(injection, cin, cout):
    blk = ResnetBlock(cin, cout, 12, norm_groups=4, eps=1e-5, time_injection=injection)
    blk = _randomize(blk).double().eval()
    g = _gen(1)
    x = torch.randn(2, cin, 5, 5, generator=g, dtype=torch.float64)
    temb = torch.randn(2, 12, generator=g, dtype=torch.float64)

    h = F.silu(F.group_norm(x, 4, blk.norm1.weight, blk.norm1.bias, 1e-5))
    h = F.conv2d(h, blk.conv1.weight, blk.conv1.bias, padding=1)
    t = F.linear(F.silu(temb), blk.time_proj.weight, blk.time_proj.bias)[:, :, None, None]
    if injection == "add":
        h = F.group_norm(h + t, 4, blk.norm2.weight, blk.norm2.bias, 1e-5)
    else:
        scale, shift = t[:, :cout], t[:, cout:]
        h = F.group_norm(h, 4, blk.norm2.weight, blk.norm2.bias, 1e-5) * (1 + scale) + shift
    h = F.conv2d(F.silu(h), blk.conv2.weight, blk.conv2.bias, padding=1)
    skip = x if cin == cout else F.conv2d(x, blk.skip.weight, blk.skip.bias)
    torch.testing.assert_close(blk(x, temb), skip + h)


def test_resnet_block_zero_init_is_identity():
    blk = ResnetBlock(8, 8, 12, norm_groups=4)
    x = torch.randn(2, 8, 4, 4)
    assert torch.equal(blk(x, torch.randn(2, 12)), x)


# ---------------------------------------------------------------- attention


@pytest.mark.parametrize("cross", [False, True])
def test_attention_matches_plain_softmax(cross):
    attn = Attention(12, context_dim=7 if cross else None, heads=3, head_dim=4, qkv_bias=True)
    attn = _randomize(attn).double()
    g = _gen(2)
    x = torch.randn(2, 10, 12, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 5, 7, generator=g, dtype=torch.float64) if cross else x
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    ref = attn.to_out(_softmax_attention(q, k, v, heads=3))
    out = attn(x, ctx) if cross else attn(x)
    torch.testing.assert_close(out, ref)


def test_attention_block_matches_reference_and_starts_as_identity():
    blk = AttentionBlock(8, heads=2, norm_groups=4)
    x = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    assert torch.equal(blk.double()(x), x)  # zero-initialised output projection

    blk = _randomize(blk)
    a = blk.attn
    h = F.group_norm(x, 4, blk.group_norm.weight, blk.group_norm.bias, 1e-5)
    tokens = h.flatten(2).transpose(1, 2)  # (B, 12, 8)
    out = a.to_out(_softmax_attention(a.to_q(tokens), a.to_k(tokens), a.to_v(tokens), heads=2))
    ref = x + out.transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(blk(x), ref)


def test_feed_forward_is_geglu():
    ff = FeedForward(6).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    a, gate = ff.proj_in(x)[:, :24], ff.proj_in(x)[:, 24:]
    torch.testing.assert_close(ff(x), ff.proj_out(a * F.gelu(gate)))


def test_cross_attention_ignores_context_when_kv_projections_are_zero():
    blk = _randomize(BasicTransformerBlock(8, heads=2, head_dim=4, context_dim=5)).double()
    zero_module(blk.attn2.to_k)
    zero_module(blk.attn2.to_v)
    with torch.no_grad():
        blk.attn2.to_out.bias.zero_()
    g = _gen(3)
    x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    ctx_a = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    ctx_b = torch.randn(2, 9, 5, generator=g, dtype=torch.float64)

    # The block without its cross-attention branch.
    h = x + blk.attn1(blk.norm1(x))
    no_context = h + blk.ff(blk.norm3(h))
    torch.testing.assert_close(blk(x, ctx_a), no_context)
    torch.testing.assert_close(blk(x, ctx_b), no_context)


def test_cross_attention_output_changes_with_context():
    blk = _randomize(BasicTransformerBlock(8, heads=2, head_dim=4, context_dim=5))
    x = torch.randn(2, 6, 8)
    ctx = torch.randn(2, 4, 5)
    out_a, out_b = blk(x, ctx), blk(x, ctx + 1.0)
    assert (out_a - out_b).abs().max() > 1e-3
    # Only the sample whose context changed moves.
    ctx_c = ctx.clone()
    ctx_c[1] += 1.0
    out_c = blk(x, ctx_c)
    torch.testing.assert_close(out_c[0], out_a[0])
    assert (out_c[1] - out_a[1]).abs().max() > 1e-3


@pytest.mark.parametrize("linear", [False, True])
def test_spatial_transformer_identity_at_init_and_uses_context(linear):
    st = SpatialTransformer(
        8, heads=2, context_dim=5, depth=2, norm_groups=4, linear_projection=linear
    )
    x, ctx = torch.randn(2, 8, 3, 3), torch.randn(2, 4, 5)
    assert torch.equal(st(x, ctx), x)
    st = _randomize(st)
    out = st(x, ctx)
    assert out.shape == x.shape
    assert (out - st(x, torch.randn(2, 4, 5))).abs().max() > 1e-3


def test_spatial_transformer_tokens_follow_pixel_order():
    # With conv and linear projections holding the same weights the two layouts must agree.
    conv = _randomize(SpatialTransformer(8, heads=2, context_dim=5, norm_groups=4)).double()
    lin = SpatialTransformer(8, heads=2, context_dim=5, norm_groups=4, linear_projection=True)
    lin = lin.double()
    state = {k: v.flatten(1) if v.ndim == 4 else v for k, v in conv.state_dict().items()}
    lin.load_state_dict(state)
    x, ctx = torch.randn(2, 8, 3, 4, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(lin(x, ctx), conv(x, ctx))


# ---------------------------------------------------------------- resampling


def test_downsample_padding_modes():
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    d1 = Downsample(4, padding=1).double()
    torch.testing.assert_close(
        d1(x), F.conv2d(x, d1.conv.weight, d1.conv.bias, stride=2, padding=1)
    )
    d0 = Downsample(4, padding=0).double()
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), d0.conv.weight, d0.conv.bias, stride=2)
    torch.testing.assert_close(d0(x), ref)
    assert d0(x).shape == d1(x).shape == (2, 4, 4, 4)


def test_upsample_is_nearest_then_conv():
    up = Upsample(4).double()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(up(x), F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1))


def test_zero_module():
    conv = zero_module(torch.nn.Conv2d(3, 4, 3))
    assert all(torch.count_nonzero(p) == 0 for p in conv.parameters())
