"""`finetune` (a new class or a style from a few images, as a LoRA adapter) and `merge_adapter`."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, check_float
from ..runs import RunFolder

if TYPE_CHECKING:  # the heavy modules are imported inside the functions that use them
    from ..training.loop import ProgressFn, StopRequest

from .checks import check_apart, check_device, check_path, check_writable, overlap

log = logging.getLogger(__name__)


MAX_NAME = 64  # characters of a new class's name


def check_new_name(run: RunFolder, name: Any, shown: Any = None) -> str:
    """The name of what `finetune` teaches: a new class's name must be new to the run, and
    readable by --class (no comma, not a number)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError('--name is empty; name what the images show, e.g. --name "heart"')
    if name != name.strip() or "," in name or name.isdigit() or len(name) > MAX_NAME:
        raise ConfigError(
            f"--name {name!r} cannot be picked with --class: use up to {MAX_NAME} characters, "
            "no comma, no spaces around it, not a number"
        )
    if run.has_text():
        check_new_word(run, name, shown)
        return name
    names = run.data_info().class_names or []
    if run.config().unet.num_classes and name in names:
        raise ConfigError(
            f"--name {name!r} is a class of {shown or run.path} already ({', '.join(names)}); "
            "choose a new name"
        )
    return name


def check_new_word(run: RunFolder, name: str, shown: Any = None) -> None:
    """A text run's new word: one word of letters and digits (so that a prompt can hold it),
    not a word its tokenizer reads as one token already (`Tokenizer.known_as_one_token`)."""
    from ..models.text import WORD_NAME

    if not WORD_NAME.fullmatch(name):
        raise ConfigError(
            f"--name {name!r} is not one word: a text run learns NAME as a new word that prompts "
            "use, so give letters and digits starting with a letter, e.g. --name zorb"
        )
    if run.load_tokenizer().known_as_one_token(name):
        raise ConfigError(
            f"--name {name!r} is a word the text encoder of {shown or run.path} knows already "
            "(one token of its vocabulary); choose a new word, e.g. a made-up one like zorb"
        )


def finetune(
    run: str | os.PathLike,
    *,
    data: str,
    name: str,
    out: str | os.PathLike,
    resume: bool = False,
    device: str | None = None,
    progress: ProgressFn | None = None,
    stop: StopRequest | None = None,
    options: Any = None,
    **keywords: Any,
) -> Any:
    """Teach the trained `run` what the 3-50 images of `data` show, as an adapter folder `out`
    (ldmkit.training.finetune): for a class-conditional run the new class `name`, for a text
    run the new word `name` (a learned token row, usable in any prompt), for an unconditional
    one a style. Its options (`options.FinetuneOptions`, checked once) come as
    keywords (rank=, steps=, time_budget=, prior_weight=, ...) or all at once as `options`.
    `resume` continues an interrupted fine-tuning from its checkpoint. Returns a
    `FinetuneResult` (the folder, its `AdapterInfo`, why it ended)."""
    from ..options import FinetuneOptions
    from ..runs import AdapterFolder

    check_path("--run", run)
    check_path("--data", data)
    check_path("--out", out)
    if options is not None and keywords:
        raise TypeError("give finetune's options as keywords or as `options`, not both")
    o = options if options is not None else FinetuneOptions.given(keywords)
    folder = RunFolder(run)
    o = o.check(folder, shown=run)
    check_new_name(folder, name, run)
    check_apart("--out", out, "--data", data)
    if overlap(out, run) in ("is", "contains"):  # inside the run is fine (RUN/adapters/NAME)
        raise ConfigError(
            f"--out {out} would put the adapter's files over the run's own ({run}); choose a "
            "folder of its own, e.g. inside the run"
        )
    adapter = AdapterFolder(out)
    if adapter.holds_adapter() and not resume:
        raise ConfigError(
            f"--out {out} holds an adapter already; choose another --out (or --resume to "
            "continue its fine-tuning)"
        )
    check_writable(out)
    dev = check_device(device)
    from ..training.finetune import finetune_run

    return finetune_run(
        run, data, name, out, rank=o.rank, alpha=o.alpha, conv=o.targets == "attention+conv",
        steps=o.steps, lr=o.lr, class_lr=o.class_lr, batch_size=o.batch_size,
        time_budget_s=o.time_budget,
        prior_weight=o.prior_weight, prior_images=o.prior_images, flip=o.augment == "flip",
        seed=o.seed, resume=resume, device=dev, progress=progress, stop=stop,
        gate=o.gate,
    )  # fmt: skip


def merge_adapter(
    run: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
    scale: float = 1.0,
) -> RunFolder:  # fmt: skip
    """Bake `adapter` (written by `finetune` for `run`) into a new run folder `out` at `scale`:
    a full run of its own, its new class an ordinary class (`ldmkit finetune --merge`)."""
    from ..options import MAX_ADAPTER_SCALE, MIN_ADAPTER_SCALE
    from ..runs import AdapterFolder

    check_path("--run", run)
    check_path("--merge", adapter)
    check_path("--out", out)
    check_float("--adapter-scale", scale, MIN_ADAPTER_SCALE, MAX_ADAPTER_SCALE, hint=" (0 = off)")
    folder = RunFolder(run).require_trained()
    info = AdapterFolder(adapter).check_fits(folder, shown=f"{run}")
    if info.kind == "word":
        raise ConfigError(
            f"--merge {adapter} teaches the text run the word {info.word!r}, a new row of its "
            "text encoder that a merged UNet cannot hold: sample it with --adapter"
        )
    if info.gate == "class" and scale != 0:
        raise ConfigError(
            f"--merge {adapter} acts on its class only (fine-tuned with --gate class); merged "
            "weights would act on every class: sample it with --adapter, or fine-tune again with "
            "--gate none to merge"
        )
    if RunFolder(out).exists() or overlap(out, run) is not None:
        raise ConfigError(
            f"--out {out} holds a run already or overlaps {run}; give a new folder for the "
            "merged run"
        )
    check_writable(out)
    from ..training.finetune import merge_run

    return merge_run(run, adapter, out, scale=scale)


def export_adapter_peft(
    run: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike
) -> os.PathLike:
    """Write `adapter` (made by `finetune` for `run`) as a diffusers/peft LoRA folder `out`
    (`ldmkit finetune --export-peft`; `ldmkit.interop.lora_peft`, docs/interop.md)."""
    from ..interop.lora_peft import export_peft_lora

    for flag, folder in (("--run", run), ("--export-peft", adapter), ("--out", out)):
        check_path(flag, folder)
    for flag, folder in (("--run", run), ("--export-peft", adapter)):
        check_apart("--out", out, flag, folder)
    check_writable(out)
    return export_peft_lora(run, adapter, out)
