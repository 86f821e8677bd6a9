import json
import time

import pytest
import torch
from torch import nn

from ldmkit.config import ConfigError
from ldmkit.recipe import TrainConfig
from ldmkit.runs import RunFolder
from ldmkit.training.loop import DataOrder, Progress, train_stage
from ldmkit.training.state import RunLock, RunLockedError, list_checkpoints
from ldmkit.training.step import Stage

DATA = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
TARGET = DATA @ torch.tensor([[1.0], [-2.0], [0.5]])


def make_stage(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(123)

    def loss(mb):
        noise = torch.randn(len(mb), 1, generator=gen) * 0.01
        return ((model(DATA[mb.indices]) - TARGET[mb.indices] - noise) ** 2).mean(), {}

    return Stage("toy", model, opt, loss, generators={"noise": gen})


def train(stage, c, path, **kw):
    kw.setdefault("num_items", 40)
    kw.setdefault("seed", 0)
    return train_stage(stage, c, folder=RunFolder(path), **kw)


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
    ra = train(a, cfg(12), tmp_path / "a", num_items=40, seed=5)
    b = make_stage()
    train(b, cfg(7), tmp_path / "b", num_items=40, seed=5)
    c = make_stage(seed=99)  # a fresh process: different init, all restored from the checkpoint
    rc = train(c, cfg(12), tmp_path / "b", num_items=40, seed=5, resume=True)
    assert rc.steps_done == 12
    for x, y in zip(weights(a, ra), weights(c, rc)):
        assert torch.equal(x, y)


def test_without_resume_weights_differ(tmp_path):
    # the same comparison without restoring RNG/optimizer must fail, or the test above proves nothing
    a = make_stage()
    ra = train(a, cfg(12), tmp_path / "a", num_items=40, seed=5)
    c = make_stage(seed=0)
    rc = train(c, cfg(12), tmp_path / "c", num_items=40, seed=6)
    assert not all(torch.equal(x, y) for x, y in zip(weights(a, ra), weights(c, rc)))


def test_checkpoint_rotation_and_log(tmp_path):
    s = make_stage()
    train(s, cfg(17), tmp_path, num_items=40, seed=0)
    steps = [c.step for c in list_checkpoints(RunFolder(tmp_path).checkpoints_dir, "toy")]
    assert steps[-2:] == [16, 17] and len(steps) <= 3  # last 2 + possibly the best
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 2 and "images_per_s" in lines[0]


def test_time_budget_stops_with_checkpoint(tmp_path):
    s = make_stage()
    r = train(s, cfg(10_000), tmp_path, num_items=40, seed=0, time_budget_s=0.2)
    assert r.stopped_because == "time budget"
    assert list_checkpoints(RunFolder(tmp_path).checkpoints_dir, "toy")[-1].step == r.steps_done


def slow_stage(delay):
    s = make_stage()
    inner = s.loss
    lrs = []

    def loss(mb):
        time.sleep(delay / 2)  # two micro-batches a step
        lrs.append(s.optimizer.param_groups[0]["lr"])
        return inner(mb)

    s.loss = loss
    return s, lrs


def test_time_budget_plans_the_lr_decay(tmp_path):
    # 10 ms per step and a 1 s budget: about 5 + 20 timed steps, then a plan for the rest, and
    # the cosine reaches its floor (10 % of the peak) at the planned end, before the deadline
    s, lrs = slow_stage(0.01)
    c = cfg(10_000, lr_schedule="cosine", checkpoint_every=10_000)
    r = train(s, c, tmp_path, num_items=40, seed=0, time_budget_s=1.0)
    assert r.stopped_because == "time budget"
    assert 40 <= r.steps_done <= 100  # sleep dominates; at most 1 s / 10 ms steps
    assert lrs[-1] <= 0.12 * c.lr  # the decay had (nearly) reached its floor when time ran out
    assert max(lrs) == pytest.approx(c.lr)
    state = json.loads(
        (
            list_checkpoints(RunFolder(tmp_path).checkpoints_dir, "toy")[-1].path / "state.json"
        ).read_text()
    )
    assert r.steps_done <= state["planned_steps"] <= r.steps_done + 5
    # a constant LR is not planned: the deadline stops it
    s2, _ = slow_stage(0.01)
    r2 = train(s2, cfg(10_000, checkpoint_every=10_000), tmp_path / "c", num_items=40, seed=0,
        time_budget_s=0.5,
    )  # fmt: skip
    assert r2.stopped_because == "time budget"
    state2 = json.loads(
        (
            list_checkpoints(RunFolder(tmp_path / "c").checkpoints_dir, "toy")[-1].path
            / "state.json"
        ).read_text()
    )
    assert state2["planned_steps"] is None


def test_nan_loss_stops_after_k_bad_steps(tmp_path):
    s = make_stage()

    def bad(mb):
        return s.model(DATA[mb.indices]).sum() * float("nan"), {}

    s.loss = bad
    before = [p.detach().clone() for p in s.model.parameters()]
    r = train(s, cfg(50, max_bad_steps=3), tmp_path, num_items=40, seed=0)
    assert r.stopped_because == "bad loss" and r.steps_done == 3
    assert all(torch.equal(x, y) for x, y in zip(before, s.model.parameters()))


def test_data_order_is_a_function_of_step():
    o1, o2 = DataOrder(10, 3, 1, seed=1, key="toy"), DataOrder(10, 3, 1, seed=1, key="toy")
    seq = [o1.micro_batches(k)[0].indices.tolist() for k in range(7)]
    assert [o2.micro_batches(k)[0].indices.tolist() for k in reversed(range(7))][::-1] == seq
    stream = sum(seq, [])  # epochs laid end to end: each item once per epoch
    assert sorted(stream[:10]) == sorted(stream[10:20]) == list(range(10))


def test_lr_schedule():
    c = TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine")
    assert c.lr_multiplier(0) == pytest.approx(0.1)
    assert c.lr_multiplier(9) == pytest.approx(1.0)
    assert c.lr_multiplier(100) == pytest.approx(0.1)


def test_bad_train_config():
    with pytest.raises(ConfigError, match="steps must be a whole number >= 1"):
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


def test_run_lock_is_held_says_whether_a_training_holds_it(tmp_path):
    assert not RunLock.is_held(tmp_path)  # no lock file yet
    with RunLock(tmp_path):
        assert RunLock.is_held(tmp_path)
        assert RunLock.is_held(tmp_path)  # the probe leaves the lock as it was
    assert not RunLock.is_held(tmp_path)
    with RunLock(tmp_path):  # a probe never keeps a training out
        pass


def test_a_stop_request_ends_the_stage_with_a_checkpoint(tmp_path):
    """A threading.Event set from another place (a web page, a notebook) stops the stage after
    the current step, with a checkpoint at that step; resuming then ends where an uninterrupted
    run does."""
    import threading

    stop, events = threading.Event(), []

    def progress(p: Progress):
        events.append(p)
        if p.step == 6:
            stop.set()

    s = make_stage()
    r = train(s, cfg(12), tmp_path / "b", progress=progress, stop=stop)
    assert (r.stopped_because, r.steps_done) == ("stop request", 6)
    assert list_checkpoints(RunFolder(tmp_path / "b").checkpoints_dir, "toy")[-1].step == 6
    assert [e.step for e in events if not e.done] == [1, 2, 3, 4, 5, 6] and events[-1].done
    assert [e.step for e in events if e.loss is not None] == [2, 4, 6]  # the log_every rows
    c = make_stage()
    rc = train(c, cfg(12), tmp_path / "b", resume=True)
    a = make_stage()
    ra = train(a, cfg(12), tmp_path / "a")
    assert (rc.steps_done, rc.stopped_because) == (12, "finished")
    assert all(torch.equal(x, y) for x, y in zip(weights(a, ra), weights(c, rc)))
