"""A stage that measures itself and ends on quality (loop.QualityGate, BudgetPlan.finish_at),
the wsd LR schedule, re-planning on the recent speed, and the thread fallback (ThreadGovernor)."""

import json

import pytest
import torch
from test_loop import cfg, make_stage, train

from ldmkit.recipe import WSD_DECAY, TrainConfig
from ldmkit.runs import RunFolder
from ldmkit.training import loop
from ldmkit.training.loop import BudgetPlan, QualityGate, ThreadGovernor
from ldmkit.training.state import list_checkpoints


def test_wsd_schedule_is_stable_then_decays_linearly_to_zero():
    c = TrainConfig(steps=100, warmup_steps=10, lr_schedule="wsd")
    assert c.lr_multiplier(0) == pytest.approx(0.1)  # warm-up as before
    assert c.lr_multiplier(10) == 1.0 and c.lr_multiplier(79) == 1.0
    start = 100 * (1 - WSD_DECAY)  # the last 20 steps decay
    for step in (80, 90, 99):
        assert c.lr_multiplier(step) == pytest.approx((100 - step) / (100 - start))
    assert c.lr_multiplier(100) == 0.0
    # planned from a budget (total): the decay follows the plan, not `steps`
    assert c.lr_multiplier(45, total=50) == pytest.approx(0.5)


def readability_rising(values):
    """A measure that returns the next of `values` each call (then the last one)."""
    it = iter(values)
    last = {"v": values[0]}

    def measure(model):
        last["v"] = next(it, last["v"])
        return {"psnr": 30.0, "ssim": 0.9, "latent_std": 1.0, "readability": last["v"]}

    return measure


def target(rows):
    return "readability target" if rows[-1]["readability"] >= 0.95 else None


def test_gate_ends_a_budgeted_stage_through_its_decay(tmp_path):
    gate = QualityGate(readability_rising([0.2, 0.5, 0.96]), target, stop_on_target=True,
                       min_steps=10)  # fmt: skip
    c = cfg(10_000, lr_schedule="wsd", checkpoint_every=10_000, log_every=5)
    r = train(make_stage(), c, tmp_path, time_budget_s=600.0, gate=gate)
    # measured after steps 1, 11, 21; the target at 21 ends it at ceil(21 / (1 - 0.2)) = 27
    assert [row["step"] for row in gate.rows] == [1, 11, 21, 22, 23, 24, 25, 26][: len(gate.rows)]
    assert gate.rows[2]["step"] == 21 and gate.reason == "readability target"
    assert r.stopped_because == "quality target" and r.steps_done == 27 and r.planned == 27
    logged = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    quality = [x for x in logged if x.get("kind") == "quality"]
    assert quality[0]["step"] == 1 and quality[0]["readability"] == 0.2
    clocks = {"seconds", "cpu_s", "measure_s"}  # the stage's clocks, less the measurements'
    assert clocks <= set(quality[0])


def test_gate_without_stop_on_target_only_measures(tmp_path):
    gate = QualityGate(readability_rising([0.96]), target, stop_on_target=False, min_steps=5)
    r = train(make_stage(), cfg(20, lr_schedule="wsd"), tmp_path, gate=gate)
    assert r.stopped_because == "finished" and r.steps_done == 20
    assert [row["step"] for row in gate.rows] == [1, 6, 11, 16]


def test_a_fixed_plan_survives_resume(tmp_path):
    gate = QualityGate(readability_rising([0.96]), target, stop_on_target=True, min_steps=10)
    c = cfg(10_000, lr_schedule="wsd", checkpoint_every=1)
    # stopped by a request right after the target fixed the end (step 2 of ceil(1 / 0.8) = 2)
    r = train(make_stage(), c, tmp_path, time_budget_s=600.0, gate=gate)
    assert r.steps_done == 2 and r.stopped_because == "quality target"
    state = json.loads(
        (
            list_checkpoints(RunFolder(tmp_path).checkpoints_dir, "toy")[-1].path / "state.json"
        ).read_text()
    )
    assert state["plan_fixed"] is True and state["planned_steps"] == 2
    assert state["quality_reason"] == "readability target"
    gate2 = QualityGate(readability_rising([0.1]), target, stop_on_target=True)
    r2 = train(make_stage(), c, tmp_path, time_budget_s=600.0, gate=gate2, resume=True)
    assert r2.steps_done == 2 and r2.stopped_because == "quality target"
    assert gate2.reason == "readability target"


def test_finish_at_never_extends_and_time_only_shortens(monkeypatch):
    c = TrainConfig(steps=1000, warmup_steps=0, lr_schedule="wsd")
    plan = BudgetPlan("s", c, deadline=100.0, start_step=0, planned=500)
    assert plan.finish_at(200) == 250 and plan.fixed
    assert plan.finish_at(400) == 250  # never later than fixed
    clock = {"t": 0.0}
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock["t"])
    for step in range(loop.PLAN_SKIP, loop.PLAN_SKIP + 3 * loop.PLAN_OVER + 1):
        plan.observe(step)  # 0.01 s/step: the budget would allow ~9500 more steps
        clock["t"] += 0.01
    assert plan.planned == 250  # fixed: time does not extend it
    clock["t"] = 99.0  # then time runs short: the plan shrinks
    plan.observe(loop.PLAN_SKIP + 4 * loop.PLAN_OVER)
    assert plan.planned < 250


def test_plan_follows_the_recent_speed(monkeypatch):
    """A machine that gets 10x slower halfway: the plan uses the last windows' speed, not the
    mean since the start."""
    clock = {"t": 0.0}
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock["t"])
    c = TrainConfig(steps=100_000, warmup_steps=0, lr_schedule="cosine")
    plan = BudgetPlan("s", c, deadline=1000.0, start_step=0, planned=None)
    step = 0
    for per_step in [0.1] * (loop.PLAN_SKIP + 200) + [1.0] * 100:  # ends on a window
        plan.observe(step)
        clock["t"] += per_step
        step += 1
    plan.observe(step)
    assert plan.per_step == pytest.approx(1.0)
    remaining = 1000.0 - clock["t"]
    assert plan.planned == step + int(loop.PLAN_MARGIN * remaining / 1.0)


def fake_threads(monkeypatch, n=2):
    threads = {"n": n}
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads["n"])
    monkeypatch.setattr(torch, "set_num_threads", lambda k: threads.__setitem__("n", k))
    return threads


def test_governor_on_a_quiet_machine_tries_one_thread_rarely(monkeypatch):
    threads = fake_threads(monkeypatch)
    gov = ThreadGovernor("s")
    speed = {2: 0.10, 1: 0.16}  # a quiet 2-core machine: 2 threads are faster
    trials, step = [], 0
    for _ in range(200):
        step += 20
        n = threads["n"]
        gov.observe(step, speed[n])
        if threads["n"] == 1:
            trials.append(step)
    # after the first window it tries 1 thread, which loses; then after 20, 40, 80 windows
    # (the wait doubles with each lost trial): 4 slow windows of 200
    assert trials == [20, 420, 1220, 2820]
    assert threads["n"] == 2


def test_governor_keeps_one_thread_on_a_machine_busy_from_the_start(monkeypatch, caplog):
    threads = fake_threads(monkeypatch)
    gov = ThreadGovernor("s")
    speed = {2: 0.40, 1: 0.15}  # a hog on one core: 2 threads stall each other
    for step in range(20, 400, 20):
        gov.observe(step, speed[threads["n"]])
    assert threads["n"] == 1 and gov.changes[:2] == [(20, 1)] + gov.changes[1:2]
    assert gov.changes[0] == (20, 1) and gov.changes[1][1] == 2  # the trial back at 2 lost
    assert "1 thread runs faster than 2" in caplog.text
    gov.restore()
    assert threads["n"] == 2


def test_governor_reacts_when_the_machine_becomes_busy_and_quiet_again(monkeypatch):
    threads = fake_threads(monkeypatch)
    gov = ThreadGovernor("s")
    step, log_n = 0, []
    for phase, windows in (({2: 0.10, 1: 0.16}, 5), ({2: 0.50, 1: 0.20}, 30),
                           ({2: 0.10, 1: 0.16}, 60)):  # fmt: skip
        for _ in range(windows):
            step += 20
            gov.observe(step, phase[threads["n"]])
            log_n.append(threads["n"])
    busy, quiet_again = log_n[5:35], log_n[35:]
    assert busy.count(1) > 0.7 * len(busy)  # mostly one thread while the hog runs
    assert quiet_again[-10:] == [2] * 10  # and back to two once it has gone


def test_governor_acts_in_a_budgeted_stage(tmp_path, monkeypatch):
    """The loop feeds it: a stage whose steps slow 10x after its first windows drops a thread."""
    torch.set_num_threads(2)
    s, _ = _slowing_stage(after=loop.PLAN_SKIP + 2 * loop.PLAN_OVER)
    r = train(s, cfg(loop.PLAN_SKIP + 6 * loop.PLAN_OVER, checkpoint_every=10_000), tmp_path,
              time_budget_s=600.0)  # fmt: skip
    assert r.threads and r.threads[0][1] == 1
    assert torch.get_num_threads() == 2  # restored when the stage ends


def _slowing_stage(after):
    import time

    s = make_stage()
    inner = s.loss
    calls = {"n": 0}

    def loss(mb):
        calls["n"] += 1
        time.sleep(0.002 if calls["n"] < 2 * after else 0.03)
        return inner(mb)

    s.loss = loss
    return s, calls


def test_the_governor_reads_the_last_window_alone(monkeypatch):
    """The plan's speed spans three windows; a thread trial must be judged on its own window."""
    clock = {"t": 0.0}
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock["t"])
    plan = BudgetPlan("s", TrainConfig(steps=10_000, lr_schedule="cosine"), deadline=1e6,
                      start_step=0, planned=None)  # fmt: skip
    step = 0
    for per_step in [0.1] * (loop.PLAN_SKIP + 2 * loop.PLAN_OVER) + [1.0] * loop.PLAN_OVER:
        plan.observe(step)
        clock["t"] += per_step
        step += 1
    plan.observe(step)
    assert plan.last_window == pytest.approx(1.0)
    assert plan.per_step == pytest.approx((0.1 * 2 + 1.0) / 3)
