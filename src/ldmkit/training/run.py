"""Two-stage latent diffusion training, from a data spec to a run folder.

`train_run` reads as the story of a run: prepare (config, data, run.json) -> train the
autoencoder -> measure the latent scaling factor and encode the data once -> train the UNet on
those latents -> save the final weights, grid and loss curve. Stage 1 (reconstruction + KL) and
stage 2 (the diffusion loss on latents drawn from the cached posterior moments; Rombach et al.
2022) are defined in `stages.py`; the loop both run through is `loop.py`. The run folder's
layout is `ldmkit.runs.RunFolder`'s.

Under torchrun every process runs this same story (training/distributed.py): rank 0 settles the
config and writes every file, inside `World.together()` blocks that the other ranks wait at,
and the others read what it wrote (run.json, the tokenizer, the autoencoder, the latent cache).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data.transforms import to_float
from ..diffusion.samplers import NonFiniteSampleError
from ..evaluation.reconstruction import (
    QualityVerdict,
    ReconstructionProbe,
    describe,
    probe_split,
)
from ..models.conditioning import ClassConditioner, TextConditioner
from ..models.text import Tokenizer, minilm_dir
from ..models.unet import UNet
from ..models.vae import Autoencoder, measure_scaling_factor
from ..recipe import CHANGEABLE_ON_RESUME, RunConfig, TrainConfig, parse_duration, resolve_config
from ..runs import DataInfo, RunFolder, read_data
from ..utils import format_seconds
from . import distributed
from .distributed import World, local_micro_batch

if TYPE_CHECKING:
    from ..data.dataset import ImageDataset
    from ..pipeline import LatentDiffusion
from .loop import ProgressFn, QualityGate, RunLog, StageResult, StopRequest, train_stage
from .run_parts import (  # noqa: F401  (_report_diffusion: also read from here)
    FINAL_GRID_S,
    GUIDANCE_MIN_STEPS,
    STOPPED_EARLY,
    RunResult,
    _announce,
    _base_unet,
    _report_diffusion,
    _Run,
    _text_encoder,
    _train_diffusion,
)
from .sizing import SizeChoice, estimate_step_time, plan_lines, unet_step_time, vae_step_time
from .stages import TextUNet, autoencoder_stage, diffusion_stage, encode_moments, split_model
from .state import RunLock, list_checkpoints
from .video_run import (
    _clip_conditions,
    _clip_motion,
    _finish_video,
    _is_video_data,
    _video_data,
    _video_diffusion,
)

log = logging.getLogger(__name__)

# (STOPPED_EARLY, FINAL_GRID_S, GUIDANCE_MIN_STEPS and MIN_STAGE_SHARE: run_parts.py)
# the guidance measurement at the end (evaluation/guidance_choice.py; ~25-40 s on 2 CPU cores): the
# share of a time budget kept for it, at most GUIDANCE_MAX_S; budgets under GUIDANCE_MIN_BUDGET_S
# and UNets of fewer than GUIDANCE_MIN_STEPS steps (which draw noise) skip it
GUIDANCE_SHARE, GUIDANCE_MAX_S, GUIDANCE_MIN_BUDGET_S = 0.05, 45.0, 300.0
# longest the run's quick domain classifier trains, in the CPU time it gets per thread
# (evaluation.features.BudgetClock), or JUDGE_BUDGET_SHARE of the run's budget if that is
# more. It needs ~35 s on moving shapes (2 cores, quiet); beside a second 2-thread job the
# CPU clock still ran out at 60 s at epoch 7 of 11 (0.78 held-out; spinning threads count)
JUDGE_BUDGET_S, JUDGE_BUDGET_SHARE = 60.0, 0.1
JUDGE_STEPS = 300  # its optimiser steps (at least; whole epochs)
JUDGE_MIN_ACCURACY = 0.8  # held-out accuracy below which it does not judge readability
# data of at least this many labelled images: a judge below eval's target accuracy after its
# steps trains on while it improves (within JUDGE_BUDGET_S). 300 steps read 25-28 % of 16000
# moving-shape frames, so a video run's autoencoder had no readability and a feature-matching
# term from a near-random network; the still shapes (97 %) and MNIST (98 %) reach the target in
# their steps, and smaller data (where a weak judge means too few images) trains as before.
JUDGE_TRAIN_ON_MIN_IMAGES = 1000


def train_run(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    stage: Literal["all", "autoencoder", "diffusion"] = "all",
    progress: ProgressFn | None = None,
    stop: StopRequest | None = None,
    backend: str = "auto",
    size: SizeChoice | None = None,
) -> RunResult:
    """Train both stages into `out_dir` (layout: ldmkit.runs), in this process or, launched by
    torchrun, in all of its processes together (training/distributed.py).

    Args:
        resume: continue from the newest checkpoints, with the run's saved config (only the
            training settings in `recipe.CHANGEABLE_ON_RESUME` may change).
        stage: "autoencoder" stops after the autoencoder; "diffusion" trains the UNet on a
        saved one.
        progress: called with a `loop.Progress` after every step (the CLI draws a tqdm bar).
        stop: a threading.Event (or a callable) that, once set, stops the training cleanly with
            a checkpoint, as SIGINT does. A stop request file in the run folder
            (`RunFolder.request_stop`, e.g. a web page's stop button) does the same.
        backend: under torchrun, the process group's: "auto" (nccl on CUDA, gloo on the CPU),
            "gloo" or "nccl".
        size: how the image size was chosen (training/sizing.py), for data.json.
    """
    folder = RunFolder(out_dir)
    stop = _or_stop_file(stop, folder)
    world = distributed.start(cfg, backend)  # one process, or this one among torchrun's N
    try:
        with contextlib.ExitStack() as lock:

            def prepare() -> _Run:
                if world.is_main:  # the others read the run.json that rank 0 writes
                    _check_can_start(folder, resume)
                    folder.path.mkdir(parents=True, exist_ok=True)
                    lock.enter_context(RunLock(folder.path))
                    folder.clear_stop_request()  # one left by an earlier training
                    lock.callback(folder.clear_stop_request)  # answered: gone, lock still held
                return _prepare(folder, cfg, resume, progress, stop, world, stage, size)

            run = world.main_first(prepare)
            status = "failed"  # what the trackers hear unless the story ends
            try:
                vae, vae_steps, why = _autoencoder(run, train=stage in ("all", "autoencoder"))
                if why in STOPPED_EARLY or stage == "autoencoder":
                    result = run.result(vae_steps, 0, why)
                else:
                    moments = _latents(run, vae)
                    if run.clips:  # a video run (issue 30): the video UNet on the clips
                        model, unet_steps, why = _video_diffusion(run, vae, moments)
                        _finish_video(run, vae, model, why)
                    else:
                        model, unet_steps, why = _diffusion(run, vae, moments)
                        _finish(run, vae, model, unet_steps, why)
                    result = run.result(vae_steps, unet_steps, why)
                if world.is_main:
                    _track_summary(run, result)
                status = ("failed" if why == "bad loss" else
                          "stopped" if why in STOPPED_EARLY else "finished")  # fmt: skip
            finally:
                run.run_log.close(status)
            return result
    finally:
        world.close()


def _track_summary(run: _Run, result: RunResult) -> None:
    """The run's final figures (training.json's numbers, flattened; steps, seconds, why it
    ended, the guidance scale) and files (final grid, loss curves, reconstructions) to its
    experiment trackers."""
    from .trackers import flat, numbers

    values: dict[str, Any] = {
        "vae_steps": result.vae_steps, "unet_steps": result.unet_steps,
        "seconds": round(result.seconds, 1), "stopped_because": result.stopped_because,
    }  # fmt: skip
    if run.cfg.guidance_scale is not None:
        values["guidance_scale"] = run.cfg.guidance_scale
    report = {k: v for k, v in flat(run.folder.stage_report()).items() if ".history" not in k}
    values.update(numbers(report))
    folder = run.folder
    run.run_log.summary(values, [folder.final_grid_path, folder.loss_plot_path,
                                 folder.reconstructions_path])  # fmt: skip


def _or_stop_file(stop: StopRequest | None, folder: RunFolder) -> StopRequest:
    """`stop`, or the run folder's stop request file: whichever comes first."""
    if stop is None:
        return folder.stop_requested
    is_set = stop.is_set if isinstance(stop, threading.Event) else stop
    return lambda: bool(is_set()) or folder.stop_requested()


def _check_can_start(folder: RunFolder, resume: bool) -> None:
    if folder.path.exists() and not folder.path.is_dir():
        raise ConfigError(f"--out {folder.path} is a file; give a folder")
    if resume and not list_checkpoints(folder.checkpoints_dir) and not folder.has_model("vae"):
        if not folder.exists():
            raise CheckpointError(
                f"--resume: {folder.path} holds no checkpoint to resume from; drop --resume to start anew"
            )
        # killed before its first checkpoint: less than one interval is lost, so start over
        log.warning("%s has no checkpoint yet: starting its training from step 0", folder.path)


def _prepare(
    folder: RunFolder, cfg: RunConfig, resume: bool, progress: ProgressFn | None,
    stop: StopRequest | None, world: World, stage: str = "all", size: SizeChoice | None = None,
) -> _Run:  # fmt: skip
    """Settle the config, load the data, check the time plan, write run.json and data.json
    (rank 0; the other ranks take the config from the run.json it wrote, so every process
    trains the same one)."""
    from ..data import parse_spec

    t_start = time.perf_counter()
    resumed = resume and folder.exists()
    if not world.is_main:
        cfg, resumed = folder.config(), True
    elif not resume:  # checked under the lock: see RunLock
        folder.require_new()
    elif resumed:  # the saved data and models; training settings (steps, ...) may change
        cfg = dataclasses.replace(
            folder.config(), **{k: getattr(cfg, k) for k in CHANGEABLE_ON_RESUME}
        )
    device = world.device
    cfg = _check_bf16(cfg, device)
    _cuda_speedups(device)
    torch.manual_seed(cfg.seed)
    clips = 0
    if cfg.video is not None or _is_video_data(cfg.data):
        cfg, ds, clips = _video_data(cfg)
    else:
        ds = read_data(cfg.data, image_size=cfg.image_size, channels=cfg.channels, seed=cfg.seed,
                       conditioning=cfg.conditioning)  # fmt: skip
    mode = _conditioning(cfg, ds)
    motion = _clip_motion(cfg, ds, mode) if clips else None  # a video run's directions, or None
    if mode == "text" and cfg.text.encoder == "minilm":
        minilm_dir()  # a one-line error, before anything is written, without the `text` extra
    num_classes = len(ds.class_names) if mode == "class" else None
    labels_from = None
    if num_classes and world.is_main:
        labels_from = "sub-folder names" if parse_spec(cfg.data)[0] == "folder" else "the data set"
        log.info(
            "class-conditional on %d classes (%s) from %s; set conditioning=none to train "
            "without labels", num_classes, ", ".join(ds.class_names[:10]),
            labels_from if labels_from == "the data set" else f"the sub-folder names of {cfg.data}",
        )  # fmt: skip
    if not resumed:
        if cfg.init_from:
            cfg = _from_base(cfg, num_classes, mode)
        cfg = resolve_config(cfg, ds.channels, num_classes, text=mode == "text")
    elif cfg.unet.num_classes != num_classes:  # the data changed since the run started
        raise ConfigError(
            f"--resume: the data {cfg.data} has {num_classes or 'no'} classes but the run was "
            f"trained with {cfg.unet.num_classes or 'no'}; resume with the same data, or train "
            "into a new --out folder"
        )
    if world.is_main and not resumed:
        for line in plan_lines(cfg, size):
            log.info("plan: %s", line)
    if world.is_main:
        from .trackers import missing_packages

        missing_packages(cfg.log)  # before anything is written
        _check_time_plan(
            cfg, ds.images, device, train_vae=stage in ("all", "autoencoder") and not folder.has_model("vae"),
            train_unet=stage in ("all", "diffusion"), resumed=resumed,
        )  # fmt: skip
        folder.write_config(cfg)
        if cfg.init_from and not resumed:  # the base run's autoencoder, as it is: no stage 1
            folder.save_vae(RunFolder(cfg.init_from).load_vae())
        folder.write_data_info(DataInfo(
            spec=cfg.data, name=ds.name, num_images=len(ds.images), channels=ds.channels,
            image_size=cfg.image_size, class_names=ds.class_names if num_classes else None,
            fingerprint=ds.fingerprint(), labels_from=labels_from if num_classes else None,
            native_size=size.native if size else None, size_note=size.note if size else None,
            num_clips=clips or None, frames=cfg.video.frames if cfg.video else None,
        ))  # fmt: skip
    _sanity_check(ds.images, cfg)
    if world.is_main and len(ds.images) < 1000:
        log.warning(
            "only %d training images: the model will likely memorise them; "
            "use `ldmkit eval` to check for near-copies", len(ds.images),
        )  # fmt: skip
    cond_data, tokenizer, prompts = ds.labels if mode == "class" else None, None, None
    if mode == "text":
        tokenizer, cond_data, prompts = _prepare_text(folder, cfg, ds, resumed)
    if mode != "class":  # the class case was logged above, with where its labels come from
        log.info("conditioning: %s", "text prompts" if mode == "text" else "none (unconditional)")
    if clips and cond_data is not None:  # one condition per clip (its frames share it)
        cond_data = _clip_conditions(cfg, cond_data, motion)
    return _Run(
        folder, cfg, device, ds.images, cond_data,
        ds.class_names if mode == "class" else None, tokenizer, prompts, resume,
        parse_duration(cfg.time_budget) if cfg.time_budget else None, t_start,
        _run_log(folder, cfg, resumed, world), progress, stop, world, ds, clips=clips,
    )  # fmt: skip


def _run_log(folder: RunFolder, cfg: RunConfig, resumed: bool, world: World) -> RunLog:
    """log.jsonl and, on rank 0, the experiment trackers of log.trackers (the others log
    nothing: a tracked run has one writer)."""
    from .trackers import open_trackers

    if not world.is_main:
        return RunLog(folder, trackers=[])
    return RunLog(folder, trackers=open_trackers(cfg, folder, resume=resumed))


def _from_base(cfg: RunConfig, num_classes: int | None, mode: str) -> RunConfig:
    """The config of a run that starts from the trained run `init_from`: its autoencoder,
    UNet architecture, image size and schedule, with this run's task and training settings."""
    base = RunFolder(cfg.init_from).require_trained()
    b = base.config()
    if mode == "text" or base.has_text():
        raise ConfigError(
            f"init_from {cfg.init_from}: starting from a text-conditional run, or a text run from "
            "another, is not supported yet; train the text run from scratch"
        )
    if b.unet.num_classes != num_classes:
        raise ConfigError(
            f"init_from {cfg.init_from}: that run has {b.unet.num_classes or 'no'} classes, this "
            f"data {num_classes or 'none'}; start from a run trained on the same classes"
        )
    if b.task == "inpaint" and cfg.task != "inpaint":
        raise ConfigError(
            f"init_from {cfg.init_from} is an inpainting model; keep --set task=inpaint"
        )
    return dataclasses.replace(
        cfg, image_size=b.image_size, vae=b.vae, unet=b.unet, diffusion=b.diffusion
    )


def _conditioning(cfg: RunConfig, ds: ImageDataset) -> str:
    """What the run is conditioned on: "class", "text" or "none" (see RunConfig.conditioning)."""
    has_classes = ds.labels is not None and bool(ds.class_names)
    mode = cfg.conditioning
    if mode == "auto":  # a resumed run's saved config holds the resolved choice
        mode = "class" if has_classes else "text" if ds.captions else "none"
    if mode == "class" and not has_classes:
        raise ConfigError(f"conditioning 'class' needs labels, but {cfg.data} has none")
    if mode == "text" and not ds.captions:
        raise ConfigError(
            f"conditioning 'text' needs captions, but {cfg.data} has none; put a .txt file beside "
            "each image (same name) or a captions.jsonl in the folder"
        )
    return mode


def _prepare_text(
    folder: RunFolder, cfg: RunConfig, ds: ImageDataset, resumed: bool
) -> tuple[Tokenizer, Tensor, list[str]]:
    """The run's tokenizer (built from the captions, or the saved one on resume), every
    caption's token ids (N, L), and the preview prompts (one caption per class, or the first)."""
    from ..models.text import Tokenizer

    if resumed and folder.has_text():
        tokenizer = folder.load_tokenizer()
    else:
        kind = "minilm" if cfg.text.encoder == "minilm" else cfg.text.tokenizer
        tokenizer = Tokenizer.from_captions(ds.captions, kind=kind, max_length=cfg.text.max_length)
        folder.save_tokenizer(tokenizer)
    ids, _ = tokenizer.encode(ds.captions)
    if ds.labels is not None and ds.class_names:  # the first caption of each class
        prompts = [ds.captions[int((ds.labels == c).nonzero()[0])]
                   for c in range(len(ds.class_names)) if (ds.labels == c).any()]  # fmt: skip
    else:  # the first distinct captions
        prompts = list(dict.fromkeys(c for c in ds.captions if c))
    return tokenizer, ids, prompts[:5]


def _autoencoder(run: _Run, train: bool) -> tuple[Autoencoder, int, str]:
    """Stage 1, unless the autoencoder is saved already: (the saved VAE, steps, stop reason).

    The stage measures itself on a fixed batch (evaluation/reconstruction.py); with a time
    budget it ends once its target is reached, and at the latest after budget_split of the
    budget. Its figures, steps and end go to training.json; an autoencoder below the usable
    level is reported loudly there and by every command that uses the run."""
    cfg, images, device, folder, world = run.cfg, run.images, run.device, run.folder, run.world
    torch.manual_seed(cfg.seed)  # each model's init depends on the seed alone (exact resume)
    vae = Autoencoder(cfg.vae).to(device)
    if not train or folder.has_model("vae"):
        return folder.load_vae(device).eval(), 0, "finished"
    if world.size > 1 and cfg.vae.disc_weight > 0:
        raise ConfigError(
            "vae.disc_weight > 0: the PatchGAN discriminator (BatchNorm, adaptive weight) trains "
            "in one process only; train the autoencoder without torchrun (--stage autoencoder), then "
            "resume the run with torchrun"
        )
    probe_idx, train_idx = probe_split(len(images), cfg.seed)
    train_images = images if train_idx is None else images[train_idx]
    if world.is_main or cfg.vae.feature_weight > 0:  # every rank's loss needs the same judge
        run.judge = _judge(run)
    activations = _feature_net(run, device) if cfg.vae.feature_weight > 0 else None
    st = autoencoder_stage(vae, train_images, cfg.vae_train, device, wrap=world.wrap,
                           activations=activations)  # fmt: skip
    _vae_round_trip_check(vae, images, device)
    st.preview = lambda step, model: _save_reconstructions(
        model, images, folder.preview_path(step, prefix="vae-"), device
    )
    budget = run.budget * cfg.budget_split if run.budget else None
    gate = None
    if world.is_main:
        mb = local_micro_batch(cfg.vae_train, world.size)
        per_step = estimate_step_time(
            vae, lambda m: m(to_float(images[:mb]).to(device))[0].square().mean(), device
        )
        _announce("autoencoder", vae, per_step, cfg.vae_train, len(images))
        probe = ReconstructionProbe(images[probe_idx], _reader(run.judge, len(images)),
                                    held_out=train_idx is not None)  # fmt: skip
        verdict = QualityVerdict(target_readability=cfg.vae_target)
        gate = QualityGate(probe.measure, verdict.target_reached,
                           stop_on_target=budget is not None and cfg.vae_target > 0)  # fmt: skip
        if budget is not None:
            log.info(
                "autoencoder: trains until %s (measured on %d %simages), at most %s (%.0f %% "
                "of the budget)", f"{cfg.vae_target:.0%} of its reconstructions keep their class"
                if probe.classifier is not None else "its reconstruction PSNR plateaus",
                len(probe_idx), "held-out " if train_idx is not None else "", format_seconds(budget),
                100 * cfg.budget_split,
            )  # fmt: skip
    res = train_stage(
        st, cfg.vae_train, folder=folder, num_items=len(train_images), seed=cfg.seed,
        resume=run.resume, time_budget_s=budget, run_log=run.run_log, progress=run.progress,
        stop=run.stop, world=world, gate=gate,
    )  # fmt: skip
    if res.stopped_because in STOPPED_EARLY:
        return vae, res.steps_done, res.stopped_because
    with world.together():  # rank 0 measures the scaling factor and saves; every rank loads that
        if world.is_main:
            final = (res.ema.model if res.ema is not None else vae).eval()
            # posterior samples from a seeded generator: the factor must not depend on what
            # drew from the global RNG before (a step-time probe of N-dependent size)
            gen = torch.Generator().manual_seed(cfg.seed)
            scale = measure_scaling_factor(final, _batches(images, device), generator=gen)
            final.config = dataclasses.replace(final.config, scaling_factor=scale)
            folder.save_vae(final)
            log.info("autoencoder done after %d steps; latent scaling factor %.4f", res.steps_done, scale)  # fmt: skip
            _save_reconstructions(final, images, folder.reconstructions_path, device)
            run.run_log.add_image("autoencoder/reconstructions", folder.reconstructions_path,
                                  res.steps_done)  # fmt: skip
            assert gate is not None
            _report_autoencoder(run, res, gate, probe, final, budget)
    return folder.load_vae(device).eval(), res.steps_done, res.stopped_because


def judge_budget(run_budget: float | None) -> float:
    """The judge's time budget (seconds of CPU per thread) for a run of `run_budget` seconds."""
    return max(JUDGE_BUDGET_S, JUDGE_BUDGET_SHARE * (run_budget or 0.0))


def _judge(run: _Run) -> Any | None:
    """The run's quick domain classifier (as `measure_guidance` trains when nothing is cached),
    or None for data without labels. It is fully convolutional, so it reads any size: at
    more than 64 px (where evaluation may use Inception instead) it still gives the
    autoencoder its feature-matching term and its readability."""
    from ..evaluation import feature_nets as fn

    ds = run.dataset
    if ds is None or ds.labels is None:
        return None
    # JUDGE_STEPS optimiser steps at least (the module's DOMAIN_MIN_STEPS, which tests lower
    # for speed, must not change what a run trains), then on towards eval's target accuracy
    # for large data only (JUDGE_TRAIN_ON_MIN_IMAGES)
    per_epoch = math.ceil(len(ds) * (1 - fn.DOMAIN_HELD_OUT) / fn.DOMAIN_BATCH_SIZE)
    target = fn.DOMAIN_TARGET_ACCURACY if len(ds) >= JUDGE_TRAIN_ON_MIN_IMAGES else None
    with torch.random.fork_rng(devices=[]):  # the run's own draws stay as they were
        return fn.get_feature_net("domain", dataset=ds, epochs=math.ceil(JUDGE_STEPS / per_epoch),
                                  seed=run.cfg.seed, time_budget_s=judge_budget(run.budget),
                                  target_accuracy=target)  # fmt: skip


def _feature_net(run: _Run, device: torch.device) -> Any | None:
    """The judge's activations for the feature-matching loss (a frozen copy on the device), or
    None, with a note, where the run has no judge (data without labels)."""
    if run.judge is None:
        log.info("vae.feature_weight: no domain classifier for this data (it needs class "
                 "labels); the autoencoder trains without it")  # fmt: skip
        return None
    net = copy.deepcopy(run.judge).to(device).eval().requires_grad_(False)
    return net.activations


def _reader(judge: Any | None, images: int) -> Any | None:
    """The judge, when it reads the data well enough for readability to mean something; a
    weak judge of large data (`images` >= JUDGE_TRAIN_ON_MIN_IMAGES), where it should have
    learned the classes, is a warning (a machine too busy, or classes hard to tell apart)."""
    accuracy = getattr(judge, "held_out_accuracy", None)
    if judge is None or accuracy is None or accuracy >= JUDGE_MIN_ACCURACY:
        return judge
    level = logging.WARNING if images >= JUDGE_TRAIN_ON_MIN_IMAGES else logging.INFO
    log.log(
        level,
        "autoencoder: readability not measured: the run's classifier reads only %.0f %% of "
        "held-out images right (too few images, or too little time, to learn the classes); "
        "PSNR judges it",
        100 * accuracy,
    )  # fmt: skip
    return None


def _report_autoencoder(run: _Run, res: StageResult, gate: QualityGate,
                        probe: ReconstructionProbe, vae: Autoencoder,
                        budget: float | None) -> None:  # fmt: skip
    """Measure the saved autoencoder, write its record to training.json, and say loudly when it
    is not usable, with its numbers and what to do."""
    final = probe.measure(vae)
    problems = QualityVerdict.problems(final)
    planned = run.cfg.vae_train.steps
    record = {
        "steps": res.steps_done, "planned_steps": res.planned, "configured_steps": planned,
        "seconds": round(res.seconds, 1), "stopped_because": res.stopped_because,
        "target": gate.reason, "budget_s": budget, "final": final,
        "measured_on": f"{len(probe.images)} {'held-out' if probe.held_out else 'training'} images",
        "history": gate.rows, "thread_changes": res.threads, "problems": problems,
    }  # fmt: skip
    run.folder.write_stage_report("autoencoder", record)
    why = res.stopped_because + (
        f" ({gate.reason})" if res.stopped_because == "quality target" else ""
    )
    log.info("autoencoder after %d steps (%s, %.0f s): %s", res.steps_done, why, res.seconds,
             describe(final))  # fmt: skip
    if problems:
        log.warning(
            "THE AUTOENCODER IS NOT USABLE: %s after %d steps (%s). Every sample of this run "
            "will be poor. Resume with a longer budget (ldmkit train --out %s --resume "
            "--time-budget ...), or train the autoencoder for a set number of steps (--set "
            "vae_train.steps=%d with no --time-budget); the UNet trains anyway",
            "; ".join(problems), res.steps_done, why, run.folder.path, max(planned, 1000),
        )  # fmt: skip


def _latents(run: _Run, vae: Autoencoder) -> Tensor:
    """Posterior moments of the training images: encoded once, cached in the run folder."""
    vae_id = run.folder.vae_identity(len(run.images))
    moments = None
    with run.world.together():  # rank 0 encodes and caches them; the other ranks read the cache
        if run.world.is_main:
            moments = run.folder.cached_moments(vae_id)
            if moments is None:
                t0 = time.perf_counter()
                moments = encode_moments(vae, run.images, run.device)
                run.folder.save_moments(moments, vae_id)
                log.info(
                    "encoded %d images into latents %s in %.1f s",
                    len(run.images), tuple(moments.shape[1:]), time.perf_counter() - t0,
                )  # fmt: skip
    if moments is None:
        moments = run.folder.cached_moments(vae_id)
    if moments is None:
        raise CheckpointError(
            f"rank {run.world.rank} cannot read the latent cache that rank 0 wrote in "
            f"{run.folder.path}; with several machines, --out must be a folder they all see"
        )
    return moments


def _diffusion(run: _Run, vae: Autoencoder, moments: Tensor) -> tuple[nn.Module, int, str]:
    """Stage 2: the UNet (and a text encoder) on the latents; returns (the EMA weights, steps,
    stop reason). A text-conditional run trains its encoder and UNet as one `TextUNet`."""
    cfg, device, world = run.cfg, run.device, run.world
    # The UNet's init must not depend on whether stage 1 ran in this process (a resumed run)
    torch.manual_seed(cfg.seed + 1)
    unet = UNet(cfg.unet).to(device) if not cfg.init_from else _base_unet(cfg, device)
    model: nn.Module = unet
    if run.tokenizer is not None:
        encoder = _text_encoder(run)
        unet.null_context.requires_grad_(False)  # the null condition is the encoder's ""
        model = TextUNet(unet, encoder)
        conditioner = TextConditioner(run.tokenizer, encoder, dropout=cfg.text.caption_dropout)
    else:
        num_classes = len(run.class_names) if run.class_names else None
        conditioner = ClassConditioner(num_classes, dropout=cfg.diffusion.class_dropout)
    st = diffusion_stage(
        model, moments, conditioner, run.cond_data, vae.config.scaling_factor, cfg.diffusion,
        cfg.unet_train, device, wrap=world.wrap,
        inpaint_factor=vae.config.downsample_factor if cfg.task == "inpaint" else None,
    )  # fmt: skip
    st.preview = _diffusion_preview(run, vae)
    # the loop's batches are no larger than the data
    mb = min(local_micro_batch(cfg.unet_train, world.size), len(run.images))

    def probe(m: nn.Module) -> Tensor:  # one forward of a copy, for the time estimate
        x = torch.randn(mb, cfg.unet.in_channels, *moments.shape[2:]).to(device)
        t = torch.randint(0, 1000, (mb,)).to(device)
        unet_copy, encoder = split_model(m)
        cond = {}
        if encoder is not None:
            cond = encoder.context(run.cond_data[:mb].to(device))
        elif run.class_names:
            cond = {"class_labels": torch.zeros(mb, dtype=torch.long, device=device)}
        return unet_copy(x, t, **cond).square().mean()

    return _train_diffusion(
        run, st, model, probe, name="diffusion", stage="diffusion", num_items=len(run.images),
        reserve_s=_guidance_reserve(run) if _will_choose_guidance(run) else 0.0,
        save=run.folder.save_unet,
    )  # fmt: skip


def _finish(run: _Run, vae: Autoencoder, model: nn.Module, steps: int, why: str) -> None:
    """The guidance scale (measured, see `_choose_guidance`) and the final sample grid, unless
    stopped early, and the loss curves."""
    from ..evaluation.plots import plot_loss_curves

    with run.world.together():
        if not run.world.is_main:
            return
        if why not in STOPPED_EARLY:
            _choose_guidance(run, vae, model.eval(), steps)
            grid = _diffusion_preview(run, vae, per_row=8)(steps, model.eval())
            if grid is not None:
                shutil.copyfile(grid, run.folder.final_grid_path)
                run.run_log.add_image("diffusion/final", run.folder.final_grid_path, steps)
        plot_loss_curves(run.folder.log_path, run.folder.loss_plot_path)


def _will_choose_guidance(run: _Run) -> bool:
    """Whether the run measures its guidance scale at the end: a conditional run whose
    guidance_scale is unset, with choose_guidance on and a budget (if any) long enough."""
    cfg = run.cfg
    conditional = run.tokenizer is not None or bool(run.class_names)
    long_enough = run.budget is None or run.budget >= GUIDANCE_MIN_BUDGET_S
    return conditional and cfg.choose_guidance and cfg.guidance_scale is None and long_enough


def _guidance_reserve(run: _Run) -> float:
    return min(GUIDANCE_SHARE * (run.budget or 0.0), GUIDANCE_MAX_S)


def _choose_guidance(run: _Run, vae: Autoencoder, model: nn.Module, steps: int) -> None:
    """Measure FID and accuracy per guidance scale (evaluation/guidance_choice.py), store the pick as
    the run's guidance_scale (run.json) and the table in eval/; the final grid then uses it."""
    from ..evaluation.guidance_choice import measure_guidance, save_choice

    if not _will_choose_guidance(run):
        return
    if steps < GUIDANCE_MIN_STEPS:
        log.info("guidance: not measured after %d UNet steps (fewer than %d); the run samples "
                 "at %g", steps, GUIDANCE_MIN_STEPS, run.cfg.sampling_guidance)  # fmt: skip
        return
    choice = measure_guidance(
        _pipeline(run, vae, model), run.folder, seed=run.cfg.seed, net=run.judge
    )
    if choice is None:
        log.info("guidance: the run samples at the default %g", run.cfg.sampling_guidance)
        return
    run.cfg = dataclasses.replace(run.cfg, guidance_scale=choice.scale)
    run.folder.write_config(run.cfg)
    save_choice(run.folder, choice)
    run.run_log.add_table(
        "guidance", ["guidance", f"FID-{choice.feature_name}", "accuracy", "seconds", "chosen"],
        [[r.scale, r.fid, r.accuracy, r.seconds, r.scale == choice.scale] for r in choice.rows],
    )  # fmt: skip
    log.info("guidance scale %g chosen by measurement (set guidance_scale=X to fix one, or "
             "choose_guidance=false to skip this):\n%s", choice.scale, choice.table())  # fmt: skip


def _pipeline(run: _Run, vae: Autoencoder, model: nn.Module) -> LatentDiffusion:
    """The sampling pipeline of a diffusion stage's model (a UNet, or the text run's `TextUNet`)."""
    from ..pipeline import LatentDiffusion

    unet, encoder = split_model(model)
    return LatentDiffusion(
        vae, unet, run.cfg.diffusion.make_schedule(), class_names=run.class_names,
        text_encoder=encoder, tokenizer=run.tokenizer if encoder is not None else None,
        device=run.device, guidance_scale=run.cfg.sampling_guidance,
    )  # fmt: skip


def _diffusion_preview(run: _Run, vae: Autoencoder, per_row: int = 4):
    """A function that samples a grid with the given model (a UNet, or the text run's
    `TextUNet`): one labelled row per class or per preview prompt, else a square
    of per_row x per_row images."""
    from ..evaluation.grids import save_grid

    cfg = run.cfg
    n_classes = len(run.class_names) if run.class_names else 0
    options = dict(sampler=cfg.preview_sampler, steps=cfg.preview_steps, seed=0)

    def preview(step: int, model: torch.nn.Module) -> Path | None:
        was_training = model.training
        model.eval()
        try:
            ldm = _pipeline(run, vae, model)
            if ldm.is_text_conditional:
                images, nrow, row_labels = ldm.prompt_grid(
                    run.preview_prompts or [""], per_row, **options
                )
            else:
                n = n_classes * per_row if n_classes else per_row * per_row
                images, nrow, row_labels = ldm.sample_grid(n, **options)
        except NonFiniteSampleError as e:  # a preview is a convenience: never stop for one
            log.warning("step %d: no preview grid: %s", step, e)
            return None
        finally:
            model.train(was_training)
        path = run.folder.preview_path(step)
        save_grid(images, path, nrow=nrow, row_labels=row_labels,
                  scale=2 if cfg.image_size <= 64 else 1)  # fmt: skip
        return path

    return preview


def _save_reconstructions(
    vae: Autoencoder, images: Tensor, path: Path, device: torch.device
) -> Path:
    """Originals beside their reconstructions (32 pairs), as a grid PNG."""
    from ..evaluation.grids import save_grid

    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        x = to_float(images[:32]).to(device)
        recon = vae.decode(vae.encode(x).mode()).clamp(-1, 1).cpu()
    vae.train(was_training)
    pairs = torch.stack([x.cpu(), recon], 1).flatten(0, 1)  # original, reconstruction, ...
    save_grid(pairs, path, nrow=16)
    return path


def _batches(images: Tensor, device: torch.device, batch: int = 256, limit: int = 4096):
    for s in range(0, min(len(images), limit), batch):
        yield to_float(images[s : s + batch]).to(device)


@torch.no_grad()
def _vae_round_trip_check(vae: Autoencoder, images: Tensor, device: torch.device) -> None:
    """One encode/decode before training, so a broken config fails in seconds, not hours."""
    was_training = vae.training
    vae.eval()
    x = to_float(images[:2]).to(device)
    post = vae.encode(x)
    recon = vae.decode(post.mode())
    vae.train(was_training)
    if recon.shape != x.shape or not torch.isfinite(recon).all():
        raise ValueError(
            f"the autoencoder maps {tuple(x.shape)} to {tuple(recon.shape)} (finite: "
            f"{bool(torch.isfinite(recon).all())}); check the vae config"
        )


def _sanity_check(images: Tensor, cfg: RunConfig) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"the data loader returned {images.dtype} {tuple(images.shape)}; expected uint8 (N, C, H, W)"
        )
    lo, hi = int(images.min()), int(images.max())
    if hi - lo < 8:
        raise ValueError(
            f"every training image is (nearly) one flat value ({lo}..{hi}); check the data"
        )
    if images.shape[-1] != cfg.image_size:
        raise ValueError(f"images are {images.shape[-1]} px but image_size is {cfg.image_size}")


def _check_time_plan(
    cfg: RunConfig, images: Tensor, device: torch.device, *, train_vae: bool, train_unet: bool,
    resumed: bool,
) -> None:  # fmt: skip
    """Before anything is written: time a micro-batch of each model to be trained, then warn of
    a time budget too short for the steps a stage runs before it plans (loop.BudgetPlan), or,
    without a budget, say how long the configured steps will take (`_time_plan`)."""
    said = _time_plan(cfg, images, device, train_vae=train_vae, train_unet=train_unet,
                      resumed=resumed)  # fmt: skip
    if said is not None:
        log.log(*said)


def _time_plan(
    cfg: RunConfig, images: Tensor, device: torch.device, *, train_vae: bool, train_unet: bool,
    resumed: bool, always: bool = False,
) -> tuple[int, str] | None:  # fmt: skip
    """(log level, message) of the run's time plan: how long the configured steps take here, or
    a warning of a --time-budget too short to plan; a budget long enough says nothing unless
    `always` (the plan a page shows). (Each stage times itself again when it
    starts, for its log line; those probes draw from the seeded global RNG.)"""
    from .loop import PLAN_OVER, PLAN_SKIP

    # throw-away models: the global RNG (seeded above, and drawn by the stages) stays untouched
    stages = []  # (name, config, seconds per optimizer step)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if train_vae:
            t = vae_step_time(cfg, images, device) * cfg.vae_train.grad_accum
            stages.append(("autoencoder", cfg.vae_train, t))
        if train_unet:
            t = unet_step_time(cfg, len(images), device) * cfg.unet_train.grad_accum
            stages.append(("diffusion", cfg.unet_train, t))
    if not stages:
        return None
    speeds = ", ".join(f"{name} ~{t:.2f} s/step" for name, _, t in stages)
    if cfg.time_budget is None:
        return logging.INFO, (
            f"no --time-budget: this training will take {'up to ' if resumed else 'about '}"
            f"{format_seconds(sum(tc.steps * t for _, tc, t in stages))} "
            f"({', '.join(f'{name} {tc.steps} steps' for name, tc, _ in stages)} at {speeds}, "
            "measured now; plus previews and checkpoints); pass --time-budget to bound it"
        )
    first = PLAN_SKIP + PLAN_OVER  # steps a stage runs before its time plan
    split = cfg.budget_split if train_vae else 0.0
    need = max(  # the shortest budget that gives every stage its first steps
        first * t / split if name == "autoencoder" else (first * t + FINAL_GRID_S) / (1 - split)
        for name, _, t in stages
    )
    if parse_duration(cfg.time_budget) < need:
        # a warning, not a refusal: one timed step on a machine that is busy at that moment can
        # be 10-30x slower than training runs (seen here), and a stage that cannot plan still
        # stops at its deadline with a checkpoint
        return logging.WARNING, (
            f"--time-budget {cfg.time_budget} is too short for this run on this machine: each "
            f"stage runs {first} steps before it can plan ({speeds}, measured now), so the "
            f"budget must be at least {format_seconds(need)}; the stages will stop at their "
            "deadlines before their learning rates decay. Give a longer --time-budget, or drop "
            "it to train the configured steps"
        )
    if not always:
        return None
    budget, shares = parse_duration(cfg.time_budget), {"autoencoder": split, "diffusion": 1 - split}
    fits = ", ".join(f"~{int(shares[name] * budget / t)} {name} steps" for name, _, t in stages)
    return logging.INFO, (
        f"--time-budget {cfg.time_budget}: {fits} at these speeds ({speeds}, measured now; "
        "each stage plans its steps again as it trains, and the autoencoder may end early on "
        "quality)"
    )


def plan_run(cfg: RunConfig, folder: RunFolder, size: SizeChoice | None = None) -> list[str]:
    """The plan a new training of `cfg` into `folder` logs before it starts, as lines: the
    data, the image size and why, the models, the conditioning and the time (each model's step
    timed here). Nothing is written; the checks `_prepare` makes before it writes are made."""
    from ..runtime import resolve_device

    folder.require_new()
    device = resolve_device(cfg.device)
    cfg = _check_bf16(cfg, device)
    clips = 0
    if cfg.video is not None or _is_video_data(cfg.data):  # a video run: its clips' frames
        cfg, ds, clips = _video_data(cfg)
    else:
        ds = read_data(cfg.data, image_size=cfg.image_size, channels=cfg.channels, seed=cfg.seed,
                       conditioning=cfg.conditioning)  # fmt: skip
    mode = _conditioning(cfg, ds)
    if clips:
        _clip_motion(cfg, ds, mode)  # its refusals, as a training makes them
    num_classes = len(ds.class_names) if mode == "class" else None
    if cfg.init_from:
        cfg = _from_base(cfg, num_classes, mode)
    cfg = resolve_config(cfg, ds.channels, num_classes, text=mode == "text")
    what = {"class": f"class-conditional on {num_classes} classes "
                     f"({', '.join(ds.class_names[:10])})" if num_classes else "",
            "text": "text prompts (the data's captions)", "none": "none (unconditional)"}[mode]  # fmt: skip
    lines = [f"data: {ds.name}, {len(ds.images)} images", *plan_lines(cfg, size)]
    if clips and cfg.video is not None:  # the time below is the image UNet's: a lower bound
        lines[0] = f"data: {ds.name}, {clips} clips of {cfg.video.frames} frames"
        lines.append(f"video: a video UNet on clips of {cfg.video.frames} frames at "
                     f"{cfg.video.fps:g} fps{', grown from ' + cfg.init_from if cfg.init_from else ''}"
                     "; the time below is timed on single frames (a lower bound)")  # fmt: skip
    if size is not None and size.reduced:
        lines.append(f"image size: {size.note}")
    lines.append(f"conditioning: {what}")
    said = _time_plan(cfg, ds.images, device, train_vae=True, train_unet=True, resumed=False,
                      always=True)  # fmt: skip
    if said is not None:
        lines.append(("warning: " if said[0] >= logging.WARNING else "time: ") + said[1])
    return lines


def _check_bf16(cfg: RunConfig, device: torch.device) -> RunConfig:
    """Settle each stage's bf16 setting for this device: auto (None) means bf16 on a CUDA GPU
    that runs it, else fp32; an explicit bf16 is turned off, with a warning, where it would be
    far slower (a CPU without native bf16) or is not supported (an older GPU)."""
    from ..runtime import cpu_has_fast_bf16

    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        why = "this GPU does not run bf16 (Ampere or later does); training in fp32"
    else:
        supported = device.type == "cpu" and cpu_has_fast_bf16()
        why = ("this CPU has no native bf16 (avx512_bf16 or AMX), where bf16 runs about 15x "
               "slower than fp32; training in fp32 instead")  # fmt: skip
    wants = [name for name in ("vae_train", "unet_train") if getattr(cfg, name).bf16]
    if wants and not supported:
        log.warning("%s.bf16: %s", "/".join(wants), why)
    auto = device.type == "cuda" and supported

    def settle(tc: TrainConfig) -> TrainConfig:
        return dataclasses.replace(
            tc, bf16=bool(auto if tc.bf16 is None else tc.bf16) and supported
        )

    return dataclasses.replace(
        cfg, vae_train=settle(cfg.vae_train), unet_train=settle(cfg.unet_train)
    )


def _cuda_speedups(device: torch.device) -> None:
    """TF32 matmuls and convolutions, and cuDNN's autotuner, on a CUDA device (training only:
    evaluation keeps full fp32, evaluation/metrics.py)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
