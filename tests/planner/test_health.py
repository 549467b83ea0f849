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
