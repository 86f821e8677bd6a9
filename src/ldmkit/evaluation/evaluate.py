"""`evaluate_run`: everything `ldmkit eval` does to a trained run, as one story.

    1. the run's data, a feature network (`feature_nets`) and the features of 2n real images
       (`reference`, cached in <run>/eval/reference/)
    2. the sampler table beside the real-vs-real floor (`table`), keeping the rows of an earlier
       table in out_dir that was measured under the same identity (weights, data, features, n,
       seed, guidance)
    3. the VAE reconstruction error and the memorisation check (`memorisation`) on real images
       the model never saw
    4. summary.json beside sampler_table.csv / .png and memorisation-*.png in out_dir

The maths lives in `metrics.py`; each step above in its own module.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit.checkpoint import WEIGHTS_NAME, write_json
from ldmkit.data.transforms import to_float
from ldmkit.diffusion.samplers import check_sampler
from ldmkit.pipeline import LatentDiffusion
from ldmkit.runs import RunFolder, read_data

from .feature_nets import FeatureNet, feature_net_info, get_feature_net
from .features import file_fingerprint
from .memorisation import memorisation_check
from .reference import Reference, held_out_spec, reference_features
from .table import (
    DEFAULT_N,
    DEFAULT_SAMPLERS,
    DEFAULT_STEPS,
    SamplerTable,
    earlier_rows,
    sampler_table,
    skip_reason,
)

logger = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    ref: str | None = None,
    held_out: str | None = None,
    features: str | None = None,
    samplers: Sequence[str] = DEFAULT_SAMPLERS,
    steps: Sequence[int] = DEFAULT_STEPS,
    n: int = DEFAULT_N,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | None = None,
    ldm: LatentDiffusion | None = None,
    guidance_scale: float | None = None,
    fresh: bool = False,
) -> tuple[SamplerTable, dict[str, Any]]:
    """Everything `ldmkit eval` does: the sampler table, floor, VAE reconstruction error and
    memorisation share of a run, written to out_dir (default run_dir/eval) as
    sampler_table.csv, sampler_table.png, memorisation-*.png and summary.json.

    Args:
        ref: reference data spec (default: the run's training data, from data.json).
        held_out: real images the model never saw, for the memorisation ratio and the VAE error
            (default: `held_out_spec` of the run's data; without one both use what exists and
            say so).
        features: "domain", "inception", "inception:PATH" or None for `default_feature_kind`.
        guidance_scale: classifier-free guidance of a class-conditional model (default: the
            run's `guidance_scale`, as `ldmkit sample` uses).
        fresh: start a new table. Otherwise rows of the table already in out_dir are kept
            when it was measured on the same weights, reference, features, n, seed and
            guidance (rows measured again are replaced), so `ldmkit eval --samplers ddpm
            --steps 1000` can add a slow row to the table of an earlier call.
    """
    run = RunFolder(run_dir).require_run()
    check_sampler(*samplers)  # before the model and data are loaded
    out = Path(out_dir) if out_dir is not None else run.eval_dir
    ldm = ldm or LatentDiffusion.from_run(run.path, device=device)
    _announce(ldm, samplers, steps, n, batch_size, guidance_scale)

    # 1. data, feature network, reference features of 2n real images (n for the model, n more
    # for the floor)
    train_ds = run.load_data()
    ref_ds = train_ds if ref is None else run.load_data(ref)
    net = get_feature_net(features, dataset=ref_ds, run_dir=run.path, seed=seed)
    reference = reference_features(ref_ds, net, n=2 * n, cache_dir=run.eval_dir / "reference")
    if reference.n < n:
        logger.warning(
            "the reference holds only %d images; evaluating n = %d", reference.n, reference.n
        )
        n = reference.n

    # 2. the sampler table, grown from an earlier one of the same identity
    if guidance_scale is None:
        guidance_scale = ldm.guidance_scale
    identity = {
        "model_fingerprint": file_fingerprint(run.unet_dir / WEIGHTS_NAME),
        "reference_fingerprint": ref_ds.fingerprint(),
        "feature_fingerprint": net.fingerprint,
        "n": n,
        "seed": seed,
        "guidance_scale": guidance_scale if ldm.conditioner.enabled else None,
    }
    keep_rows = [] if fresh else earlier_rows(out / SUMMARY_NAME, identity)
    prompts = None
    if ldm.is_text_conditional and ref_ds.captions:  # the reference images' own captions
        prompts = [ref_ds.captions[i] for i in reference.indices[:n].tolist()]
    table = sampler_table(
        ldm, reference, net, samplers, steps, n, seed, out_dir=out, batch_size=batch_size,
        guidance_scale=guidance_scale, prompts=prompts, keep_rows=keep_rows,
    )  # fmt: skip
    summary = _summary(run, identity, table, ref_ds, reference, net)

    # 3. the autoencoder and memorisation, on held-out real images where the data has them
    own = reference if ref_ds is train_ds else None  # reference features of training images
    summary.update(_held_out_checks(ldm, run, train_ds, held_out, table, net, out, own))

    # 4. the summary beside the table's files
    summary["files"]["summary"] = str(out / SUMMARY_NAME)
    write_json(out / SUMMARY_NAME, summary)
    return table, summary


def _announce(
    ldm: LatentDiffusion, samplers: Sequence[str], steps: Sequence[int], n: int, batch_size: int,
    guidance_scale: float | None,
) -> None:  # fmt: skip
    """Log how long the table's sampling will take, before it starts (a probe per sampler)."""
    from ldmkit.utils import format_seconds

    T = ldm.schedule.num_timesteps
    rows = [(s, k) for s in samplers for k in sorted(set(steps)) if skip_reason(s, k, T) is None]
    seconds = sum(
        ldm.estimate_seconds(
            n, sampler=sampler, steps=[k for s, k in rows if s == sampler], batch_size=batch_size,
            guidance_scale=guidance_scale,
        )
        for sampler in dict.fromkeys(s for s, _ in rows)
    )  # fmt: skip
    logger.info(
        "sampler table: %d row(s) of %d images (%s at %s steps): the sampling will take about "
        "%s here (timed now), plus the feature network and reference features on a first call",
        len(rows), n, ",".join(samplers), ",".join(map(str, sorted(set(steps)))),
        format_seconds(seconds),
    )  # fmt: skip


def _summary(
    run: RunFolder,
    identity: dict[str, Any],
    table: SamplerTable,
    ref_ds: Any,
    reference: Reference,
    net: FeatureNet,
) -> dict[str, Any]:
    """summary.json's identity, reference, feature network and table parts."""
    return {
        "run": str(run.path),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **identity,
        "kept_rows": table.kept,
        "reference": {
            "spec": ref_ds.spec,
            "name": ref_ds.name,
            "fingerprint": ref_ds.fingerprint(),
            "num_images": len(ref_ds),
            "n_used": reference.n,
        },
        "feature_network": feature_net_info(net, run.path),
        "warning": table.warning,
        "floor": table.floor,
        "best": table.best,
        "table": table.rows,
        "skipped": table.skipped,
        "files": {"csv": str(table.csv_path), "png": str(table.png_path)},
    }


def _held_out_checks(
    ldm: LatentDiffusion,
    run: RunFolder,
    train_ds: Any,
    held_out: str | None,
    table: SamplerTable,
    net: FeatureNet,
    out: Path,
    train_reference: Reference | None = None,
) -> dict[str, Any]:
    """summary.json's VAE reconstruction error and memorisation check (and why one is missing).

    The memorisation check searches the training images whose features the reference holds
    already (`train_reference`: 2n of them, all where the data has fewer) and as many held-out
    images: equal sizes keep its ratio ~1 for a model that generalises, and a large data set's
    features are not computed again (all 11 000 photos through Inception took ~40 min here).
    """
    held_ds, held_note = held_out_data(run, train_ds, held_out)
    recon_images = (held_ds if held_ds is not None else train_ds).images[:1000]
    checks: dict[str, Any] = {
        "vae_reconstruction": {
            **reconstruction_error(ldm, recon_images),
            "on": "held-out images" if held_ds is not None else "training images",
            "units": "MSE on pixels in [0, 1]; PSNR in dB",
        }
    }
    if held_ds is not None and table.best_images is not None:
        train_images, train_features = train_ds.images, None
        if train_reference is not None and train_reference.n < len(train_ds):
            train_images = train_ds.images[train_reference.indices]
            train_features = train_reference.features
        held_images = held_ds.images
        if len(held_images) > len(train_images):  # a seeded sample of the train sample's size
            keep = torch.randperm(len(held_images), generator=torch.Generator().manual_seed(0))
            held_images = held_images[keep[: len(train_images)].sort().values]
        mem = memorisation_check(
            table.best_images, train_images, held_images, net, out_dir=out,
            train_features=train_features, n_train_total=len(train_ds),
        )  # fmt: skip
        checks["memorisation"] = {
            **mem.to_dict(),
            "samples": f"{table.best['sampler']} at {table.best['steps']} steps",
        }
    else:
        checks["memorisation"] = {"near_copy_share": None, "note": held_note}
    if held_note:
        checks["held_out_note"] = held_note
    return checks


def held_out_data(run: RunFolder, train_ds: Any, held_out: str | None) -> tuple[Any, str | None]:
    """(real images the model never saw, None), or (None, a note saying why there are none)."""
    cfg = run.config()
    size, channels, how = cfg.image_size, cfg.channels, cfg.conditioning
    if held_out is not None:
        return read_data(held_out, image_size=size, channels=channels, conditioning=how), None
    spec = held_out_spec(train_ds.spec.split("|")[0])
    if spec is not None:
        held_spec, seed_offset = spec
        return read_data(
            held_spec, image_size=size, channels=channels, seed=cfg.seed + seed_offset,
            conditioning=how,
        ), None  # fmt: skip
    return None, (
        f"{train_ds.name} has no held-out part: the VAE error is on training images and the "
        "memorisation check is skipped; pass --held-out DATA"
    )


@torch.no_grad()
def reconstruction_error(
    ldm: LatentDiffusion, images: Tensor, batch_size: int = 128
) -> dict[str, float]:
    """VAE reconstruction error of images (N, C, H, W) uint8 or float in [-1, 1].

    Encodes with the posterior mode and decodes. MSE is on pixels in [0, 1], averaged over all
    pixels; PSNR = 10 log10(1 / MSE) in dB (of the mean MSE, not a mean of per-image PSNRs).
    """
    total, count = 0.0, 0
    for s in range(0, len(images), batch_size):
        x = images[s : s + batch_size]
        x = to_float(x) if x.dtype == torch.uint8 else x.to(torch.float32)
        recon = ldm.decode(ldm.encode(x)).cpu()
        total += float(((recon - x.clamp(-1, 1)) / 2).square().sum())
        count += x.numel()
    mse = total / count
    return {"mse": mse, "psnr": 10 * math.log10(1 / mse) if mse > 0 else math.inf, "n": len(images)}


__all__ = [
    "DEFAULT_SAMPLERS",
    "DEFAULT_STEPS",
    "evaluate_run",
    "held_out_data",
    "reconstruction_error",
]
