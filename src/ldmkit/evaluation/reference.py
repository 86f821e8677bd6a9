"""The real side of every comparison: features of reference images (cached), the scores of
generated images against them, the real-vs-real floor, and which real images a model never saw.

Honest small-n numbers: every figure states n and the feature network; a FID from fewer than
2000 images carries `metrics.fid_bias_warning`; the FID between two disjoint real halves of the
same n (the real-vs-real floor, `real_vs_real_floor`) is reported beside the model's.

Cache (no pickle; safetensors with string metadata):
    <cache_dir>/ref-<data fp>-<net fp>-n<N>.safetensors   features, indices, labels and
        FeatureStats of the first N images of a seeded permutation of the data (so a cache for
        N also serves any n <= N)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit.checkpoint import CheckpointError, load_tensors, save_tensors

from .feature_nets import FeatureNet, compute_features, has_logits, metric_labels
from .metrics import (
    FeatureStats,
    fid_bias_warning,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)

logger = logging.getLogger(__name__)

PR_K = 3  # k of the k-NN manifolds for precision / recall (Kynkäänniemi 2019 use 3)


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


# ---------------------------------------------------------------------------------------------
# reference features and their cache


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
    from ldmkit.runs import read_data

    ds = spec_or_dataset
    if isinstance(ds, (str, os.PathLike)):
        ds = read_data(str(ds), image_size=image_size, channels=channels)
    if n < 2:
        raise ValueError(f"n must be >= 2 reference images, got {n}")
    if n > len(ds):
        logger.warning(
            "the reference data has only %d images; using all of them, not %d", len(ds), n
        )
        n = len(ds)
    data_fp = ds.fingerprint() if seed == 0 else f"{ds.fingerprint()}s{seed}"
    if cache_dir is not None:
        cached = _cached_reference(Path(cache_dir), data_fp, feature_net.fingerprint, n, ds.name)
        if cached is not None:
            return cached
    ref = _compute_reference(ds, feature_net, n, seed, data_fp)
    if cache_dir is not None:
        ref.path = Path(cache_dir) / _cache_name(data_fp, feature_net.fingerprint, n)
        _save_reference(ref)
    return ref


def _compute_reference(
    ds: Any, feature_net: FeatureNet, n: int, seed: int, data_fp: str
) -> Reference:
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    indices = perm[:n]
    t0 = time.perf_counter()
    feats = compute_features(feature_net, ds.images[indices])
    meta = {
        "data_name": ds.name,
        "data_spec": ds.spec,
        "data_fingerprint": data_fp,
        "feature_network": feature_net.name,
        "feature_fingerprint": feature_net.fingerprint,
        "n": str(n),
        "seed": str(seed),
    }  # saved with the cache, so a file can be checked before reuse
    logger.info(
        "computed %s features of %d reference images in %.1f s",
        feature_net.name, n, time.perf_counter() - t0,
    )  # fmt: skip
    return Reference(
        feats, FeatureStats(meta=meta).update(feats), indices,
        ds.labels[indices] if ds.labels is not None else None, ds.name, data_fp,
        feature_net.name, feature_net.fingerprint,
    )  # fmt: skip


def _cache_name(data_fp: str, net_fp: str, n: int) -> str:
    return f"ref-{data_fp}-{net_fp}-n{n}.safetensors"


def _cached_reference(
    cache: Path, data_fp: str, net_fp: str, n: int, data_name: str
) -> Reference | None:
    """The first n images of the cache file for exactly n, else of the smallest larger one."""
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
                ref = _load_reference(path, data_name)
                _check_cached(
                    ref, data_fp, net_fp, int(path.name[len(prefix) : -len(".safetensors")])
                )
            except (CheckpointError, KeyError, ValueError) as e:
                logger.warning("reference cache %s is unreadable (%s); recomputing", path, e)
                continue
            logger.info("reference features of %d images from %s", n, path)
            return ref.take(n)
    return None


def _check_cached(ref: Reference, data_fp: str, net_fp: str, n: int) -> None:
    """Refuse a cache file that is not what its name says: other data or network, another
    number of images, or features that are not finite (a file damaged or copied by hand)."""
    if (ref.data_fingerprint, ref.feature_fingerprint) != (data_fp, net_fp):
        raise ValueError(
            f"it holds features of data {ref.data_fingerprint} by {ref.feature_fingerprint}, "
            f"not {data_fp} by {net_fp}"
        )
    if not (ref.n == n == len(ref.indices)) or ref.stats.n != n:
        raise ValueError(f"it holds {ref.n} feature rows and {len(ref.indices)} indices, not {n}")
    if not bool(torch.isfinite(ref.features).all()):
        raise ValueError("its features are not all finite")


def _save_reference(ref: Reference) -> None:
    tensors = {"features": ref.features, "indices": ref.indices, **ref.stats.to_tensors()}
    if ref.labels is not None:
        tensors["labels"] = ref.labels
    save_tensors(ref.path, tensors, metadata=ref.stats.meta)


def _load_reference(path: Path, data_name: str) -> Reference:
    from safetensors import safe_open

    t = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return Reference(
        t["features"], FeatureStats.from_tensors(t, meta), t["indices"], t.get("labels"),
        meta.get("data_name", data_name), meta["data_fingerprint"], meta["feature_network"],
        meta["feature_fingerprint"], path, from_cache=True,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# scores against the reference


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


def check_reference(ref: Reference, net: FeatureNet) -> None:
    """Refuse a reference whose features another network made."""
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
    check_reference(ref, feature_net)
    n = len(images)
    if n < 2:
        raise ValueError(f"need at least 2 generated images, got {n}")
    fake = compute_features(feature_net, images) if features is None else features
    real = ref.take(min(n, ref.n)) if match_n else ref
    out: dict[str, Any] = {"n": n, "n_ref": real.n}
    out.update(_metrics(real.features, fake, real.stats, seed))
    if has_logits(feature_net):
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
    out["feature_network"] = ref.feature_network
    out["feature_fingerprint"] = ref.feature_fingerprint
    out["note"] = (
        None
        if m == n
        else f"the reference data holds {ref.n} images, so the floor uses 2 x {m}, not 2 x {n}"
    )
    out["warning"] = fid_bias_warning(m)
    return out


# ---------------------------------------------------------------------------------------------
# real images the model never saw


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


__all__ = [
    "PR_K",
    "Reference",
    "check_reference",
    "evaluate_samples",
    "held_out_spec",
    "real_vs_real_floor",
    "reference_features",
]
