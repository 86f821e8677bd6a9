"""`ldmkit finetune`: teach a trained run something new from a handful of images, as a small
adapter (issue 28).

For a class-conditional run the new thing is a new class: a new row of the UNet's class
embedding (started at the mean of the old rows) and LoRA adapters on the UNet's attention
projections (optionally its convolutions) learn it, the base weights frozen
(`models.lora`). For a text run the new thing is a new word (textual inversion, Gal et al.
2023): a new row of the text encoder's token embedding (`models.text.add_word`), read wherever
the word stands in a prompt, learned together with the LoRA, which by default acts on prompts
holding the word only (`lora.gate_by_words`). The few images' captions must hold the word (an
image without a caption is captioned with the word alone). For an unconditional run the adapter
is LoRA alone (a style).

The loss is the run's own diffusion loss (`diffusion.losses.training_loss` with the run's
weighting), on the few images encoded by the run's autoencoder (and their mirror images with
`flip`). Prior preservation (DreamBooth, Ruiz et al. 2023): the base run's own samples of its
old classes, drawn once and cached in the adapter folder, are trained on beside them, so that
the adapter does not pull the old classes towards the new one; each step's loss is
loss(new) + prior_weight * loss(prior), with as many prior samples as new ones.

It runs in the shared training loop (`loop.train_stage`): progress, the time budget, the
checkpoints and `--resume` are the loop's, and the checkpoints and log.jsonl sit in the
adapter folder. Every random draw is per sample (`step.MicroBatch`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import load_tensors, save_tensors
from ..config import ConfigError, to_dict
from ..diffusion.losses import training_loss
from ..diffusion.sampler_names import DEFAULT_SAMPLER
from ..models.conditioning import ClassConditioner, TextConditioner
from ..models.distributions import DiagonalGaussian
from ..models.lora import (
    ATTENTION_TARGETS,
    CONV_TARGETS,
    LoraConfig,
    add_class_rows,
    class_rows,
    gate_by_class,
    gate_by_words,
    inject_lora,
    lora_parameters,
    lora_state_dict,
    watch_prompts,
)
from ..models.text import WORD_NAME, AnyTextEncoder, Tokenizer, add_word, token_rows, word_row
from ..models.unet import UNet
from ..pipeline import LatentDiffusion
from ..recipe import DiffusionConfig, TrainConfig
from ..runs import AdapterFolder, AdapterInfo, RunFolder, read_data
from ..runtime import resolve_device
from .loop import ProgressFn, StopRequest, train_stage
from .stages import encode_moments
from .step import MicroBatch, Stage

log = logging.getLogger(__name__)

MIN_IMAGES = 3  # fewer teach nothing but copies
MAX_IMAGES = 50  # more: train the run on them (`--set init_from=RUN`)
ADAPTER = "adapter"  # the adapter's name on the UNet while it trains
PRIOR_STEPS = 20  # sampler steps of the cached prior samples


# The new class row's learning rate, as a share of the old rows' RMS per coordinate: Adam moves
# a coordinate by about its LR per step, and a trained run's class rows lie ~15 apart in norm
# (128 coordinates of RMS ~1: a 6-minute 32 px shapes run), the mean row ~9.5 from each. At the
# adapter's LR (1e-3) the row travelled 0.94 in 200 steps and the new class came out at 9 % by
# the shapes classifier (bench/finetune.py, notes of issue 28): it never left the old rows' blend.
CLASS_LR_SHARE = 0.03


def default_class_lr(unet: UNet) -> float:
    """CLASS_LR_SHARE of the old class rows' RMS (see above)."""
    embed = unet.class_embed
    old = (embed.base.weight if hasattr(embed, "base") else embed.weight)[:-1]
    return CLASS_LR_SHARE * float(old.detach().pow(2).mean().sqrt())


def default_word_lr(encoder: AnyTextEncoder) -> float:
    """CLASS_LR_SHARE of the RMS of the encoder's token rows: a new word's row, like a new
    class's, must be able to travel between the words in a few hundred steps."""
    base = token_rows(encoder).base.weight
    return CLASS_LR_SHARE * float(base.detach().pow(2).mean().sqrt())


@dataclass
class FinetuneResult:
    adapter: Path
    info: AdapterInfo
    stopped_because: str


def few_images(spec: str, run: RunFolder) -> tuple[Tensor, str]:
    """The images to learn from (uint8 (N, C, H, W) at the run's size and channels) and their
    fingerprint; fewer than MIN_IMAGES or more than MAX_IMAGES is a one-line error."""
    ds = few_data(spec, run)
    return ds.images, ds.fingerprint()


def word_captions(captions: list[str] | None, word: str, spec: str) -> list[str]:
    """The few images' captions for learning the new word `word`: their own (from .txt files or
    captions.jsonl), each of which must hold the word; an image without one gets the word alone."""
    pattern = re.compile(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", re.IGNORECASE)
    out, lacking = [], []
    for c in captions or []:
        if not c:
            out.append(word)
        elif pattern.search(c):
            out.append(c)
        else:
            lacking.append(c)
    if lacking:
        raise ConfigError(
            f"--data {spec}: {len(lacking)} caption(s) do not hold the new word {word!r} (e.g. "
            f"{lacking[0]!r}); write it where the thing it names is meant, e.g. 'a red {word}', "
            "or leave the captions out"
        )
    return out


def few_data(spec: str, run: RunFolder):  # -> data.dataset.ImageDataset
    """The few images as `read_data` reads them (images, captions, fingerprint), checked."""
    cfg = run.config()
    ds = read_data(
        spec, image_size=cfg.image_size, channels=cfg.vae.image_channels, seed=cfg.seed,
        conditioning="none",
    )  # fmt: skip
    n = len(ds)
    if n < MIN_IMAGES:
        raise ConfigError(
            f"--data {spec} holds {n} image{'s' if n != 1 else ''}; fine-tuning needs at least "
            f"{MIN_IMAGES} (add images to the folder)"
        )
    if n > MAX_IMAGES:
        raise ConfigError(
            f"--data {spec} holds {n} images; fine-tuning takes at most {MAX_IMAGES} (pick the "
            "best, or train a run on them with --set init_from=RUN)"
        )
    if ds.captions is None:
        ds.captions = [""] * n
    return ds


def prior_samples(
    run: RunFolder, adapter: AdapterFolder, ldm: LatentDiffusion, n: int, seed: int
) -> tuple[Tensor, Tensor | None]:
    """n of the base run's own samples as latents (what the UNet sees), one class after the
    other for a class run (labels), for a text run of n of its training captions drawn with
    `seed` (their token ids), cached in the adapter folder for this run's weights."""
    key = f"{run.weights_hash()}:{n}:{seed}:{DEFAULT_SAMPLER}:{PRIOR_STEPS}"
    if adapter.prior_path.is_file():
        from safetensors import safe_open

        with safe_open(str(adapter.prior_path), "pt") as f:
            same = (f.metadata() or {}).get("key") == key
        if same:
            cached = load_tensors(adapter.prior_path)
            log.info("prior samples: %d cached in %s", n, adapter.prior_path)
            return cached["latents"], cached.get("labels")
    k = ldm.conditioner.num_classes
    labels = torch.arange(n) % k if k else None
    prompts = None
    if isinstance(ldm.conditioner, TextConditioner):
        prompts = run_captions(run, n, seed)
        labels = ldm.conditioner.tokenizer.encode(prompts)[0]
    t0 = time.perf_counter()
    latents = ldm.sample(n, steps=PRIOR_STEPS, seed=seed, class_labels=None if prompts else labels,
                         prompt=prompts, return_latents=True)  # fmt: skip
    log.info("prior samples: drew %d in %.1f s (cached in %s)", n, time.perf_counter() - t0,
             adapter.prior_path)  # fmt: skip
    tensors = {"latents": latents} | ({"labels": labels} if labels is not None else {})
    save_tensors(adapter.prior_path, tensors, metadata={"key": key})
    return latents, labels


def run_captions(run: RunFolder, n: int, seed: int) -> list[str]:
    """n captions of the run's training data (drawn with `seed`): the prompts of a text run's
    prior samples. Data that is gone is a one-line error."""
    cfg = run.config()
    try:
        ds = read_data(cfg.data, image_size=cfg.image_size, channels=cfg.vae.image_channels,
                       seed=cfg.seed)  # fmt: skip
    except Exception as e:  # noqa: BLE001 -- any reader's error: the data is not there
        raise ConfigError(
            f"prior preservation of a text run draws prompts from its training captions, but "
            f"its data {cfg.data} cannot be read ({str(e).splitlines()[0]}); fine-tune with "
            "--prior-weight 0 or the default --gate class"
        ) from None
    captions = [c for c in ds.captions or [] if c]
    if not captions:
        raise ConfigError(f"the run's data {cfg.data} has no captions to draw prior prompts from; "
                          "fine-tune with --prior-weight 0")  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    return [captions[int(i)] for i in torch.randint(len(captions), (n,), generator=g)]


def finetune_stage(
    unet: UNet,
    moments: Tensor,
    label: int | Tensor | None,
    prior: Tensor | None,
    prior_labels: Tensor | None,
    prior_weight: float,
    scaling_factor: float,
    diff: DiffusionConfig,
    cfg: TrainConfig,
    device: torch.device,
    class_lr: float = 0.0,
    new_label_dropout: float | None = None,
    text: tuple[AnyTextEncoder, Tokenizer] | None = None,
    caption_dropout: float = 0.0,
) -> Stage:
    """The fine-tuning stage: the run's diffusion loss on the few images' latents (moments
    (N, 2 zc, h, w), all of class `label`, or None), plus `prior_weight` times the same loss on
    as many prior latents (drawn per sample from its own generator). Trains the parameters of
    `unet` that require grad: the adapter at cfg.lr, the new class row at `class_lr`.
    `new_label_dropout`: the share of the few images' labels replaced by the null label (None:
    the run's class dropout, as on the prior samples).

    A text run (`text`: its encoder and tokenizer, the new word added): `label` is the few
    images' caption token ids (N, L), `prior_labels` the prior prompts'; the new word's row
    (trainable, in the encoder) learns at `class_lr`, and the UNet sees the prompts' states
    and ids (`prompt_ids`, for the word gate); `caption_dropout` (the run's) stands for the
    class dropout."""
    schedule = diff.make_schedule()
    dropout = caption_dropout if text is not None else diff.class_dropout
    new_dropout = dropout if new_label_dropout is None else new_label_dropout
    conditioner: ClassConditioner | TextConditioner
    if text is None:
        conditioner = ClassConditioner(unet.config.num_classes, dropout=diff.class_dropout)
        new_conditioner: ClassConditioner | TextConditioner = ClassConditioner(
            unet.config.num_classes, dropout=new_dropout
        )
        rows = class_rows(unet, ADAPTER)
    else:
        encoder, tokenizer = text
        conditioner = TextConditioner(tokenizer, encoder, dropout=dropout)
        new_conditioner = TextConditioner(tokenizer, encoder, dropout=new_dropout)
        rows = next((p for p in token_rows(encoder).rows.values() if p.requires_grad), None)
    lora = [p for p in unet.parameters() if p.requires_grad and p is not rows]
    groups: list[dict] = [{"params": lora, "lr": cfg.lr, "base_lr": cfg.lr}]
    if rows is not None and rows.requires_grad:  # its own rate (train_stage scales base_lr)
        groups.append({"params": [rows], "lr": class_lr, "base_lr": class_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    use_prior = prior is not None and prior_weight > 0
    kind = unet.config.prediction_type

    def loss_of(mb: MicroBatch, z0: Tensor, y: Tensor | None, c: Any) -> Tensor:
        t = mb.timesteps(schedule.num_timesteps, diff.timestep_sampling)
        eps = mb.randn(*z0.shape[1:])
        cond = mb.per_sample(
            lambda rows, g: c.training_kwargs(None if y is None else y[rows], g, device)
        )
        if text is not None:  # caption ids (after dropout) -> states, ids for the word gate
            ids = cond.pop("text_ids")
            cond = {**text[0].context(ids), "prompt_ids": ids}
        return training_loss(
            unet, schedule, z0.to(device), prediction_type=kind, weighting=diff.loss_weighting,
            gamma=diff.min_snr_gamma, t=t, eps=eps, cond=cond,
        )  # fmt: skip

    def loss(mb: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        post = DiagonalGaussian.from_moments(moments[mb.indices])
        z0 = post.sample(noise=mb.randn(*post.shape[1:])) * scaling_factor
        if isinstance(label, Tensor):  # a text run: the few images' caption ids
            y: Tensor | None = label[mb.indices]
        else:
            y = None if label is None else torch.full((len(mb),), label, dtype=torch.long)
        new = loss_of(mb, z0, y, new_conditioner)
        if not use_prior:
            return new, {"loss_new": float(new.detach())}
        assert prior is not None
        picks = torch.cat([torch.randint(len(prior), (1,), generator=g) for g in mb.generators])
        old = loss_of(mb, prior[picks], None if prior_labels is None else prior_labels[picks],
                      conditioner)  # fmt: skip
        logs = {"loss_new": float(new.detach()), "loss_prior": float(old.detach())}
        return new + prior_weight * old, logs

    extra = {"word_rows": token_rows(text[0]).rows} if text is not None else {}
    return Stage("finetune", unet, opt, loss, extra_modules=extra)


def finetune_run(
    run: str | Path,
    data: str,
    name: str,
    out: str | Path,
    *,
    rank: int = 4,
    alpha: float | None = None,
    conv: bool = False,
    steps: int = 600,
    lr: float = 1e-3,
    class_lr: float | None = None,
    batch_size: int = 8,
    time_budget_s: float | None = None,
    prior_weight: float = 1.0,
    prior_images: int = 64,
    flip: bool = False,
    seed: int = 0,
    new_label_dropout: float | None = None,
    gate: str = "none",
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: ProgressFn | None = None,
    stop: StopRequest | None = None,
) -> FinetuneResult:
    """Fine-tune an adapter of `run` on the images of `data` and write it to `out` (an
    `AdapterFolder`). The caller (`api.finetune`) checked the options against the run."""
    start = time.perf_counter()
    folder = RunFolder(run).require_trained()
    cfg = folder.config()
    adapter = AdapterFolder(out)
    ds = few_data(data, folder)
    images, fingerprint = ds.images, ds.fingerprint()
    dev = resolve_device(device)
    vae, unet = folder.load_vae(dev), folder.load_unet(dev)
    base_unet_config = cfg.unet
    is_text = folder.has_text()
    is_class = bool(unet.config.num_classes) and not is_text
    text: tuple[AnyTextEncoder, Tokenizer] | None = None
    captions: list[str] = []
    if is_text:
        if not WORD_NAME.fullmatch(name):
            raise ConfigError(f"--name {name!r} is not one word of letters and digits")
        captions = word_captions(ds.captions, name, data)
        encoder = folder.load_text_encoder(dev).eval()
        for p in encoder.parameters():
            p.requires_grad_(False)
        text = (encoder, folder.load_tokenizer())
    gated = (is_class or is_text) and gate == "class"
    if gated:
        # the adapter never acts on the old classes or the null label: nothing to preserve, and
        # a new image shown with the null label would train nothing
        prior_weight = 0.0
        new_label_dropout = 0.0 if new_label_dropout is None else new_label_dropout

    prior, prior_labels = None, None
    if prior_weight > 0:
        words = {"text_encoder": text[0], "tokenizer": text[1]} if text else {}
        ldm = LatentDiffusion(
            vae, unet, cfg.diffusion.make_schedule(), device=dev,
            guidance_scale=cfg.sampling_guidance, fast=False, **words,
        )  # fmt: skip
        prior, prior_labels = prior_samples(folder, adapter, ldm, prior_images, seed)

    x = images
    if flip:
        x = torch.cat([x, x.flip(-1)])
    moments = encode_moments(vae.eval(), x, dev)
    log.info("fine-tuning on %d images%s of %s", len(images), " (and their mirror images)"
             if flip else "", data)  # fmt: skip

    for p in unet.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(
        rank=rank, alpha=float(alpha if alpha is not None else rank),
        targets=ATTENTION_TARGETS + (CONV_TARGETS if conv else ()),
    )  # fmt: skip
    layers = inject_lora(unet, lora, ADAPTER)
    label: int | Tensor | None = add_class_rows(unet, ADAPTER, 1) if is_class else None
    if label is not None and gated:  # the adapter acts on the new class only
        gate_by_class(unet, ADAPTER, [int(label)])
    trained = lora_parameters(unet, ADAPTER)
    rows = class_rows(unet, ADAPTER)
    token = None
    if text is not None:  # the new word: a token row of the encoder, and the prompts' ids
        token = add_word(text[0], text[1], name)
        rows = word_row(text[0], name)
        watch_prompts(unet)
        if gated:  # the adapter acts on prompts holding the word only
            gate_by_words(unet, ADAPTER, [token])
        label = text[1].encode(captions)[0]
        if flip:
            label = torch.cat([label, label])
        log.info("the new word %r is token %d; captions such as %r", name, token, captions[0])
    if rows is not None:
        trained.append(rows)
        if class_lr is None:
            class_lr = default_word_lr(text[0]) if text is not None else default_class_lr(unet)
    for p in trained:
        p.requires_grad_(True)
    unet.to(dev).train()
    n_trained = sum(p.numel() for p in trained)
    what = ", a new word's row" if text is not None else ", a new class row" if rows is not None \
        else ""  # fmt: skip
    log.info("adapter: rank %d on %d layers%s, %d trained parameters (%.1f KB in float32)",
             rank, layers, what, n_trained, n_trained * 4 / 1024)  # fmt: skip

    tcfg = dataclasses.replace(
        cfg.unet_train, steps=steps, batch_size=batch_size, grad_accum=1, lr=lr,
        warmup_steps=min(20, steps // 10), lr_schedule="constant", weight_decay=0.0,
        ema_decay=0.0, checkpoint_every=max(100, steps // 4), keep_last=1, sample_every=0,
        log_every=10, compile=False, gradient_checkpointing=False,
    )  # fmt: skip
    stage = finetune_stage(
        unet, moments, label, prior, prior_labels, prior_weight, vae.config.scaling_factor,
        cfg.diffusion, tcfg, dev, class_lr=class_lr or 0.0, new_label_dropout=new_label_dropout,
        text=text, caption_dropout=cfg.text.caption_dropout if text is not None else 0.0,
    )  # fmt: skip
    result = train_stage(
        stage, tcfg, folder=adapter, num_items=len(moments), seed=seed, resume=resume,
        time_budget_s=time_budget_s, progress=progress, stop=stop,
    )  # fmt: skip
    unet.eval()

    tensors = lora_state_dict(unet, ADAPTER)
    if rows is not None:
        key = AdapterFolder.WORD_ROW if text is not None else AdapterFolder.CLASS_ROWS
        tensors[key] = rows.detach().clone()
    gate_kind = "word" if text is not None and gated else gate if is_class else "none"
    info = AdapterInfo(
        lora=lora, base_weights_hash=folder.weights_hash(), unet=to_dict(base_unet_config),
        kind="word" if is_text else "class" if is_class else "style",
        class_name=name if is_class else None, word=name if is_text else None,
        class_index=label if is_class else None, base_run=str(run), steps=result.steps_done, lr=lr,
        class_lr=class_lr if rows is not None else None, data=str(data),
        data_fingerprint=fingerprint, num_images=len(images), flip=flip,
        prior_weight=prior_weight if prior is not None else 0.0,
        prior_images=len(prior) if prior is not None else 0,
        seconds=round(time.perf_counter() - start, 1),
        gate=gate_kind,
    )  # fmt: skip
    adapter.save(info, tensors)
    log.info("wrote the adapter %s (%d steps, %s)", adapter.path, result.steps_done,
             result.stopped_because)  # fmt: skip
    return FinetuneResult(adapter.path, info, result.stopped_because)


def merge_run(
    run: str | Path, adapter: str | Path, out: str | Path, *, scale: float = 1.0
) -> RunFolder:
    """A new run folder `out`: `run` with `adapter` baked into its UNet's weights at `scale`
    (`models.lora.merge_lora`: the same outputs up to float rounding), its new class, if any,
    an ordinary class of it (run.json's num_classes and data.json's class names grow by one).
    The autoencoder is copied as it is. The caller checked that the adapter fits the run."""
    from ..models.lora import merge_lora
    from ..pipeline import with_adapters

    base = RunFolder(run).require_trained()
    cfg, data = base.config(), base.data_info()
    unet, names = with_adapters(base, base.load_unet(), data.class_names, [(adapter, scale)])
    merge_lora(unet)
    new = RunFolder(out)
    new.save_vae(base.load_vae())
    new.save_unet(unet)
    info = AdapterFolder(adapter).info()
    new.write_data_info(dataclasses.replace(
        data, class_names=names if info.class_name is not None else data.class_names,
        fingerprint=None,  # the classes are no longer those of the data it names
    ))  # fmt: skip
    new.write_config(dataclasses.replace(cfg, unet=unet.config))  # last: marks a complete run
    log.info("wrote %s: %s with the adapter %s merged at scale %g", new.path, base.path,
             AdapterFolder(adapter).path, scale)  # fmt: skip
    return new
