"""Sample-quality metrics as plain functions over feature tensors.

Every function takes features from some feature network (Inception-v3 pool3, or ldmkit's own
domain classifier; see `features.py`) and computes in float64 with TF32 off, on the features'
device. Nothing here knows about images.

- FID: Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017,
  "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium").
- KID: unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, mean and std over random
  subsets (Binkowski et al. 2018, "Demystifying MMD GANs", Appendix D).
- IS: exp E_x[KL(p(y|x) || p(y))], mean and std over splits (Salimans et al. 2016).
- Precision / recall: k-NN manifold estimates (Kynkäänniemi et al. 2019, "Improved Precision and
  Recall Metric for Assessing Generative Models").
- Memorisation: distance of each generated item to its nearest training item, relative to its
  nearest held-out item.

Notation: f1, f2 are feature sets (N, D); mu, cov their mean (D,) and covariance (D, D) with the
unbiased (N - 1) normaliser, as pytorch-fid and the TF reference use.

FID is biased upward at small N and its bias depends on N (Chong & Forsyth 2020, "Effectively
Unbiased FID and Inception Score and where to find them"): a FID from fewer than
`MIN_FID_IMAGES` = 2000 images is not comparable with a FID from another N, nor with published
figures (which use 50 000). `fid_bias_warning(n)` gives the string to print beside such a
number, and the FID functions log it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

MIN_FID_IMAGES = 2000
"""Below this many images (in either set) a FID is flagged as biased and not comparable."""


class MeanStd(NamedTuple):
    mean: float
    std: float


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


# ---------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """Disable TF32 matmuls for the block (they would silently cost ~3 digits on Ampere+)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def _as_float64(x: Tensor | np.ndarray, name: str, ndim: int | None = None) -> Tensor:
    """Copy to a float64 tensor (on CPU when the device has no float64, e.g. MPS)."""
    t = torch.as_tensor(x)
    if t.device.type == "mps":
        t = t.cpu()
    t = t.detach().to(torch.float64)
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} holds NaN or inf values; check the feature network's input")
    return t


def _features_pair(
    f1: Tensor | np.ndarray, f2: Tensor | np.ndarray, min_n: int = 1
) -> tuple[Tensor, Tensor]:
    a, b = _as_float64(f1, "f1", 2), _as_float64(f2, "f2", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"feature sets differ in width ({a.shape[1]} vs {b.shape[1]}); "
            "were they made by the same feature network?"
        )
    if min(a.shape[0], b.shape[0]) < min_n:
        raise ValueError(
            f"need at least {min_n} features per set, got {a.shape[0]} and {b.shape[0]}"
        )
    return a, b.to(a.device)


def fid_bias_warning(n: int) -> str | None:
    """The warning to show beside a FID computed from `n` images, or None when n is enough."""
    if n >= MIN_FID_IMAGES:
        return None
    return (
        f"FID from n={n} < {MIN_FID_IMAGES} images is biased upward and depends on n: compare it "
        "only with FIDs at the same n (and the real-vs-real floor), never with published figures"
    )


def _log_bias(n: int) -> None:
    msg = fid_bias_warning(n)
    if msg is not None:
        logger.warning(msg)


# ---------------------------------------------------------------------------------------------
# streaming statistics


class FeatureStats:
    """Running mean and covariance of features in float64, updated batch by batch.

    Uses the pairwise update of Chan et al. (1979): each batch's mean and centred scatter
    matrix are merged into the totals, which stays accurate when the mean is large compared
    with the spread (a naive sum of x x^T would cancel catastrophically).

    `meta` holds strings saved with the statistics (e.g. the feature network's name and
    fingerprint, the data set and n) so a cache can be checked before reuse.
    """

    def __init__(self, dim: int | None = None, meta: dict[str, str] | None = None) -> None:
        self.dim = dim
        self.n = 0
        self.meta: dict[str, str] = dict(meta or {})
        self._mean: Tensor | None = None  # (D,)
        self._m2: Tensor | None = None  # (D, D) sum of outer products of deviations

    def update(self, features: Tensor | np.ndarray) -> FeatureStats:
        """Add a batch (B, D) of features; returns self."""
        x = _as_float64(features, "features", 2)
        if self.dim is None:
            self.dim = x.shape[1]
        if x.shape[1] != self.dim:
            raise ValueError(f"features have width {x.shape[1]}, these stats hold {self.dim}")
        if x.shape[0] == 0:
            return self
        with tf32_off():
            mean_b = x.mean(0)
            xc = x - mean_b
            m2_b = xc.T @ xc
        self._merge(x.shape[0], mean_b, m2_b)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another FeatureStats (e.g. from another process or shard) into this one."""
        if other.n == 0:
            return self
        if self.dim is not None and other.dim != self.dim:
            raise ValueError(f"cannot merge stats of width {other.dim} into width {self.dim}")
        for key in ("feature_network", "fingerprint"):
            if key in self.meta and key in other.meta and self.meta[key] != other.meta[key]:
                raise ValueError(
                    f"cannot merge stats with different {key} "
                    f"({self.meta[key]!r} vs {other.meta[key]!r})"
                )
        self.dim = other.dim
        self._merge(other.n, other._mean, other._m2)
        return self

    def _merge(self, n_b: int, mean_b: Tensor, m2_b: Tensor) -> None:
        if self.n == 0:
            self.n, self._mean, self._m2 = n_b, mean_b.clone(), m2_b.clone()
            return
        mean_b, m2_b = mean_b.to(self._mean.device), m2_b.to(self._mean.device)
        n = self.n + n_b
        delta = mean_b - self._mean
        # Chan et al. 1979: M2 = M2_a + M2_b + delta delta^T n_a n_b / n
        self._m2 = self._m2 + m2_b + torch.outer(delta, delta) * (self.n * n_b / n)
        self._mean = self._mean + delta * (n_b / n)
        self.n = n

    @property
    def mean(self) -> Tensor:
        if self._mean is None:
            raise ValueError("no features were added to these stats yet")
        return self._mean

    @property
    def cov(self) -> Tensor:
        """Unbiased covariance (divides by n - 1)."""
        if self._m2 is None or self.n < 2:
            raise ValueError(f"a covariance needs at least 2 features, these stats hold {self.n}")
        return self._m2 / (self.n - 1)

    def to_tensors(self) -> dict[str, Tensor]:
        """{"n": (1,) int64, "mean": (D,), "m2": (D, D)}: what `save` writes and `from_tensors` reads."""
        if self.n == 0:
            raise ValueError("refusing to save empty stats; add features first")
        return {"n": torch.tensor([self.n], dtype=torch.int64), "mean": self.mean, "m2": self._m2}

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, Tensor], meta: dict[str, str] | None = None
    ) -> FeatureStats:
        """Stats from the n, mean and m2 tensors of `to_tensors` (other keys are ignored)."""
        stats = cls(dim=int(tensors["mean"].shape[0]), meta=meta)
        stats.n = int(tensors["n"][0])
        stats._mean = tensors["mean"].to(torch.float64)
        stats._m2 = tensors["m2"].to(torch.float64)
        return stats

    def save(self, path: str | os.PathLike) -> None:
        """Write to `.safetensors` or `.npz` (no pickle), atomically."""
        from ldmkit.checkpoint import atomic_write, save_tensors

        tensors = self.to_tensors()
        path = Path(path)
        if path.suffix == ".safetensors":
            save_tensors(path, tensors, metadata={str(k): str(v) for k, v in self.meta.items()})
        elif path.suffix == ".npz":
            arrays = {k: v.cpu().numpy() for k, v in tensors.items()}
            arrays["meta_keys"] = np.array(list(self.meta.keys()), dtype=np.str_)
            arrays["meta_values"] = np.array([str(v) for v in self.meta.values()], dtype=np.str_)

            def write(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)

            atomic_write(path, write)
        else:
            raise ValueError(f"{path}: use a .safetensors or .npz suffix for feature stats")

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read stats written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; compute the reference stats first")
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            from ldmkit.checkpoint import load_tensors

            tensors = load_tensors(path)
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                tensors = {k: torch.from_numpy(z[k].copy()) for k in ("n", "mean", "m2")}
                meta = dict(zip(z["meta_keys"].tolist(), z["meta_values"].tolist()))
        else:
            raise ValueError(f"{path}: feature stats must be .safetensors or .npz")
        return cls.from_tensors(tensors, meta)


# ---------------------------------------------------------------------------------------------
# FID


def _sqrtm_psd(a: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    evals, evecs = torch.linalg.eigh((a + a.T) / 2)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


def frechet_distance(
    mu1: Tensor | np.ndarray,
    cov1: Tensor | np.ndarray,
    mu2: Tensor | np.ndarray,
    cov2: Tensor | np.ndarray,
) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) between two Gaussians.

    tr((C1 C2)^(1/2)) is computed as the sum of sqrt(eig(S C2 S)) with S = C1^(1/2): S C2 S is
    similar to C1 C2 but symmetric PSD, so `eigh` is stable and no complex parts appear, unlike
    scipy.linalg.sqrtm of the non-symmetric product (which pytorch-fid must patch with an eps).
    """
    mu1, mu2 = _as_float64(mu1, "mu1", 1), _as_float64(mu2, "mu2", 1)
    cov1, cov2 = _as_float64(cov1, "cov1", 2), _as_float64(cov2, "cov2", 2)
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"shapes do not match: mu1 {tuple(mu1.shape)}, cov1 {tuple(cov1.shape)}, "
            f"mu2 {tuple(mu2.shape)}, cov2 {tuple(cov2.shape)}"
        )
    dev = mu1.device
    mu2, cov1, cov2 = mu2.to(dev), cov1.to(dev), cov2.to(dev)
    with tf32_off():
        s = _sqrtm_psd(cov1)
        m = s @ cov2 @ s
        tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
        dist = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_covmean
    return float(dist.clamp_min(0))  # rounding can give -1e-12 for equal Gaussians


def fid_from_stats(stats1: FeatureStats, stats2: FeatureStats) -> float:
    """FID between two FeatureStats; logs `fid_bias_warning` when either n < 2000."""
    _log_bias(min(stats1.n, stats2.n))
    return frechet_distance(stats1.mean, stats1.cov, stats2.mean, stats2.cov)


def fid_from_features(f1: Tensor | np.ndarray, f2: Tensor | np.ndarray) -> float:
    """FID between two feature sets (N1, D), (N2, D); logs a warning when either N < 2000."""
    a, b = _features_pair(f1, f2, min_n=2)
    return fid_from_stats(FeatureStats().update(a), FeatureStats().update(b))


# ---------------------------------------------------------------------------------------------
# KID


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3  # Binkowski 2018: k(x, y) = (x.y / d + 1)^3


def mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 with the cubic polynomial kernel (Binkowski 2018 eq. 2 / Gretton 2012).

    Diagonal terms k(x_i, x_i) are left out of the within-set means; x and y may differ in size.
    """
    m, n = x.shape[0], y.shape[0]
    with tf32_off():
        k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
        sum_xx = k_xx.sum() - k_xx.diagonal().sum()
        sum_yy = k_yy.sum() - k_yy.diagonal().sum()
        return sum_xx / (m * (m - 1)) + sum_yy / (n * (n - 1)) - 2 * k_xy.sum() / (m * n)


def kid(
    f1: Tensor | np.ndarray,
    f2: Tensor | np.ndarray,
    subsets: int = 100,
    subset_size: int | None = 1000,
    generator: torch.Generator | None = None,
) -> MeanStd:
    """Kernel Inception Distance: mean and std of unbiased MMD^2 over random subsets.

    Each subset draws `subset_size` items from each set without replacement (Binkowski 2018,
    as in their reference code); `subset_size=None` uses min(N1, N2). std is the population std
    (ddof=0) over subsets, as in the reference code and torchmetrics. `generator` (CPU) fixes
    the subsets.
    """
    a, b = _features_pair(f1, f2, min_n=2)
    size = min(a.shape[0], b.shape[0]) if subset_size is None else subset_size
    if size < 2 or size > min(a.shape[0], b.shape[0]):
        raise ValueError(
            f"subset_size={size} must be in [2, {min(a.shape[0], b.shape[0])}] for sets of "
            f"{a.shape[0]} and {b.shape[0]} features; pass subset_size=None to use all of the "
            "smaller set"
        )
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    values = []
    for _ in range(subsets):
        ia = torch.randperm(a.shape[0], generator=generator)[:size].to(a.device)
        ib = torch.randperm(b.shape[0], generator=generator)[:size].to(b.device)
        values.append(mmd2_unbiased(a[ia], b[ib]))
    v = torch.stack(values)
    return MeanStd(float(v.mean()), float(v.std(correction=0)))


# ---------------------------------------------------------------------------------------------
# Inception Score


def inception_score(
    probs_or_logits: Tensor | np.ndarray,
    splits: int = 10,
    *,
    kind: Literal["auto", "logits", "probs"] = "auto",
) -> MeanStd:
    """Inception Score exp E_x[KL(p(y|x) || p(y))], mean and std over `splits` (Salimans 2016).

    Args:
        probs_or_logits: (N, num_classes) class probabilities or logits of a classifier.
        splits: the items are cut in order into this many near-equal parts (torch.tensor_split,
            no item dropped); p(y) is the mean of p(y|x) within each part.
        kind: "logits", "probs", or "auto": probabilities when every row is non-negative and
            sums to 1 (to 1e-6), logits otherwise.

    Returns:
        mean and population std (ddof=0, as in the original code) of the score over splits.
    """
    x = _as_float64(probs_or_logits, "probs_or_logits", 2)
    if kind == "auto":
        is_probs = bool((x >= 0).all() and torch.allclose(x.sum(1), x.new_ones(()), atol=1e-6))
        kind = "probs" if is_probs else "logits"
    if kind == "logits":
        log_p = torch.log_softmax(x, dim=1)
        p = log_p.exp()
    elif kind == "probs":
        if (x < 0).any() or not torch.allclose(x.sum(1), x.new_ones(()), atol=1e-6):
            raise ValueError("probs must be non-negative and each row must sum to 1")
        p = x
    else:
        raise ValueError(f"kind must be 'auto', 'logits' or 'probs', got {kind!r}")
    if not 1 <= splits <= x.shape[0]:
        raise ValueError(
            f"splits must be in [1, {x.shape[0]}] for {x.shape[0]} items, got {splits}"
        )
    scores = []
    for part in torch.tensor_split(p, splits, dim=0):
        p_y = part.mean(0, keepdim=True)  # (1, K) marginal p(y)
        kl = torch.xlogy(part, part) - torch.xlogy(part, p_y)  # 0 log 0 = 0
        scores.append(kl.sum(1).mean().exp())
    s = torch.stack(scores)
    return MeanStd(float(s.mean()), float(s.std(correction=0)))


# ---------------------------------------------------------------------------------------------
# nearest neighbours, precision / recall, memorisation


def _sq_dists(q: Tensor, bank: Tensor, bank_sq: Tensor) -> Tensor:
    """Squared Euclidean distances (Q, M) through one matmul, clamped at 0."""
    return ((q * q).sum(1, keepdim=True) + bank_sq[None] - 2 * q @ bank.T).clamp_min(0)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def knn_radii(features: Tensor | np.ndarray, k: int = 3, chunk_size: int = 1024) -> Tensor:
    """Distance (N,) from each item to its k-th nearest other item in the same set."""
    x = _as_float64(features, "features", 2)
    if not 1 <= k < x.shape[0]:
        raise ValueError(f"k={k} must be in [1, {x.shape[0] - 1}] for {x.shape[0]} items")
    x_sq = (x * x).sum(1)
    radii = []
    with tf32_off():
        for sl in _chunks(x.shape[0], chunk_size):
            d2 = _sq_dists(x[sl], x, x_sq)  # (chunk, N)
            # the item itself is at distance 0, so the k-th neighbour is the (k+1)-th smallest
            radii.append(d2.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii).sqrt()


def _share_inside(
    queries: Tensor, bank: Tensor, radii: Tensor, chunk_size: int
) -> tuple[float, Tensor]:
    """Share of queries inside at least one ball (bank_j, radii_j), and the per-query flags."""
    bank_sq, r2 = (bank * bank).sum(1), radii.square()
    inside = []
    with tf32_off():
        for sl in _chunks(queries.shape[0], chunk_size):
            inside.append((_sq_dists(queries[sl], bank, bank_sq) <= r2[None]).any(1))
    flags = torch.cat(inside)
    return float(flags.to(torch.float64).mean()), flags


def precision_recall(
    real_features: Tensor | np.ndarray,
    fake_features: Tensor | np.ndarray,
    k: int = 3,
    chunk_size: int = 1024,
) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1-3).

    The real manifold is the union of balls around each real feature with radius the distance
    to its k-th nearest real neighbour; precision is the share of fake features inside it.
    Recall swaps the roles. Distances are computed `chunk_size` rows at a time, so memory is
    O(chunk_size x N), never N x N.
    """
    real, fake = _features_pair(real_features, fake_features, min_n=k + 1)
    precision, _ = _share_inside(fake, real, knn_radii(real, k, chunk_size), chunk_size)
    recall, _ = _share_inside(real, fake, knn_radii(fake, k, chunk_size), chunk_size)
    return PrecisionRecall(precision, recall)


def nearest_neighbours(
    queries: Tensor | np.ndarray, bank: Tensor | np.ndarray, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """For each query (Q, D), the index (Q,) of its nearest item in `bank` (M, D) and the distance.

    Works on any vectors: feature-network features, or flattened pixels for a pixel-space check.
    """
    q, b = _features_pair(queries, bank)
    b_sq = (b * b).sum(1)
    idx, dist = [], []
    with tf32_off():
        for sl in _chunks(q.shape[0], chunk_size):
            d2, i = _sq_dists(q[sl], b, b_sq).min(1)
            idx.append(i)
            dist.append(d2.sqrt())
    return torch.cat(idx), torch.cat(dist)


@dataclass
class MemorisationReport:
    """Result of `memorisation_report`; tensors are indexed by generated item."""

    n: int  # number of generated items
    threshold: float
    near_copy_share: float  # share of generated items with ratio < threshold
    ratio: Tensor  # (n,) d_train / d_held_out
    train_index: Tensor  # (n,) index of the nearest training item
    train_distance: Tensor  # (n,)
    held_out_distance: Tensor  # (n,)
    worst: Tensor  # indices of generated items with the smallest ratios, ascending ratio


def memorisation_report(
    gen: Tensor | np.ndarray,
    train: Tensor | np.ndarray,
    held_out: Tensor | np.ndarray,
    threshold: float = 1 / 3,
    worst: int = 16,
    chunk_size: int = 1024,
) -> MemorisationReport:
    """Flag generated items that sit much closer to a training item than to any held-out item.

    ratio = d(gen, nearest train) / d(gen, nearest held-out). A model that generalises puts its
    samples as close to unseen data as to its training data (ratio ~ 1 when train and held_out
    have the same size; a larger train set lowers every ratio, so pass equal-size sets); a
    near-copy of a training item has ratio ~ 0. The 1/3 threshold follows the spirit of the
    nearest-to-second-nearest ratio of Gu et al. 2023 ("On Memorization in Diffusion Models"),
    with a held-out set as the yardstick; it is a heuristic, so show the worst cases as a grid.
    """
    g = _as_float64(gen, "gen", 2)
    train_index, d_train = nearest_neighbours(g, train, chunk_size)
    _, d_held = nearest_neighbours(g, held_out, chunk_size)
    tiny = torch.finfo(torch.float64).tiny
    ratio = d_train / d_held.clamp_min(tiny)
    order = torch.argsort(ratio, stable=True)
    return MemorisationReport(
        n=g.shape[0],
        threshold=threshold,
        near_copy_share=float((ratio < threshold).to(torch.float64).mean()),
        ratio=ratio,
        train_index=train_index,
        train_distance=d_train,
        held_out_distance=d_held,
        worst=order[: min(worst, g.shape[0])],
    )


__all__ = [
    "MIN_FID_IMAGES",
    "FeatureStats",
    "MeanStd",
    "MemorisationReport",
    "PrecisionRecall",
    "fid_bias_warning",
    "fid_from_features",
    "fid_from_stats",
    "frechet_distance",
    "inception_score",
    "kid",
    "knn_radii",
    "memorisation_report",
    "mmd2_unbiased",
    "nearest_neighbours",
    "precision_recall",
    "tf32_off",
]
