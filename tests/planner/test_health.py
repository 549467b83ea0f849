import pytest

from dyn.planner.health import Deadlines, ProcessSlot, RestartBudget
from dyn.planner.policy import StaticPolicy, WorkerView


def test_restart_budget_slides():
    budget = RestartBudget(max_restarts=2, window_s=10.0)
    assert budget.can_restart(0.0)
    budget.record(0.0)
    budget.record(1.0)
    assert not budget.can_restart(5.0)
    assert budget.can_restart(10.5)  # the first restart left the window


def test_deadlines_per_state():
    d = Deadlines(register_s=10, load_s=100, heartbeat_s=3)
    slot = ProcessSlot("decode-0", "decode", "h1", (0,))
    slot.set_state("starting", 0.0)
    assert slot.overdue(9.0, d) is None
    assert "did not register within 10 s" in slot.overdue(11.0, d)
    slot.set_state("loading", 11.0)
    slot.registered = True
    slot.heard(11.0)
    assert slot.overdue(13.0, d) is None
    assert "missed heartbeats for 4.0 s" in slot.overdue(15.0, d)
    slot.heard(110.0)
    assert "did not become ready within 100 s" in slot.overdue(112.0, d)
    slot.set_state("ready", 112.0)
    slot.heard(112.0)
    assert slot.overdue(114.0, d) is None
    slot.set_state("failed", 200.0)
    assert slot.overdue(1000.0, d) is None  # failed slots are handled, not re-failed


def test_unknown_timeout_override_is_named():
    with pytest.raises(ValueError, match=r"unknown timeouts \['heartbeat'\]"):
        Deadlines.from_overrides({"heartbeat": 1})
    assert Deadlines.from_overrides({"heartbeat_s": 2}).heartbeat_s == 2.0


def test_static_policy_changes_nothing():
    views = [WorkerView("decode-0", "decode", "h1", (0,), "ready", {"num_waiting": 100.0})]
    assert StaticPolicy().decide(views, 0.0) == []


def test_relaunch_time_is_measured_from_failure_to_ready():
    from dyn.planner.report import relaunch_time_s

    w0, w1 = ProcessSlot("w0", "decode", "n", (0,)), ProcessSlot("w1", "decode", "n", (1,))
    fe = ProcessSlot("frontend", "frontend", "n", ())
    assert relaunch_time_s([w0, w1, fe]) is None
    for slot in (w0, w1, fe):
        slot.set_state("launching", 100.0)
        slot.set_state("loading", 103.0)
    w0.set_state("ready", 110.0)  # first launch: 10 s
    w1.set_state("ready", 104.0)
    fe.set_state("ready", 190.0)  # frontends do not count
    assert relaunch_time_s([w0, w1, fe]) == 10.0
    w1.set_state("failed", 200.0, "killed")
    w1.set_state("launching", 201.0)  # the backoff is part of the wait a request sees
    w1.set_state("starting", 202.0)
    w1.set_state("ready", 213.5)
    assert w1.ready_after_s == 13.5 and relaunch_time_s([w0, w1, fe]) == 13.5


def test_restart_budget_comes_from_the_recipe_unless_overridden():
    from dyn.config.loader import parse_recipe
    from dyn.planner.daemon import restart_budget

    recipe = parse_recipe("name: m\nmodel: {path: /m}\nworkers: {both: {}}\n"
                          "planner: {max_restarts: 50, restart_window_s: 60}\n", "m.yaml")
    assert restart_budget(recipe, {}) == {"max_restarts": 50, "window_s": 60.0}
    assert restart_budget(recipe, {"max_restarts": 2.0}) == {"max_restarts": 2, "window_s": 60.0}
