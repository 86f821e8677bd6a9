"""Does the video UNet learn motion on moving shapes? Inflating an image run vs from scratch.

The recipe (`ldmkit.training.video.VIDEO_RECIPE`) in latent space: the image run's autoencoder
encodes every frame of `builtin:moving-shapes` clips (32 px, 8 frames -> 8 x 4 x 16 x 16
latents), and a `VideoUNet` conditioned on (shape, direction) learns them. The label is joint
(`VideoUNetConfig.motion_classes` = 8 directions): the shape conditions the image UNet as in
the image run, the direction a learned embedding in every temporal block. Arms:

    inflate-frozen  the image run's UNet, spatial layers frozen; the temporal layers train
    inflate         the image run's UNet, everything trains (temporal layers at a higher LR)
    scratch         a fresh UNet of the same shape, everything trains
    stacked         a fresh 2-D UNet that sees a clip's frames as channels (layout=stacked,
                    `--stacked-channels` wide), the shape as its class, the direction its
                    own embedding

Each arm trains for `--minutes` (the shared loop, EMA); while it trains a gate samples a few
clips per direction and logs the direction accuracy against the training seconds (measurement
time excluded), so the arms' curves show which reaches an accuracy sooner. At the end it
samples `--per-direction` clips per direction over the seen (shape, direction) pairs and
`--per-holdout` clips of each held-out pair (never in the training data, in any colour), and
reads them:

    direction   the motion tracker's direction equals the asked one (chance 1/8)
    moving      one object found and moving
    class_const a shape classifier reads one class in every frame (a small CNN trained here on
                real frames' object maps, the colour distance from the background: colour-blind)
    class_right ... and that class is the asked shape
    flicker     mean |change| between frames outside the object

Real clips give the ceiling in the first rows; their reconstructions through the autoencoder
the ceiling of a latent model (`real-autoencoded`).

    python bench/video_shapes.py --arms inflate-frozen,scratch --minutes 15 --out /tmp/vs
    python bench/video_shapes.py --quick

Prints the CPU flags and load, the settings, the learning curves and the table. `--out` gets a
GIF of samples per arm. Figures are for the seeds given, on a shared CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import load_line, machine_line, perturb, print_table
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ldmkit.data.animations import save_animation
from ldmkit.data.moving_shapes import DIRECTION_NAMES, generate_moving_shapes
from ldmkit.data.shapes import COLOR_NAMES, KINDS
from ldmkit.diffusion.samplers import sample
from ldmkit.evaluation.motion import THRESHOLD, track
from ldmkit.models.conditioning import ClassConditioner
from ldmkit.models.unet import UNet, UNetConfig
from ldmkit.models.vae import Autoencoder, AutoencoderConfig
from ldmkit.models.video import VideoUNet, VideoUNetConfig, clip_noise
from ldmkit.recipe import DiffusionConfig, TrainConfig
from ldmkit.runs import RunFolder
from ldmkit.training.loop import QualityGate
from ldmkit.training.video import VIDEO_RECIPE, encode_clip_moments, train_video_unet
from ldmkit.video_sampling import decode_clips

ARMS = ("inflate-frozen", "inflate", "scratch", "stacked")
# (shape, direction) pairs held out of the training clips in every colour: the model never sees
# a star moving left or a circle moving up-right, and is asked for them at the end.
HELD_OUT_PAIRS = (("star", "left"), ("circle", "up-right"))
SAMPLER = "dpm++2m"  # deterministic: the clip's start noise (mixed as trained) is all it draws


def holdout_triples() -> list[tuple[str, str, str]]:
    return [(c, k, d) for k, d in HELD_OUT_PAIRS for c in COLOR_NAMES]


def is_held_out(kind: int, direction: int) -> bool:
    return (KINDS[kind], DIRECTION_NAMES[direction]) in HELD_OUT_PAIRS


def seen_requests(per_direction: int) -> list[tuple[int, int]]:
    """(shape, direction) requests: per direction, the seen shapes in turn."""
    out = []
    for d in range(len(DIRECTION_NAMES)):
        kinds = [k for k in range(len(KINDS)) if not is_held_out(k, d)]
        out += [(kinds[i % len(kinds)], d) for i in range(per_direction)]
    return out


def read(videos: np.ndarray, kinds: list[int], directions: list[int], clf) -> list[float]:
    """direction, moving, class_const, class_right, flicker of uint8 clips (N, F, 3, S, S)."""
    tr = track(videos)
    asked = np.array([DIRECTION_NAMES[d] for d in directions])
    right = float(np.mean(np.array(tr.direction) == asked))
    moving = float(np.mean([d not in ("still", "lost") for d in tr.direction]))
    n, f = videos.shape[:2]
    with torch.no_grad():
        pred = clf(object_maps(videos)).argmax(1).view(n, f).numpy()
    const = (pred == pred[:, :1]).all(axis=1)
    right_class = const & (pred[:, 0] == np.array(kinds))
    return [right, moving, float(const.mean()), float(right_class.mean()), float(tr.flicker.mean())]


@torch.no_grad()
def draw(model, vae, scale, requests, frames, *, steps, guidance, seed) -> np.ndarray:
    """Sample one clip per (shape, direction) request; uint8 (N, F, 3, S, S)."""
    cfg = model.config
    y = torch.tensor([cfg.joint_label(k, d) for k, d in requests])
    unet = cfg.unet
    shape = (len(y), frames, unet.in_channels, unet.sample_size, unet.sample_size)
    g = torch.Generator().manual_seed(seed)
    x_t = clip_noise(shape, cfg.noise_mixing, generator=g)
    was = model.training
    model.eval()
    z = sample(
        model, DiffusionConfig().make_schedule(), x_t, sampler=SAMPLER, steps=steps,
        prediction_type=unet.prediction_type, cond={"class_labels": y},
        uncond={"class_labels": torch.full_like(y, cfg.num_classes)}, guidance_scale=guidance,
    )  # fmt: skip
    model.train(was)
    return decode_clips(vae, z, scale).numpy()


def object_maps(videos: np.ndarray) -> Tensor:
    """(N, F, 3, S, S) uint8 -> (N*F, 1, S, S): each pixel's colour distance from the clip's
    background (the tracker's), mapped so that the tracker's threshold is 0. Colour-blind: the
    shape classifier sees the outline only."""
    n, f, c, h, w = videos.shape
    x = videos.astype(np.float32)
    bg = np.median(x.transpose(0, 2, 1, 3, 4).reshape(n, c, -1), axis=2)
    dist = np.sqrt(((x - bg[:, None, :, None, None]) ** 2).sum(axis=2))
    return torch.from_numpy(np.clip(dist / THRESHOLD - 1, -1, 1)).reshape(n * f, 1, h, w)


def shape_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(32, len(KINDS)),
    )  # fmt: skip


def autoencoded(vae: Autoencoder, videos: np.ndarray) -> np.ndarray:
    """Clips through the autoencoder (posterior mean), uint8 as they came."""
    moments = encode_clip_moments(vae, torch.from_numpy(videos), torch.device("cpu"))
    scale = vae.config.scaling_factor
    return decode_clips(vae, moments[:, :, : moments.shape[2] // 2] * scale, scale).numpy()


def shape_classifier(
    path: Path | None, vae: Autoencoder, size: int, seed: int, quick: bool
) -> nn.Module:
    """A shape classifier of frames, trained on the object maps of real moving-shape frames and
    of the same frames through the autoencoder (whose soft edges a generated frame has too);
    cached in `path` when given. Prints its accuracy on frames of other clips, both kinds."""
    model = shape_net()
    if path is not None and path.exists():
        model.load_state_dict(load_file(path))
        return model.eval()
    data = generate_moving_shapes(40 if quick else 3000, frames=3, image_size=size, seed=seed + 7)
    x = torch.cat([object_maps(data.videos), object_maps(autoencoded(vae, data.videos))])
    y = torch.from_numpy(np.tile(np.repeat(data.labels, 3), 2))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2 if quick else 400):
        i = torch.randint(len(x), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = generate_moving_shapes(8 if quick else 300, frames=8, image_size=size, seed=seed + 8)
    for name, clips in (("real", test.videos), ("autoencoded", autoencoded(vae, test.videos))):
        with torch.no_grad():
            pred = model(object_maps(clips)).argmax(1).view(len(test.labels), -1).numpy()
        print(f"shape classifier: {name} frames of other clips read right "
              f"{np.mean(pred == test.labels[:, None]):.4f} ({pred.size} frames)")  # fmt: skip
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), path)
    return model


def build(
    arm: str, image_unet: UNet, frames: int, recipe: dict, stacked_channels=None
) -> VideoUNet:
    settings = dict(frames=frames, motion_classes=len(DIRECTION_NAMES), **recipe["model"])
    if arm == "stacked":
        settings.update(layout="stacked", frame_embedding=False, freeze_spatial=False,
                        noise_mixing=recipe["scratch_noise_mixing"])  # fmt: skip
        unet_cfg = image_unet.config
        if stacked_channels:
            unet_cfg = dataclasses.replace(unet_cfg, block_out_channels=stacked_channels,
                                           time_embed_dim=None)  # fmt: skip
        torch.manual_seed(0)
        return VideoUNet(VideoUNetConfig(unet=unet_cfg, **settings))
    if arm == "scratch":
        settings["temporal_lr_mult"] = recipe["scratch_temporal_lr_mult"]
        torch.manual_seed(0)
        return VideoUNet(VideoUNetConfig(unet=image_unet.config, **settings))
    settings["freeze_spatial"] = arm == "inflate-frozen"
    return VideoUNet.from_image_unet(image_unet, **settings)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arms", default="inflate-frozen,scratch", help=f"of {', '.join(ARMS)}")
    p.add_argument("--image-run", type=Path, default=Path("/work/runs/shapes-main10"),
                   help="the image run to inflate (its vae/ and unet/ folders)")  # fmt: skip
    p.add_argument("--minutes", type=float, default=10.0, help="training time per arm")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument(
        "--stacked-channels",
        default=None,
        help="the stacked arm's UNet widths per level (recipe's scratch ones)",
    )
    p.add_argument("--clips", type=int, default=2000, help="training clips")
    p.add_argument("--batch", type=int, default=None, help="clips per step (recipe's)")
    p.add_argument("--noise-mixing", type=float, default=None, help="alpha (recipe's)")
    p.add_argument("--temporal-levels", default=None, help="e.g. 1,2 (recipe's); 'all'")
    p.add_argument("--frame-embedding", type=int, choices=(0, 1), default=None, help="(recipe's)")
    p.add_argument("--lr", type=float, default=None, help="the inflate arms' base LR (recipe's)")
    p.add_argument(
        "--temporal-lr-mult",
        type=float,
        default=None,
        help="the inflate arms' temporal LR multiplier (recipe's)",
    )
    p.add_argument("--per-direction", type=int, default=4, help="final samples per direction")
    p.add_argument("--per-holdout", type=int, default=8, help="final samples per held-out pair")
    p.add_argument("--gate-per-direction", type=int, default=2, help="0: no learning curve")
    p.add_argument("--gate-share", type=float, default=0.1, help="of the time for the curve")
    p.add_argument("--steps", type=int, default=12, help="sampler steps")
    p.add_argument("--guidance", type=float, default=None, help="(recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="folder caching the shape classifier and the encoded clips",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="GIFs, results.json and each arm's model (<arm>-model/)",
    )
    p.add_argument(
        "--load",
        type=Path,
        default=None,
        help="evaluate the models an earlier --out saved instead of training",
    )
    p.add_argument("--quick", action="store_true", help="a smoke test of seconds")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    recipe = json.loads(json.dumps(VIDEO_RECIPE))  # a deep copy
    if a.noise_mixing is not None:
        recipe["model"]["noise_mixing"] = recipe["scratch_noise_mixing"] = a.noise_mixing
    if a.temporal_levels is not None:
        recipe["model"]["temporal_levels"] = (
            None if a.temporal_levels == "all" else [int(v) for v in a.temporal_levels.split(",")]
        )
    if a.batch is not None:
        recipe["batch_size"] = recipe["scratch_batch_size"] = a.batch
    if a.frame_embedding is not None:
        recipe["model"]["frame_embedding"] = bool(a.frame_embedding)
    if a.lr is not None:
        recipe["lr"]["inflate"] = a.lr
    if a.temporal_lr_mult is not None:
        recipe["model"]["temporal_lr_mult"] = a.temporal_lr_mult
    guidance = recipe["guidance_scale"] if a.guidance is None else a.guidance
    arms = [s.strip() for s in a.arms.split(",") if s.strip()]
    for arm in arms:
        if arm not in ARMS:
            p.error(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    size = 32
    if a.quick:
        size, a.frames, a.clips, a.per_direction, a.per_holdout, a.steps = 16, 4, 16, 1, 1, 2
        a.gate_per_direction, recipe["batch_size"], recipe["scratch_batch_size"] = 1, 2, 2
        recipe["model"]["temporal_levels"] = None
    print(machine_line())
    print(f"settings: {vars(a)}")
    print(f"recipe: {recipe}")

    if a.quick:  # a random autoencoder and a UNet standing in for an image run
        torch.manual_seed(a.seed)
        vae = Autoencoder(AutoencoderConfig(image_size=size, block_out_channels=(8, 8),
                                            norm_groups=4)).eval()  # fmt: skip
        torch.manual_seed(0)
        image_unet = perturb(UNet(UNetConfig(
            sample_size=size // 2, in_channels=4, block_out_channels=(16, 32),
            attention_resolutions=(), head_dim=16, norm_num_groups=8, num_classes=len(KINDS),
        )))  # fmt: skip
    else:
        vae = Autoencoder.from_pretrained(a.image_run / "vae").eval()
        image_unet = UNet.from_pretrained(a.image_run / "unet")
    scale = vae.config.scaling_factor
    cnn = None if a.cache is None else a.cache / f"shape-cnn-{a.image_run.name}.safetensors"
    clf = shape_classifier(None if a.quick else cnn, vae, size, a.seed, a.quick)

    t0 = time.perf_counter()
    data = generate_moving_shapes(a.clips, frames=a.frames, image_size=size, seed=a.seed,
                                  holdout=holdout_triples())  # fmt: skip
    key = f"moments-{a.image_run.name}-{a.clips}-{a.frames}-{a.seed}.safetensors"
    cached = None if a.cache is None or a.quick else a.cache / key
    if cached is not None and cached.exists():
        moments = load_file(cached)["moments"]
    else:
        moments = encode_clip_moments(vae, torch.from_numpy(data.videos), torch.device("cpu"))
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            save_file({"moments": moments.contiguous()}, cached)
    labels = torch.from_numpy(data.labels * len(DIRECTION_NAMES) + data.direction)
    print(f"data: {a.clips} clips encoded in {time.perf_counter() - t0:.0f} s; latents "
          f"{tuple(moments.shape[1:])}")  # fmt: skip

    seen = seen_requests(a.per_direction)
    held = [(KINDS.index(k), DIRECTION_NAMES.index(d)) for k, d in HELD_OUT_PAIRS
            for _ in range(a.per_holdout)]  # fmt: skip
    real = generate_moving_shapes(len(seen), frames=a.frames, image_size=size, seed=a.seed + 99)
    real_moments = encode_clip_moments(vae, torch.from_numpy(real.videos), torch.device("cpu"))
    recon = decode_clips(vae, real_moments[:, :, :4] * scale, scale).numpy()
    real_req = (list(real.labels), list(real.direction))
    rows = [
        ["real", "seen", *read(real.videos, *real_req, clf), None, None],
        ["real-autoencoded", "seen", *read(recon, *real_req, clf), None, None],
    ]
    curves, results = {}, {"settings": {k: str(v) for k, v in vars(a).items()}, "recipe": recipe}
    diff = DiffusionConfig(class_dropout=recipe["class_dropout"])
    widths = tuple(recipe["scratch_unet_channels"] if a.stacked_channels is None else
                   (int(v) for v in a.stacked_channels.split(",")))  # fmt: skip
    for arm in arms:
        model = build(arm, image_unet, a.frames, recipe, (16, 32) if a.quick else widths)
        lr = recipe["lr"]["inflate" if arm.startswith("inflate") else "scratch"]
        cfg = TrainConfig(
            steps=3 if a.quick else 1_000_000, lr=lr,
            batch_size=recipe["scratch_batch_size" if arm == "stacked" else "batch_size"],
            warmup_steps=1 if a.quick else recipe["warmup_steps"], lr_schedule="constant",
            ema_decay=recipe["ema_decay"], checkpoint_every=1_000_000, sample_every=0,
            log_every=100, grad_clip=1.0,
        )  # fmt: skip
        gate_req = seen_requests(a.gate_per_direction)

        def measure(net, gate_req=gate_req):
            clips = draw(net, vae, scale, gate_req, a.frames, steps=a.steps, guidance=guidance,
                         seed=a.seed + 5)  # fmt: skip
            right, _, const, *_ = read(clips, *map(list, zip(*gate_req)), clf)
            return {"direction": right, "class_const": const}

        gate = None
        if a.gate_per_direction:
            gate = QualityGate(measure, lambda rows: None, min_steps=1 if a.quick else 50,
                               max_share=a.gate_share)  # fmt: skip
        print(f"{arm}: {model.summary()}; trainable "
              f"{sum(p.numel() for p in (model.temporal_parameters() if model.config.freeze_spatial else model.parameters())) / 1e6:.2f} M;"
              f" {load_line()}")  # fmt: skip
        if a.load is not None:  # the model an earlier run saved, its training figures
            net = VideoUNet.from_pretrained(a.load / f"{arm}-model")
            before = json.loads((a.load / "results.json").read_text())[arm]
            steps_done, minutes, gate = before["steps"], before["minutes"], None
            curves[arm] = before["curve"]
        else:
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                result = train_video_unet(
                    model, moments, RunFolder(Path(tmp) / "run"), diff=diff, cfg=cfg,
                    scaling_factor=scale, conditioner=ClassConditioner(
                        model.config.num_classes, dropout=recipe["class_dropout"]),
                    cond_data=labels, seed=a.seed, time_budget_s=None if a.quick else a.minutes * 60,
                    gate=gate,
                )  # fmt: skip
            minutes = (time.perf_counter() - start) / 60
            net = (result.ema.model if result.ema is not None else model).eval()
            steps_done = result.steps_done
            curves[arm] = gate.rows if gate else []
            print(f"{arm}: stopped by {result.stopped_because}, last loss {result.last_loss:.4f}")
        t1 = time.perf_counter()
        got_seen = draw(net, vae, scale, seen, a.frames, steps=a.steps, guidance=guidance,
                        seed=a.seed + 1)  # fmt: skip
        got_held = draw(net, vae, scale, held, a.frames, steps=a.steps, guidance=guidance,
                        seed=a.seed + 2)  # fmt: skip
        eval_s = time.perf_counter() - t1
        for name, got, req in (("seen", got_seen, seen), ("held-out", got_held, held)):
            rows.append([arm, name, *read(got, *map(list, zip(*req)), clf), steps_done,
                         minutes])  # fmt: skip
        print(
            f"{arm}: {steps_done} steps in {minutes:.1f} min; final sampling {eval_s:.0f} s; "
            f"{load_line()}"
        )
        if a.out is not None:
            a.out.mkdir(parents=True, exist_ok=True)
            per = a.per_direction
            # one row of clips per direction: a strip of `per` clips side by side
            grid = np.concatenate([np.concatenate(list(got_seen[d * per:(d + 1) * per]), axis=-1)
                                   for d in range(len(DIRECTION_NAMES))], axis=-2)  # fmt: skip
            save_animation(
                a.out / f"{arm}.gif",
                grid,
                fps=4,
                params={"arm": arm, "rows": DIRECTION_NAMES, "steps": steps_done},
            )
            k = min(per, a.per_holdout)  # the first k clips of each held-out pair, a row each
            rows_held = [
                got_held[i * a.per_holdout : i * a.per_holdout + k]
                for i in range(len(HELD_OUT_PAIRS))
            ]
            save_animation(
                a.out / f"{arm}-held-out.gif",
                np.concatenate([np.concatenate(list(r), axis=-1) for r in rows_held], axis=-2),
                fps=4,
                params={"arm": arm, "rows": [" ".join(h) for h in HELD_OUT_PAIRS]},
            )
            net.save_pretrained(a.out / f"{arm}-model")
        results[arm] = {"curve": curves[arm], "steps": steps_done, "minutes": minutes}

    print(
        f"learning curves (direction right and class constant on {a.gate_per_direction} "
        f"clips per direction, by training seconds without the measurements):"
    )
    curve_rows = [[arm, r["step"], r["seconds"], r["direction"], r["class_const"]]
                  for arm, rs in curves.items() for r in rs]  # fmt: skip
    print_table(["arm", "step", "train_s", "direction", "class_const"], curve_rows)
    print(
        f"VideoUNet on (shape, direction), {size} px, {a.frames} frames; {SAMPLER} "
        f"{a.steps} steps, guidance {guidance}; held out: "
        f"{', '.join(f'{k} {d}' for k, d in HELD_OUT_PAIRS)} (every colour); {load_line()}"
    )
    cols = ["clips", "asked", "direction", "moving", "class_const", "class_right", "flicker",
            "train_steps", "minutes"]  # fmt: skip
    print_table(cols, rows)
    if a.out is not None:
        results["table"] = [dict(zip(cols, r)) for r in rows]
        (a.out / "results.json").write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
