"""Measuring a video run's clips without downloads: per-frame FID, class kept, motion, flicker.

FVD (Unterthiner et al. 2018) needs the I3D network's weights, which do not ship with ldmkit
and cannot be fetched offline, so it is not offered (`FVD_NOTE` says so in every result).
What is measured instead, all in the run's own domain classifier (`feature_nets`, trained on
the clips' frames, as an image run's evaluation uses it):

- `fid_frames`: FID between the generated and the real frames, every frame one image
  (Fréchet distance of the classifier's features): the frames' quality, blind to motion;
- `class_constant`: share of clips whose frames the classifier reads as one class throughout
  (temporal consistency: a star stays a star), and `class_accuracy`: share whose majority class
  is the one asked for (class-conditional runs); `real_class_constant`, the same read of the
  real clips, is the reader's own ceiling (a weak classifier reads real clips inconsistently
  too, and then the generated clips' figure means little);
- `direction_accuracy` (moving shapes): share of clips whose tracked motion
  (`motion.track`: the centroid's median step, one of 8 directions) is the direction their
  caption names, beside `moving` (share not read as still or lost) and the median speed;
- `flicker`: mean change between frames outside the moving object (0..255 units), 0 on real
  moving-shapes clips.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ldmkit.data.moving_shapes import DIRECTION_NAMES

from .metrics import fid_from_features
from .motion import track

FVD_NOTE = (
    "FVD is not available offline: it needs the I3D network's weights, which do not ship with "
    "ldmkit; per-frame FID, class consistency, motion and flicker are measured instead"
)
_DIRECTION = re.compile(
    r"\bmoving (" + "|".join(sorted(DIRECTION_NAMES, key=len, reverse=True)) + r")\b"
)


def caption_direction(caption: str) -> str | None:
    """The direction a caption names ("... moving up-left ..." -> "up-left"), or None."""
    m = _DIRECTION.search(caption or "")
    return m.group(1) if m else None


@dataclass
class ClipScores:
    """What `score_clips` measured (None: not measurable for this run or data)."""

    clips: int
    frames: int
    fid_frames: float | None
    class_constant: float | None
    class_accuracy: float | None
    real_class_constant: float | None
    direction_accuracy: float | None
    moving: float
    median_speed: float
    flicker: float
    real_flicker: float | None
    fvd: None = None
    note: str = FVD_NOTE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def one_class_share(classes: np.ndarray) -> float:
    """Share of clips whose frames' classes (N, F) are one class throughout."""
    return float(np.mean((classes == classes[:, :1]).all(1)))


def frame_classes(net: Any, clips: np.ndarray) -> np.ndarray:
    """The domain classifier's class per frame (N, F) of uint8 clips (N, F, C, H, W)."""
    from ldmkit.data.transforms import to_float

    n, f = clips.shape[:2]
    x = to_float(torch.from_numpy(np.ascontiguousarray(clips.reshape(n * f, *clips.shape[2:]))))
    with torch.no_grad():
        return net.logits(x).argmax(1).view(n, f).numpy()


def frame_features(net: Any, clips: np.ndarray) -> torch.Tensor:
    from ldmkit.data.transforms import to_float

    flat = clips.reshape(-1, *clips.shape[2:])
    with torch.no_grad():
        return net.features(to_float(torch.from_numpy(np.ascontiguousarray(flat))))


def score_clips(
    clips: np.ndarray,
    *,
    real: np.ndarray | None = None,
    net: Any = None,
    labels: np.ndarray | None = None,
    directions: list[str | None] | None = None,
) -> ClipScores:
    """Measure uint8 clips (N, F, C, H, W) (module doc). `real`: clips of the data (for FID
    and their flicker); `net`: the domain classifier (features and logits), None skips FID and
    the class measures; `labels` (N,): the class each clip was asked for; `directions`: the
    direction each clip's caption names (None entries are left out)."""
    clips = np.asarray(clips)
    n, f = clips.shape[:2]
    fid = constant = accuracy = real_constant = None
    if net is not None and real is not None:
        fid = fid_from_features(frame_features(net, clips), frame_features(net, real))
    if net is not None and hasattr(net, "logits"):
        classes = frame_classes(net, clips)
        constant = one_class_share(classes)
        if real is not None:
            real_constant = one_class_share(frame_classes(net, real))
        if labels is not None:
            majority = np.array([np.bincount(row).argmax() for row in classes])
            accuracy = float(np.mean(majority == np.asarray(labels)))
    tracked = track(clips)
    direction = None
    if directions is not None:
        pairs = [(got, want) for got, want in zip(tracked.direction, directions) if want]
        if pairs:
            direction = float(np.mean([got == want for got, want in pairs]))
    moving = float(np.mean([d not in ("still", "lost") for d in tracked.direction]))
    speeds = tracked.speed[np.isfinite(tracked.speed)]
    real_flicker = None if real is None else float(np.mean(track(real).flicker))
    return ClipScores(
        clips=n, frames=f, fid_frames=fid, class_constant=constant, class_accuracy=accuracy,
        real_class_constant=real_constant, direction_accuracy=direction, moving=moving,
        median_speed=float(np.median(speeds)) if len(speeds) else 0.0,
        flicker=float(np.nanmean(tracked.flicker)), real_flicker=real_flicker,
    )  # fmt: skip
