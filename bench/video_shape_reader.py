"""Where does a video run lose the shape? Read moving-shape frames with `ldmkit eval`'s classifier.

Three reads, each by the frame classifier that `ldmkit eval` trained for a video run
(`RUN/eval/domain-classifier`, `--classifier`):

    --autoencoder VAE ...  real clips of another seed through each autoencoder: frames read
                           right, class constant over the frames, PSNR (the real clips first)
    --image-run RUN        an image run trained on the frames as stills: `--per-class` samples of
                           each class, the share read as that class
    --video-run RUN        a video run: `--clips` clips per class, frames read right and class
                           constant (and the classes read, summed over frames)

`--write-frames DIR` writes the stills for the image run instead: `--frame-clips` moving-shape
clips (seed `--seed`), every frame a PNG in DIR/<class>/, so that `ldmkit train --data DIR`
trains an image run of the same frames.

    python bench/video_shape_reader.py --write-frames /tmp/frames --frame-clips 1250
    ldmkit train --data /tmp/frames --out /tmp/img --time-budget 15m
    python bench/video_shape_reader.py --classifier V/eval/domain-classifier --image-run /tmp/img --video-run V --autoencoder V/vae

Prints the CPU flags and load, then one table per read. Figures are for the seeds given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from benchlib import load_line, machine_line, print_table
from PIL import Image

from ldmkit.data.moving_shapes import generate_moving_shapes
from ldmkit.data.shapes import KINDS
from ldmkit.evaluation.features import DomainClassifier
from ldmkit.evaluation.video import frame_classes, one_class_share
from ldmkit.models.vae import Autoencoder
from ldmkit.training.video import encode_clip_moments
from ldmkit.video_sampling import decode_clips


def write_frames(folder: Path, clips: int, frames: int, size: int, seed: int) -> int:
    """Every frame of `clips` moving-shape clips as DIR/<class>/<clip>-<frame>.png; returns the
    number of images written."""
    data = generate_moving_shapes(clips, frames=frames, image_size=size, seed=seed)
    for kind in KINDS:
        (folder / kind).mkdir(parents=True, exist_ok=True)
    for i, label in enumerate(data.labels):
        for f in range(frames):
            image = Image.fromarray(data.videos[i, f].transpose(1, 2, 0))
            image.save(folder / KINDS[label] / f"{i:05d}-{f}.png")
    return clips * frames


def clip_scores(net, clips: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(share of frames read as their clip's label, share of clips read as one class)."""
    c = frame_classes(net, clips)
    return float(np.mean(c == labels[:, None])), one_class_share(c)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


def read_autoencoders(net, paths: list[Path], n: int, frames: int, size: int, seed: int) -> None:
    data = generate_moving_shapes(n, frames=frames, image_size=size, seed=seed)
    rows = [["real", *clip_scores(net, data.videos, data.labels), None]]
    for path in paths:
        vae = Autoencoder.from_pretrained(path).eval()
        moments = encode_clip_moments(vae, torch.from_numpy(data.videos), torch.device("cpu"))
        scale = vae.config.scaling_factor
        rec = decode_clips(vae, moments[:, :, : moments.shape[2] // 2] * scale, scale).numpy()
        rows.append([str(path), *clip_scores(net, rec, data.labels), psnr(rec, data.videos)])
    print(f"real clips (seed {seed}, {n} clips x {frames} frames) through each autoencoder:")
    print_table(["clips", "frames right", "class constant", "PSNR dB"], rows)


def read_image_run(net, run: Path, per_class: int, seed: int) -> None:
    from ldmkit import api

    rows = []
    for k, kind in enumerate(KINDS):
        images = api.sample(run, n=per_class, classes=kind, seed=seed).images
        pred = net.logits(images).argmax(1).numpy()
        rows.append([kind, float(np.mean(pred == k)), *np.bincount(pred, minlength=len(KINDS))])
    rows.append(["mean", float(np.mean([r[1] for r in rows])), *([None] * len(KINDS))])
    print(f"image run {run}: {per_class} samples per class (seed {seed}), read as:")
    print_table(["asked", "right", *KINDS], rows)


def read_video_run(net, run: Path, per_class: int, seed: int) -> None:
    from ldmkit import api

    rows = []
    for k, kind in enumerate(KINDS):
        clips = api.sample_clips(run, n=per_class, classes=kind, seed=seed).clips.numpy()
        right, constant = clip_scores(net, clips, np.full(len(clips), k))
        counts = np.bincount(frame_classes(net, clips).ravel(), minlength=len(KINDS))
        rows.append([kind, right, constant, *counts])
    rows.append(["mean", float(np.mean([r[1] for r in rows])),
                 float(np.mean([r[2] for r in rows])), *([None] * len(KINDS))])  # fmt: skip
    print(f"video run {run}: {per_class} clips per class (seed {seed}), frames read as:")
    print_table(["asked", "frames right", "class constant", *KINDS], rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--write-frames", type=Path, default=None, help="write the stills here")
    p.add_argument("--frame-clips", type=int, default=1250, help="clips whose frames are written")
    p.add_argument("--classifier", type=Path, default=None, help="eval's domain-classifier folder")
    p.add_argument("--autoencoder", type=Path, nargs="*", default=[], help="autoencoder folders")
    p.add_argument("--image-run", type=Path, default=None)
    p.add_argument("--video-run", type=Path, default=None)
    p.add_argument("--real-clips", type=int, default=256, help="clips through the autoencoders")
    p.add_argument("--per-class", type=int, default=64, help="image samples per class")
    p.add_argument("--clips", type=int, default=16, help="video clips per class")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=None,
                   help="real clips' seed (default 123); with --write-frames, the stills' (default 0)")  # fmt: skip
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(machine_line())
    if a.write_frames is not None:
        seed = 0 if a.seed is None else a.seed
        n = write_frames(a.write_frames, a.frame_clips, a.frames, a.size, seed)
        print(f"wrote {n} frames of {a.frame_clips} clips (seed {seed}) to {a.write_frames}")
        return
    if a.classifier is None:
        p.error("--classifier (a video run's eval/domain-classifier) is needed to read")
    net = DomainClassifier.from_pretrained(a.classifier)
    if a.autoencoder:
        seed = 123 if a.seed is None else a.seed
        read_autoencoders(net, a.autoencoder, a.real_clips, a.frames, a.size, seed)
    if a.image_run is not None:
        read_image_run(net, a.image_run, a.per_class, seed=1)
    if a.video_run is not None:
        read_video_run(net, a.video_run, a.clips, seed=1)
    print(load_line())


if __name__ == "__main__":
    main()
