"""The motion tracker against the moving-shapes generator's ground truth, and its flicker
measure against injected changes of known size."""

import numpy as np
import pytest

from ldmkit.data.moving_shapes import COLORS, DIRECTION_NAMES, OPPOSITE, generate_moving_shapes
from ldmkit.evaluation.motion import classify, direction_accuracy, track


@pytest.fixture(scope="module")
def clips():
    return generate_moving_shapes(400, frames=16, image_size=32, seed=7)


def test_direction_read_right_on_clean_clips_and_opposite_when_reversed(clips):
    expected = [DIRECTION_NAMES[k] for k in clips.direction]
    tr = track(clips.videos)
    assert direction_accuracy(tr, expected) >= 0.99
    backwards = track(np.ascontiguousarray(clips.videos[:, ::-1]))
    assert direction_accuracy(backwards, [OPPOSITE[e] for e in expected]) >= 0.99
    # each of the eight directions occurs and is read
    assert set(tr.direction) == set(DIRECTION_NAMES)


def test_track_follows_the_ground_truth(clips):
    tr = track(clips.videos)
    assert tr.found.all()
    # centroids within ~1 px of the true centres (pixel centres at integer coordinates)
    assert np.abs(tr.centroids - (clips.centers * 32 - 0.5)).max() < 1.2
    ratio = tr.speed / (clips.speed * 32)
    assert abs(np.median(ratio) - 1) < 0.05 and np.quantile(np.abs(ratio - 1), 0.9) < 0.15
    rgb = np.array(list(COLORS.values()))
    assert np.array_equal(tr.background, rgb[clips.background])  # flat: the median is exact
    assert np.all(tr.flicker == 0)  # the background is flat and still


def test_flicker_measures_changes_outside_the_object(clips):
    videos = clips.videos[:20].astype(np.int16)
    tr = track(clips.videos[:20])
    base = tr.background[:, None, :, None, None].astype(np.int16)
    is_bg = (videos == base).all(axis=2, keepdims=True)
    flickered = videos.copy()
    step = np.where(tr.background.mean(axis=1) > 128, -6, 6)[:, None, None, None, None]
    flickered[:, 1::2] += (step * is_bg)[:, 1::2]  # odd frames' background brighter or darker
    out = track(flickered.clip(0, 255).astype(np.uint8))
    assert np.allclose(out.flicker, 6.0)  # every pair of frames differs by 6 outside the shape
    assert out.direction == tr.direction  # and the motion is still read


def test_still_lost_and_classify():
    still = np.zeros((1, 4, 3, 16, 16), np.uint8)
    still[:, :, :, 6:10, 6:10] = 255
    empty = np.zeros((1, 4, 3, 16, 16), np.uint8)
    assert track(still).direction == ["still"] and track(empty).direction == ["lost"]
    units = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1),
             "down-right": (1, 1), "up-left": (-1, -1)}  # fmt: skip
    assert classify(np.array(list(units.values()), float)) == list(units)
    # 45-degree sectors: 20 degrees off "right" is right, 25 degrees is the diagonal
    a, b = np.deg2rad(20), np.deg2rad(25)
    assert classify(np.array([[np.cos(a), np.sin(a)], [np.cos(b), np.sin(b)]])) == [
        "right",
        "down-right",
    ]
    with pytest.raises(ValueError, match="uint8"):
        track(np.zeros((1, 4, 3, 8, 8), np.float32))
