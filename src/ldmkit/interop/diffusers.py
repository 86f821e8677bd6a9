"""Read diffusers folders into ldmkit models and runs, and write ldmkit runs as diffusers folders.

Everything here works on local folders and reads weights with safetensors only: diffusers itself
is never imported, so converting needs no diffusers install (the tests use diffusers as the
independent reference). Parameter names and config keys are translated by one table per model:
`ldmkit.interop.unet_names` (UNet2DModel / UNet2DConditionModel) and
`ldmkit.interop.vae_names` (AutoencoderKL).

Layouts read (`load_*` take either the component folder or a pipeline folder holding it):

    pipeline/                model_index.json, vae/, unet/, scheduler/
    component/               config.json + diffusion_pytorch_model.safetensors (or a sharded
                             diffusion_pytorch_model.safetensors.index.json)
    scheduler/               scheduler_config.json

Layout written by `export_to_diffusers` (a DDIMPipeline folder plus the autoencoder):

    model_index.json         DDIMPipeline (DDPMPipeline for the sigmoid schedule): unet + scheduler
    unet/                    config.json, diffusion_pytorch_model.safetensors,
                             ldmkit_extra.safetensors (ldmkit-only tensors: the null context)
    vae/                     config.json (AutoencoderKL, with scaling_factor),
                             diffusion_pytorch_model.safetensors
    scheduler/               scheduler_config.json (DDIMScheduler; DDPMScheduler for sigmoid)

Every exported config.json carries the full ldmkit config under the private key "_ldmkit"
(diffusers ignores keys starting with "_"), so ldmkit -> diffusers -> ldmkit restores equal
configs and, with ldmkit_extra.safetensors, bit-identical tensors. docs/interop.md has the
details and the list of what is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit.checkpoint import (
    CheckpointError,
    load_state_dict_strict,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from ldmkit.config import ConfigError, from_dict, to_dict
from ldmkit.diffusion.process import PredictionType
from ldmkit.diffusion.schedules import NoiseSchedule, ScheduleName, schedule_from_fields
from ldmkit.interop import unet_names, vae_names
from ldmkit.models.unet import UNet, UNetConfig
from ldmkit.models.vae import Autoencoder, AutoencoderConfig
from ldmkit.recipe import DiffusionConfig, RunConfig
from ldmkit.runs import DataInfo, RunFolder

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
MODEL_INDEX_NAME = "model_index.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
EXTRA_NAME = "ldmkit_extra.safetensors"  # ldmkit-only tensors beside the diffusers weights
LDMKIT_KEY = "_ldmkit"  # private config.json key holding the full ldmkit config
# Written into exported configs when diffusers is not installed: the oldest version whose
# from_pretrained the layout was checked with (pyproject's dev extra asks for >= 0.30).
FALLBACK_DIFFUSERS_VERSION = "0.30.0"


class InteropError(ValueError):
    """A diffusers folder cannot be read into ldmkit, or an ldmkit run cannot be written out."""


# ----------------------------------------------------------------------------------------------
# Schedules: ldmkit name <-> diffusers beta_schedule, and the prediction types

# ldmkit schedule -> (diffusers beta_schedule, ldmkit's beta_start, beta_end). The cosine
# schedule takes no betas in either library; the diffusers defaults are written for it.
_SCHEDULES: dict[str, tuple[str, float, float]] = {
    "linear": ("linear", 1e-4, 0.02),
    "scaled_linear": ("scaled_linear", 0.00085, 0.012),
    "cosine": ("squaredcos_cap_v2", 1e-4, 0.02),  # Nichol & Dhariwal 2021, max_beta 0.999
    "sigmoid": ("sigmoid", 1e-4, 0.02),
}
_PREDICTIONS: dict[str, str] = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}

# Schedulers whose config describes the same discrete VP beta schedule (num_train_timesteps,
# beta_schedule, ...); their remaining options only steer their own sampling loops.
_VP_SCHEDULERS = {
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
}
# Sampling options that make diffusers' loop differ from ldmkit's samplers when set: named in a
# warning on import (ldmkit never clips or thresholds x0, and starts DDIM at t = T - 1).
_SAMPLING_DIFFERENCES = {"clip_sample": False, "thresholding": False}
# Scheduler keys that fix the betas or the model's output; all others are sampling options.
_SCHEDULE_KEYS = {
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
    "timestep_type",
}


@dataclass(frozen=True)
class SchedulerSpec:
    """What ldmkit takes from a diffusers scheduler config.

    `schedule`, `num_timesteps`, `beta_start`, `beta_end` and `zero_terminal_snr` fix the betas
    (`make_schedule()` rebuilds them); `prediction_type` says what the UNet predicts.
    `sampling_options` holds the scheduler's other options (clip_sample, timestep_spacing,
    solver settings, ...), which only steer diffusers' own sampling loop and have no effect on
    ldmkit's samplers.
    """

    schedule: ScheduleName
    num_timesteps: int
    zero_terminal_snr: bool
    prediction_type: PredictionType
    beta_start: float | None = None  # None: ldmkit's default for the schedule
    beta_end: float | None = None
    scheduler_class: str = "DDPMScheduler"
    sampling_options: dict[str, Any] = field(default_factory=dict)

    def make_schedule(self) -> NoiseSchedule:
        return schedule_from_fields(self)


def load_diffusers_scheduler(directory: str | Path) -> SchedulerSpec:
    """Map a diffusers scheduler config (DDPM, DDIM and the other VP schedulers) onto ldmkit's.

    Args:
        directory: a scheduler folder (scheduler_config.json), a pipeline folder with
            scheduler/, or the path of the JSON file itself.
    Raises InteropError naming any option that changes the betas or the model in a way ldmkit
    cannot express (trained_betas, another beta_schedule, learned variances, ...).
    """
    path = _scheduler_config_path(Path(directory))
    cfg = read_json(path)
    cls_name = cfg.get("_class_name", "DDPMScheduler")
    try:
        _check_vp_scheduler(cls_name)
        schedule = _schedule_name(cfg)
        prediction_type = _prediction_type(cfg)
        _check_model_options(cfg)
    except ConfigError as e:
        raise InteropError(f"{path}: {e}") from None
    beta_start, beta_end = _beta_range(cfg, schedule)
    return SchedulerSpec(
        schedule=schedule,
        num_timesteps=int(cfg.get("num_train_timesteps", 1000)),
        zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
        prediction_type=prediction_type,
        beta_start=beta_start,
        beta_end=beta_end,
        scheduler_class=cls_name,
        sampling_options=_sampling_options(cfg, path),
    )


def _check_vp_scheduler(cls_name: str) -> None:
    if cls_name not in _VP_SCHEDULERS:
        raise ConfigError(
            f"scheduler class {cls_name!r} is not supported; ldmkit reads the discrete VP beta "
            f"schedules of {', '.join(sorted(_VP_SCHEDULERS))}"
        )


def _schedule_name(cfg: dict[str, Any]) -> ScheduleName:
    """ldmkit's name of the scheduler's beta_schedule."""
    if cfg.get("trained_betas") is not None:
        raise ConfigError(
            "trained_betas (an explicit beta list) is not supported; use a named beta_schedule"
        )
    beta_schedule = cfg.get("beta_schedule", "linear")
    names = {theirs: ours for ours, (theirs, _, _) in _SCHEDULES.items()}
    if beta_schedule not in names:
        raise ConfigError(
            f"beta_schedule={beta_schedule!r} is not supported; ldmkit has "
            f"{', '.join(sorted(names))}"
        )
    return names[beta_schedule]


def _prediction_type(cfg: dict[str, Any]) -> PredictionType:
    prediction = cfg.get("prediction_type", "epsilon")
    ours = {theirs: mine for mine, theirs in _PREDICTIONS.items()}
    if prediction not in ours:
        raise ConfigError(
            f"prediction_type={prediction!r} is not supported; ldmkit has {', '.join(sorted(ours))}"
        )
    return ours[prediction]


def _check_model_options(cfg: dict[str, Any]) -> None:
    """Refuse options that change what the UNet outputs or which t it takes."""
    variance = cfg.get("variance_type")
    if variance is not None and str(variance).startswith("learned"):
        raise ConfigError(
            f"variance_type={variance!r} (a UNet that predicts its variance) is not supported; "
            "ldmkit UNets predict eps, x0 or v only"
        )
    timestep_type = cfg.get("timestep_type", "discrete")
    if timestep_type != "discrete":
        raise ConfigError(
            f"timestep_type={timestep_type!r} is not supported; ldmkit UNets take discrete t"
        )


def _beta_range(cfg: dict[str, Any], schedule: ScheduleName) -> tuple[float | None, float | None]:
    """(beta_start, beta_end) where they differ from ldmkit's defaults for `schedule`, else None."""
    if schedule == "cosine":  # diffusers ignores both for squaredcos_cap_v2
        return None, None
    _, default_start, default_end = _SCHEDULES[schedule]
    start, end = cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02)
    beta_start = None if math.isclose(start, default_start, rel_tol=1e-9) else float(start)
    beta_end = None if math.isclose(end, default_end, rel_tol=1e-9) else float(end)
    return beta_start, beta_end


def _sampling_options(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """The options that only steer diffusers' sampling loop; warns about those ldmkit lacks."""
    sampling = {k: v for k, v in cfg.items() if k not in _SCHEDULE_KEYS and not k.startswith("_")}
    differs = [k for k, v in _SAMPLING_DIFFERENCES.items() if sampling.get(k, v) != v]
    if differs:
        logger.warning(
            "%s: %s only affect diffusers' sampling loop; ldmkit's samplers do not apply them",
            path,
            ", ".join(f"{k}={sampling[k]!r}" for k in differs),
        )
    return sampling


def diffusers_scheduler_config(
    schedule: ScheduleName,
    num_timesteps: int,
    *,
    zero_terminal_snr: bool = False,
    prediction_type: PredictionType = "eps",
) -> dict[str, Any]:
    """Scheduler config equal to ldmkit's schedule and its samplers' defaults.

    A DDIMScheduler (ldmkit's `sampler="ddim"` defaults: timestep_spacing "trailing", i.e. start
    at t = T - 1, and set_alpha_to_one, i.e. end at alpha_bar = 1), except for the sigmoid
    schedule, which only diffusers' DDPMScheduler implements (ldmkit's `sampler="ddpm"`
    defaults: "leading" spacing, beta-tilde variance). clip_sample is off in both because
    ldmkit never clips x0.
    """
    if schedule not in _SCHEDULES:
        raise InteropError(f"schedule {schedule!r} has no diffusers counterpart")
    beta_schedule, beta_start, beta_end = _SCHEDULES[schedule]
    config: dict[str, Any] = {
        "_class_name": "DDPMScheduler" if schedule == "sigmoid" else "DDIMScheduler",
        "_diffusers_version": _diffusers_version(),
        "num_train_timesteps": num_timesteps,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "beta_schedule": beta_schedule,
        "trained_betas": None,
        "clip_sample": False,
        "prediction_type": _PREDICTIONS[prediction_type],
        "thresholding": False,
        "steps_offset": 0,
        "rescale_betas_zero_snr": zero_terminal_snr,
    }
    if schedule == "sigmoid":
        config.update(variance_type="fixed_small", timestep_spacing="leading")
    else:
        config.update(set_alpha_to_one=True, timestep_spacing="trailing")
    return config


# ----------------------------------------------------------------------------------------------
# Models


def load_diffusers_vae(directory: str | Path) -> Autoencoder:
    """An ldmkit Autoencoder (eval mode, float32, CPU) from a diffusers AutoencoderKL folder.

    `directory` is the vae folder itself or a pipeline folder with vae/.
    """
    folder = _component_dir(Path(directory), "vae", ("AutoencoderKL",))
    cfg = read_json(folder / CONFIG_NAME)
    try:
        config = vae_names.vae_config_from_diffusers(cfg)
    except ConfigError as e:
        raise InteropError(f"{folder / CONFIG_NAME}: {e}") from None
    config = _ldmkit_config(folder, cfg, AutoencoderConfig, config, vae_names.diffusers_vae_config)
    model = Autoencoder(config)
    state = vae_names.state_dict_from_diffusers(_read_weights(folder))
    _load_strict(model, state, folder)
    logger.info("loaded diffusers AutoencoderKL %s as %s", folder, model.summary())
    return model.eval()


def load_diffusers_unet(
    directory: str | Path,
    *,
    sample_size: int | None = None,
    prediction_type: PredictionType | None = None,
) -> UNet:
    """An ldmkit UNet (eval mode, float32, CPU) from a diffusers UNet2DModel or
    UNet2DConditionModel folder (the unet folder itself or a pipeline folder with unet/).

    Args:
        sample_size: side length to use when config.json has none.
        prediction_type: "eps", "x0" or "v"; None takes it from the pipeline's scheduler/ when
            there is one, else from an ldmkit export's "_ldmkit" config, else "eps".
    A class embedding of K rows gets K labels plus a zero null row, and a cross-attention UNet a
    zero null context, unless the folder is an ldmkit export (see docs/interop.md).
    """
    directory = Path(directory)
    folder = _component_dir(directory, "unet", ("UNet2DModel", "UNet2DConditionModel"))
    cfg = read_json(folder / CONFIG_NAME)
    if prediction_type is None and folder != directory and _has_scheduler(directory):
        prediction_type = load_diffusers_scheduler(directory).prediction_type
    try:
        config = unet_names.unet_config_from_diffusers(
            cfg, sample_size=sample_size, prediction_type=prediction_type or "eps"
        )
    except ConfigError as e:
        raise InteropError(f"{folder / CONFIG_NAME}: {e}") from None
    config = _ldmkit_config(folder, cfg, UNetConfig, config, unet_names.diffusers_unet_config)
    if prediction_type is not None and config.prediction_type != prediction_type:
        config = dataclasses.replace(config, prediction_type=prediction_type)

    model = UNet(config)
    state = _read_weights(folder)
    key = "class_embedding.weight"
    if config.num_classes and key in state and state[key].shape[0] == config.num_classes:
        # diffusers has no "no label" row; ldmkit's null label starts as the zero embedding.
        state[key] = torch.cat([state[key], state[key].new_zeros(1, state[key].shape[1])])
    try:
        unet_names.load_diffusers_unet_state_dict(model, state)
    except CheckpointError as e:
        raise InteropError(f"{folder / WEIGHTS_NAME}: {e}") from None
    extra = _read_extra(folder)
    with torch.no_grad():
        if model.null_context is not None:
            # The learned null context has no diffusers counterpart: restore an ldmkit export's,
            # else start from zeros (attending to one zero token adds only to_out's bias).
            null = extra.pop("null_context", None)
            if null is not None and null.shape != model.null_context.shape:
                raise InteropError(
                    f"{folder / EXTRA_NAME}: null_context has shape {tuple(null.shape)}, the "
                    f"config gives {tuple(model.null_context.shape)}; the file is from another model"
                )
            model.null_context.copy_(null if null is not None else torch.zeros(1))
    if extra:
        raise InteropError(
            f"{folder / EXTRA_NAME}: unexpected tensors {sorted(extra)}; the file is from "
            "another model or another ldmkit version"
        )
    logger.info("loaded diffusers %s %s as %s", cfg.get("_class_name"), folder, model.summary())
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Whole runs


def convert_from_diffusers(
    src_dir: str | Path,
    out_run_dir: str | Path,
    *,
    vae_dir: str | Path | None = None,
    scheduler_dir: str | Path | None = None,
) -> Path:
    """Write an ldmkit run folder (`ldmkit.runs.RunFolder`) from diffusers folders.

    Args:
        src_dir: a pipeline folder with unet/, vae/ and scheduler/ (model_index.json), or a lone
            UNet folder; then `vae_dir` and `scheduler_dir` must name the other two.
        vae_dir, scheduler_dir: override or supply the autoencoder / scheduler folder.
    A pixel-space model (a UNet without an autoencoder) cannot become a run, because
    `LatentDiffusion` always decodes through an autoencoder: load it with `load_diffusers_unet`
    and sample it with `ldmkit.diffusion.samplers.sample`. Nothing is written unless every part
    loads. Returns the run folder.
    """
    src, run = Path(src_dir), RunFolder(out_run_dir)
    if run.exists():
        raise InteropError(f"{run.path} already holds a run; choose another output folder")
    _require_empty_folder(run.path)
    vae_src, scheduler_src = _run_sources(src, vae_dir, scheduler_dir)
    spec = _run_scheduler(scheduler_src)
    vae = load_diffusers_vae(vae_src)
    unet = load_diffusers_unet(src, prediction_type=spec.prediction_type)
    cfg = _run_config(src, vae.config, unet.config, spec)

    run.save_vae(vae)
    run.save_unet(unet)
    run.write_data_info(
        DataInfo(
            spec=cfg.data,
            name="diffusers",
            num_images=0,
            channels=cfg.channels,
            image_size=cfg.image_size,
        )
    )
    run.write_config(cfg)  # last: its presence marks a complete run
    logger.info("converted %s into the ldmkit run %s", src, run.path)
    return run.path


def _run_sources(
    src: Path, vae_dir: str | Path | None, scheduler_dir: str | Path | None
) -> tuple[Path, Path]:
    """The folders to read the autoencoder and the scheduler from; refuses incomplete sources."""
    _check_pipeline_components(src)
    if vae_dir is None and not _is_component(src / "vae"):
        raise InteropError(
            f"{src} has no vae/ folder: ldmkit runs are latent diffusion models and need an "
            "AutoencoderKL; pass vae_dir (--vae), or load a pixel-space UNet alone with "
            "ldmkit.interop.load_diffusers_unet"
        )
    if scheduler_dir is None and not _has_scheduler(src):
        raise InteropError(
            f"{src} has no scheduler config (scheduler/scheduler_config.json); pass "
            "scheduler_dir (--scheduler) with the scheduler the UNet was trained with"
        )
    vae_src = Path(vae_dir) if vae_dir is not None else src
    scheduler_src = Path(scheduler_dir) if scheduler_dir is not None else src
    return vae_src, scheduler_src


def _run_scheduler(scheduler_src: Path) -> SchedulerSpec:
    """The scheduler of a run to be converted; refuses beta ranges that are not carried over."""
    spec = load_diffusers_scheduler(scheduler_src)
    if spec.beta_start is not None or spec.beta_end is not None:
        raise InteropError(
            f"{scheduler_src}: beta_start/beta_end {spec.beta_start}/{spec.beta_end} differ from "
            f"ldmkit's {spec.schedule} defaults, and converting does not carry other beta "
            "ranges into a run yet; load the parts with load_diffusers_unet / "
            "load_diffusers_scheduler instead"
        )
    return spec


def _run_config(
    src: Path, vcfg: AutoencoderConfig, ucfg: UNetConfig, spec: SchedulerSpec
) -> RunConfig:
    """The RunConfig of a converted run; refuses a UNet that does not map latents to latents."""
    if ucfg.in_channels != vcfg.latent_channels or ucfg.out_channels != ucfg.in_channels:
        raise InteropError(
            f"the UNet maps {ucfg.in_channels} to {ucfg.out_channels} channels but the "
            f"autoencoder makes {vcfg.latent_channels}-channel latents; ldmkit runs need a UNet "
            "from latents to latents (inpainting or image-conditioned UNets are not supported)"
        )
    image_size = ucfg.sample_size * vcfg.downsample_factor
    if image_size != vcfg.image_size:
        logger.warning(
            "the UNet's sample_size %d times the autoencoder's factor %d is %d, but the "
            "autoencoder's sample_size is %d; the run samples %dx%d images",
            ucfg.sample_size,
            vcfg.downsample_factor,
            image_size,
            vcfg.image_size,
            image_size,
            image_size,
        )
    return RunConfig(
        data=f"diffusers:{src.resolve()}",
        image_size=image_size,
        channels=vcfg.image_channels,
        conditioning="class" if ucfg.num_classes else "none",
        vae=vcfg,
        unet=ucfg,
        diffusion=DiffusionConfig(
            schedule=spec.schedule,
            num_timesteps=spec.num_timesteps,
            zero_terminal_snr=spec.zero_terminal_snr,
        ),
    )


def export_to_diffusers(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write an ldmkit run as a diffusers folder (see the module docstring for the layout).

    Load it in diffusers with `DiffusionPipeline.from_pretrained(out_dir)` (a DDIMPipeline, or a
    DDPMPipeline for the sigmoid schedule, holding unet + scheduler) and
    `AutoencoderKL.from_pretrained(out_dir, subfolder="vae")`; decode latents / scaling_factor.
    Returns out_dir.
    """
    run, out = RunFolder(run_dir), Path(out_dir)
    _require_empty_folder(out)
    if run.has_text():
        raise InteropError(
            f"{run.path} is text-conditional: its text encoder and tokenizer are ldmkit's own "
            "and have no diffusers equivalent; export works for class-conditional and "
            "unconditional runs"
        )
    diffusion = _exportable_diffusion(run)
    vae, unet = run.load_vae(), run.load_unet()
    try:
        vae_cfg = vae_names.diffusers_vae_config(vae.config)
        unet_cls, unet_cfg = unet_names.diffusers_unet_config(unet.config)
    except ConfigError as e:
        raise InteropError(f"{run.path}: {e}") from None
    version = _diffusers_version()

    vae_state = vae_names.state_dict_to_diffusers(vae.state_dict())
    _write_component(out / "vae", "AutoencoderKL", vae_cfg, vae.config, vae_state, version)
    unet_state = unet.state_dict()
    extra = {k: unet_state[k] for k in unet_names.LDMKIT_ONLY if k in unet_state}
    if extra:
        save_tensors(out / "unet" / EXTRA_NAME, extra, metadata={"format": "pt"})
    their_state = unet_names.state_dict_to_diffusers(unet_state)
    _write_component(out / "unet", unet_cls, unet_cfg, unet.config, their_state, version)
    scheduler = diffusers_scheduler_config(
        diffusion.schedule,
        diffusion.num_timesteps,
        zero_terminal_snr=diffusion.zero_terminal_snr,
        prediction_type=unet.config.prediction_type,
    )
    write_json(out / "scheduler" / SCHEDULER_CONFIG_NAME, scheduler)
    _write_model_index(out, scheduler["_class_name"], unet_cls, version)
    logger.info("exported the ldmkit run %s as the diffusers folder %s", run.path, out)
    return out


def _exportable_diffusion(run: RunFolder) -> DiffusionConfig:
    """The diffusion settings of a finished run; refuses beta ranges (not carried over yet)."""
    try:
        run.require_trained()
        diffusion = run.config().diffusion
    except CheckpointError as e:
        raise InteropError(str(e)) from None
    for name in ("beta_start", "beta_end"):  # refuse rather than drop them
        if getattr(diffusion, name) is not None:
            raise InteropError(f"{run.config_path}: diffusion.{name} cannot be exported yet")
    return diffusion


def _write_component(
    folder: Path,
    class_name: str,
    diffusers_config: dict[str, Any],
    ldmkit_config: Any,
    state: dict[str, Tensor],
    version: str,
) -> None:
    """A diffusers model folder: weights, and config.json with the ldmkit config under LDMKIT_KEY."""
    save_tensors(folder / WEIGHTS_NAME, state, metadata={"format": "pt"})
    write_json(
        folder / CONFIG_NAME,
        {
            "_class_name": class_name,
            "_diffusers_version": version,
            **_jsonable(diffusers_config),
            LDMKIT_KEY: to_dict(ldmkit_config),
        },
    )


def _write_model_index(out: Path, scheduler_cls: str, unet_cls: str, version: str) -> None:
    """model_index.json of a DDIMPipeline (DDPMPipeline with a DDPMScheduler): unet + scheduler."""
    pipeline = "DDPMPipeline" if scheduler_cls == "DDPMScheduler" else "DDIMPipeline"
    write_json(
        out / MODEL_INDEX_NAME,
        {
            "_class_name": pipeline,
            "_diffusers_version": version,
            "scheduler": ["diffusers", scheduler_cls],
            "unet": ["diffusers", unet_cls],
        },
    )


# ----------------------------------------------------------------------------------------------
# Folder and file helpers


def _require_empty_folder(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"{out} exists and is not an empty folder; choose another output folder")


def _is_component(folder: Path) -> bool:
    return (folder / CONFIG_NAME).is_file()


def _has_scheduler(directory: Path) -> bool:
    return (directory / "scheduler" / SCHEDULER_CONFIG_NAME).is_file() or (
        directory / SCHEDULER_CONFIG_NAME
    ).is_file()


def _scheduler_config_path(directory: Path) -> Path:
    if directory.is_file():
        return directory
    for path in (
        directory / SCHEDULER_CONFIG_NAME,
        directory / "scheduler" / SCHEDULER_CONFIG_NAME,
    ):
        if path.is_file():
            return path
    raise InteropError(
        f"{directory} holds no {SCHEDULER_CONFIG_NAME} (nor scheduler/{SCHEDULER_CONFIG_NAME}); "
        "give a diffusers scheduler or pipeline folder"
    )


def _component_dir(directory: Path, subfolder: str, classes: tuple[str, ...]) -> Path:
    """The folder holding the component: `directory` itself or its `subfolder` (pipelines)."""
    if not directory.is_dir():
        raise InteropError(
            f"{directory} is not a folder; give a diffusers {subfolder} or pipeline folder"
        )
    for folder in (directory, directory / subfolder):
        if _is_component(folder):
            cls = read_json(folder / CONFIG_NAME).get("_class_name")
            if cls in classes:
                return folder
            if folder == directory / subfolder or not (directory / subfolder).is_dir():
                raise InteropError(
                    f"{folder / CONFIG_NAME} describes a {cls!r}, not {' or '.join(classes)}; "
                    "this diffusers component is not supported"
                )
    raise InteropError(
        f"{directory} holds no diffusers {subfolder} ({CONFIG_NAME} in it or in {subfolder}/)"
    )


def _check_pipeline_components(src: Path) -> None:
    """Refuse pipelines with parts ldmkit would drop (text encoders, tokenizers, ...)."""
    index = src / MODEL_INDEX_NAME
    if not index.is_file():
        return
    for name, value in read_json(index).items():
        if name.startswith("_") or name in ("vae", "unet", "scheduler"):
            continue
        if isinstance(value, list) and any(v is not None for v in value):
            raise InteropError(
                f"{index}: pipeline component {name!r} ({value[-1]}) has no ldmkit counterpart; "
                "an ldmkit run holds vae, unet and scheduler only (load those parts with "
                "load_diffusers_vae / load_diffusers_unet)"
            )


def _read_weights(folder: Path) -> dict[str, Tensor]:
    """The component's tensors from safetensors (one file or shards); never unpickles."""
    if (folder / WEIGHTS_NAME).is_file():
        return load_tensors(folder / WEIGHTS_NAME)
    if (folder / WEIGHTS_INDEX_NAME).is_file():
        weight_map = read_json(folder / WEIGHTS_INDEX_NAME).get("weight_map", {})
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise InteropError(
                    f"{folder / WEIGHTS_INDEX_NAME}: shard {shard!r} is outside the folder"
                )
            state.update(load_tensors(folder / shard))
        return state
    if (folder / PICKLE_WEIGHTS_NAME).is_file():
        raise InteropError(
            f"{folder / PICKLE_WEIGHTS_NAME} is a pickle file, which ldmkit never loads; re-save "
            "it as safetensors with diffusers (from_pretrained(...).save_pretrained(..., "
            "safe_serialization=True)) and convert that"
        )
    found = sorted(p.name for p in folder.glob("*.safetensors") if p.name != EXTRA_NAME)
    hint = f" (found {', '.join(found)}; rename the one to use)" if found else ""
    raise InteropError(f"{folder} has no {WEIGHTS_NAME}{hint}")


def _read_extra(folder: Path) -> dict[str, Tensor]:
    path = folder / EXTRA_NAME
    return dict(load_tensors(path)) if path.is_file() else {}


def _load_strict(model: torch.nn.Module, state: dict[str, Tensor], folder: Path) -> None:
    try:
        load_state_dict_strict(model, state, str(folder / WEIGHTS_NAME))
    except CheckpointError as e:
        raise InteropError(str(e)) from None


def _ldmkit_config(
    folder: Path,
    cfg: dict[str, Any],
    cls: type[Any],
    from_keys: Any,
    to_diffusers: Callable[[Any], Any],
) -> Any:
    """The config saved under "_ldmkit" by `export_to_diffusers`, if it matches the diffusers keys.

    It restores what diffusers does not record (loss settings, ldmkit's null label and
    prediction_type), so a round trip gives an equal config. It is refused when it disagrees
    with the diffusers keys, e.g. after the config.json was edited by hand.
    """
    saved = cfg.get(LDMKIT_KEY)
    if saved is None:
        return from_keys
    try:
        config = from_dict(cls, saved)
        described = to_diffusers(config)
    except ConfigError as e:
        raise InteropError(
            f"{folder / CONFIG_NAME}: the {LDMKIT_KEY} section is invalid: {e}"
        ) from None
    kwargs = described[1] if isinstance(described, tuple) else described
    for key, value in _jsonable(kwargs).items():
        if key in cfg and cfg[key] != value:
            raise InteropError(
                f"{folder / CONFIG_NAME}: {key}={cfg[key]!r} disagrees with the {LDMKIT_KEY} "
                f"section ({value!r}); delete the {LDMKIT_KEY} section to read the diffusers keys alone"
            )
    return config


def _jsonable(obj: Any) -> Any:
    """Tuples -> lists, as the config reads back from JSON."""
    return json.loads(json.dumps(obj))


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version

        return version("diffusers")
    except Exception:  # diffusers is optional
        return FALLBACK_DIFFUSERS_VERSION
