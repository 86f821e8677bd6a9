"""Training a video UNet on latent clips: the image autoencoder per frame, the image diffusion loss.

Video LDM's recipe (Blattmann et al. 2023): the autoencoder is the image run's, applied to every
frame (`encode_clip_moments`: (N, F, C, H, W) -> (N*F, C, H, W) -> encode -> (N, F, 2zc, h, w)),
and the video UNet (`models.video.VideoUNet`) is trained with the same objective as the image
UNet (`diffusion.losses.training_loss`, its per-sample MSE taken over all frames of a clip).
One clip is one sample: it draws one t, its posterior noise and eps from its own generator
(`step.MicroBatch`), so a seeded run is reproducible as an image run is. The clip's frames share
its t and its condition (class label or caption).

`video_diffusion_stage` is a `Stage` for the shared loop (`loop.train_stage`: checkpoints, EMA,
LR plan, time budget); `train_video_unet` runs it into a run folder. With `freeze_spatial` in the
model's config only the temporal layers train ("inflating" an image run with its spatial layers
kept). Not yet wired to `ldmkit train` (issue 30's later steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import ConfigError
from ..diffusion.losses import training_loss
from ..models.conditioning import ClassConditioner, TextConditioner
from ..models.distributions import DiagonalGaussian
from ..models.vae import Autoencoder
from ..models.video import VideoUNet, mix_frame_noise
from ..recipe import DiffusionConfig, TrainConfig
from ..runs import RunFolder
from .loop import QualityGate, StageResult, train_stage
from .stages import Wrap, _layout, _unwrapped, autocast, encode_moments, prepare_model, split_model
from .step import MicroBatch, Stage

STAGE = "video"  # names the stage's checkpoints and log rows

# The settings a video run starts from, as measured on moving shapes (bench/video_shapes.py,
# docs/performance.md "Video: does the video UNet learn motion?"). From scratch a run is
# `layout="stacked"` (one 2-D UNet on a clip's frames as channels): of everything tried, the
# only model whose clips kept their background and moved in the asked direction above chance
# within 10 CPU-minutes (0.375 against 1/8), at the image recipe's batch, widths and LR and
# without the mixed noise prior. Growing an image run keeps the temporal layout (the only one
# that can start as the image model), with the settings that kept its frames most consistent
# (the spatial layers frozen, mixed noise); none of the temporal variants learned motion in
# 8-10 CPU-minutes. "model" are VideoUNetConfig fields of the temporal layout; "lr" the base LR
# when inflating (the temporal layers at lr * temporal_lr_mult) and from scratch; the
# `scratch_*` keys replace the model's and the batch from scratch; `inflate_freeze_spatial`
# whether inflating freezes the image UNet; the rest TrainConfig / DiffusionConfig / sampling
# settings. Plain JSON types.
VIDEO_RECIPE: dict = {
    "model": {
        # the lowest level only (4x4 on 16x16 latents) and the middle: a step of 4 clips x 8
        # frames cost 0.28 s against 0.72 s with the 8x8 level too (frozen image UNet)
        "temporal_levels": [2],
        "temporal_mid": True,
        "temporal_heads": 4,
        # (motion, frame) embedding in the time embedding: tried with unfrozen inflation and
        # from scratch, no better in 8 minutes; off by default
        "frame_embedding": False,
        "temporal_lr_mult": 10.0,
        "noise_mixing": 3.0,  # frames share 90 % of their noise variance: fewer colour jumps
    },
    "inflate_freeze_spatial": True,
    "lr": {"inflate": 1e-4, "scratch": 1e-3},
    "scratch_temporal_lr_mult": 1.0,
    # video.frame_channels (per-frame layers after the stacked UNet) stays 0: at 32 in 30
    # minutes it drew the asked shape (0.545 of frames read right, against 0.245) but lost the
    # direction (0.17 against 0.92) at 2.2x the time a step (docs/performance.md, session 16)
    "scratch_layout": "stacked",
    "scratch_noise_mixing": 0.0,  # 3 (the temporal layout's) was no better for stacked: 0.09
    "scratch_batch_size": 32,  # clips per step from scratch: 8 gave 0.09-0.16 in 10 minutes
    "batch_size": 8,  # clips per step when inflating
    "warmup_steps": 50,
    "ema_decay": 0.995,
    # what the video rows of docs/performance.md were measured with; the image recipe moved on
    # (wsd, a thinner UNet: issue 25) without a video measurement
    "lr_schedule": "cosine",
    "scratch_unet_channels": [32, 64, 64],  # the image UNet's; (48, 96, 96): 747 steps, 0.125
    "class_dropout": 0.1,
    "guidance_scale": 2.0,
    "frames": 8,
}


def recipe_settings(spec: str, *, inflate: bool, levels: int, conditioning: str = "auto") -> dict:
    """VIDEO_RECIPE as a layer of run settings (RunConfig's dict form) for a new video run on
    the data `spec`, laid under the user's own (api.checks.run_config: theirs win): the model's
    temporal settings and the clips' frames (`video.*`), the base LR (`inflate`: growing an image
    run, whose spatial layers the recipe freezes; else from scratch, where the temporal layers
    take `scratch_temporal_lr_mult`), the batch of clips, warm-up and EMA (`unet_train.*`), the
    class dropout (`diffusion.*`) and the guidance scale. The recipe's temporal levels are
    counted for a 3-level UNet; a UNet of `levels` levels gets its deepest instead of one it
    lacks. On moving shapes, whose captions name each clip's direction, a class-conditional run
    is also conditioned on the direction (`video.motion_classes`: the 8 directions)."""
    from ..data.moving_shapes import DIRECTION_NAMES

    r, unet = VIDEO_RECIPE, None
    video = dict(r["model"], frames=r["frames"])
    if video.get("temporal_levels") is not None:
        video["temporal_levels"] = sorted({min(i, levels - 1) for i in video["temporal_levels"]})
    if inflate:
        video["freeze_spatial"] = r["inflate_freeze_spatial"]
    else:
        video["temporal_lr_mult"] = r["scratch_temporal_lr_mult"]
        video["layout"] = r["scratch_layout"]
        video["noise_mixing"] = r["scratch_noise_mixing"]
        if levels == len(r["scratch_unet_channels"]):
            unet = {"block_out_channels": r["scratch_unet_channels"]}
    if spec.split("?")[0] == "builtin:moving-shapes" and conditioning in ("auto", "class"):
        video["motion_classes"] = len(DIRECTION_NAMES)
    return {
        "video": video,
        **({"unet": unet} if unet else {}),
        "unet_train": {
            "lr": r["lr"]["inflate" if inflate else "scratch"],
            "batch_size": r["batch_size" if inflate else "scratch_batch_size"],
            "warmup_steps": r["warmup_steps"], "ema_decay": r["ema_decay"],
            "lr_schedule": r["lr_schedule"],
        },
        "diffusion": {"class_dropout": r["class_dropout"]},
        "guidance_scale": r["guidance_scale"],
    }  # fmt: skip


@torch.no_grad()
def encode_clip_moments(
    vae: Autoencoder, videos: Tensor, device: torch.device, batch: int = 256
) -> Tensor:
    """Posterior moments (N, F, 2*zc, h, w) of uint8 clips (N, F, C, H, W), frame by frame."""
    if videos.ndim != 5:
        raise ValueError(f"videos must be (N, F, C, H, W), got {tuple(videos.shape)}")
    n, f = videos.shape[:2]
    moments = encode_moments(vae, videos.reshape(n * f, *videos.shape[2:]), device, batch)
    return moments.view(n, f, *moments.shape[1:])


def _param_groups(model: torch.nn.Module, video: VideoUNet, lr: float) -> list[dict]:
    """The trainable parameters in two optimiser groups: the temporal layers at lr *
    temporal_lr_mult, the rest at lr (`base_lr` is what the loop's LR plan scales)."""
    temporal = {id(p) for p in video.temporal_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    fast = [p for p in params if id(p) in temporal]
    rest = [p for p in params if id(p) not in temporal]
    mult = video.config.temporal_lr_mult
    groups = [{"params": fast, "lr": lr * mult, "base_lr": lr * mult}]
    if rest:
        groups.append({"params": rest, "lr": lr, "base_lr": lr})
    return [g for g in groups if g["params"]]


def video_diffusion_stage(
    model: torch.nn.Module,
    moments: Tensor,
    conditioner: ClassConditioner | TextConditioner,
    cond_data: Tensor | None,
    scaling_factor: float,
    diff: DiffusionConfig,
    cfg: TrainConfig,
    device: torch.device,
    wrap: Wrap = _unwrapped,
) -> Stage:
    """The video stage: `model` is a `VideoUNet` (or a `TextUNet` around one), `moments` the
    clips' posterior moments (N, F, 2*zc, h, w), `cond_data` their labels (N,) or caption ids
    (N, L). With the VideoUNet's `freeze_spatial`, its image UNet gets no gradients."""
    schedule = diff.make_schedule()
    video, _ = split_model(model)
    if not isinstance(video, VideoUNet):
        raise TypeError(f"the video stage trains a VideoUNet, got {type(video).__name__}")
    if moments.ndim != 5:
        raise ValueError(f"moments must be (N, F, 2*zc, h, w), got {tuple(moments.shape)}")
    if video.config.freeze_spatial:
        if not video.unet.conv_out.weight.any():
            # the image UNet's output layer starts at zero: frozen, nothing upstream learns
            raise ConfigError(
                "freeze_spatial needs a trained image UNet (inflate an image run with "
                "VideoUNet.from_image_unet); a fresh one would keep the temporal layers at zero"
            )
        video.unet.requires_grad_(False)
    prepare_model(video, cfg, device)
    opt = torch.optim.AdamW(
        _param_groups(model, video, cfg.lr), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    alpha = video.config.noise_mixing
    net = wrap(model)
    forward = torch.compile(net) if cfg.compile else net
    frames, zc2, h, w = moments.shape[1:]

    def network(x_t: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        with autocast(device, cfg.bf16):
            b, f = x_t.shape[:2]
            x = _layout(x_t.reshape(b * f, *x_t.shape[2:]), device).view_as(x_t)
            return forward(x, t, **cond)

    def loss(mb: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        # per clip, from its own generator: posterior noise, t, eps, condition dropout
        post = DiagonalGaussian.from_moments(moments[mb.indices].reshape(-1, zc2, h, w))
        noise = mb.randn(frames, zc2 // 2, h, w).reshape(post.shape)
        z0 = (post.sample(noise=noise) * scaling_factor).view(len(mb), frames, zc2 // 2, h, w)
        t = mb.timesteps(schedule.num_timesteps, diff.timestep_sampling)
        eps = mb.randn(*z0.shape[1:])
        if alpha:  # the mixed prior: a share common to the clip's frames, from its generator
            eps = mix_frame_noise(eps, alpha, shared=mb.randn(1, *z0.shape[2:]))
        y = cond_data[mb.indices] if cond_data is not None else None
        cond = mb.per_sample(
            lambda rows, g: conditioner.training_kwargs(None if y is None else y[rows], g, device)
        )
        value = training_loss(
            network, schedule, z0.to(device), prediction_type=video.config.unet.prediction_type,
            weighting=diff.loss_weighting, gamma=diff.min_snr_gamma, t=t, eps=eps, cond=cond,
        )  # fmt: skip
        return value, {}

    return Stage(STAGE, model, opt, loss, wrapped=net)


def train_video_unet(
    model: torch.nn.Module,
    moments: Tensor,
    folder: RunFolder,
    *,
    diff: DiffusionConfig,
    cfg: TrainConfig,
    scaling_factor: float,
    conditioner: ClassConditioner | TextConditioner | None = None,
    cond_data: Tensor | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    time_budget_s: float | None = None,
    gate: QualityGate | None = None,
) -> StageResult:
    """Train `model` (a VideoUNet) on the clips' moments with the shared loop, checkpoints in
    `folder`; returns the loop's `StageResult` (its `ema` holds the EMA model when enabled)."""
    device = torch.device(device)
    model.to(device).train()
    if conditioner is None:
        conditioner = ClassConditioner(None)
    stage = video_diffusion_stage(
        model, moments, conditioner, cond_data, scaling_factor, diff, cfg, device
    )
    return train_stage(
        stage,
        cfg,
        folder=folder,
        num_items=len(moments),
        seed=seed,
        time_budget_s=time_budget_s,
        gate=gate,
    )
