"""The run's judge (training/run.py `_judge`): on large data it trains on towards eval's target
accuracy when its steps leave it weak; on small data it trains exactly its steps."""

from types import SimpleNamespace

import pytest

from ldmkit.data import load_dataset
from ldmkit.evaluation import feature_nets
from ldmkit.training import run as run_module


@pytest.fixture(scope="module")
def shapes1024():
    return load_dataset("builtin:shapes?n=1024", image_size=16, seed=0)


def _epochs(caplog) -> int:
    return sum("domain classifier epoch" in r.getMessage() for r in caplog.records)


def test_a_weak_judge_of_large_data_trains_on(shapes1024, monkeypatch, caplog):
    run = SimpleNamespace(dataset=shapes1024, cfg=SimpleNamespace(seed=0), budget=None)
    monkeypatch.setattr(run_module, "JUDGE_STEPS", 2)  # one epoch of 8 batches: weak
    monkeypatch.setattr(feature_nets, "DOMAIN_MIN_STEPS", 2)
    caplog.set_level("INFO", logger="ldmkit.evaluation.features")
    monkeypatch.setattr(run_module, "JUDGE_TRAIN_ON_MIN_IMAGES", 10_000)  # small data: as before
    small = run_module._judge(run)
    assert _epochs(caplog) == 1 and "training on" not in caplog.text
    assert small.held_out_accuracy < feature_nets.DOMAIN_TARGET_ACCURACY
    caplog.clear()
    monkeypatch.setattr(run_module, "JUDGE_TRAIN_ON_MIN_IMAGES", 1000)  # large data: trains on
    large = run_module._judge(run)
    assert _epochs(caplog) > 1 and "training on" in caplog.text
    assert large.held_out_accuracy > small.held_out_accuracy
    # the run's own random draws are untouched by the longer training
    import torch

    torch.manual_seed(5)
    run_module._judge(run)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))
