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
    """How n images asked for are laid out with one row per class or prompt."""

    n: int  # images drawn: rows x per_row (may differ from the count asked for: see `note`)
    per_row: int
    rows: int  # rows drawn (all the classes or prompts, unless `most` is below their number)
    note: str | None  # why n differs from the count asked for; None when it does not


def row_layout(n: int, rows: int, what: str = "class", most: int | None = None) -> RowLayout:
    """The one rule of a grid with one row per class (or prompt, `what`): every row whole and
    every class present, so `n` is rounded up to whole rows (8 images of 5 classes: 10, 2 per
    class) and the note says so; with a limit `most` (images per call) a count that would pass
    it is rounded down to whole rows instead, and only when `most` holds fewer images than
    there are classes are classes left out, with a note naming how many."""
    assert n >= 1 and rows >= 1, (n, rows)
    plural = "classes" if what == "class" else what + "s"
    per_row = -(-n // rows)
    if most is not None and per_row * rows > most:
        per_row = most // rows
        if per_row == 0:  # fewer images allowed than classes: one each, for the first `most`
            note = (
                f"one image per {what} for the first {most} of the {rows} {plural}: a call draws "
                f"at most {most} images; name the {plural} you want to see"
            )
            return RowLayout(most, 1, most, note)
    total = per_row * rows
    note = None
    if total != n:
        why = "rounded up" if total > n else "rounded down (the most a call draws)"
        note = (
            f"{n} images do not fill one row per {what} ({rows} {plural}): drawing {total}, "
            f"{per_row} per {what} ({why} to whole rows, so that no {what} is left out)"
        )
    return RowLayout(total, per_row, rows, note)


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
        """Labels for a grid with one row per class: (labels, per_row, row_labels). The grid has
        `row_layout(n, num_classes).n` images: whole rows, every class (a caller that shows the
        grid says so when that is not n: `row_layout`'s note)."""
        if not self.enabled:
            return None, None, None
        layout = row_layout(n, self.num_classes)
        labels = torch.arange(self.num_classes).repeat_interleave(layout.per_row)
        return labels, layout.per_row, (self.class_names if self.class_names else None)

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
        """Token ids (B, L) -> {"context": (B, L, D), "context_mask": (B, L)} on device."""
        return self.encoder.context(ids.to(device))

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
