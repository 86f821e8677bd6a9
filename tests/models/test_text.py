"""Tokenizers, the text encoder, the text conditioner and the UNet's context mask."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ldmkit.models.conditioning import TextConditioner
from ldmkit.models.text import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    TextEncoder,
    TextEncoderConfig,
    Tokenizer,
    TokenizerConfig,
)
from ldmkit.models.unet import UNet, UNetConfig

CAPTIONS = ["a small red star on a blue background", "a large blue circle, at the top"]


def test_word_tokenizer_vocabulary_is_sorted_by_count_then_alphabet():
    tok = Tokenizer.from_captions(CAPTIONS)
    assert tok.config.vocab[:2] == ["a", "blue"]  # 3 and 2 occurrences; then 1 each, a..z
    assert tok.config.vocab[2:] == sorted(tok.config.vocab[2:])
    assert "," in tok.config.vocab  # punctuation is a token
    assert tok.vocab_size == 4 + len(tok.config.vocab)


@pytest.mark.parametrize("kind", ["words", "bytes"])
def test_round_trip_padding_and_the_empty_caption(kind):
    tok = Tokenizer.from_captions(CAPTIONS, kind=kind, max_length=48)
    ids, mask = tok.encode(["a small red star", ""])
    assert ids.shape == mask.shape == (2, 48) and ids.dtype == torch.long
    assert tok.decode(ids[0].tolist()) == "a small red star"
    assert ids[1, :3].tolist() == [BOS_ID, EOS_ID, PAD_ID] and mask[1].sum() == 2
    assert (ids[mask] != PAD_ID).all() and (ids[~mask] == PAD_ID).all()


def test_bytes_tokenizer_encodes_any_text():
    tok = Tokenizer(TokenizerConfig(kind="bytes", max_length=40))
    text = "große Straße, 東京 🌟"
    ids, _ = tok.encode([text])
    assert tok.decode(ids[0].tolist()) == text
    assert tok.vocab_size == 4 + 256


def test_unknown_words_become_unk_with_one_warning(caplog):
    tok = Tokenizer.from_captions(CAPTIONS)
    ids, _ = tok.encode(["a red dog", "a red dog"])
    assert ids[0, 3].item() == UNK_ID
    tok.encode(["a purple cat"])
    warnings = [r for r in caplog.records if "not in the run's vocabulary" in r.getMessage()]
    assert len(warnings) == 1 and "'dog'" in warnings[0].getMessage()


def test_truncation_keeps_eos_and_warns_once(caplog):
    tok = Tokenizer.from_captions(CAPTIONS, max_length=5)
    ids, mask = tok.encode(CAPTIONS)
    assert ids[:, -1].tolist() == [EOS_ID, EOS_ID] and mask.all()
    assert tok.decode(ids[0].tolist()) == "a small red"
    assert sum("longer than max_length = 5" in r.getMessage() for r in caplog.records) == 1


def test_token_ids_are_identical_in_another_process():
    code = (
        "import json; from ldmkit.models.text import Tokenizer;"
        f"t = Tokenizer.from_captions({CAPTIONS!r});"
        "print(json.dumps(t.encode(['a blue star, at the top', 'x'])[0].tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    tok = Tokenizer.from_captions(CAPTIONS)
    assert json.loads(out.stdout) == tok.encode(["a blue star, at the top", "x"])[0].tolist()


def _encoder(tok, width=16, seed=0):
    torch.manual_seed(seed)
    return TextEncoder(
        TextEncoderConfig(vocab_size=tok.vocab_size, max_length=32, width=width, layers=2, heads=2)
    )


def _unet(width=16):
    torch.manual_seed(1)
    cfg = UNetConfig(sample_size=8, in_channels=4, block_out_channels=(16, 32), attention_resolutions=(4,),
                     norm_num_groups=8, head_dim=8, context_dim=width, zero_init_residual=False)  # fmt: skip
    unet = UNet(cfg).eval()
    with torch.no_grad():  # the output conv starts at zero: give every weight some signal
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


@torch.no_grad()
def test_padding_does_not_change_the_encoder_or_the_unet():
    tok = Tokenizer.from_captions(CAPTIONS)
    enc, unet = _encoder(tok).eval(), _unet()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    outs = []
    for length in (12, 32):  # the same prompts padded to 12 and to 32 tokens
        ids, mask = tok.encode(CAPTIONS, max_length=length)
        states = enc(ids, mask)
        outs.append((states[mask], unet(x, t, context=states, context_mask=mask)))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=0)
    ids, _ = tok.encode(CAPTIONS, max_length=32)  # without the mask the padding does leak in
    unmasked = unet(x, t, context=enc(ids, torch.ones_like(ids, dtype=torch.bool)))
    assert not torch.allclose(unmasked, outs[1][1], atol=1e-4)


def test_caption_dropout_rate():
    tok = Tokenizer.from_captions(CAPTIONS)
    ids, _ = tok.encode(CAPTIONS * 5000)  # 10 000 captions
    for p in (0.0, 0.1, 0.5):
        cond = TextConditioner(tok, _encoder(tok), dropout=p)
        out = cond.training_kwargs(ids, torch.Generator().manual_seed(0), torch.device("cpu"))
        dropped = (out["text_ids"] == cond.null_ids).all(dim=1).float().mean().item()
        assert abs(dropped - p) <= 0.01 and (p > 0 or dropped == 0)


@torch.no_grad()
def test_guidance_algebra_with_prompts():
    """Scale 1 is the conditional model, scale 0 the unconditional one, an explicit empty negative
    prompt equals none, and the batched [cond, uncond] call equals two separate calls."""
    from ldmkit.diffusion.denoiser import VPDenoiser
    from ldmkit.diffusion.guidance import classifier_free_guidance
    from ldmkit.diffusion.schedules import make_schedule

    tok = Tokenizer.from_captions(CAPTIONS)
    cond = TextConditioner(tok, _encoder(tok).eval())
    unet, dev = _unet(), torch.device("cpu")
    denoise = VPDenoiser(unet, make_schedule("cosine", 100), "v")
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 2.0], dtype=torch.float64)
    c, u = cond.sampling_kwargs(CAPTIONS, 2, 3.0, dev)
    c2, u2 = cond.sampling_kwargs(CAPTIONS, 2, 3.0, dev, negative=["", ""])
    torch.testing.assert_close(u["context"], u2["context"])
    x0_c, x0_u = denoise(x, sigma, **c), denoise(x, sigma, **u)
    for w, want in ((1.0, x0_c), (0.0, x0_u), (3.0, x0_u + 3.0 * (x0_c - x0_u))):
        got = classifier_free_guidance(denoise, w, cond=c, uncond=u)(x, sigma)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert cond.sampling_kwargs(CAPTIONS, 2, 1.0, dev)[1] is None  # no uncond branch at scale 1


def test_context_mask_must_match_the_context():
    unet = _unet()
    ctx = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="context_mask must be a bool tensor"):
        unet(
            torch.randn(2, 4, 8, 8), 1, context=ctx, context_mask=torch.ones(2, 4, dtype=torch.bool)
        )
