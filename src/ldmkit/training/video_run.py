"""A video run (issue 30): the story of training/run.py told on clips.

Its images are the clips' frames, so the autoencoder stage, its gate and the latent cache are
the image run's, fed frames (`_video_data` gives `_prepare` the frames as an image data set);
then the video UNet (models/video.py) trains on the clips' latents (training/video.py's stage
in the shared loop, through run_parts' `_train_diffusion`) in place of the UNet stage, and the
run ends with its clips (`_finish_video`: clips.gif, frames.png) in place of the final grid.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..diffusion.samplers import NonFiniteSampleError
from ..models.conditioning import ClassConditioner, TextConditioner
from ..models.vae import Autoencoder
from ..recipe import RunConfig
from ..runs import RunFolder
from .distributed import local_micro_batch
from .run_parts import STOPPED_EARLY, _base_unet, _Run, _text_encoder, _train_diffusion
from .stages import TextUNet, split_model

if TYPE_CHECKING:
    from ..data.dataset import ImageDataset

log = logging.getLogger("ldmkit.training.run")  # the run's story logs under one name


def _is_video_data(spec: str) -> bool:
    from ..data.video import is_video_spec

    return is_video_spec(spec)


def _video_data(cfg: RunConfig) -> tuple[RunConfig, ImageDataset, int]:
    """(the config with its `video` settings, the clips' frames as an image data set (labels
    and captions repeated per frame), the clip count)."""
    import numpy as np

    from ..data.dataset import ImageDataset
    from ..recipe import VideoConfig
    from ..runs import read_video

    if not _is_video_data(cfg.data):
        raise ConfigError(
            f"video.* is set but {cfg.data} is image data; give video data (builtin:moving-shapes, "
            "builtin:moving-mnist or animations:DIR) or drop the video settings"
        )
    if cfg.video is None:
        cfg = dataclasses.replace(cfg, video=VideoConfig())
    if cfg.init_from:  # the image run it grows from decides the size
        cfg = dataclasses.replace(cfg, image_size=RunFolder(cfg.init_from).config().image_size)
    assert cfg.video is not None
    vd = read_video(cfg.data, image_size=cfg.image_size, frames=cfg.video.frames, seed=cfg.seed,
                    conditioning=cfg.conditioning)  # fmt: skip
    n, f = vd.videos.shape[:2]
    if cfg.channels is not None and cfg.channels != vd.videos.shape[2]:
        raise ConfigError(
            f"channels={cfg.channels}, but the clips of {cfg.data} have {vd.videos.shape[2]}; "
            "drop the channels setting"
        )
    frames = torch.from_numpy(np.ascontiguousarray(vd.videos.reshape(n * f, *vd.videos.shape[2:])))
    labels = None if vd.labels is None else torch.from_numpy(np.repeat(vd.labels, f)).long()
    captions = None if vd.captions is None else [c for c in vd.captions for _ in range(f)]
    ds = ImageDataset(frames, labels=labels, captions=captions, class_names=vd.class_names,
                      name=vd.name, spec=cfg.data)  # fmt: skip
    log.info("video data %s: %d clips of %d frames at %d px", vd.name, n, f, cfg.image_size)
    return cfg, ds, n


def _clip_motion(cfg: RunConfig, ds: ImageDataset, mode: str) -> Tensor | None:
    """Each clip's motion class (N,) for a run with `video.motion_classes` (the direction its
    caption names, an index into `data.moving_shapes.DIRECTION_NAMES`; the run's labels become
    c * M + m), else None. Checked before anything is written: the motion classes are the 8
    directions, the run is class-conditional, and every clip's caption names its direction."""
    from ..data.moving_shapes import DIRECTION_NAMES
    from ..evaluation.video import caption_direction

    assert cfg.video is not None
    m = cfg.video.motion_classes
    if not m:
        return None
    if m != len(DIRECTION_NAMES):
        raise ConfigError(
            f"video.motion_classes={m}: the motion classes are the {len(DIRECTION_NAMES)} "
            f"directions a clip's caption names ({', '.join(DIRECTION_NAMES)}); set "
            f"video.motion_classes={len(DIRECTION_NAMES)}, or 0 for none"
        )
    if mode != "class":
        raise ConfigError(
            f"video.motion_classes needs a class-conditional run, but this one is conditioned on "
            f"{'text' if mode == 'text' else 'nothing'}; use conditioning=class (labelled clips), "
            "or set video.motion_classes=0"
        )
    f = cfg.video.frames
    captions = ds.captions[::f] if ds.captions else [""] * (len(ds.images) // f)
    directions = [caption_direction(c) for c in captions]
    missing = [i for i, d in enumerate(directions) if d is None]
    if missing:
        raise ConfigError(
            f"video.motion_classes: clip {missing[0]} of {cfg.data} has no caption naming its "
            f'direction ("... moving left ..."; {len(missing)} of {len(directions)} clips lack '
            "one); caption every clip with its direction, or set video.motion_classes=0"
        )
    return torch.tensor([DIRECTION_NAMES.index(d) for d in directions], dtype=torch.long)


def _clip_conditions(cfg: RunConfig, cond_data: Tensor, motion: Tensor | None) -> Tensor:
    """One condition per clip (its frames share it): the label or caption of its first frame,
    with motion classes the joint label c * M + m (`VideoUNetConfig.joint_label`)."""
    assert cfg.video is not None
    per_clip = cond_data[:: cfg.video.frames]
    if motion is None:
        return per_clip
    return per_clip * cfg.video.motion_classes + motion


def _video_model(run: _Run) -> tuple[nn.Module, Any]:
    """(the model the video stage trains: a VideoUNet, or a TextUNet around one; its
    conditioner). From scratch, or grown from the image run `init_from` (its UNet the spatial
    layers, the temporal ones starting at zero: exactly that model per frame)."""
    from ..models.video import VideoUNet

    cfg, device = run.cfg, run.device
    assert cfg.video is not None
    torch.manual_seed(cfg.seed + 1)
    video = VideoUNet(cfg.video.unet_config(cfg.unet)).to(device)
    if cfg.init_from:
        video.unet.load_state_dict(_base_unet(cfg, device).state_dict())
        log.info("video UNet grown from the image run %s%s", cfg.init_from,
                 " (its spatial layers frozen)" if cfg.video.freeze_spatial else "")  # fmt: skip
    model: nn.Module = video
    if run.tokenizer is not None:
        encoder = _text_encoder(run)
        video.unet.null_context.requires_grad_(False)
        model = TextUNet(video, encoder)
        return model, TextConditioner(run.tokenizer, encoder, dropout=cfg.text.caption_dropout)
    # with motion classes the labels are joint, C * M of them (the null label is C * M)
    num_classes = video.config.num_classes if run.class_names else None
    return model, ClassConditioner(num_classes, dropout=cfg.diffusion.class_dropout)


def _video_diffusion(run: _Run, vae: Autoencoder, moments: Tensor) -> tuple[nn.Module, int, str]:
    """The video UNet on the clips' latents (training/video.py's stage in the shared loop):
    checkpoints, resume, the time budget's rest, progress and stop as the UNet stage has them."""
    from .video import STAGE, video_diffusion_stage

    cfg, device, world = run.cfg, run.device, run.world
    assert cfg.video is not None
    clips = moments.view(run.clips, cfg.video.frames, *moments.shape[1:])
    model, conditioner = _video_model(run)
    st = video_diffusion_stage(
        model, clips, conditioner, run.cond_data, vae.config.scaling_factor, cfg.diffusion,
        cfg.unet_train, device, wrap=world.wrap,
    )  # fmt: skip
    st.preview = _video_preview(run, vae)
    mb = min(local_micro_batch(cfg.unet_train, world.size), run.clips)

    def probe(m: nn.Module) -> Tensor:  # one forward of a copy, for the time estimate
        video, encoder = split_model(m)
        x = torch.randn(mb, *clips.shape[1:2], cfg.unet.in_channels, *clips.shape[3:]).to(device)
        t = torch.randint(0, cfg.diffusion.num_timesteps, (mb,)).to(device)
        cond = {}
        if encoder is not None:
            cond = encoder.context(run.cond_data[:mb].to(device))
        elif run.class_names:
            cond = {"class_labels": torch.zeros(mb, dtype=torch.long, device=device)}
        return video(x, t, **cond).square().mean()

    return _train_diffusion(
        run, st, model, probe, name="video diffusion", stage=STAGE, num_items=run.clips,
        reserve_s=0.0, save=run.folder.save_video_unet,
    )  # fmt: skip


def _video_clips(run: _Run, vae: Autoencoder, model: nn.Module, per_class: int) -> Tensor:
    """Clips of the video stage's model for a preview: `per_class` a class (or preview prompt),
    else per_class squared; uint8 (B, F, C, H, W)."""
    from ..video_sampling import sample_video

    cfg = run.cfg
    assert cfg.video is not None
    video, encoder = split_model(model)
    if encoder is not None:
        assert run.tokenizer is not None
        prompts = [p for p in (run.preview_prompts or [""]) for _ in range(per_class)]
        conditioner: Any = TextConditioner(run.tokenizer, encoder)
        cond, uncond = conditioner.sampling_kwargs(prompts, len(prompts), cfg.sampling_guidance,
                                                   run.device)  # fmt: skip
    elif run.class_names:
        n_classes = min(len(run.class_names), 8)
        labels = torch.arange(n_classes).repeat_interleave(per_class)
        m = video.config.motion_classes
        if m:  # joint labels: the clips of a class move in different directions
            labels = labels * m + torch.arange(len(labels)) % m
        conditioner = ClassConditioner(video.config.num_classes)
        cond, uncond = conditioner.sampling_kwargs(labels, len(labels), cfg.sampling_guidance,
                                                   run.device)  # fmt: skip
    else:
        cond, uncond = {}, None
    n = len(next(iter(cond.values()))) if cond else per_class * per_class
    u = cfg.unet
    return sample_video(
        video, vae, cfg.diffusion.make_schedule(), n=n, frames=cfg.video.frames,
        latent_shape=(u.out_channels, u.sample_size, u.sample_size),
        scaling_factor=vae.config.scaling_factor, prediction_type=u.prediction_type,
        sampler=cfg.preview_sampler, steps=cfg.preview_steps, seed=0, cond=cond, uncond=uncond,
        guidance_scale=cfg.sampling_guidance, device=run.device,
    )  # fmt: skip


def _video_preview(run: _Run, vae: Autoencoder, per_class: int = 2):
    """A function that samples a few clips with the given model and saves their frames as a
    preview PNG (a row per clip)."""
    from ..evaluation.grids import save_grid

    def preview(step: int, model: torch.nn.Module) -> Path | None:
        was_training = model.training
        model.eval()
        try:
            clips = _video_clips(run, vae, model, per_class)
        except NonFiniteSampleError as e:
            log.warning("step %d: no preview: %s", step, e)
            return None
        finally:
            model.train(was_training)
        path = run.folder.preview_path(step)
        save_grid(clips.flatten(0, 1), path, nrow=clips.shape[1],
                  scale=2 if run.cfg.image_size <= 64 else 1)  # fmt: skip
        return path

    return preview


def _finish_video(run: _Run, vae: Autoencoder, model: nn.Module, why: str) -> None:
    """The final clips (clips.gif: all clips in one animation; frames.png: a row per clip),
    unless stopped early, and the loss curves."""
    from ..data.animations import clips_grid, save_animation
    from ..evaluation.grids import save_grid
    from ..evaluation.plots import plot_loss_curves

    with run.world.together():
        if not run.world.is_main:
            return
        if why not in STOPPED_EARLY:
            assert run.cfg.video is not None
            try:
                clips = _video_clips(run, vae, model.eval(), per_class=4).numpy()
            except NonFiniteSampleError as e:
                log.warning("no final clips: %s", e)
            else:
                folder = run.folder
                save_animation(folder.final_clips_path, clips_grid(clips), fps=run.cfg.video.fps)
                save_grid(clips.reshape(-1, *clips.shape[2:]), folder.final_frames_path,
                          nrow=clips.shape[1])  # fmt: skip
                run.run_log.add_image("video/final", folder.final_frames_path, 0)
        plot_loss_curves(run.folder.log_path, run.folder.loss_plot_path)
