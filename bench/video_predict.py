"""Frame prediction by a video run: given the first G frames of clips it never trained on, how
close are the frames it continues with to the truth?

For `--n` clips of the run's own data kind drawn with another seed (`--data-seed`; for
`builtin:moving-mnist` add `?split=test` to the spec with `--data` to take the digits from
MNIST's test split), the run samples each clip's frames G..F-1 with the first G given
(`video_sampling.sample_video`, the same path as `ldmkit sample --first-frames --given G`) and
compares them with the true frames: PSNR and SSIM per predicted frame (evaluation.reconstruction,
pixels in [-1, 1]). Two references measured on the same clips:

    autoencoder  the true frames through the run's autoencoder: the best a latent model can do
    copy-last    the last given frame repeated: what predicting no motion at all scores

A model that learned the motion beats copy-last on the later frames; one that did not sits at or
below it. Prints the CPU flags and load, and a table of the mean PSNR / SSIM per predicted frame.

    python bench/video_predict.py --run RUN --n 64 --given 4
    python bench/video_predict.py --quick   # a toy run trained in seconds; tests/test_bench.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import load_line, machine_line, print_table

from ldmkit.evaluation.reconstruction import psnr, ssim
from ldmkit.runs import RunFolder, read_video
from ldmkit.video_sampling import decode_clips, encode_frames, sample_video


def to_unit(x: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float64 in [-1, 1]."""
    return torch.from_numpy(x).double() / 127.5 - 1


def scores(pred: np.ndarray, truth: np.ndarray) -> list[tuple[float, float]]:
    """(mean PSNR, mean SSIM) per frame of uint8 clips (N, K, C, H, W)."""
    out = []
    for k in range(truth.shape[1]):
        a, b = to_unit(pred[:, k]), to_unit(truth[:, k])
        p = psnr(a, b).clamp(max=100.0)  # identical frames: inf, capped
        out.append((float(p.mean()), float(ssim(a, b).mean())))
    return out


def predict(run: Path, clips: np.ndarray, given: int, *, steps: int, sampler: str, seed: int):
    """The run's continuation of each clip's first `given` frames: uint8 (N, F, C, H, W)."""
    folder = RunFolder(run)
    cfg = folder.config()
    vae, model = folder.load_vae(), folder.load_video_unet().eval()
    ucfg = model.config.unet
    latent = (ucfg.in_channels, ucfg.sample_size, ucfg.sample_size)
    return sample_video(
        model, vae, cfg.diffusion.make_schedule(), n=len(clips), frames=clips.shape[1],
        latent_shape=latent, scaling_factor=vae.config.scaling_factor,
        prediction_type=ucfg.prediction_type, first_frames=torch.from_numpy(clips[:, :given]),
        sampler=sampler, steps=steps, seed=seed,
    ).numpy()  # fmt: skip


def autoencoded(run: Path, clips: np.ndarray) -> np.ndarray:
    vae = RunFolder(run).load_vae()
    s = vae.config.scaling_factor
    return decode_clips(vae, encode_frames(vae, torch.from_numpy(clips), s), s).numpy()


def quick_run(out: Path) -> Path:
    """A toy unconditional moving-MNIST-like video run (moving shapes, no labels), seconds."""
    from ldmkit.recipe import run_config_from_dict
    from ldmkit.training.run import train_run

    d = {
        "data": "builtin:moving-shapes?n=8", "image_size": 16, "conditioning": "none",
        "video": {"frames": 3, "temporal_heads": 2, "layout": "stacked"},
        "vae": {"block_out_channels": [8, 8], "norm_groups": 4, "latent_channels": 4},
        "unet": {"block_out_channels": [16, 32], "attention_resolutions": [4],
                 "norm_num_groups": 8, "head_dim": 8},
        "vae_train": {"steps": 2, "batch_size": 4}, "unet_train": {"steps": 2, "batch_size": 4},
    }  # fmt: skip
    train_run(run_config_from_dict(d), out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", type=Path, help="a video run folder")
    p.add_argument("--data", default=None, help="the clips' spec (default: the run's data)")
    p.add_argument("--data-seed", type=int, default=1000, help="not the run's seed: new clips")
    p.add_argument("--n", type=int, default=64, help="clips")
    p.add_argument("--given", type=int, default=4, help="frames given")
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a toy run of seconds")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        if a.quick:
            a.run, a.n, a.given, a.steps = quick_run(Path(tmp) / "r"), 2, 1, 2
        if a.run is None:
            p.error("give --run RUN (a video run) or --quick")
        cfg = RunFolder(a.run).config()
        if cfg.video is None:
            p.error(f"{a.run} is an image run; give a video run")
        frames = cfg.video.frames
        if not 1 <= a.given < frames:
            p.error(f"--given must be from 1 to {frames - 1} (the run's clips have {frames})")
        spec = a.data or cfg.data
        data = read_video(spec, image_size=cfg.image_size, frames=frames, seed=a.data_seed,
                          conditioning="none")  # fmt: skip
        clips = data.videos[: a.n]
        t0 = time.perf_counter()
        pred = predict(a.run, clips, a.given, steps=a.steps, sampler=a.sampler, seed=a.seed)
        took = time.perf_counter() - t0
        recon = autoencoded(a.run, clips)
    truth = clips[:, a.given :]
    last = np.repeat(clips[:, a.given - 1 : a.given], frames - a.given, axis=1)
    rows = []
    for name, got in (("run", pred[:, a.given :]), ("autoencoder", recon[:, a.given :]),
                      ("copy-last", last)):  # fmt: skip
        per = scores(got, truth)
        rows.append([name, *(f"{ps:.2f} / {ss:.3f}" for ps, ss in per),
                     f"{np.mean([s[0] for s in per]):.2f} / {np.mean([s[1] for s in per]):.3f}"])  # fmt: skip
    print(f"{a.run}: {len(clips)} clips of {spec} (seed {a.data_seed}), {frames} frames at "
          f"{cfg.image_size} px, {a.given} given; {a.sampler} {a.steps} steps, seed {a.seed}; "
          f"sampling {took:.0f} s; {load_line()}")  # fmt: skip
    cols = ["frames", *(f"frame {k + 1}" for k in range(a.given, frames)), "mean"]
    print("PSNR (dB) / SSIM of the predicted frames against the truth:")
    print_table(cols, rows)


if __name__ == "__main__":
    main()
