"""Pictures of a run: samples by class, denoising trajectories, VAE reconstructions, latent
channels, training loss and the sampler-quality table (PNG files).

Figures use matplotlib's object API (`matplotlib.figure.Figure` with the Agg canvas), never
pyplot, so no global backend or figure state is touched. Images are (B, C, H, W) float in
[-1, 1] or uint8, as everywhere in ldmkit.

The denoising trajectory is recorded through the sampler callback `callback(i, x, sigma, x0)`:
x is the VE state x = x0 + sigma * noise of the (scaled) latents, so it is shown in image space
as decode(x / sqrt(1 + sigma^2)), the VP latent x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar)
noise with alpha_bar = 1 / (1 + sigma^2); x0 is the step's prediction of the clean latent.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ldmkit.data.transforms import to_float
from ldmkit.diffusion.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS
from ldmkit.runs import read_log

from .grids import as_uint8, save_grid, to_uint8_hwc

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# helpers


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    from ldmkit.checkpoint import atomic_write

    path = Path(path)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def _show(ax: Any, image: np.ndarray) -> None:
    """Draw one uint8 (H, W, C) image without axes."""
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


# ---------------------------------------------------------------------------------------------
# curves


def plot_loss_curves(log_path: str | os.PathLike, path: str | os.PathLike) -> Path | None:
    """Loss against step, one panel per training stage (log y); None when nothing is logged."""
    log_path = Path(log_path)
    if not log_path.is_file():
        return None
    rows = [r for r in read_log(log_path) if "loss" in r and "step" in r and "stage" in r]
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    if not stages:
        return None
    fig = _figure(5 * len(stages), 3.5)
    for k, stage in enumerate(stages):
        ax = fig.add_subplot(1, len(stages), k + 1)
        pts = sorted((r["step"], r["loss"]) for r in rows if r["stage"] == stage)
        steps, losses = np.array([p[0] for p in pts]), np.array([p[1] for p in pts], float)
        ax.plot(steps, losses, marker="o" if len(pts) < 20 else None, lw=1, alpha=0.6, label="loss")
        if len(pts) >= 20:  # an exponential moving average shows the trend through the noise
            ema, smooth = losses[0], []
            for v in losses:
                ema = 0.9 * ema + 0.1 * v
                smooth.append(ema)
            ax.plot(steps, smooth, lw=2, label="EMA 0.9")
            ax.legend()
        if np.all(losses > 0):
            ax.set_yscale("log")
        ax.set_title(f"{stage} loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_sampler_table(table: Any, path: str | os.PathLike) -> Path:
    """FID against steps for each sampler (log x), with the real-vs-real floor dashed."""
    fig = _figure(7, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    samplers = list(dict.fromkeys(r["sampler"] for r in table.rows))
    for s in samplers:
        pts = sorted((r["steps"], r["FID"]) for r in table.rows if r["sampler"] == s)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
    floor = table.floor.get("FID")
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", lw=1, label=f"real vs real ({floor:.3g})")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.set_xticks(sorted({r["steps"] for r in table.rows}) or [1])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sampler steps")
    ax.set_ylabel(f"{table.labels['FID']} (n = {table.n})")
    title = f"sample quality against steps; features {table.feature_network}"
    if table.warning:
        title += f"\nn = {table.n} < 2000: biased, compare only at equal n"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# pictures of the model


@torch.no_grad()
def plot_samples(
    ldm: Any,
    path: str | os.PathLike,
    *,
    per_class: int = 8,
    n: int = 64,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    guidance_scale: float = 1.0,
    prompts: list[str] | None = None,
) -> Path:
    """A sample grid: one row of `per_class` samples per class (or per prompt of a
    text-conditional model), labelled with the class names (prompts); n samples in a square
    grid otherwise."""
    cond = ldm.conditioner
    options = dict(sampler=sampler, steps=steps, seed=seed, guidance_scale=guidance_scale)
    if ldm.is_text_conditional and prompts:
        images, per_row, names = ldm.prompt_grid(prompts, per_class, **options)
        save_grid(images, path, nrow=per_row, row_labels=names, scale=2)
    elif cond.num_classes:
        labels, per_row, names = cond.grid_labels(cond.num_classes * per_class)
        images = ldm.sample(len(labels), class_labels=labels, **options)
        names = names or [str(c) for c in range(cond.num_classes)]
        save_grid(images, path, nrow=per_row, row_labels=names, scale=2)
    else:
        images = ldm.sample(n, sampler=sampler, steps=steps, seed=seed)
        save_grid(images, path, scale=2)
    return Path(path)


@torch.no_grad()
def record_trajectory(
    ldm: Any,
    *,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    n: int = 3,
    class_labels: Tensor | None = None,
) -> list[tuple[int, float, Tensor, Tensor]]:
    """Sample n images and return, for every sampler step i, (i, sigma, x_t, x0_pred).

    x_t is the VP latent x / sqrt(1 + sigma^2) after step i (at sigma = sigmas[i + 1]) and
    x0_pred the step's prediction of the clean latent, both scaled latents (B, C, h, w) on the
    CPU; decode them with `ldm.decode`. A class-conditional model gets classes 0, 1, ... unless
    class_labels is given.
    """
    cond = ldm.conditioner
    if class_labels is None and cond.num_classes:
        class_labels = torch.arange(n) % cond.num_classes
    record: list[tuple[int, float, Tensor, Tensor]] = []

    def callback(i: int, x: Tensor, sigma: Tensor, x0: Tensor) -> None:
        s = float(sigma)
        x_t = x.detach().float().cpu() / math.sqrt(1 + s**2)  # VE state -> VP latent x_t
        record.append((i, s, x_t, x0.detach().float().cpu()))

    ldm.sample(
        n, sampler=sampler, steps=steps, seed=seed, class_labels=class_labels, batch_size=n,
        callback=callback,
    )  # fmt: skip
    if not record:
        raise ValueError(f"the {sampler} sampler made no callback; cannot draw a trajectory")
    return record


@torch.no_grad()
def plot_denoising_trajectory(
    ldm: Any,
    path: str | os.PathLike,
    *,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    n: int = 3,
    frames: int = 8,
    class_labels: Tensor | None = None,
) -> Path:
    """For n samples, a row of decoded x_t and a row of decoded predicted x0 at `frames` of the
    sampler's steps (from `record_trajectory`)."""
    record = record_trajectory(
        ldm, sampler=sampler, steps=steps, seed=seed, n=n, class_labels=class_labels
    )
    pick = sorted({round(v) for v in np.linspace(0, len(record) - 1, min(frames, len(record)))})
    cols = []
    for j in pick:
        i, sigma, x_t, x0 = record[j]
        cols.append(
            (i, sigma, to_uint8_hwc(ldm.decode(x_t).cpu()), to_uint8_hwc(ldm.decode(x0).cpu()))
        )
    fig = _figure(1.2 * len(cols) + 0.8, 1.25 * 2 * n + 0.4)
    axes = fig.subplots(2 * n, len(cols), squeeze=False)
    for c, (i, sigma, xt_img, x0_img) in enumerate(cols):
        axes[0, c].set_title(f"step {i + 1}\nσ={sigma:.3g}", fontsize=8)
        for b in range(n):
            _show(axes[2 * b, c], xt_img[b])
            _show(axes[2 * b + 1, c], x0_img[b])
    for b in range(n):
        axes[2 * b, 0].set_ylabel(f"x_t #{b}", fontsize=8)
        axes[2 * b + 1, 0].set_ylabel(f"pred x0 #{b}", fontsize=8)
    fig.suptitle(f"{sampler}, {steps} steps: x_t (decoded) and predicted x0", fontsize=9)
    return _save(fig, path)


@torch.no_grad()
def plot_reconstructions(ldm: Any, images: Tensor, path: str | os.PathLike, *, n: int = 8) -> Path:
    """Originals (top row) above their VAE reconstructions (bottom row), n of each."""
    x = as_uint8(images[:n])
    recon = ldm.decode(ldm.encode(to_float(x))).cpu()
    save_grid(
        torch.cat([x, as_uint8(recon)]), path, nrow=len(x),
        row_labels=["original", "reconstruction"], scale=2,
    )  # fmt: skip
    return Path(path)


@torch.no_grad()
def plot_latent_channels(ldm: Any, images: Tensor, path: str | os.PathLike, *, n: int = 4) -> Path:
    """Each image beside its latent channels (posterior mode, scaled as the UNet sees them).

    Channels share one symmetric colour scale per channel across the images, so a channel that
    carries little shows as pale.
    """
    x = as_uint8(images[:n])
    z = ldm.encode(to_float(x)).cpu()  # (n, C_lat, h, w)
    n, c = z.shape[:2]
    fig = _figure(1.4 * (c + 1) + 0.6, 1.4 * n + 0.5)
    axes = fig.subplots(n, c + 1, squeeze=False)
    pics = to_uint8_hwc(x)
    for b in range(n):
        _show(axes[b, 0], pics[b])
        for k in range(c):
            lim = float(z[:, k].abs().max()) or 1.0
            axes[b, k + 1].imshow(z[b, k].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim,
                                  interpolation="nearest")  # fmt: skip
            axes[b, k + 1].set_xticks([])
            axes[b, k + 1].set_yticks([])
            if b == 0:
                axes[0, k + 1].set_title(f"z[{k}] std {float(z[:, k].std()):.2f}", fontsize=8)
    axes[0, 0].set_title("image", fontsize=8)
    fig.suptitle(f"latents {tuple(z.shape[1:])} (scaled, posterior mode)", fontsize=9)
    return _save(fig, path)


__all__ = [
    "plot_denoising_trajectory",
    "plot_latent_channels",
    "plot_loss_curves",
    "plot_reconstructions",
    "plot_sampler_table",
    "plot_samples",
    "record_trajectory",
]
