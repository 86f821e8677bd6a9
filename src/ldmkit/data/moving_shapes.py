"""The built-in procedural video data set: one shape moving in a named direction, bouncing.

Each clip is `frames` frames of one shape (the class label) of a named colour and size, drawn
exactly as `builtin:shapes` draws it (same kinds, colours, contrast rule, anti-aliasing and
small fixed tilt), moving in a straight line in one of eight named directions on a flat
background of a different named colour, and bouncing off the borders. Its caption names the
shape and the direction, e.g. "a small red star moving left on a blue background". Nothing is
downloaded; the same `seed` always gives the same bytes.

Unlike the still shapes, the background is flat (no brightness ramp): every pixel the shape
does not touch has exactly the background colour in every frame, so the motion tracker
(`ldmkit.evaluation.motion`) finds the shape without a model of the background and a flicker
measure has an exact zero on real clips.

Motion. A clip's speed is drawn so that the shape travels `TRAVEL` (a range, as a fraction of
the image side) over the clip, whatever the frame count. The start is drawn so that the shape
runs in its named direction for at least `MIN_RUN` of the clip's steps before its first bounce
(on every moving axis): the named direction is then the clip's dominant motion, the majority of
the frame-to-frame steps, while many clips still show a bounce. A bounce reflects the centre at
the borders of the band the shape fits in (`margin` = `EXTENT` outer radii), so the shape never
leaves the frame. Ground truth (centres per frame, speed, whether it bounced) comes with the data.

Held-out combinations: `holdout` takes colour-shape-direction triples ("red-star-left") and
colour-shape pairs ("red-star", every direction) that never occur in a generated set; a clip that
drew one draws another direction (a triple) or another colour pair (a pair) instead. The same
combinations are drawn alone with `only_holdout=True`, to measure compositional generalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import (
    COLOR_NAMES,
    COLORS,
    EXTENT,
    KINDS,
    MAX_ROTATION,
    _article,
    _render,
    contrasting_pairs,
)

# Unit steps in image coordinates (x right, y down); diagonals move at the same speed.
_D = float(np.sqrt(0.5))
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-_D, -_D),
    "up-right": (_D, -_D),
    "down-left": (-_D, _D),
    "down-right": (_D, _D),
}
DIRECTION_NAMES = list(DIRECTIONS)
OPPOSITE = {
    "left": "right", "right": "left", "up": "down", "down": "up",
    "up-left": "down-right", "down-right": "up-left",
    "up-right": "down-left", "down-left": "up-right",
}  # fmt: skip

# Outer radius as a fraction of the side: smaller than the still shapes' (0.22, 0.32) so the
# shape has room to move (at 32 px a small shape is ~10 px wide, a large one ~14 px).
SIZES = {"small": 0.14, "large": 0.2}
TRAVEL = (0.45, 0.8)  # path length over the whole clip, as a fraction of the image side
MIN_RUN = 0.6  # share of the steps that run in the named direction before the first bounce
DEFAULT_FRAMES = 16
DEFAULT_SIZE = 32


def caption(kind: int, color: int, background: int, size: int, direction: int) -> str:
    """E.g. "a small red star moving left on a blue background" (indices into the tables)."""
    bg = COLOR_NAMES[background]
    return (
        f"a {list(SIZES)[size]} {COLOR_NAMES[color]} {KINDS[kind]} moving "
        f"{DIRECTION_NAMES[direction]} on {_article(bg)} {bg} background"
    )


def reflect(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Positions on an unbounded line folded into [lo, hi] by reflection at both ends."""
    span = hi - lo
    u = np.mod(p - lo, 2 * span)
    return lo + np.where(u <= span, u, 2 * span - u)


@dataclass(frozen=True)
class MovingShapesData:
    """A generated moving-shapes set; attribute arrays index the module's tables."""

    videos: np.ndarray  # (N, F, 3, S, S) uint8
    labels: np.ndarray  # (N,) int64, index into KINDS
    captions: list[str]
    color: np.ndarray  # (N,) index into COLOR_NAMES
    background: np.ndarray  # (N,) index into COLOR_NAMES
    size: np.ndarray  # (N,) 0 = small, 1 = large
    direction: np.ndarray  # (N,) index into DIRECTION_NAMES
    speed: np.ndarray  # (N,) float64, image sides per frame
    centers: np.ndarray  # (N, F, 2) float64, the shape's centre (x, y) per frame, in image sides
    bounced: np.ndarray  # (N,) bool, whether the shape hits a border during the clip
    class_names: list[str]


def parse_video_holdout(text: str) -> list[tuple[str, str, str | None]]:
    """'red-star-left,blue-circle' -> [("red", "star", "left"), ("blue", "circle", None)]."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        color, _, rest = item.partition("-")
        kind, _, direction = rest.partition("-")
        if color not in COLORS or kind not in KINDS or (direction and direction not in DIRECTIONS):
            raise ValueError(
                f"holdout {item!r} is not COLOUR-SHAPE-DIRECTION or COLOUR-SHAPE; colours: "
                f"{', '.join(COLOR_NAMES)}; shapes: {', '.join(KINDS)}; directions: "
                f"{', '.join(DIRECTION_NAMES)} (e.g. holdout=red-star-left,blue-circle)"
            )
        out.append((color, kind, direction or None))
    return out


def _is_held_out(kind, color, direction, holdout) -> np.ndarray:
    hit = np.zeros(len(kind), dtype=bool)
    for c_name, k_name, d_name in holdout:
        h = (color == COLOR_NAMES.index(c_name)) & (kind == KINDS.index(k_name))
        if d_name is not None:
            h &= direction == DIRECTION_NAMES.index(d_name)
        hit |= h
    return hit


def _draw_attributes(rng: np.random.Generator, n: int, holdout, only_holdout: bool):
    pairs = contrasting_pairs()
    if only_holdout:
        if not holdout:
            raise ValueError("only_holdout needs at least one held-out combination")
        pick = rng.integers(len(holdout), size=n)
        color = np.array([COLOR_NAMES.index(holdout[i][0]) for i in pick])
        kind = np.array([KINDS.index(holdout[i][1]) for i in pick])
        direction = rng.integers(len(DIRECTIONS), size=n)
        fixed = np.array([holdout[i][2] is not None for i in pick], dtype=bool)
        direction[fixed] = [DIRECTION_NAMES.index(holdout[i][2]) for i in pick[fixed]]
        background = np.empty(n, dtype=np.int64)
        for i in range(n):
            options = pairs[pairs[:, 0] == color[i], 1]
            background[i] = options[rng.integers(len(options))]
        return kind, color, background, direction
    kind = rng.permutation(np.arange(n) % len(KINDS))
    pair = pairs[rng.integers(len(pairs), size=n)]
    direction = rng.integers(len(DIRECTIONS), size=n)
    # Redraw until no clip is held out: a triple redraws the direction, a pair the colours.
    for _ in range(100):
        hit = _is_held_out(kind, pair[:, 0], direction, holdout or [])
        if not hit.any():
            break
        pair_hit = hit & _is_held_out(
            kind, pair[:, 0], direction, [h for h in holdout if h[2] is None]
        )
        dir_hit = hit & ~pair_hit
        direction[dir_hit] = rng.integers(len(DIRECTIONS), size=int(dir_hit.sum()))
        pair[pair_hit] = pairs[rng.integers(len(pairs), size=int(pair_hit.sum()))]
    else:  # pragma: no cover - only if every combination of a shape is held out
        raise ValueError("the held-out combinations leave no clip to draw; hold out fewer")
    return kind, pair[:, 0], pair[:, 1], direction


def generate_moving_shapes(
    num_clips: int,
    *,
    frames: int = DEFAULT_FRAMES,
    image_size: int = DEFAULT_SIZE,
    seed: int = 0,
    holdout: list[tuple[str, str, str | None]] | None = None,
    only_holdout: bool = False,
    chunk: int = 64,
) -> MovingShapesData:
    """Generate `num_clips` clips of `frames` RGB frames of side `image_size`, from `seed`.

    Kinds are balanced (counts differ by at most one) unless `only_holdout`; colour pair, size,
    direction, speed and start are drawn per clip (see the module docstring for the motion).
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if frames < 2:
        raise ValueError(f"frames must be >= 2 for motion, got {frames}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 for shapes to be recognisable, got {image_size}")
    rng = np.random.default_rng(seed)
    n, f = num_clips, frames
    kind, color, background, direction = _draw_attributes(rng, n, holdout or [], only_holdout)
    size = rng.integers(2, size=n)
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION, size=n)
    travel = rng.uniform(*TRAVEL, size=n)
    speed = travel / (f - 1)
    radius = np.array(list(SIZES.values()))[size]
    margin = EXTENT * radius + 0.5 / image_size  # the centre's distance from the borders
    lo, hi = margin, 1.0 - margin
    unit = np.array(list(DIRECTIONS.values()))[direction]  # (N, 2)
    velocity = unit * speed[:, None]  # (N, 2) image sides per frame
    # Start: at least MIN_RUN of the path ahead before the wall on every moving axis.
    run = np.minimum(MIN_RUN * travel[:, None] * np.abs(unit), (hi - lo)[:, None])  # (N, 2)
    u = rng.uniform(0, 1, size=(n, 2))
    width = (hi - lo)[:, None]  # (N, 1)
    start = lo[:, None] + np.where(
        unit < 0, run + u * (width - run), np.where(unit > 0, u * (width - run), u * width)
    )
    steps = np.arange(f, dtype=np.float64)
    free = start[:, None, :] + velocity[:, None, :] * steps[None, :, None]  # (N, F, 2) unbounded
    centers = reflect(free, lo[:, None, None], hi[:, None, None])
    outside = (free < lo[:, None, None] - 1e-12) | (free > hi[:, None, None] + 1e-12)
    bounced = outside.any(axis=(1, 2))

    rgb = np.array(list(COLORS.values()), dtype=np.float32)
    videos = np.empty((n, f, 3, image_size, image_size), dtype=np.uint8)
    for s0 in range(0, n, chunk):
        sl = slice(s0, min(s0 + chunk, n))
        m = sl.stop - sl.start
        alpha = _render(
            np.repeat(kind[sl], f),
            centers[sl, :, 0].reshape(-1),
            centers[sl, :, 1].reshape(-1),
            np.repeat(radius[sl], f),
            np.repeat(angle[sl], f),
            image_size,
        ).reshape(m, f, 1, image_size, image_size)
        bg = rgb[background[sl]][:, None, :, None, None]  # (m, 1, 3, 1, 1)
        fg = rgb[color[sl]][:, None, :, None, None]
        videos[sl] = np.clip(np.rint(bg * (1 - alpha) + fg * alpha), 0, 255).astype(np.uint8)

    captions = [caption(*a) for a in zip(kind, color, background, size, direction)]
    return MovingShapesData(
        videos=videos,
        labels=kind.astype(np.int64),
        captions=captions,
        color=color,
        background=background,
        size=size,
        direction=direction,
        speed=speed,
        centers=centers,
        bounced=bounced,
        class_names=list(KINDS),
    )
