"""What the two branches of a run's story share (training/run.py: images; training/video_run.py:
clips): the run's state (`_Run`), its result, the constants of its ending, and the diffusion
stage's common part (`_train_diffusion`: time a micro-batch, announce, take the budget's rest,
run the shared loop with resume, save the final EMA model, report the stage in training.json).

The two branches differ in the network (a `UNet` or a `VideoUNet`, either inside a `TextUNet`
for text), in what one training item is (an image or a clip), in the budget kept for the
guidance measurement (image runs only) and in where the model is saved; the caller passes those.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..models.text import MiniLMEncoder, TextEncoder, TextEncoderConfig, Tokenizer
from ..models.unet import UNet, widen_input
from ..recipe import RunConfig, TrainConfig
from ..runs import RunFolder
from .distributed import World
from .loop import ProgressFn, RunLog, StageResult, StopRequest, train_stage
from .sizing import estimate_step_time
from .stages import split_model
from .state import list_checkpoints
from .step import Stage

if TYPE_CHECKING:
    from ..data.dataset import ImageDataset

log = logging.getLogger("ldmkit.training.run")  # one logger for the run's story, as before

# stop reasons after which no final grid is drawn and the run reports an early end
STOPPED_EARLY = ("signal", "stop request", "bad loss")
FINAL_GRID_S = 20.0  # seconds of a time budget kept for the final grid
# UNets of fewer than GUIDANCE_MIN_STEPS steps draw noise (the guidance choice skips them)
GUIDANCE_MIN_STEPS = 200
# a stage that ran fewer than this share of its planned steps says so
MIN_STAGE_SHARE = 0.5


@dataclass
class RunResult:
    run_dir: Path
    vae_steps: int
    unet_steps: int
    seconds: float
    stopped_because: str  # "finished", "time budget", or one of STOPPED_EARLY


@dataclass
class _Run:
    """What the steps of one training share."""

    folder: RunFolder
    cfg: RunConfig
    device: torch.device
    images: Tensor  # (N, C, H, W) uint8
    # per-image condition: class labels (N,) long, caption token ids (N, L), or None
    cond_data: Tensor | None
    class_names: list[str] | None  # of a class-conditional run
    tokenizer: Tokenizer | None  # of a text-conditional run
    preview_prompts: list[str] | None  # one preview row each, for a text-conditional run
    resume: bool
    budget: float | None  # seconds, for both stages
    t_start: float
    run_log: RunLog
    progress: ProgressFn | None
    stop: StopRequest | None
    world: World  # this process among the training's processes (one by default)
    dataset: ImageDataset | None = None  # the data as read (its labels train the judge)
    # the run's quick domain classifier (labelled data of at most 64 px): it reads the
    # autoencoder's reconstructions while it trains and the guidance choice's samples
    judge: Any | None = None
    clips: int = 0  # a video run's clip count (its images are the clips' frames); 0: images

    def result(self, vae_steps: int, unet_steps: int, why: str) -> RunResult:
        return RunResult(
            self.folder.path, vae_steps, unet_steps, time.perf_counter() - self.t_start, why
        )


def _base_unet(cfg: RunConfig, device: torch.device) -> UNet:
    """The UNet of the run `init_from`, widened with zero weights to take the mask and the
    masked latent when this run learns inpainting (so it starts as exactly that model)."""
    unet = RunFolder(cfg.init_from).load_unet(device)
    extra = cfg.unet.in_channels - unet.config.in_channels
    if extra:
        unet = widen_input(unet, extra)
    if unet.config != cfg.unet:
        raise ConfigError(
            f"init_from {cfg.init_from}: its UNet differs from this run's ({unet.config} vs "
            f"{cfg.unet}); do not --set unet.* together with init_from"
        )
    return unet.train()


def _text_encoder(run: _Run) -> TextEncoder | MiniLMEncoder:
    """The text encoder a text-conditional run trains with its network (a frozen MiniLM is
    loaded from its package and trained no further)."""
    t = run.cfg.text
    if t.encoder == "minilm":
        return MiniLMEncoder().to(run.device)
    assert run.tokenizer is not None
    return TextEncoder(TextEncoderConfig(
        vocab_size=run.tokenizer.vocab_size, max_length=t.max_length, width=t.width,
        layers=t.layers, heads=t.heads,
    )).to(run.device)  # fmt: skip


def _train_diffusion(
    run: _Run, st: Stage, model: nn.Module, probe: Callable[[nn.Module], Tensor], *,
    name: str, stage: str, num_items: int, reserve_s: float, save: Callable[[nn.Module], None],
) -> tuple[nn.Module, int, str]:  # fmt: skip
    """The diffusion stage's common part, for `model` (its `st` built by the caller): time
    `probe` (one forward of a copy), announce the stage as `name`, take what the time budget
    left less the final grid's FINAL_GRID_S and `reserve_s`, run the shared loop over
    `num_items` training items (resuming from the checkpoints named `stage`), then save the
    final EMA model (`save` gets the network; a text encoder is saved here) and write the
    stage's record. Returns (the EMA model, steps, stop reason)."""
    cfg, device, folder, world = run.cfg, run.device, run.folder, run.world
    per_step = None
    if world.is_main:
        per_step = estimate_step_time(model, probe, device) * cfg.unet_train.grad_accum
        _announce(name, model, per_step / cfg.unet_train.grad_accum, cfg.unet_train, num_items)
    budget = None
    if run.budget:  # what the autoencoder left, less margins for the final grid (and guidance)
        keep = FINAL_GRID_S + reserve_s
        budget = max(run.budget - (time.perf_counter() - run.t_start) - keep, 10.0)
    res = train_stage(
        st, cfg.unet_train, folder=folder, num_items=num_items, seed=cfg.seed + 1,
        resume=run.resume and bool(list_checkpoints(folder.checkpoints_dir, stage)),
        time_budget_s=budget, run_log=run.run_log, progress=run.progress, stop=run.stop,
        world=world,
    )  # fmt: skip
    final = res.ema.model if res.ema is not None else model
    net_final, encoder_final = split_model(final)
    with world.together():
        if world.is_main:
            if encoder_final is not None:
                folder.save_text_encoder(encoder_final)
            save(net_final)
            if res.stopped_because not in STOPPED_EARLY:
                _report_diffusion(run, res, budget, per_step)
    return final, res.steps_done, res.stopped_because


def _report_diffusion(
    run: _Run, res: StageResult, budget: float | None, per_step: float | None
) -> None:
    """The UNet stage's record in training.json; a stage that got far fewer steps than its
    start promised (a machine busier than at the probe), or too few to draw anything, says so."""
    # without a budget the configured steps ran (the user chose them): nothing to report
    expected = run.cfg.unet_train.steps
    if budget is not None:  # what the budget promised at the probe's speed
        expected = min(expected, int(budget / per_step)) if per_step else None
    problems = []
    if budget is not None and res.steps_done < GUIDANCE_MIN_STEPS:
        problems.append(
            f"only {res.steps_done} UNet steps: its samples will be mostly noise; resume with "
            "a longer --time-budget"
        )
    elif budget is not None and expected and res.steps_done < MIN_STAGE_SHARE * expected:
        problems.append(
            f"the UNet got {res.steps_done} steps where its start promised about {expected} "
            "(the machine was busier than when the speed was measured); resume with a longer "
            "--time-budget for a better model"
        )
    run.folder.write_stage_report("diffusion", {
        "steps": res.steps_done, "planned_steps": res.planned, "expected_steps": expected,
        "configured_steps": run.cfg.unet_train.steps, "seconds": round(res.seconds, 1),
        "stopped_because": res.stopped_because, "budget_s": budget,
        "thread_changes": res.threads, "problems": problems,
    })  # fmt: skip
    for p in problems:
        log.warning("diffusion: %s", p)


def _announce(
    name: str, model: torch.nn.Module, per_micro: float, cfg: TrainConfig, n: int
) -> None:
    steps_per_epoch = max(1, n // cfg.batch_size)
    per_step = per_micro * cfg.grad_accum
    log.info(
        "%s: %s; ~%.2f s/step (%.0f img/s), ~%.0f s/epoch of %d images; model state ~%.0f MB",
        name, _summary(model), per_step,
        cfg.batch_size / per_step, per_step * steps_per_epoch, n, _model_memory_mb(model),
    )  # fmt: skip


def _model_memory_mb(model: torch.nn.Module) -> float:
    n = sum(p.numel() for p in model.parameters())
    return n * 4 * 4 / 2**20  # weights, grads, two AdamW moments (fp32)


def _summary(model: torch.nn.Module) -> str:
    unet, encoder = split_model(model)
    kind = "frozen MiniLM " if isinstance(encoder, MiniLMEncoder) else ""
    text = f"; {kind}text encoder {encoder.num_parameters() / 1e6:.2f} M params" if encoder else ""
    return (unet.summary() if hasattr(unet, "summary") else type(unet).__name__) + text
