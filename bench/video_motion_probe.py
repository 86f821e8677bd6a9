"""Do the temporal layers learn motion? A pixel-space probe on the moving shapes (issue 30).

A small `VideoUNet` trains on `builtin:moving-shapes` clips in pixel space (no autoencoder: the
clips enter the video stage as posterior moments of zero variance, so the latent is the clip),
conditioned on the direction of motion (8 classes, not the shape), with the shared training
loop and a time budget. Then it samples `--per-direction` clips for each direction (the default
sampler, classifier-free guidance `--guidance`) and the motion tracker reads them: the share
moving the asked way (chance 1/8), the share in which one object is found and moves, the
median speed, and the flicker; real clips give the ceiling in the first row.

    python bench/video_motion_probe.py --minutes 10 --out /tmp/probe
    python bench/video_motion_probe.py --quick

Prints the CPU flags and load, the settings, and the table; `--out` also gets a GIF per
direction. Figures are for the seed given, on a shared CPU: read the steps column with them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import machine_line, print_table

from ldmkit.data.animations import save_animation
from ldmkit.data.moving_shapes import DIRECTION_NAMES, generate_moving_shapes
from ldmkit.data.transforms import to_uint8
from ldmkit.diffusion.samplers import sample
from ldmkit.evaluation.motion import direction_accuracy, track
from ldmkit.models.conditioning import ClassConditioner
from ldmkit.models.unet import UNetConfig
from ldmkit.models.video import VideoUNet, VideoUNetConfig
from ldmkit.recipe import DiffusionConfig, TrainConfig
from ldmkit.runs import RunFolder
from ldmkit.training.video import train_video_unet


def read(videos: np.ndarray, asked: list[str]) -> list[object]:
    tr = track(videos)
    moving = np.array([d not in ("still", "lost") for d in tr.direction])
    speed = float(np.nanmedian(tr.speed)) if np.isfinite(tr.speed).any() else None
    return [direction_accuracy(tr, asked), float(moving.mean()), speed, float(tr.flicker.mean())]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="training time budget")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--clips", type=int, default=4000)
    p.add_argument("--batch", type=int, default=16, help="clips per step")
    p.add_argument("--per-direction", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="folder for one GIF per direction")
    p.add_argument("--quick", action="store_true", help="a smoke test of seconds")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.clips, a.batch, a.per_direction, a.steps, a.frames, a.size = 16, 4, 1, 2, 4, 8
    print(machine_line())
    print(f"settings: {vars(a)}")

    data = generate_moving_shapes(a.clips, frames=a.frames, image_size=a.size, seed=a.seed)
    x = torch.from_numpy(data.videos).float() / 127.5 - 1  # (N, F, 3, S, S) in [-1, 1]
    moments = torch.cat([x, torch.full_like(x, -30.0)], dim=2)  # zero-variance "posterior"
    levels = (32, 64) if a.quick else (32, 64, 64)
    torch.manual_seed(a.seed)
    unet = UNetConfig(sample_size=a.size, in_channels=3, block_out_channels=levels,
                      attention_resolutions=(a.size // 2 ** (len(levels) - 1),), head_dim=32,
                      num_classes=len(DIRECTION_NAMES))  # fmt: skip
    model = VideoUNet(VideoUNetConfig(unet=unet, frames=a.frames, temporal_heads=4))
    diff = DiffusionConfig()
    cfg = TrainConfig(steps=3 if a.quick else 100_000, batch_size=a.batch, lr=5e-4,
                      warmup_steps=1 if a.quick else 50, lr_schedule="cosine", ema_decay=0.995,
                      checkpoint_every=100_000, sample_every=0, log_every=50)  # fmt: skip
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train_video_unet(
            model, moments, RunFolder(Path(tmp) / "run"), diff=diff, cfg=cfg, scaling_factor=1.0,
            conditioner=ClassConditioner(len(DIRECTION_NAMES), dropout=0.1),
            cond_data=torch.from_numpy(data.direction), seed=a.seed,
            time_budget_s=None if a.quick else a.minutes * 60,
        )  # fmt: skip
    minutes = (time.perf_counter() - start) / 60
    net = (result.ema.model if result.ema is not None else model).eval()

    labels = torch.arange(len(DIRECTION_NAMES)).repeat_interleave(a.per_direction)
    asked = [DIRECTION_NAMES[k] for k in labels]
    shape = (len(labels), a.frames, 3, a.size, a.size)
    clips = sample(
        net, diff.make_schedule(), shape, steps=a.steps, prediction_type=unet.prediction_type,
        generator=torch.Generator().manual_seed(a.seed + 1), cond={"class_labels": labels},
        uncond={"class_labels": torch.full_like(labels, len(DIRECTION_NAMES))},
        guidance_scale=a.guidance,
    )  # fmt: skip
    videos = to_uint8(clips).numpy()
    real = generate_moving_shapes(len(labels), frames=a.frames, image_size=a.size,
                                  seed=a.seed + 99)  # fmt: skip
    real_asked = [DIRECTION_NAMES[k] for k in real.direction]
    rows = [
        ["real", *read(real.videos, real_asked), None, None],
        ["samples", *read(videos, asked), result.steps_done, minutes],
    ]
    print(f"direction-conditioned VideoUNet, {a.size} px, {a.frames} frames, "
          f"{a.per_direction} samples per direction, guidance {a.guidance}, {a.steps} steps; "
          f"data median speed {np.median(data.speed) * a.size:.2f} px/frame")  # fmt: skip
    print_table(
        ["clips", "direction", "moving", "speed", "flicker", "train_steps", "minutes"], rows
    )
    if a.out is not None:
        for k, name in enumerate(DIRECTION_NAMES):
            row = videos[k * a.per_direction : (k + 1) * a.per_direction]  # (n, F, 3, S, S)
            strip = np.concatenate(list(row), axis=-1)  # the clips side by side
            save_animation(a.out / f"{name}.gif", strip, fps=4, params={"direction": name})


if __name__ == "__main__":
    main()
