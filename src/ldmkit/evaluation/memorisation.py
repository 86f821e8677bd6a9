"""Memorisation check: does a model hand back near-copies of its training images?

For each generated image, the distance to its nearest training image over the distance to its
nearest held-out image (`metrics.memorisation_report`), in feature space and in pixel space;
a ratio under 1/3 marks a near-copy. The worst cases are saved as grids, each generated image
beside its nearest training image, since the threshold is a heuristic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldmkit.data.transforms import to_float

from .feature_nets import FeatureNet, compute_features
from .grids import as_uint8, save_grid
from .metrics import MemorisationReport, memorisation_report


@dataclass
class MemorisationResult:
    """Near-copies of training images among generated ones, in feature and in pixel space."""

    near_copy_share: float  # share flagged in either space
    feature: MemorisationReport  # in feature space
    pixel: MemorisationReport  # in pixel space
    n_train: int
    n_held_out: int
    feature_network: str
    feature_fingerprint: str
    n_train_total: int = 0  # the training set's size; > n_train when a sample of it was searched
    grids: dict[str, Path] = field(default_factory=dict)  # space -> worst-case grid PNG

    def to_dict(self) -> dict[str, Any]:
        def space(r: MemorisationReport) -> dict[str, Any]:
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
            "n_train_total": max(self.n_train_total, self.n_train),
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
    train_features: Tensor | None = None,
    n_train_total: int | None = None,
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
        train_features: `feature_net`'s features of `train`, where they are known already (the
            evaluation's reference features), so they are not computed again.
        n_train_total: the size of the whole training set, when `train` is a sample of it
            (recorded: a near-copy of a training image outside the sample is not found).
    """
    gen, tr, ho = _images_of(gen_images), _images_of(train), _images_of(held_out)
    if gen.shape[1:] != tr.shape[1:] or tr.shape[1:] != ho.shape[1:]:
        raise ValueError(
            f"generated {tuple(gen.shape[1:])}, train {tuple(tr.shape[1:])} and held-out "
            f"{tuple(ho.shape[1:])} images must have the same shape"
        )
    if train_features is None:
        train_features = compute_features(feature_net, tr)
    elif len(train_features) != len(tr):
        raise ValueError(f"{len(train_features)} train features for {len(tr)} train images")
    feat = memorisation_report(
        compute_features(feature_net, gen), train_features, compute_features(feature_net, ho),
        threshold=threshold, worst=worst,
    )  # fmt: skip
    pix = memorisation_report(
        _pixels(gen), _pixels(tr), _pixels(ho), threshold=threshold, worst=worst
    )
    either = (feat.ratio < threshold) | (pix.ratio < threshold)
    result = MemorisationResult(
        float(either.to(torch.float64).mean()), feat, pix, len(tr), len(ho), feature_net.name,
        feature_net.fingerprint, n_train_total=len(tr) if n_train_total is None else n_train_total,
    )  # fmt: skip
    if out_dir is not None:
        gen_u8, tr_u8 = as_uint8(gen), as_uint8(tr)
        for space, report in (("feature", feat), ("pixel", pix)):
            path = Path(out_dir) / f"memorisation-{space}.png"
            result.grids[space] = _save_worst(gen_u8, tr_u8, report, path)
    return result


def _save_worst(gen_u8: Tensor, train_u8: Tensor, report: MemorisationReport, path: Path) -> Path:
    """A grid of the report's worst generated images, each beside its nearest training image."""
    idx = report.worst
    pairs = torch.stack([gen_u8[idx], train_u8[report.train_index[idx]]], 1).flatten(0, 1)
    captions = []
    for i in idx.tolist():
        captions += [f"gen r={float(report.ratio[i]):.2f}", f"train #{int(report.train_index[i])}"]
    save_grid(pairs, path, nrow=min(8, len(pairs)), captions=captions)
    return path


def _images_of(data: Any) -> Tensor:
    images = data.images if hasattr(data, "images") else torch.as_tensor(data)
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    return images


def _pixels(images: Tensor) -> Tensor:
    """(N, C, H, W) uint8 or float in [-1, 1] -> flat float32 (N, C*H*W) in [-1, 1]."""
    if images.dtype == torch.uint8:
        x = to_float(images)
    else:
        x = images.to(torch.float32).clamp(-1, 1)
    return x.flatten(1)


__all__ = ["MemorisationResult", "memorisation_check"]
