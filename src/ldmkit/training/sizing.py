"""The image size a run trains at, when the user does not say: the data's own, if the device
can train it in the time there is.

`choose_size` reads the data's size from the image headers (`data.native_size`), rounds it to
what the models need (`recipe.round_size`), and, above the smallest size, times one training
step of each model at that size on this device (throw-away models, `step_times`). A size is
affordable when the time budget gives each stage at least MIN_VAE_STEPS / MIN_UNET_STEPS steps
at that speed, or, without a budget, when the recipe's configured steps take at most
NO_BUDGET_LIMIT_S. The largest affordable size of the data's own and its halvings wins; when it
is not the data's own, the message says why, what full size would take, and the flag that
trains at it anyway. An explicit image_size (flag, --set or config file) is never changed.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..data import native_size
from ..data.transforms import to_float
from ..models.unet import UNet
from ..models.vae import Autoencoder
from ..recipe import (
    MIN_AUTO_SIZE,
    RunConfig,
    parse_duration,
    resolve_config,
    round_size,
    run_config_from_dict,
    size_step,
)
from ..runs import RunFolder
from ..utils import format_seconds

log = logging.getLogger(__name__)

# the fewest steps a time budget must give a stage at a size chosen for the user: the 10-minute
# main job on a 2-core CPU gives about 770 autoencoder and 2800 UNet steps at 32 px
MIN_VAE_STEPS = 400
MIN_UNET_STEPS = 1500
NO_BUDGET_LIMIT_S = 2 * 3600.0  # without a budget: the recipe's steps may take this long


@dataclass(frozen=True)
class SizeChoice:
    """The size a run trains at and why (`note`, also written to data.json)."""

    size: int
    native: int | None  # the data's own size (short side), None if it could not be told
    note: str
    reduced: bool = False  # smaller than the data's own, for the device's speed


@dataclass(frozen=True)
class StepTimes:
    """Seconds per optimizer step of each model at one size on one device (one timed step)."""

    size: int
    vae: float
    unet: float

    def text(self) -> str:
        return f"~{self.vae:.2f} s per autoencoder step and ~{self.unet:.2f} s per UNet step"


def choose_size(given: dict[str, Any], device: torch.device) -> SizeChoice:
    """The training size for the user's settings `given` (which hold no image_size), logged."""
    spec = str(given.get("data") or RunConfig().data)
    native = native_size(spec, RunFolder.holds_run)
    if native is None:  # no readable image: the loader says why, at the default size
        return SizeChoice(RunConfig().image_size, None, "the data's size could not be read")
    size = round_size(native.side)
    if native.side < MIN_AUTO_SIZE:
        note = (
            f"the data's images are {native.side} px ({native.how}): training at {size} px, the "
            "smallest size of the recipe (they are enlarged)"
        )
    elif size != native.side:
        note = (
            f"the data's own size, {native.side} px from {native.how}, rounded down to {size} px: "
            f"the models need a multiple of {size_step(size)}"
        )
    else:
        note = f"the data's own size, from {native.how}"
    full = size
    budget = parse_duration(str(given["time_budget"])) if given.get("time_budget") else None
    times: list[StepTimes] = []
    while size > MIN_AUTO_SIZE:
        times.append(step_times(given, size, device))
        if _affordable(given, times[-1], budget):
            break
        size = round_size(size // 2)
    if size == full:
        log.info("image size: %d px, %s", size, note)
        return SizeChoice(size, native.side, note)
    why = _too_slow(given, times[0], budget)
    at = f" ({times[-1].text()})" if times[-1].size == size else ""
    cost = (
        ""
        if budget is None
        else (
            f" (the recipe's steps would take about "
            f"{format_seconds(_recipe_seconds(given, times[0]))} here)"
        )
    )
    note = (
        f"the data's images are {native.side} px ({native.how}), but at {full} px this device "
        f"takes {times[0].text()}, so {why}; training at {size} px instead{at}. To train at "
        f"{full} px anyway pass --image-size {full}{cost}"
    )
    log.warning("image size: %s", note)
    return SizeChoice(size, native.side, note, reduced=True)


def _settings(given: dict[str, Any], size: int) -> RunConfig:
    return run_config_from_dict({**given, "image_size": size})


def _recipe_seconds(given: dict[str, Any], t: StepTimes) -> float:
    cfg = _settings(given, t.size)
    return cfg.vae_train.steps * t.vae + cfg.unet_train.steps * t.unet


def _budget_steps(given: dict[str, Any], t: StepTimes, budget: float) -> tuple[int, int]:
    split = _settings(given, t.size).budget_split
    return int(split * budget / t.vae), int((1 - split) * budget / t.unet)


def _affordable(given: dict[str, Any], t: StepTimes, budget: float | None) -> bool:
    if budget is None:
        return _recipe_seconds(given, t) <= NO_BUDGET_LIMIT_S
    vae_steps, unet_steps = _budget_steps(given, t, budget)
    return vae_steps >= MIN_VAE_STEPS and unet_steps >= MIN_UNET_STEPS


def _too_slow(given: dict[str, Any], t: StepTimes, budget: float | None) -> str:
    if budget is None:
        return (
            f"the recipe's steps would take about {format_seconds(_recipe_seconds(given, t))}, over "
            f"the {format_seconds(NO_BUDGET_LIMIT_S)} a size is chosen for without a --time-budget"
        )
    vae_steps, unet_steps = _budget_steps(given, t, budget)
    return (
        f"the --time-budget {given['time_budget']} would give only {vae_steps} autoencoder and "
        f"{unet_steps} UNet steps (a size is chosen for at least {MIN_VAE_STEPS} and "
        f"{MIN_UNET_STEPS})"
    )


def step_times(given: dict[str, Any], size: int, device: torch.device) -> StepTimes:
    """One timed optimizer step of each model of the user's settings at `size` px (RGB,
    unconditional: a class embedding or text encoder adds little), on throw-away models."""
    cfg = resolve_config(_settings(given, size), 3, None)
    images = torch.randint(0, 256, (cfg.vae_train.micro_batch, 3, size, size), dtype=torch.uint8)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        vae = vae_step_time(cfg, images, device) * cfg.vae_train.grad_accum
        unet = unet_step_time(cfg, cfg.unet_train.micro_batch, device) * cfg.unet_train.grad_accum
    return StepTimes(size, vae, unet)


def plan_lines(cfg: RunConfig, size: SizeChoice | None = None) -> list[str]:
    """What a run will train, for the log before it starts: the size and why, each model's
    shape, parameters and batch (the models are built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        vae, unet = Autoencoder(cfg.vae), UNet(cfg.unet)
    z, h, w = vae.latent_shape()
    why = ""
    if size:
        why = (
            f": {size.note}"
            if not size.reduced
            else (
                f": smaller than the data's {size.native} px, for this device's speed (see above)"
            )
        )
    attention = ", ".join(str(r) for r in cfg.unet.attention_resolutions) or "none"
    what, batch = "UNet", f"batch {cfg.unet_train.batch_size}"
    if cfg.video is not None:  # the video UNet around the image UNet's config
        from ..models.video import VideoUNet

        with torch.device("meta"):
            unet = VideoUNet(cfg.video.unet_config(cfg.unet))
        shell = (
            f", per-frame layers of {cfg.video.frame_channels}" if cfg.video.frame_channels else ""
        )
        what = f"video UNet ({cfg.video.layout}{shell}, {cfg.video.frames} frames)"
        batch = f"batch {cfg.unet_train.batch_size} clips"
    return [
        f"{cfg.image_size} px, {cfg.channels or '?'} channels{why}",
        f"autoencoder f{vae.downsample_factor} -> {z}x{h}x{w} latents, channels "
        f"{list(cfg.vae.block_out_channels)}, {vae.num_parameters() / 1e6:.2f} M params, batch "
        f"{cfg.vae_train.batch_size}",
        f"{what} at {cfg.unet.sample_size}x{cfg.unet.sample_size}, channels "
        f"{list(cfg.unet.block_out_channels)}, attention at {attention}, "
        f"{unet.num_parameters() / 1e6:.2f} M params, {batch}",
    ]


# ------------------------------------------------------------------------------ timing
def vae_step_time(cfg: RunConfig, images: Tensor, device: torch.device) -> float:
    """Seconds per autoencoder micro-batch of cfg's, on `images` (uint8)."""
    mb = min(cfg.vae_train.micro_batch, len(images))
    x = to_float(images[:mb]).to(device)
    return estimate_step_time(
        Autoencoder(cfg.vae).to(device), lambda m: m(x)[0].square().mean(), device, repeats=1
    )


def unet_step_time(cfg: RunConfig, num_images: int, device: torch.device) -> float:
    """Seconds per UNet micro-batch of cfg's (at most `num_images` latents)."""
    c, mb = cfg.unet, min(cfg.unet_train.micro_batch, num_images)
    z = torch.randn(mb, c.in_channels, c.sample_size, c.sample_size, device=device)
    t = torch.randint(0, cfg.diffusion.num_timesteps, (mb,), device=device)
    y = {"class_labels": torch.zeros(mb, dtype=torch.long, device=device)} if c.num_classes else {}
    return estimate_step_time(
        UNet(c).to(device), lambda m: m(z, t, **y).square().mean(), device, repeats=1
    )


def estimate_step_time(
    model: torch.nn.Module, make_batch, device: torch.device, repeats: int = 2
) -> float:
    """Seconds per training micro-batch, measured on a throw-away copy of the model."""
    probe = copy.deepcopy(model).train()
    opt = torch.optim.SGD(probe.parameters(), lr=0.0)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        loss = make_batch(probe)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del probe, opt
    return min(times[1:])
