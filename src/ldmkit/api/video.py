"""Video runs (issue 30): clips sampled from a video run, written as animations with their
parameters, and the run measured without downloads.

    clips = api.sample_clips("runs/moving", n=8, classes="star")
    api.save_clips(clips, "out/stars.gif")        # out/stars.gif (all clips) + out/stars.png
    api.save_clip_files(clips, "out/stars")       # one GIF per clip + clips.png
    api.sample_clips("runs/moving", n=4, first_frames="clip.gif", given_frames=4)  # continue a clip

A video run is trained by `api.train` on video data (`builtin:moving-shapes`,
`builtin:moving-mnist`, `animations:DIR`; training/run.py); its options are `SampleOptions`
(the video flags `--first-frames`, `--given`, `--fps` among them), checked once by its `check`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..options import SampleOptions
from ..runs import RunFolder
from .checks import check_count, check_device, check_path, check_seed

log = logging.getLogger(__name__)

ANIMATION_SUFFIXES = (".gif", ".webp")


def is_video_run(run: str | os.PathLike | None) -> bool:
    """Whether `run` is a video run (a folder whose run.json has `video`, or a video UNet); a
    name the file system cannot hold is refused in one line (`check_path`)."""
    if run is None:
        return False
    check_path("--run", run)
    return RunFolder(run).is_video()


@dataclass
class Clips:
    """Clips drawn from a video run and how they were made."""

    clips: Any  # uint8 tensor (n, F, C, H, W)
    fps: float
    labels: list[str]  # what each clip was asked for: a class name, a prompt, or ""
    params: dict[str, Any]  # the run, its weights' hash and the options: written into each file
    description: str  # e.g. "8 clips of 16 frames, dpm++2m-sde, 20 steps, seed 0, guidance 5"
    given: int = 0  # frames given by --first-frames (the clips' first `given` frames)
    notes: list[str] = field(default_factory=list)


_SAMPLE = SampleOptions()


def sample_clips(
    run: str | os.PathLike,
    *,
    options: SampleOptions | None = None,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    **keywords: Any,
) -> Clips:
    """Sample clips from the video run `run`. Options as `api.sample` takes them (keywords of
    `SampleOptions`, or all at once as `options`): n clips, sampler, steps, seed, classes or
    prompts, guidance, and the video ones: `first_frames` (an animation whose first `given`
    frames every clip starts with: their latents are imposed at every step) and `fps`.
    `progress(done, total)` hears of every sampler step."""
    import torch

    from ..data.animations import read_animation
    from ..data.transforms import resize_array
    from ..models.conditioning import ClassConditioner, TextConditioner
    from ..runtime import resolve_device
    from ..video_sampling import sample_video

    if options is None:
        options = SampleOptions(**keywords)
    elif keywords:
        raise TypeError("give sample_clips's options as keywords or as `options`, not both")
    check_path("--run", run)
    folder = RunFolder(run)
    folder.require_run()
    if not folder.is_video():
        raise ConfigError(
            f"{run} is an image run; sample it with `ldmkit sample` (api.sample), which writes PNGs"
        )
    o = options.check(folder, shown=run)
    check_device(device)
    cfg = folder.config()
    assert cfg.video is not None
    frames = cfg.video.frames
    dev = resolve_device(device or cfg.device)
    vae = folder.load_vae(dev)
    model = folder.load_video_unet(dev)
    guidance = cfg.sampling_guidance if o.guidance_scale is None else o.guidance_scale

    # the given first frames: read, resized to the run's size, its channels
    first = None
    given = 0
    if o.first_frames is not None:
        check_path("--first-frames", o.first_frames)
        clip = read_animation(o.first_frames)
        given = o.given_frames if o.given_frames is not None else min(len(clip), frames - 1)
        if len(clip) < given:
            raise ConfigError(
                f"--given {given}: {o.first_frames} has only {len(clip)} frames; give at most "
                f"{len(clip)}"
            )
        clip = resize_array(clip[:given], cfg.image_size)
        if cfg.channels == 1:
            clip = clip.mean(1, keepdims=True).round().astype(clip.dtype)
        first = torch.from_numpy(clip.copy())[None]

    # the condition of each clip
    labels: list[str] = [""] * o.n
    if folder.has_text():
        conditioner: Any = TextConditioner(folder.load_tokenizer(), folder.load_text_encoder(dev))
        prompts = list(o.prompts or [])
        per = [prompts[i * len(prompts) // o.n] for i in range(o.n)]
        labels = per

        def conditions(rows: slice) -> tuple[dict, dict | None]:
            neg = [o.negative_prompt] * len(per[rows]) if o.negative_prompt is not None else None
            return conditioner.sampling_kwargs(per[rows], len(per[rows]), guidance, dev, neg)

    elif cfg.unet.num_classes:
        names = folder.data_info().class_names
        conditioner = ClassConditioner(cfg.unet.num_classes, class_names=names)
        if o.classes is not None:
            y = conditioner.parse(o.classes, o.n)
        else:  # every class in turn
            y = torch.arange(o.n) % cfg.unet.num_classes
        labels = [names[int(c)] if names else str(int(c)) for c in y]
        if model.config.motion_classes:  # joint labels: each clip's class and direction
            y, labels = _with_directions(model.config, y, labels, o.directions)
            conditioner = ClassConditioner(model.config.num_classes)  # its null label: C * M

        def conditions(rows: slice) -> tuple[dict, dict | None]:
            part = y[rows]
            return conditioner.sampling_kwargs(part, len(part), guidance, dev)

    else:

        def conditions(rows: slice) -> tuple[dict, dict | None]:
            return {}, None

    per_batch = max(1, o.batch_size // frames)
    total = math.ceil(o.n / per_batch) * o.steps
    done = 0

    def step(i: int, x: Any, sigma: Any, x0: Any) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    u = cfg.unet
    out = []
    for start in range(0, o.n, per_batch):
        rows = slice(start, min(o.n, start + per_batch))
        cond, uncond = conditions(rows)
        b = rows.stop - rows.start
        out.append(sample_video(
            model, vae, cfg.diffusion.make_schedule(), n=b, frames=frames,
            latent_shape=(u.out_channels, u.sample_size, u.sample_size),
            scaling_factor=vae.config.scaling_factor, prediction_type=u.prediction_type,
            sampler=o.sampler, steps=o.steps, seed=o.seed + start, cond=cond, uncond=uncond,
            guidance_scale=guidance, guidance_rescale=o.guidance_rescale, first_frames=first,
            callback=step, device=dev,
        ))  # fmt: skip
    clips = torch.cat(out)
    fps = o.fps if o.fps is not None else cfg.video.fps
    from .. import __version__

    params = {
        "ldmkit": __version__, "run": str(run), "weights": folder.weights_hash(),
        "n": o.n, "frames": frames, "fps": fps, "sampler": o.sampler, "steps": o.steps,
        "seed": o.seed, "guidance": guidance, "classes": o.classes, "directions": o.directions,
        "prompts": list(o.prompts) if o.prompts else None,
        "negative_prompt": o.negative_prompt, "first_frames": o.first_frames, "given": given,
        "batch_clips": per_batch,
    }  # fmt: skip
    how = f"{o.sampler}, {o.steps} steps, seed {o.seed}"
    if cfg.unet.num_classes or folder.has_text():
        how += f", guidance {guidance:g}"
    if given:
        how += f", the first {given} frames given"
    return Clips(clips, fps, labels, params, f"{o.n} clips of {frames} frames, {how}", given)


def _with_directions(config: Any, y: Any, labels: list[str], directions: str | None) -> tuple:
    """(the joint labels c * M + m of a run with motion classes, `VideoUNetConfig.joint_label`,
    and each clip's label with its direction): the directions of --direction cycled over the
    clips, else every direction in turn."""
    import torch

    from ..options import direction_indices, direction_names

    names = direction_names()
    n = len(y)
    if directions is not None:
        given = direction_indices(directions)
        m = [given[i % len(given)] for i in range(n)]
    else:
        m = [i % config.motion_classes for i in range(n)]
    joint = torch.tensor([config.joint_label(int(c), d) for c, d in zip(y, m, strict=True)])
    return joint, [f"{label} moving {names[d]}" for label, d in zip(labels, m, strict=True)]


def _data_directions(captions: list[str] | None, pick: Any, spec: str) -> list[str]:
    """The direction each picked data clip's caption names (`evaluation.video.caption_direction`):
    a run with motion classes is asked for these and measured against them."""
    from ..evaluation.video import caption_direction

    found = [caption_direction(captions[int(i)]) if captions else None for i in pick]
    if any(d is None for d in found):
        raise ConfigError(
            f"eval: the clips of {spec} do not all name their direction in their captions, which "
            "a run with motion classes is measured against; evaluate it on its own data"
        )
    return [d for d in found if d is not None]


def check_animation_output(flag: str, path: str | os.PathLike) -> Path:
    """An animation to write: .gif or .webp, in a folder that can be written."""
    check_path(flag, path)
    p = Path(path)
    if p.suffix.lower() not in ANIMATION_SUFFIXES:
        raise ConfigError(
            f"{flag} {path}: a video run writes animations; name a .gif or .webp file"
        )
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; name a .gif or .webp file")
    return p


def save_clips(clips: Clips, out: str | os.PathLike) -> list[Path]:
    """Write all clips as one animation `out` (.gif or .webp: each frame tiles the clips) and
    its frames as a strip PNG beside it (`out` with .png: a row per clip, left to right in
    time); both carry the parameters (the GIF's comment, the PNG's "ldmkit" text chunk)."""
    from ..data.animations import clips_grid, save_animation

    path = check_animation_output("--out", out)
    arr = clips.clips.numpy()
    save_animation(path, clips_grid(arr), fps=clips.fps, params=clips.params)
    strip = path.with_suffix(".png")
    _write_strip(arr, strip, clips.params)
    return [path, strip]


def save_clip_files(clips: Clips, folder: str | os.PathLike, suffix: str = ".gif") -> list[Path]:
    """One animation per clip (clip-00000.gif, ...; WebP with suffix=".webp") and clips.png
    (a row per clip) into `folder`, each with the parameters (and the clip's index and seed)."""
    from ..data.animations import save_animation

    check_path("--outdir", folder)
    if suffix not in ANIMATION_SUFFIXES:
        raise ConfigError(f"clips are written as .gif or .webp, got {suffix}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = clips.clips.numpy()
    per_batch = clips.params.get("batch_clips", 1)
    paths = []
    for i, clip in enumerate(arr):
        params = {**clips.params, "index": i, "label": clips.labels[i],
                  "batch_seed": clips.params["seed"] + i // per_batch * per_batch}  # fmt: skip
        paths.append(save_animation(folder / f"clip-{i:05d}{suffix}", clip, fps=clips.fps,
                                    params=params))  # fmt: skip
    strip = folder / "clips.png"
    _write_strip(arr, strip, clips.params)
    return [*paths, strip]


def _write_strip(arr: Any, path: Path, params: dict[str, Any]) -> None:
    import torch

    from ..data.animations import frames_strip
    from ..data.images import write_png
    from ..data.transforms import to_float

    write_png(to_float(torch.from_numpy(frames_strip(arr))), path, params)


def evaluate_video(
    run: str | os.PathLike,
    *,
    n: int = 64,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    device: str | None = None,
    held_out: bool = False,
) -> dict[str, Any]:
    """Measure a video run (evaluation/video.py): n clips sampled as `ldmkit sample` draws them
    (class-conditional: every class in turn; text: the captions of n clips of the data, so each
    clip's caption names the direction its motion is checked against) against the data's clips,
    in the run's domain classifier (trained on the frames, cached in eval/). `held_out`: a
    moving-shapes run with held-out combinations is measured on those only. FVD is not
    available offline; the result says so."""
    import numpy as np
    import torch

    from ..checkpoint import write_json
    from ..data.dataset import ImageDataset
    from ..evaluation.feature_nets import get_feature_net
    from ..evaluation.video import caption_direction, score_clips
    from ..runs import read_video

    check_path("--run", run)
    check_count("--n", n, 2, 10_000)
    check_seed("--seed", seed)
    folder = RunFolder(run).require_trained_video()
    cfg = folder.config()
    assert cfg.video is not None
    spec = folder.data_info().spec or cfg.data
    limit = n
    if held_out:
        if not spec.startswith("builtin:moving-shapes") or "holdout=" not in spec:
            raise ConfigError(
                "--held-out: this run's data holds nothing out; train on "
                "builtin:moving-shapes?holdout=red-star-left (or a colour-shape pair) to measure it"
            )
    data = read_video(spec, image_size=cfg.image_size, frames=cfg.video.frames, seed=cfg.seed,
                      conditioning=cfg.conditioning)  # fmt: skip
    real = data.videos
    eval_set = real
    captions = data.captions
    labels = data.labels
    if held_out:
        from ..data.video import load_video_data

        h = load_video_data(spec, frames=cfg.video.frames, image_size=cfg.image_size,
                            seed=cfg.seed + 1, limit=limit, only_holdout=True)  # fmt: skip
        eval_set, captions, labels = h.videos, h.captions, h.labels
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(eval_set), size=min(n, len(eval_set)), replace=False)
    n = len(pick)
    opts: dict[str, Any] = {"n": n, "seed": seed, "sampler": sampler, "steps": steps,
                            "guidance_scale": guidance_scale}  # fmt: skip
    directions = None
    want_labels = None
    if folder.has_text() and captions is not None:
        chosen = [captions[i] for i in pick]
        opts["prompts"] = tuple(chosen)
        directions = [caption_direction(c) for c in chosen]
    elif cfg.unet.num_classes and labels is not None:
        want_labels = np.asarray(labels)[pick]
        opts["classes"] = ",".join(str(int(c)) for c in want_labels)
        if cfg.video.motion_classes:  # each clip asked to move as its data clip's caption says
            directions = _data_directions(captions, pick, spec)
            opts["directions"] = ",".join(directions)
    sample_opts = SampleOptions(**{k: v for k, v in opts.items() if v is not None},
                                batch_size=max(cfg.video.frames, 64))  # fmt: skip
    clips = sample_clips(run, options=sample_opts, device=device)
    net = None
    if labels is not None or data.labels is not None:
        n_frames = real.shape[0] * real.shape[1]
        frames = torch.from_numpy(np.ascontiguousarray(real.reshape(n_frames, *real.shape[2:])))
        frame_labels = torch.from_numpy(np.repeat(data.labels, real.shape[1])).long()
        ds = ImageDataset(frames, labels=frame_labels, class_names=data.class_names,
                          name=data.name, spec=spec)  # fmt: skip
        net = get_feature_net("domain", dataset=ds, run_dir=folder.path, seed=cfg.seed)
    ref = real[rng.choice(len(real), size=min(len(real), max(n, 2)), replace=False)]
    scores = score_clips(clips.clips.numpy(), real=ref if net is not None else None, net=net,
                         labels=want_labels, directions=directions)  # fmt: skip
    result = {"run": str(run), "sampled": clips.description, "held_out": held_out,
              **scores.to_dict()}  # fmt: skip
    folder.eval_dir.mkdir(parents=True, exist_ok=True)
    write_json(folder.eval_dir / "video.json", result)
    return result
