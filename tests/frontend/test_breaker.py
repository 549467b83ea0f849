"""Circuit breaker transitions, stepped with an injected clock."""

from __future__ import annotations

from dyn.frontend.breaker import BreakerBoard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_repeated_failures_and_half_opens_after_cooldown():
    clock = Clock()
    board = BreakerBoard(failure_threshold=3, cooldown_s=10.0, clock=clock)
    board.on_failure("w0")
    board.on_failure("w0")
    assert board.allows("w0") and board.states() == {"w0": "closed"}
    board.on_success("w0")  # a success resets the count: failures must be consecutive
    for _ in range(3):
        board.on_failure("w0")
    assert board.states()["w0"] == "open" and not board.allows("w0")
    assert board.blocked(["w0", "w1"]) == frozenset({"w0"})
    clock.now += 9.9
    assert not board.allows("w0")
    clock.now += 0.2
    assert board.states()["w0"] == "half_open"
    assert board.allows("w0")
    board.on_sent("w0")  # the one probe
    assert not board.allows("w0"), "half-open lets a single probe through"
    board.on_failure("w0")  # the probe failed: open again, for a fresh cool-down
    assert board.states()["w0"] == "open"
    clock.now += 10.0
    assert board.allows("w0")
    board.on_sent("w0")
    board.on_success("w0")
    assert board.states()["w0"] == "closed" and board.allows("w0")
    assert board.get("w0").num_opens == 2


def test_forget_drops_a_worker_that_left():
    board = BreakerBoard(failure_threshold=1, clock=Clock())
    board.on_failure("w0")
    assert not board.allows("w0")
    board.forget("w0")
    assert board.allows("w0") and board.states() == {}
