import json
import time

import pytest
import torch
from torch import nn

from ldmkit.config import ConfigError
from ldmkit.training.loop import DataOrder, Stage, TrainConfig, lr_multiplier, train_stage
from ldmkit.training.state import RunLock, RunLockedError, list_checkpoints

DATA = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
TARGET = DATA @ torch.tensor([[1.0], [-2.0], [0.5]])


def make_stage(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(123)

    def step(micro, i):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for idx in micro:
            noise = torch.randn(len(idx), 1, generator=gen) * 0.01
            loss = ((model(DATA[idx]) - TARGET[idx] - noise) ** 2).mean() / len(micro)
            loss.backward()
            total += loss.item()
        opt.step()
        return {"loss": total}

    return Stage("toy", model, {"adamw": opt}, step, generators={"noise": gen})


def cfg(steps, **kw):
    base = dict(
        steps=steps,
        batch_size=8,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=3,
        checkpoint_every=4,
        keep_last=2,
        sample_every=0,
        log_every=2,
        ema_decay=0.9,
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(stage, result):
    return [p.detach().clone() for p in stage.model.parameters()] + [
        p.detach().clone() for p in result.ema.model.parameters()
    ]


def test_resume_is_bit_exact(tmp_path):
    a = make_stage()
    ra = train_stage(a, cfg(12), run_dir=tmp_path / "a", num_items=40, seed=5, progress=False)
    b = make_stage()
    train_stage(b, cfg(7), run_dir=tmp_path / "b", num_items=40, seed=5, progress=False)
    c = make_stage(seed=99)  # a fresh process: different init, all restored from the checkpoint
    rc = train_stage(
        c, cfg(12), run_dir=tmp_path / "b", num_items=40, seed=5, resume=True, progress=False
    )
    assert rc.steps_done == 12
    for x, y in zip(weights(a, ra), weights(c, rc)):
        assert torch.equal(x, y)


def test_without_resume_weights_differ(tmp_path):
    # the same comparison without restoring RNG/optimizer must fail, or the test above proves nothing
    a = make_stage()
    ra = train_stage(a, cfg(12), run_dir=tmp_path / "a", num_items=40, seed=5, progress=False)
    c = make_stage(seed=0)
    rc = train_stage(c, cfg(12), run_dir=tmp_path / "c", num_items=40, seed=6, progress=False)
    assert not all(torch.equal(x, y) for x, y in zip(weights(a, ra), weights(c, rc)))


def test_checkpoint_rotation_and_log(tmp_path):
    s = make_stage()
    train_stage(s, cfg(17), run_dir=tmp_path, num_items=40, seed=0, progress=False)
    steps = [c.step for c in list_checkpoints(tmp_path, "toy")]
    assert steps[-2:] == [16, 17] and len(steps) <= 3  # last 2 + possibly the best
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 2 and "images_per_s" in lines[0]


def test_time_budget_stops_with_checkpoint(tmp_path):
    s = make_stage()
    r = train_stage(
        s, cfg(10_000), run_dir=tmp_path, num_items=40, seed=0, time_budget_s=0.2, progress=False
    )
    assert r.stopped_because == "time budget"
    assert list_checkpoints(tmp_path, "toy")[-1].step == r.steps_done


def slow_stage(delay):
    s = make_stage()
    inner = s.step
    lrs = []

    def step(micro, i):
        time.sleep(delay)
        lrs.append(s.optimizers["adamw"].param_groups[0]["lr"])
        return inner(micro, i)

    s.step = step
    return s, lrs


def test_time_budget_plans_the_lr_decay(tmp_path):
    # 10 ms per step and a 1 s budget: about 5 + 20 timed steps, then a plan for the rest, and
    # the cosine reaches its floor (10 % of the peak) at the planned end, before the deadline
    s, lrs = slow_stage(0.01)
    c = cfg(10_000, lr_schedule="cosine", checkpoint_every=10_000)
    r = train_stage(s, c, run_dir=tmp_path, num_items=40, seed=0, time_budget_s=1.0, progress=False)
    assert r.stopped_because == "time budget"
    assert 40 <= r.steps_done <= 100  # sleep dominates; at most 1 s / 10 ms steps
    assert lrs[-1] <= 0.12 * c.lr  # the decay had (nearly) reached its floor when time ran out
    assert max(lrs) == pytest.approx(c.lr)
    state = json.loads((list_checkpoints(tmp_path, "toy")[-1].path / "state.json").read_text())
    assert r.steps_done <= state["planned_steps"] <= r.steps_done + 5
    # a constant LR is not planned: the deadline stops it
    s2, _ = slow_stage(0.01)
    r2 = train_stage(
        s2, cfg(10_000, checkpoint_every=10_000), run_dir=tmp_path / "c", num_items=40, seed=0,
        time_budget_s=0.5, progress=False,
    )  # fmt: skip
    assert r2.stopped_because == "time budget"
    state2 = json.loads(
        (list_checkpoints(tmp_path / "c", "toy")[-1].path / "state.json").read_text()
    )
    assert state2["planned_steps"] is None


def test_nan_loss_stops_after_k_bad_steps(tmp_path):
    s = make_stage()

    def bad(micro, i):
        return {"loss": float("nan"), "skipped": True}

    s.step = bad
    before = [p.detach().clone() for p in s.model.parameters()]
    r = train_stage(
        s, cfg(50, max_bad_steps=3), run_dir=tmp_path, num_items=40, seed=0, progress=False
    )
    assert r.stopped_because == "bad loss" and r.steps_done == 3
    assert all(torch.equal(x, y) for x, y in zip(before, s.model.parameters()))


def test_data_order_is_a_function_of_step():
    o1, o2 = DataOrder(10, 3, seed=1), DataOrder(10, 3, seed=1)
    seq = [o1.indices(k).tolist() for k in range(7)]
    assert [o2.indices(k).tolist() for k in reversed(range(7))][::-1] == seq
    assert sorted(sum(seq[:3], [])) == sorted(set(sum(seq[:3], [])))  # no repeats within an epoch


def test_lr_schedule():
    c = TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine")
    assert lr_multiplier(0, c) == pytest.approx(0.1)
    assert lr_multiplier(9, c) == pytest.approx(1.0)
    assert lr_multiplier(100, c) == pytest.approx(0.1)


def test_bad_train_config():
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        TrainConfig(steps=-5)
    with pytest.raises(ConfigError, match="not divisible by grad_accum"):
        TrainConfig(batch_size=10, grad_accum=3)


def test_run_lock(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match="another training is already writing"):
            with RunLock(tmp_path):
                pass
    with RunLock(tmp_path):  # released
        pass
