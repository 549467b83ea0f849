"""Per-worker circuit breakers: stop routing to a worker that keeps failing.

    closed --(failure_threshold failures in a row)--> open
    open   --(cooldown_s passed; next route check)--> half_open (one probe request)
    half_open --probe succeeds--> closed      half_open --probe fails--> open (cool down again)

A worker the daemon still calls "ready" can fail every request (a wedged
GPU, a broken shuttle); without a breaker the KV router keeps sending it the
prompts it caches best. Failures are what the frontend itself sees (lost
stream, stall, internal error, refused send), not client mistakes.
The clock is injected so tests step time instead of sleeping.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal

BreakerState = Literal["closed", "half_open", "open"]
STATE_VALUES: dict[str, int] = {"closed": 0, "half_open": 1, "open": 2}
"""Gauge encoding (dyn_worker_circuit_state)."""


@dataclass(slots=True)
class CircuitBreaker:
    failure_threshold: int = 3
    cooldown_s: float = 10.0
    state: BreakerState = "closed"
    num_failures: int = 0
    """Consecutive failures while closed."""
    opened_at: float = 0.0
    probe_in_flight: bool = False
    num_opens: int = 0

    def allows(self, now: float) -> bool:
        """May a new request go to this worker now? Moves open -> half_open after the cool-down."""
        if self.state == "open" and now - self.opened_at >= self.cooldown_s:
            self.state, self.probe_in_flight = "half_open", False
        if self.state == "closed":
            return True
        return self.state == "half_open" and not self.probe_in_flight

    def on_sent(self) -> None:
        """A request was routed here; in half_open it is the one probe."""
        if self.state == "half_open":
            self.probe_in_flight = True

    def on_success(self) -> None:
        self.state, self.num_failures, self.probe_in_flight = "closed", 0, False

    def on_failure(self, now: float) -> None:
        if self.state == "half_open":
            self._open(now)
            return
        self.num_failures += 1
        if self.state == "closed" and self.num_failures >= self.failure_threshold:
            self._open(now)

    def _open(self, now: float) -> None:
        self.state, self.opened_at, self.probe_in_flight = "open", now, False
        self.num_failures = 0
        self.num_opens += 1


@dataclass(slots=True)
class BreakerBoard:
    """The breakers of every worker this frontend has routed to."""

    failure_threshold: int = 3
    cooldown_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    breakers: dict[str, CircuitBreaker] = field(default_factory=dict)

    def get(self, worker_id: str) -> CircuitBreaker:
        breaker = self.breakers.get(worker_id)
        if breaker is None:
            breaker = CircuitBreaker(self.failure_threshold, self.cooldown_s)
            self.breakers[worker_id] = breaker
        return breaker

    def allows(self, worker_id: str) -> bool:
        breaker = self.breakers.get(worker_id)
        return breaker is None or breaker.allows(self.clock())

    def blocked(self, worker_ids) -> frozenset[str]:
        """The workers among `worker_ids` (a set or dict) that must not get a new request now."""
        if not self.breakers:
            return frozenset()
        now = self.clock()  # (one pass over the breakers, not over a rack's workers)
        return frozenset(w for w, b in self.breakers.items() if w in worker_ids and not b.allows(now))

    def on_sent(self, worker_id: str) -> None:
        self.get(worker_id).on_sent()

    def on_success(self, worker_id: str) -> None:
        breaker = self.breakers.get(worker_id)
        if breaker is not None:
            breaker.on_success()

    def on_failure(self, worker_id: str) -> None:
        self.get(worker_id).on_failure(self.clock())

    def forget(self, worker_id: str) -> None:
        """The worker left the deployment (a relaunch comes back under a fresh breaker)."""
        self.breakers.pop(worker_id, None)

    def states(self) -> dict[str, str]:
        now = self.clock()
        for breaker in self.breakers.values():
            breaker.allows(now)  # let a finished cool-down show as half_open
        return {wid: b.state for wid, b in self.breakers.items()}
