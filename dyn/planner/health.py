"""Health of launched processes: the daemon's per-process view and its deadlines.

Pure data and clock arithmetic (no I/O), so every rule here is unit-tested
with a fake clock. A process moves through:

    pending -> launching -> starting -> loading -> ready -> (draining) -> stopping -> exited
                   \\            \\          \\         \\
                    +------------+----------+---------+--> failed -> (relaunch) launching
                                                                   \\-> gave_up (budget spent)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

ACTIVE_STATES = frozenset({"launching", "starting", "loading", "ready", "draining", "stopping"})
"""States in which a process is expected to be alive. "stopping" counts: a worker that stops on
its own (an operator's SIGTERM) and exits is a failure to repair, not a planned exit."""


@dataclass(frozen=True)
class Deadlines:
    """Every wait of the daemon has one of these."""

    register_s: float = 120.0
    """Launch -> Register (interpreter start and imports; 72 processes on 2 cores are slow)."""
    load_s: float = 900.0
    """Register -> ready (model load and KV allocation)."""
    heartbeat_s: float = 6.0
    """Silence after which a registered process is declared failed."""
    liveness_interval_s: float = 2.0
    """How often pids are checked on every node (catches SIGKILL before the heartbeat deadline)."""
    stop_s: float = 20.0
    """Drain + stop before processes are killed; a stopped process drains for half of it
    (ProcessConfig.drain_grace_s), then fails what is left as retryable."""
    heartbeat_interval_s: float = 1.0
    """Handed to every process; also the period of the frontend's worker-list push."""
    daemon_grace_s: float = 30.0
    """Processes exit on their own after this long without a word from the daemon."""
    restart_backoff_s: float = 1.0
    max_restarts: float = 3
    """Relaunches allowed per process within restart_window_s ... (an override: the recipe's
    planner.max_restarts / restart_window_s apply unless --timeouts names these two)"""
    restart_window_s: float = 600.0
    """... after which it is left down (`gave_up`) and the deployment is `degraded`."""
    max_starting: float = 16
    """Processes launched but not yet registered, at most (paces interpreter-start storms)."""
    partition_s: float = 600.0
    """How long to keep trying to reach (and kill) a worker cut off from the daemon before it is
    left down (`gave_up`); it is replaced as soon as its node answers again."""

    @classmethod
    def from_overrides(cls, overrides: dict[str, float]) -> "Deadlines":
        unknown = set(overrides) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown timeouts {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**{k: float(v) for k, v in overrides.items()})


@dataclass(slots=True)
class RestartBudget:
    """At most `max_restarts` relaunches per sliding `window_s` (default 3 per 10 minutes)."""

    max_restarts: int = 3
    window_s: float = 600.0
    _times: deque = field(default_factory=deque)

    def can_restart(self, now: float) -> bool:
        self._expire(now)
        return len(self._times) < self.max_restarts

    def record(self, now: float) -> None:
        self._expire(now)
        self._times.append(now)

    def _expire(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()


@dataclass(slots=True)
class ProcessSlot:
    """One desired process (worker or frontend) and what the daemon knows about it."""

    id: str
    role: str
    node: str
    gpus: tuple[int, ...]
    cpu_threads: int | None = None
    state: str = "pending"
    pid: int | None = None
    run_dir: str = ""
    log_path: str = ""
    config_path: str = ""
    addresses: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    state_since: float = 0.0
    last_heard: float | None = None
    registered: bool = False
    error: str = ""
    last_failure: str = ""
    """Why it failed last (kept across relaunches, for `dyn status`)."""
    log_tail: str = ""
    num_restarts: int = 0
    budget: RestartBudget = field(default_factory=RestartBudget)
    adopted_state: str | None = None
    """The state a previous daemon last saw (set by adoption until the process re-registers):
    a worker that was ready is ready again when the same pid comes back, never "loading"."""

    down_since: float | None = None
    """When the process last failed (or was first launched): the start of the launch-to-ready
    time the frontends derive their relaunch wait from."""
    ready_after_s: float | None = None
    """Seconds from the last failure (or first launch) to ready: the measured relaunch time."""

    def set_state(self, state: str, now: float, error: str = "") -> None:
        if state != self.state:
            if state == "failed" or (state == "launching" and self.down_since is None):
                self.down_since = now
            elif state == "ready" and self.down_since is not None:
                self.ready_after_s, self.down_since = now - self.down_since, None
            self.state = state
            self.state_since = now
        if error:
            self.error = error
            if state == "failed":
                self.last_failure = error

    def heard(self, now: float) -> None:
        self.last_heard = now

    def heartbeat_age(self, now: float) -> float | None:
        return None if self.last_heard is None else max(0.0, now - self.last_heard)

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    def overdue(self, now: float, deadlines: Deadlines) -> str | None:
        """Why this process should be declared failed now, or None."""
        waited = now - self.state_since
        if self.state in ("launching", "starting") and waited > deadlines.register_s:
            return f"did not register within {deadlines.register_s:.0f} s of launch"
        if self.state == "loading" and waited > deadlines.load_s:
            return f"did not become ready within {deadlines.load_s:.0f} s of registering"
        if self.registered and self.state in ("loading", "ready", "draining"):
            age = self.heartbeat_age(now)
            if age is not None and age > deadlines.heartbeat_s:
                return f"missed heartbeats for {age:.1f} s (limit {deadlines.heartbeat_s:.0f} s)"
        return None
