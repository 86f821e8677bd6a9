"""The built-in procedural data set: seeded images of simple shapes, with labels and captions.

Each image is one shape (the class label) of a named color, size and position on a plain or
gently graded background of a different named color, e.g. "a small red circle at the top left
on a blue background". Nothing is downloaded; the same `seed` always gives the same bytes.

Rendering is vectorised in numpy: every pixel is sampled on a `SUPERSAMPLE` x `SUPERSAMPLE` grid,
the shape's inside test is evaluated on all samples of a chunk of images at once, and the mean
coverage per pixel is the anti-aliased alpha used to paint the shape over the background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ["circle", "square", "triangle", "star", "cross"]

# Named colors shared by shapes and backgrounds (RGB, 0..255).
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 50),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOR_NAMES = list(COLORS)

# Shape and background must differ this much (Euclidean RGB distance), so every shape stands out:
# this rules out e.g. yellow on white, orange on red, red on orange.
MIN_CONTRAST = 130.0

SIZES = {"small": 0.22, "large": 0.32}  # outer radius as a fraction of the image side

# Named regions of a 3x3 grid: caption phrase and center (x, y) as fractions of the image side.
REGIONS = {
    "top left": ("at the top left", 0.36, 0.36),
    "top": ("at the top", 0.5, 0.36),
    "top right": ("at the top right", 0.64, 0.36),
    "left": ("on the left", 0.36, 0.5),
    "center": ("in the center", 0.5, 0.5),
    "right": ("on the right", 0.64, 0.5),
    "bottom left": ("at the bottom left", 0.36, 0.64),
    "bottom": ("at the bottom", 0.5, 0.64),
    "bottom right": ("at the bottom right", 0.64, 0.64),
}
REGION_NAMES = list(REGIONS)

SUPERSAMPLE = 4  # samples per pixel side for anti-aliasing
EXTENT = 1.1  # every shape lies within this many outer radii of its center
JITTER = 0.03  # random offset of a shape's center, as a fraction of the image side
MAX_ROTATION = np.deg2rad(15.0)  # small random tilt; never enough to turn a square into a diamond
GRADIENT = 0.25  # background brightness varies by up to +-GRADIENT/2 across the image


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(kind: int, color: int, background: int, size: int, region: int) -> str:
    """The caption of one image from its attribute indices (into KINDS, COLOR_NAMES, SIZES,
    REGION_NAMES), e.g. "a small red circle at the top left on a blue background"."""
    bg = COLOR_NAMES[background]
    return (
        f"a {list(SIZES)[size]} {COLOR_NAMES[color]} {KINDS[kind]} "
        f"{REGIONS[REGION_NAMES[region]][0]} on {_article(bg)} {bg} background"
    )


def contrasting_pairs() -> np.ndarray:
    rgb = np.array(list(COLORS.values()), dtype=np.float64)
    dist = np.linalg.norm(rgb[:, None] - rgb[None, :], axis=-1)
    fg, bg = np.nonzero(dist >= MIN_CONTRAST)
    return np.stack([fg, bg], axis=1)  # (P, 2) indices into COLOR_NAMES


@dataclass(frozen=True)
class ShapesData:
    """The arrays of a generated shapes data set; attribute arrays index the module's tables."""

    images: np.ndarray  # (N, 3, S, S) uint8
    labels: np.ndarray  # (N,) int64, index into KINDS
    captions: list[str]
    color: np.ndarray  # (N,) index into COLOR_NAMES
    background: np.ndarray  # (N,) index into COLOR_NAMES
    size: np.ndarray  # (N,) 0 = small, 1 = large
    region: np.ndarray  # (N,) index into REGION_NAMES
    class_names: list[str]


def _half_plane(p: tuple[float, float], q: tuple[float, float]) -> tuple[float, float, float]:
    """(a, b, c) such that a*x + b*y <= c is the origin's side of the line through p and q."""
    a, b = q[1] - p[1], p[0] - q[0]
    c = a * p[0] + b * p[1]
    return (a, b, c) if c >= 0 else (-a, -b, -c)


def _star_kites(inner: float) -> list:
    kites = []
    for k in range(5):
        t = np.pi / 2 + 2 * np.pi * k / 5  # the first point straight up
        tip = (float(np.cos(t)), float(np.sin(t)))
        c1 = (inner * float(np.cos(t - np.pi / 5)), inner * float(np.sin(t - np.pi / 5)))
        c2 = (inner * float(np.cos(t + np.pi / 5)), inner * float(np.sin(t + np.pi / 5)))
        kites.append(((c1, c2), _half_plane(c1, tip), _half_plane(tip, c2)))
    return kites


STAR_INNER = 0.45  # a chunkier star than the regular pentagram (0.38): it reads better when small
_STAR_KITES = _star_kites(STAR_INNER)


def _inside(kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether points (x, y) lie inside `kind` of outer radius 1 centred at 0 (y points up)."""
    if kind == "circle":
        return x * x + y * y <= 0.85**2  # a bit smaller so its area matches the others'
    if kind == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.75
    if kind == "triangle":
        # Equilateral, pointing up, vertices on the unit circle, centroid at 0.
        y = y + 0.1  # the centroid sits low in the bounding box; lift it to look centred
        return (y >= -0.5) & (y <= 1.0 - np.sqrt(3.0) * np.abs(x))
    if kind == "star":
        # Five points at radius 1 and inner corners at radius STAR_INNER: the union of five
        # convex kites (origin, inner corner, point, inner corner), each the sector between its
        # two inner corners intersected with the origin's side of its two outer edges.
        inside = np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
        for sector, edge1, edge2 in _STAR_KITES:
            (c1x, c1y), (c2x, c2y) = sector
            inside |= (
                (c1x * y - c1y * x >= 0)
                & (x * c2y - y * c2x >= 0)
                & (edge1[0] * x + edge1[1] * y <= edge1[2])
                & (edge2[0] * x + edge2[1] * y <= edge2[2])
            )
        return inside
    if kind == "cross":
        arm, half = 0.28, 0.85
        ax_, ay_ = np.abs(x), np.abs(y)
        return ((ax_ <= arm) & (ay_ <= half)) | ((ay_ <= arm) & (ax_ <= half))
    raise ValueError(f"unknown shape kind {kind!r}")


def _render(
    kind: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    radius: np.ndarray,
    angle: np.ndarray,
    image_size: int,
) -> np.ndarray:
    """Anti-aliased coverage (N, S, S) float32 in [0, 1] of one shape per image.

    Only a window around each shape, as wide as the largest shape of the chunk, is supersampled
    (about a third of the image): that is where all the work is.
    """
    n, ss = len(kind), SUPERSAMPLE
    wp = min(image_size, int(np.ceil(2 * EXTENT * radius.max() * image_size)) + 2)  # pixels
    w = wp * ss  # samples
    ox = np.clip(np.rint(cx * image_size - wp / 2), 0, image_size - wp).astype(np.int64)
    oy = np.clip(np.rint(cy * image_size - wp / 2), 0, image_size - wp).astype(np.int64)
    offsets = np.arange(w, dtype=np.float32) + 0.5
    gx = ((ox[:, None] * ss + offsets) / (image_size * ss)).astype(np.float32)  # (N, w) in [0, 1]
    gy = ((oy[:, None] * ss + offsets) / (image_size * ss)).astype(np.float32)
    window = np.zeros((n, w, w), dtype=bool)
    for k, name in enumerate(KINDS):
        idx = np.nonzero(kind == k)[0]
        if len(idx) == 0:
            continue
        r = radius[idx, None, None].astype(np.float32)
        dx = (gx[idx, None, :] - cx[idx, None, None].astype(np.float32)) / r  # (n, 1, w)
        dy = (cy[idx, None, None].astype(np.float32) - gy[idx, :, None]) / r  # (n, w, 1), y up
        c = np.cos(angle[idx, None, None]).astype(np.float32)
        sn = np.sin(angle[idx, None, None]).astype(np.float32)
        x = c * dx + sn * dy  # (n, w, w): the sample points rotated by -angle
        y = -sn * dx + c * dy
        window[idx] = _inside(name, x, y)
    # Mean over each pixel's SUPERSAMPLE x SUPERSAMPLE block, then paste into the full image.
    blocks = window.view(np.uint8).reshape(n, wp, ss, wp, ss)
    hits = sum(blocks[:, :, i, :, j] for i in range(ss) for j in range(ss))  # (N, wp, wp)
    window = hits.astype(np.float32) / (ss * ss)
    alpha = np.zeros((n, image_size, image_size), dtype=np.float32)
    rows = oy[:, None] + np.arange(wp)  # (N, wp)
    cols = ox[:, None] + np.arange(wp)
    alpha[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = window
    return alpha  # (N, S, S)


def parse_holdout(text: str) -> list[tuple[str, str]]:
    """'red-star,blue-circle' -> [("red", "star"), ("blue", "circle")] (color-kind pairs)."""
    pairs = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        color, _, kind = item.partition("-")
        if color not in COLORS or kind not in KINDS:
            raise ValueError(
                f"holdout {item!r} is not COLOR-SHAPE; colors: {', '.join(COLOR_NAMES)}; shapes: "
                f"{', '.join(KINDS)} (e.g. holdout=red-star,blue-circle)"
            )
        pairs.append((color, kind))
    return pairs


def generate_shapes(
    num_images: int,
    *,
    image_size: int = 32,
    seed: int = 0,
    chunk: int = 256,
    holdout: list[tuple[str, str]] | None = None,
) -> ShapesData:
    """Generate `num_images` RGB shape images of side `image_size`, deterministically from `seed`.

    The kinds are balanced exactly (counts differ by at most one) and shuffled; color, background,
    size and region are drawn uniformly (color/background from the contrasting pairs).
    `holdout` color-kind pairs never occur: their images draw another color pair (so that
    compositional generalisation can be measured on them); without it, nothing changes.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 for shapes to be recognisable, got {image_size}")
    rng = np.random.default_rng(seed)
    n = num_images
    kind = rng.permutation(np.arange(n) % len(KINDS))
    pairs = contrasting_pairs()
    pair = pairs[rng.integers(len(pairs), size=n)]
    for color_name, kind_name in holdout or []:
        c, k = COLOR_NAMES.index(color_name), KINDS.index(kind_name)
        allowed = pairs[pairs[:, 0] != c]  # same kind, any other color
        hit = (pair[:, 0] == c) & (kind == k)
        pair[hit] = allowed[rng.integers(len(allowed), size=int(hit.sum()))]
    color, background = pair[:, 0], pair[:, 1]
    size = rng.integers(2, size=n)
    region = rng.integers(len(REGIONS), size=n)
    jitter = rng.uniform(-JITTER, JITTER, size=(n, 2))
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION, size=n)
    grad_amount = rng.uniform(-GRADIENT / 2, GRADIENT / 2, size=n)
    grad_angle = rng.uniform(0, 2 * np.pi, size=n)

    centers = np.array([(v[1], v[2]) for v in REGIONS.values()])[region] + jitter  # (N, 2)
    radius = np.array(list(SIZES.values()))[size]
    rgb = np.array(list(COLORS.values()), dtype=np.float32)  # (8, 3)

    images = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        alpha = _render(kind[sl], centers[sl, 0], centers[sl, 1], radius[sl], angle[sl], image_size)
        # Background: a linear brightness ramp along a random direction.
        gx = np.cos(grad_angle[sl])[:, None, None].astype(np.float32)
        gy = np.sin(grad_angle[sl])[:, None, None].astype(np.float32)
        ramp = 1.0 + grad_amount[sl, None, None].astype(np.float32) * 2 * (
            gx * coords[None, None, :] + gy * coords[None, :, None]
        )  # (n, S, S)
        bg = rgb[background[sl]][:, :, None, None] * ramp[:, None]  # (n, 3, S, S)
        fg = rgb[color[sl]][:, :, None, None]  # (n, 3, 1, 1)
        a = alpha[:, None]  # (n, 1, S, S)
        images[sl] = np.clip(np.rint(bg * (1 - a) + fg * a), 0, 255).astype(np.uint8)

    captions = [caption(*a) for a in zip(kind, color, background, size, region)]
    return ShapesData(
        images=images,
        labels=kind.astype(np.int64),
        captions=captions,
        color=color,
        background=background,
        size=size,
        region=region,
        class_names=list(KINDS),
    )
