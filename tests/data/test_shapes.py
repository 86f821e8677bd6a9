"""The built-in procedural shapes: deterministic, balanced, captions that match the labels."""

import numpy as np
import pytest

from ldmkit.data import DataError, generate_shapes, load_dataset
from ldmkit.data.shapes import (
    COLOR_NAMES,
    COLORS,
    KINDS,
    MIN_CONTRAST,
    REGION_NAMES,
    REGIONS,
    SIZES,
)


def test_deterministic_per_seed():
    a, b, c = (generate_shapes(40, image_size=16, seed=s) for s in (3, 3, 4))
    assert a.images.tobytes() == b.images.tobytes() and a.captions == b.captions
    assert a.images.tobytes() != c.images.tobytes()
    assert a.images.shape == (40, 3, 16, 16) and a.images.dtype == np.uint8


def test_balanced_classes():
    d = generate_shapes(101, image_size=8, seed=0)
    counts = np.bincount(d.labels, minlength=len(KINDS))
    assert counts.max() - counts.min() <= 1 and len(KINDS) >= 4
    assert d.class_names == KINDS


def test_captions_match_attributes():
    d = generate_shapes(50, image_size=16, seed=1)
    for i, cap in enumerate(d.captions):
        size = list(SIZES)[d.size[i]]
        where = REGIONS[REGION_NAMES[d.region[i]]][0]
        color, bg = COLOR_NAMES[d.color[i]], COLOR_NAMES[d.background[i]]
        assert (
            cap
            == f"a {size} {color} {KINDS[d.labels[i]]} {where} on {'an' if bg == 'orange' else 'a'} {bg} background"
        )
        assert d.color[i] != d.background[i]
        dist = np.linalg.norm(np.subtract(COLORS[color], COLORS[bg]))
        assert dist >= MIN_CONTRAST


def test_pixels_match_captions():
    d = generate_shapes(60, image_size=32, seed=2)
    rgb = np.array(list(COLORS.values()))
    for i in range(len(d.labels)):
        img = d.images[i].astype(float)  # (3, 32, 32)
        fg = rgb[d.color[i]][:, None, None]
        near_fg = np.abs(img - fg).max(axis=0) < 3  # pixels fully covered by the shape
        assert near_fg.any()
        ys, xs = np.nonzero(near_fg)
        cx, cy = REGIONS[REGION_NAMES[d.region[i]]][1:]
        assert abs(xs.mean() / 32 - cx) < 0.1 and abs(ys.mean() / 32 - cy) < 0.1
        # the corner far from the shape shows the background color (up to the gradient)
        far = (31 if cx < 0.5 else 0, 31 if cy < 0.5 else 0)
        bg = rgb[d.background[i]].astype(float)
        assert np.abs(img[:, far[1], far[0]] - bg).max() <= 0.2 * 255 + 1
    large = [np.count_nonzero(np.abs(d.images[i] - rgb[d.color[i]][:, None, None]).max(0) < 3)
             for i in range(60) if d.size[i] == 1]  # fmt: skip
    small = [np.count_nonzero(np.abs(d.images[i] - rgb[d.color[i]][:, None, None]).max(0) < 3)
             for i in range(60) if d.size[i] == 0]  # fmt: skip
    assert np.mean(large) > 1.8 * np.mean(small)


def test_anti_aliased_edges():
    d = generate_shapes(10, image_size=32, seed=0)
    # edge pixels blend: some values lie strictly between background and shape colors
    assert len(np.unique(d.images[0])) > 6


def test_load_dataset_shapes():
    ds = load_dataset("builtin:shapes?n=30", image_size=16, seed=5)
    assert len(ds) == 30 and ds.images.shape == (30, 3, 16, 16) and ds.num_classes == len(KINDS)
    assert KINDS[ds[0]["label"]] in ds[0]["caption"]
    assert len(load_dataset("builtin:shapes", image_size=8, limit=12)) == 12
    gray = load_dataset("builtin:shapes?n=4", image_size=8, channels=1)
    assert gray.images.shape == (4, 1, 8, 8)
    with pytest.raises(DataError, match="n in 'builtin:shapes\\?n=x' must be a whole number"):
        load_dataset("builtin:shapes?n=x")
