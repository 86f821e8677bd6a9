"""The sampler-quality table: FID / KID / precision / recall and time per image of a model for
each sampler and step count, beside the real-vs-real floor; its CSV and text forms, and the rows
of an earlier compatible table that a new call keeps.

Every row draws n images with the same seed (so the same starting noise) and compares them with
the same n reference images (`reference.evaluate_samples`); nfe counts the UNet calls per image.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit.checkpoint import CheckpointError, atomic_write, read_json
from ldmkit.diffusion.samplers import DEFAULT_SAMPLER, SAMPLERS, check_sampler

from .feature_nets import FeatureNet, metric_labels
from .metrics import fid_bias_warning
from .plots import plot_sampler_table
from .reference import PR_K, Reference, check_reference, evaluate_samples, real_vs_real_floor

logger = logging.getLogger(__name__)

FLOOR_NAME = "real-vs-real"
# What `ldmkit eval` measures unless told otherwise: the default sampler at 20 steps on 500
# images, minutes on a CPU. The full table (`--full`) is hours on a CPU: every sampler at
# 10..1000 steps on 2000 images (the n at which FID's small-sample bias stops mattering).
DEFAULT_SAMPLERS: tuple[str, ...] = (DEFAULT_SAMPLER,)
DEFAULT_STEPS: tuple[int, ...] = (20,)
DEFAULT_N = 500
FULL_SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpm++2m", "dpm++2m-sde")
FULL_STEPS = (10, 20, 50, 100, 1000)
FULL_N = 2000
MIN_N = 2 * PR_K  # precision / recall need k + 1 neighbours in each half


@dataclass
class SamplerTable:
    """Rows of `sampler_table`, the floor row and the combinations that were skipped."""

    rows: list[dict[str, Any]]
    floor: dict[str, Any]
    skipped: list[dict[str, Any]]
    n: int
    feature_network: str
    feature_fingerprint: str
    labels: dict[str, str]
    warning: str | None
    csv_path: Path | None = None
    png_path: Path | None = None
    best: dict[str, Any] | None = None
    best_images: Tensor | None = field(default=None, repr=False)  # samples of the best row
    kept: int = 0  # rows carried over from an earlier, compatible table (`keep_rows`)

    def all_rows(self) -> list[dict[str, Any]]:
        """The sampler rows followed by the floor row."""
        return [*self.rows, self.floor_row()]

    def floor_row(self) -> dict[str, Any]:
        row = {c: None for c in self.columns()}
        row.update(
            {k: self.floor.get(k) for k in ("n", "FID", "KID", "KID_std", "precision", "recall")}
        )
        row.update(sampler=FLOOR_NAME, feature_network=self.feature_network,
                   feature_fingerprint=self.feature_fingerprint)  # fmt: skip
        return row

    def columns(self) -> list[str]:
        cols = ["sampler", "steps", "nfe", "n", "FID", "KID", "KID_std", "precision", "recall"]
        if "IS" in self.labels:
            cols += ["IS", "IS_std"]
        return [*cols, "seconds_per_image", "feature_network", "feature_fingerprint"]

    def add(self, row: dict[str, Any], images: Tensor) -> None:
        """Append a measured row; keep its images when it has the lowest FID so far."""
        self.rows.append(row)
        if self.best is None or row["FID"] < self.best["FID"]:
            self.best, self.best_images = row, images

    def keep(self, earlier: Sequence[dict[str, Any]]) -> None:
        """Add the earlier rows whose (sampler, steps) was not measured again, in table order."""
        measured = {(r["sampler"], int(r["steps"])) for r in self.rows}
        kept = [dict(r) for r in earlier if (r["sampler"], int(r["steps"])) not in measured]
        if not kept:
            return
        order = {name: i for i, name in enumerate(SAMPLERS)}
        self.rows = sorted(
            [*kept, *self.rows],
            key=lambda r: (order.get(r["sampler"], len(order)), r["sampler"], int(r["steps"])),
        )
        self.kept = len(kept)


# ---------------------------------------------------------------------------------------------
# measuring


def skip_reason(sampler: str, steps: int, num_timesteps: int) -> str | None:
    """Why (sampler, steps) is not run for a T-step model, or None when it is."""
    if steps > num_timesteps:
        return f"{steps} steps > the model's T = {num_timesteps} diffusion steps"
    if sampler == "ddpm" and num_timesteps % steps:
        return (
            f"DDPM runs its ancestral chain on evenly strided steps only (T = {num_timesteps} "
            f"must be a multiple of steps; {steps} is not)"
        )
    return None


def sampler_table(
    ldm: Any,
    ref: Reference,
    feature_net: FeatureNet,
    samplers: Sequence[str] = DEFAULT_SAMPLERS,
    steps: Sequence[int] = DEFAULT_STEPS,
    n: int = DEFAULT_N,
    seed: int = 0,
    *,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    guidance_scale: float = 1.0,
    class_labels: Any = "auto",
    prompts: Sequence[str] | None = None,
    keep_rows: Sequence[dict[str, Any]] = (),
) -> SamplerTable:
    """FID / KID / precision / recall and wall time per image for each sampler and step count.

    Every row draws n images with the same seed (so the same starting noise), compares them with
    the first n reference images, and records the denoiser evaluations per image (nfe: Heun
    makes 2 steps - 1). The floor row is `real_vs_real_floor(ref, n)`; pass a reference of 2n
    images. Combinations that make no sense (`skip_reason`) are skipped and listed.

    Args:
        ldm: a LatentDiffusion.
        class_labels: "auto" samples a class-conditional model with the reference images' own
            labels (balanced classes when the reference has none), None uses the null label.
        prompts: the prompts of the n samples of a text-conditional model (`evaluate_run`
            passes the reference images' own captions); None samples it unconditionally.
        out_dir: when given, writes sampler_table.csv and sampler_table.png there.
        keep_rows: rows of an earlier table of the same model, n, seed, guidance and features
            (see `evaluate_run`); those whose (sampler, steps) is not measured again are kept,
            so a long table can be built in several calls. `best` is this call's best row.
    """
    _check_table_args(ref, feature_net, samplers, steps, n)
    if ldm.is_text_conditional:
        conditions = {"prompt": list(prompts)[:n]} if prompts else {}
    else:
        conditions = {"class_labels": _sample_labels(ldm, ref, n, class_labels)}
    table = SamplerTable(
        [], real_vs_real_floor(ref, n, seed=seed), [], n, feature_net.name,
        feature_net.fingerprint, metric_labels(feature_net), fid_bias_warning(n),
    )  # fmt: skip
    with _CallCounter(ldm.unet) as unet_calls:
        for sampler in samplers:
            for k in sorted({int(s) for s in steps}):
                reason = skip_reason(sampler, k, ldm.schedule.num_timesteps)
                if reason is not None:
                    table.skipped.append({"sampler": sampler, "steps": k, "reason": reason})
                    logger.info("skipping %s at %d steps: %s", sampler, k, reason)
                    continue
                unet_calls.count = 0
                t0 = time.perf_counter()
                images = ldm.sample(
                    n, sampler=sampler, steps=k, seed=seed, guidance_scale=guidance_scale,
                    batch_size=batch_size, **conditions,
                )  # fmt: skip
                seconds = time.perf_counter() - t0
                nfe = unet_calls.count // math.ceil(n / batch_size)  # UNet calls per batch
                m = evaluate_samples(images, ref, feature_net, seed=seed)
                table.add(_row(table, sampler, k, nfe, m, seconds), images)
    table.keep(keep_rows)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        table.csv_path = write_table_csv(table, out / "sampler_table.csv")
        table.png_path = plot_sampler_table(table, out / "sampler_table.png")
    return table


def _check_table_args(
    ref: Reference, net: FeatureNet, samplers: Sequence[str], steps: Sequence[int], n: int
) -> None:
    check_sampler(*samplers)
    if not steps or any(int(s) < 1 for s in steps):
        raise ValueError(f"steps must be positive integers, got {list(steps)}")
    if n < MIN_N:
        raise ValueError(f"n must be at least {MIN_N} images, got {n}")
    check_reference(ref, net)
    if ref.n < n:
        raise ValueError(
            f"the reference holds {ref.n} images, fewer than n = {n}; lower n or use more data"
        )


def _sample_labels(ldm: Any, ref: Reference, n: int, class_labels: Any) -> Tensor | None:
    """The class labels of the n samples of each row ("auto": see `sampler_table`)."""
    cond = ldm.conditioner
    if not (isinstance(class_labels, str) and class_labels == "auto"):
        return cond.check(class_labels, n)
    if not cond.enabled:
        return None
    if ref.labels is not None and ref.n >= n and int(ref.labels.max()) < cond.num_classes:
        return ref.labels[:n].clone()  # the reference images' own class mix
    return torch.arange(n) % cond.num_classes


class _CallCounter:
    """Counts the forward calls of a module inside a `with` block."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.count = module, 0

    def __enter__(self) -> _CallCounter:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _hook(self, *_: Any) -> None:
        self.count += 1


def _row(
    table: SamplerTable, sampler: str, steps: int, nfe: int, m: dict[str, Any], seconds: float
) -> dict[str, Any]:
    """One table row from `evaluate_samples`' result `m` and the sampling time."""
    row = {"sampler": sampler, "steps": steps, "nfe": nfe, "n": table.n}
    row.update({c: m.get(c) for c in table.columns() if c in m and c != "n"})
    row["seconds_per_image"] = seconds / table.n
    row["feature_network"] = table.feature_network
    row["feature_fingerprint"] = table.feature_fingerprint
    logger.info(
        "%s %d steps: %s = %.4g, %.3g s/image",
        sampler, steps, table.labels["FID"], row["FID"], row["seconds_per_image"],
    )  # fmt: skip
    return row


# ---------------------------------------------------------------------------------------------
# the table as CSV and text; the rows of an earlier table


def write_table_csv(table: SamplerTable, path: str | os.PathLike) -> Path:
    """Write the rows and the floor row as CSV, atomically."""
    path = Path(path)
    cols = table.columns()

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for row in table.all_rows():
                w.writerow({c: "" if row.get(c) is None else row[c] for c in cols})

    atomic_write(path, write)
    return path


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def format_table(table: SamplerTable) -> str:
    """The table as aligned text, headed by the metric labels, with n and any warning below."""
    labels = table.labels
    cols = [c for c in table.columns() if c not in ("feature_network", "feature_fingerprint")]
    head = {c: c for c in cols}
    for c in cols:
        base = c.removesuffix("_std")
        if base in labels:
            head[c] = labels[base] + ("_std" if c.endswith("_std") else "")
    head["seconds_per_image"] = "s/image"
    body = [[_fmt(r.get(c)) for c in cols] for r in table.all_rows()]
    widths = [max(len(head[c]), *(len(row[i]) for row in body)) for i, c in enumerate(cols)]
    lines = ["  ".join(head[c].rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in body]
    lines.append(
        f"n = {table.n} images per row; features: {table.feature_network} "
        f"(fingerprint {table.feature_fingerprint})"
    )
    if table.floor.get("note"):
        lines.append(f"note: {table.floor['note']}")
    for s in table.skipped:
        lines.append(f"skipped {s['sampler']} at {s['steps']} steps: {s['reason']}")
    if table.warning:
        lines.append(f"warning: {table.warning}")
    return "\n".join(lines)


def earlier_rows(summary_path: Path, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of an earlier summary.json measured under the same `identity`, else none."""
    if not summary_path.is_file():
        return []
    try:
        old = read_json(summary_path)
    except CheckpointError as e:
        logger.warning("%s; starting a new table", e)
        return []
    differ = [k for k, v in identity.items() if old.get(k) != v]
    if differ:
        logger.info(
            "starting a new table in %s: the earlier one differs in %s",
            summary_path.parent, ", ".join(differ),
        )  # fmt: skip
        return []
    return [r for r in old.get("table", []) if "sampler" in r and "steps" in r]


__all__ = [
    "DEFAULT_N",
    "DEFAULT_SAMPLERS",
    "DEFAULT_STEPS",
    "FULL_N",
    "FULL_SAMPLERS",
    "FULL_STEPS",
    "MIN_N",
    "FLOOR_NAME",
    "SamplerTable",
    "earlier_rows",
    "format_table",
    "sampler_table",
    "skip_reason",
    "write_table_csv",
]
