"""Exponential moving average of model weights, with warm-up.

The decay ramps up as min(decay, (1 + n) / (10 + n)) over the n updates done so far (the
warm-up used by TensorFlow's ExponentialMovingAverage and by LDM), so the average follows the
model closely at the start: early preview samples are not the black or noisy images of a
freshly initialised network averaged at decay 0.9999.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps a shadow copy of a module's floating-point parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.num_updates += 1
        src = dict(model.state_dict())
        for name, shadow in self.model.state_dict().items():
            value = src[name].detach()
            if shadow.dtype.is_floating_point:
                shadow.lerp_(value.to(shadow.dtype), 1 - d)
            else:
                shadow.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.model.load_state_dict(state, strict=True)
        self.num_updates = num_updates
