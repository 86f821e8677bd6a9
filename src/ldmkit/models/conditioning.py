"""Conditioning: how a condition becomes the UNet's keyword arguments, is dropped for
classifier-free guidance, and is made null.

One object per kind of condition (`ClassConditioner`, `TextConditioner`), called by training
(dropout), sampling (cond / uncond pairs for guidance), evaluation and the grids, with the same
methods, so that no caller needs to know which kind a model has.

Class labels: long (B,) in [0, num_classes); the value `num_classes` is the learned null label
(Ho & Salimans 2022 train one network for both by replacing a share of the labels with it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ldmkit.models.text import AnyTextEncoder, Tokenizer

Cond = dict[str, Tensor]  # keyword arguments of UNet.forward, e.g. {"class_labels": (B,)}


# ---------------------------------------------------------------------- grid rows
@dataclass(frozen=True)
class RowLayout:
    """How n images are laid out with one row per class or prompt."""

    n: int  # images: exactly the count asked for
    per_row: int  # cells per grid row (the longest row)
    counts: tuple[int, ...]  # images of each row (class or prompt) in order; a short row's end
    # stays blank in the grid
    note: str | None  # what the user should know (uneven rows, classes left out); None if whole

    @property
    def rows(self) -> int:
        return len(self.counts)

    @property
    def whole(self) -> bool:
        return all(c == self.per_row for c in self.counts)

    def labels(self) -> list[int]:
        """The row index of each image: row i repeated counts[i] times."""
        return [i for i, c in enumerate(self.counts) for _ in range(c)]


def row_layout(
    n: int, rows: int, what: str = "class", names: Sequence[str] | None = None
) -> RowLayout:
    """The one rule of a grid with one row per class (or prompt, `what`), for the CLI's, the
    api's and the page's grids: exactly `n` images, as evenly as they go, every class in a row of
    its own; when n is not a multiple of the classes the first rows get one image more (8 of 5
    classes: 2, 2, 2, 1, 1; the short rows end blank) and the note says so; when n is below the
    number of classes only the first n have an image, and the note names the ones left out.
    `names`: the rows' names, for the notes."""
    assert n >= 1 and rows >= 1, (n, rows)
    plural = "classes" if what == "class" else what + "s"
    per_row = -(-n // rows)
    if n < rows:
        left = [names[i] for i in range(n, rows)] if names else [str(i) for i in range(n, rows)]
        shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        note = (
            f"{n} image{'s' if n > 1 else ''} cannot show all {rows} {plural}: one for each of "
            f"the first {n}, none of {shown}; ask for at least {rows} images (one row per "
            f"{what}), or name the {plural} you want"
        )
        return RowLayout(n, 1, (1,) * n, note)
    longer = n - rows * (per_row - 1)  # rows with per_row images; the others have one less
    counts = (per_row,) * longer + (per_row - 1,) * (rows - longer)
    note = None
    if longer < rows:
        if names and what == "class" and rows <= 10:
            which = (f"{per_row} each of {', '.join(names[:longer])} and {per_row - 1} each of "
                     f"{', '.join(names[longer:rows])}")  # fmt: skip
        else:
            which = (f"{per_row} for each of the first {longer}, {per_row - 1} for the other "
                     f"{rows - longer}")  # fmt: skip
        note = (
            f"{n} images do not fill one row per {what} ({rows} {plural}): {which} (their rows "
            f"end blank); {rows * per_row} images give whole rows"
        )
    return RowLayout(n, per_row, counts, note)


class ClassConditioner:
    """Class-label conditioning of a UNet with `num_classes` (None: an unconditional model)."""

    def __init__(
        self,
        num_classes: int | None,
        *,
        class_names: Sequence[str] | None = None,
        dropout: float = 0.0,
    ) -> None:
        if not 0 <= dropout < 1:
            raise ValueError(f"class dropout must be in [0, 1), got {dropout}")
        self.num_classes = num_classes or None
        names = list(class_names) if class_names else None
        # names that do not match the label count are not trusted for display or parsing
        self.class_names = names if names and len(names) == self.num_classes else None
        self.dropout = dropout

    @property
    def enabled(self) -> bool:
        return self.num_classes is not None

    # ------------------------------------------------------------------ training
    def training_kwargs(
        self, labels: Tensor | None, generator: torch.Generator, device: torch.device
    ) -> Cond:
        """Labels (B,) with a `dropout` share replaced by the null label (drawn from `generator`)."""
        if not self.enabled:
            return {}
        assert labels is not None, "a class-conditional model needs labels to train on"
        y = labels.clone()
        y[torch.rand(len(y), generator=generator) < self.dropout] = self.num_classes
        return {"class_labels": y.to(device)}

    # ------------------------------------------------------------------ sampling
    def check(self, labels: Sequence[int] | Tensor | None, n: int) -> Tensor | None:
        """Validate user labels for n images: one label (repeated) or n; None stays None."""
        if labels is None:
            return None
        if not self.enabled:
            raise ValueError("this model was trained without class labels; do not pass any")
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if y.numel() == 1:
            y = y.expand(n)
        if y.numel() != n:
            raise ValueError(f"got {y.numel()} class labels for {n} images; give one or n")
        if y.min() < 0 or y.max() >= self.num_classes:
            raise ValueError(f"class labels must be in 0..{self.num_classes - 1}")
        return y

    def sampling_kwargs(
        self, labels: Tensor | None, b: int, guidance_scale: float, device: torch.device
    ) -> tuple[Cond, Cond | None]:
        """(cond, uncond) network kwargs for b images; uncond is None when no guidance applies."""
        if not self.enabled:
            return {}, None
        null = torch.full((b,), self.num_classes, dtype=torch.long, device=device)
        if labels is None:
            return {"class_labels": null}, None
        if guidance_scale == 1.0:
            return {"class_labels": labels.to(device)}, None
        return {"class_labels": labels.to(device)}, {"class_labels": null}

    # ------------------------------------------------------------------ grids and parsing
    def grid_labels(self, n: int) -> tuple[Tensor | None, int | None, list[str] | None]:
        """Labels for a grid of n images with one row per class: (labels, per_row, row_labels),
        every class present (`row_layout`: when n is not a multiple of the classes, the first
        rows have one more image; `api.sample` lays such a grid out with blank row ends)."""
        if not self.enabled:
            return None, None, None
        layout = row_layout(n, self.num_classes, "class", self.class_names)
        labels = torch.tensor(layout.labels(), dtype=torch.long)
        names = self.class_names[: layout.rows] if self.class_names else None
        return labels, layout.per_row, names

    def parse(self, text: str, n: int) -> Tensor:
        """'star', '3' or 'circle,star' (names or indices) -> n labels, cycling through them."""
        values = []
        for part in (p.strip() for p in text.split(",")):
            if part.isdigit() and int(part) < (self.num_classes or 0):
                values.append(int(part))
            elif self.class_names and part in self.class_names:
                values.append(self.class_names.index(part))
            else:
                known = (
                    ", ".join(self.class_names)
                    if self.class_names
                    else f"0..{self.num_classes - 1} (the model has no class names)"
                    if self.enabled
                    else "none (the model has no classes)"
                )
                raise ValueError(f"unknown class {part!r}; known classes: {known}")
        return torch.tensor(values).repeat(n // len(values) + 1)[:n]


class TextConditioner:
    """Text conditioning: prompts -> token ids -> text encoder states -> the UNet's cross-attention.

    The null condition is the encoder's output for the empty caption "" (not a separate learned
    token): caption dropout trains it, and classifier-free guidance uses it (or the negative
    prompt) as the unconditional branch.
    """

    def __init__(
        self, tokenizer: Tokenizer, encoder: AnyTextEncoder, *, dropout: float = 0.0
    ) -> None:
        if not 0 <= dropout < 1:
            raise ValueError(f"caption dropout must be in [0, 1), got {dropout}")
        self.tokenizer, self.encoder, self.dropout = tokenizer, encoder, dropout
        self.null_ids, _ = tokenizer.encode([""])  # (1, L)

    enabled = True
    class_names = None
    num_classes = None

    def encode(self, ids: Tensor, device: torch.device) -> Cond:
        """Token ids (B, L) -> {"context": (B, L, D), "context_mask": (B, L)} on device; with
        words taught by a text adapter (`text.add_word`) also "prompt_ids": the ids, which the
        UNet's word gate reads (`lora.gate_by_words`) to know which prompts hold its word."""
        cond = self.encoder.context(ids.to(device))
        if self.tokenizer.added:
            cond["prompt_ids"] = ids.to(device)
        return cond

    def prompts(self, texts: Sequence[str], device: torch.device) -> Cond:
        return self.encode(self.tokenizer.encode(list(texts))[0], device)

    # ------------------------------------------------------------------ training
    def training_kwargs(
        self, ids: Tensor | None, generator: torch.Generator, device: torch.device
    ) -> Cond:
        """{"text_ids": the captions' ids (B, L) with a `dropout` share replaced by ""} (drawn
        from `generator`), for the trained module that encodes them (training.stages.TextUNet)."""
        assert ids is not None, "a text-conditional model needs captions to train on"
        drop = torch.rand(len(ids), generator=generator) < self.dropout
        ids = torch.where(drop[:, None], self.null_ids.expand_as(ids), ids)
        return {"text_ids": ids.to(device)}

    # ------------------------------------------------------------------ sampling
    def check(self, prompts: str | Sequence[str] | None, n: int) -> list[str] | None:
        """One prompt (repeated) or n prompts for n images; None stays None (unconditional)."""
        if prompts is None:
            return None
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(texts) == 1:
            texts = texts * n
        if len(texts) != n:
            raise ValueError(f"got {len(texts)} prompts for {n} images; give one or n")
        return texts

    def sampling_kwargs(
        self,
        prompts: Sequence[str] | None,
        b: int,
        guidance_scale: float,
        device: torch.device,
        negative: Sequence[str] | None = None,
    ) -> tuple[Cond, Cond | None]:
        """(cond, uncond) for b images; uncond (the negative prompt, else "") only with guidance."""
        null = [""] * b
        if prompts is None:
            return self.prompts(null, device), None
        cond = self.prompts(prompts, device)
        if guidance_scale == 1.0:
            return cond, None
        return cond, self.prompts(negative if negative is not None else null, device)

    def grid_labels(self, n: int) -> tuple[None, None, None]:
        return None, None, None
