"""Motion and flicker of clips with one object on a flat background (moving shapes), no network.

`track(videos)` finds the object in every frame as the pixels whose colour differs from the
clip's background colour by more than `threshold` (Euclidean distance over the channels, in
0..255 units), and reads from the centroid track:
- the velocity: the per-axis median of the frame-to-frame centroid steps (px per frame; a
  bounce's reversed steps are a minority when the named direction dominates the clip, as
  `data.moving_shapes` guarantees), its length the speed;
- the direction: of the eight named ones (`data.moving_shapes.DIRECTIONS`), the one whose unit
  vector has the largest dot product with the velocity (45-degree sectors); "still" below
  `min_speed` px per frame, "lost" when the object is found in fewer than half the frames;
- the flicker: the mean absolute frame-to-frame change (0..255 units, per channel) of the
  pixels outside the object, in both frames and `margin` px away from it; 0 on a clean clip.

The background colour is the per-channel median of all the clip's pixels (the object covers a
minority of them). For the shapes' flat backgrounds it is exact; a sample's is its estimate.
Everything is plain numpy; the inputs are uint8 (N, F, C, H, W) as the data sets hold them
(model outputs pass through `data.transforms.to_uint8` first).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ldmkit.data.moving_shapes import DIRECTION_NAMES, DIRECTIONS

THRESHOLD = 40.0  # colour distance from the background that counts as object
MIN_SPEED = 0.25  # px per frame; slower reads as "still"
MARGIN = 2  # px around the object left out of the flicker (anti-aliased edges)
CHUNK = 128  # clips per pass (bounds the float copies' memory)


@dataclass(frozen=True)
class MotionTrack:
    """What `track` reads from N clips of F frames."""

    centroids: np.ndarray  # (N, F, 2) float64 (x, y) in pixels; NaN where no object was found
    found: np.ndarray  # (N, F) bool
    velocity: np.ndarray  # (N, 2) px per frame (x right, y down); NaN when lost
    speed: np.ndarray  # (N,) px per frame
    direction: list[str]  # one of DIRECTION_NAMES, "still" or "lost"
    flicker: np.ndarray  # (N,) mean |change| between frames outside the object, 0..255 units
    background: np.ndarray  # (N, C) the background colour used


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of (..., H, W) by a (2r+1) square."""
    out = mask.copy()
    h, w = mask.shape[-2:]
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            src = mask[..., max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
            out[..., max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)] |= src
    return out


def _track_chunk(videos: np.ndarray, threshold: float, margin: int) -> tuple[np.ndarray, ...]:
    n, f, c, h, w = videos.shape
    x = videos.astype(np.float32)
    background = np.median(x.transpose(0, 2, 1, 3, 4).reshape(n, c, -1), axis=2)  # (N, C)
    dist = np.sqrt(((x - background[:, None, :, None, None]) ** 2).sum(axis=2))  # (N, F, H, W)
    mask = dist > threshold
    count = mask.sum(axis=(2, 3))  # (N, F)
    found = count > 0
    ys, xs = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (mask.sum(axis=2) * xs).sum(axis=2) / count
        cy = (mask.sum(axis=3) * ys).sum(axis=2) / count
    centroids = np.stack([cx, cy], axis=-1)  # (N, F, 2), NaN where not found
    steps = np.diff(centroids, axis=1)  # (N, F-1, 2)
    velocity = np.full((n, 2), np.nan)
    for i in range(n):
        ok = np.isfinite(steps[i]).all(axis=1)
        if found[i].sum() * 2 >= f and ok.any():
            velocity[i] = np.median(steps[i][ok], axis=0)
    # Flicker: pixels away from the object in both frames of each consecutive pair.
    near = _dilate(mask, margin)
    outside = ~(near[:, 1:] | near[:, :-1])  # (N, F-1, H, W)
    change = np.abs(np.diff(x, axis=1)).mean(axis=2)  # (N, F-1, H, W), per channel mean
    flicker = (change * outside).sum(axis=(1, 2, 3)) / np.maximum(outside.sum(axis=(1, 2, 3)), 1)
    return centroids, found, velocity, flicker, background


def classify(velocity: np.ndarray, min_speed: float = MIN_SPEED) -> list[str]:
    """Direction names of velocities (N, 2) (x right, y down), "still" below `min_speed`."""
    units = np.array(list(DIRECTIONS.values()))  # (8, 2)
    out = []
    for v in velocity:
        if not np.isfinite(v).all():
            out.append("lost")
        elif np.hypot(*v) < min_speed:
            out.append("still")
        else:
            out.append(DIRECTION_NAMES[int(np.argmax(units @ v))])
    return out


def track(
    videos: np.ndarray,
    *,
    threshold: float = THRESHOLD,
    min_speed: float = MIN_SPEED,
    margin: int = MARGIN,
) -> MotionTrack:
    """Track the one object of each clip of `videos` (N, F, C, H, W) uint8; see the module doc."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.dtype != np.uint8:
        raise ValueError(
            f"videos must be uint8 (N, F, C, H, W), got {videos.dtype} {tuple(videos.shape)}"
        )
    n, f, c, h, w = videos.shape
    if f < 2:
        raise ValueError(f"motion needs at least 2 frames, got {f}")
    parts = [_track_chunk(videos[s : s + CHUNK], threshold, margin) for s in range(0, n, CHUNK)]
    centroids, found, velocity, flicker, background = (
        np.concatenate([p[k] for p in parts]) for k in range(5)
    )
    speed = np.hypot(velocity[:, 0], velocity[:, 1])
    return MotionTrack(
        centroids=centroids,
        found=found,
        velocity=velocity,
        speed=speed,
        direction=classify(velocity, min_speed),
        flicker=flicker,
        background=background,
    )


def direction_accuracy(tracked: MotionTrack, expected: list[str]) -> float:
    """Share of clips whose direction reads as `expected` (names from DIRECTION_NAMES)."""
    if len(expected) != len(tracked.direction):
        raise ValueError(f"{len(expected)} expected directions for {len(tracked.direction)} clips")
    return float(np.mean([a == b for a, b in zip(tracked.direction, expected)]))
