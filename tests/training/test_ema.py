import pytest
import torch
from torch import nn

from ldmkit.training.ema import EMA


def test_ema_follows_closed_form():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    shadow = model.weight.detach().clone()
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update(model)
        shadow = 0.9 * shadow + 0.1 * model.weight.detach()
    assert torch.allclose(ema.model.weight, shadow, atol=1e-6)


def test_ema_warmup_tracks_model_at_start():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9999)
    assert ema.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    # the first update uses decay 0.1: the average moves 90 % of the way
    assert ema.model.weight.mean().item() > 0.8


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match="EMA decay must be in"):
        EMA(nn.Linear(1, 1), decay=1.0)
