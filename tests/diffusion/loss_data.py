"""Shared test data of the loss and likelihood tests: 8-bit images in [-1, 1] and seeded noise."""

import torch

GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the 8-bit values in [-1, 1]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def image_data(seed=0, shape=(4, 2, 4, 4)):
    """x0 on the 8-bit grid and Gaussian eps, float64."""
    g = gen(seed)
    x0 = GRID[torch.randint(0, 256, shape, generator=g)]
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    return x0, eps
