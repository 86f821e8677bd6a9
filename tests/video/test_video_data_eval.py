"""Folders of animations as video data, the video specs kept out of the image loaders, and the
clip measures of evaluation/video.py against the moving shapes' ground truth."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.data import DataError, animations, load_dataset
from ldmkit.data.animations import clips_grid, frames_strip, read_animation, save_animation
from ldmkit.data.moving_shapes import generate_moving_shapes
from ldmkit.data.video import is_video_spec, load_video_data
from ldmkit.evaluation.video import FVD_NOTE, caption_direction, score_clips


def clip(frames: int, size: int = 12, value: int = 0) -> np.ndarray:
    rng = np.random.default_rng(value)
    return rng.integers(0, 255, (frames, 3, size, size), dtype=np.uint8)


def test_a_folder_of_animations_with_class_folders_and_captions(tmp_path):
    for i, cls in enumerate(["cat", "dog", "dog"]):
        save_animation(tmp_path / cls / f"{i}.gif", clip(5, value=i))
    (tmp_path / "dog" / "1.txt").write_text("a dog running")
    data = load_video_data(f"animations:{tmp_path}", frames=3, image_size=8)
    assert data.videos.shape == (3, 3, 3, 8, 8) and data.videos.dtype == np.uint8
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [0, 1, 1]
    assert data.captions == ["", "a dog running", ""]
    assert is_video_spec(f"animations:{tmp_path}") and is_video_spec("builtin:moving-shapes?n=3")
    assert not is_video_spec("builtin:shapes")


def test_animations_too_short_or_one_frame_are_refused_in_one_line(tmp_path):
    save_animation(tmp_path / "a.gif", clip(3))
    with pytest.raises(DataError, match=r"a.gif has 3 frames but the run trains on 4"):
        load_video_data(f"animations:{tmp_path}", frames=4, image_size=8)
    Image.new("RGB", (8, 8)).save(tmp_path / "still.gif")
    with pytest.raises(DataError, match=r"still.gif has 1 frame; an animation needs at least 2"):
        load_video_data(f"animations:{tmp_path}", frames=2, image_size=8)
    (tmp_path / "a.gif").unlink(), (tmp_path / "still.gif").unlink()
    (tmp_path / "x.txt").write_text("not an animation")
    with pytest.raises(DataError, match="no images .* found 1 other file"):
        load_video_data(f"animations:{tmp_path}", frames=2, image_size=8)


def test_frames_of_different_sizes_are_refused(tmp_path, monkeypatch):
    save_animation(tmp_path / "a.gif", clip(3))
    frames = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 6))]
    monkeypatch.setattr(animations.ImageSequence, "Iterator", lambda im: iter(frames))
    with pytest.raises(DataError, match=r"frames of different sizes \(8x6 and 8x8\)"):
        read_animation(tmp_path / "a.gif")


def test_video_specs_are_not_images():
    with pytest.raises(DataError, match="is video data"):
        load_dataset("builtin:moving-shapes", image_size=16)


def test_grids_of_clips():
    clips = np.stack([clip(3, 4, v) for v in range(5)])  # (5, 3, 3, 4, 4)
    strip = frames_strip(clips)  # a row per clip, its frames left to right, 2 px apart
    assert strip.shape == (3, 5 * 6 + 2, 3 * 6 + 2)
    assert np.array_equal(strip[:, 2 + 6 * 4 : 6 + 6 * 4, 2 + 6 * 2 : 6 + 6 * 2], clips[4, 2])
    anim = clips_grid(clips)  # frame f tiles the clips' frame f, 3 a row
    assert anim.shape == (3, 3, 2 * 6 + 2, 3 * 6 + 2)
    assert np.array_equal(anim[1][:, 8:12, 8:12], clips[4, 1])


def test_caption_direction():
    assert caption_direction("a small red star moving up-left on a blue background") == "up-left"
    assert caption_direction("a large circle moving down on a green background") == "down"
    assert caption_direction("a cat") is None


class LabelNet:
    """A stand-in classifier: frame -> class by its mean brightness bucket (no training)."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        k = ((x.mean((1, 2, 3)) + 1) * 2).clamp(0, 3.99).long()
        return torch.nn.functional.one_hot(k, 4).float()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0].mean((1, 2))], 1)


def test_scores_of_real_clips_against_their_truth():
    d = generate_moving_shapes(40, frames=8, image_size=24, seed=3)
    dirs = [caption_direction(c) for c in d.captions]
    s = score_clips(d.videos, real=d.videos, net=LabelNet(), directions=dirs)
    assert s.direction_accuracy == 1.0 and s.moving == 1.0 and s.flicker == 0.0
    assert s.fid_frames == pytest.approx(0.0, abs=1e-6) and s.note == FVD_NOTE and s.fvd is None
    assert s.class_constant == 1.0  # a clip's brightness does not jump buckets (flat background)
    reverse = score_clips(d.videos[:, ::-1].copy(), directions=dirs)
    assert reverse.direction_accuracy == 0.0  # played backwards: the opposite direction
    # a clip whose frames flip between a dark and a light one is not one class throughout
    mixed = d.videos.copy()
    light = mixed[:, 0].mean((1, 2, 3)) > 127
    mixed[:, 1] = np.where(light, 0, 255)[:, None, None, None]
    assert score_clips(mixed, net=LabelNet()).class_constant == 0.0
    # the reader's ceiling: the same read of the real clips, beside the generated ones'
    against_real = score_clips(mixed, real=d.videos, net=LabelNet())
    assert against_real.class_constant == 0.0 and against_real.real_class_constant == 1.0
    assert score_clips(d.videos, real=mixed, net=LabelNet()).real_class_constant == 0.0
    frozen = np.repeat(d.videos[:, :1], 8, axis=1)
    assert score_clips(frozen, directions=dirs).moving == 0.0
