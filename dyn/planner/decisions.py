"""The daemon's record of planner decisions and scaling actions: for `dyn status` and Prometheus.

Every decision the policy makes (with the inputs it was made from) and every
action the daemon takes for it (which worker was launched, drained, stopped
or flipped, and how that ended) lands here. Status shows the last few;
`dyn_planner_decisions_total{action,role}` counts all of them.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any, Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

SHOWN = 20
"""Decisions kept for the status payload."""


class DecisionLog:
    """Recent decisions (newest last) and per (action, role) totals since the daemon started."""

    def __init__(self, maxlen: int = SHOWN) -> None:
        self.recent: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self.totals: Counter[tuple[str, str]] = Counter()
        self.actions: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self.action_totals: Counter[tuple[str, str, str]] = Counter()

    def decision(self, record: Mapping[str, Any]) -> None:
        """A planner decision (`Decision.to_dict()`), stamped with wall time."""
        entry = {**record, "wall_time": time.time()}
        self.recent.append(entry)
        self.totals[(str(record.get("action")), str(record.get("role")))] += 1

    def action(self, kind: str, worker_id: str, role: str, outcome: str, detail: str = "") -> None:
        """What the daemon did about a decision: outcome is ok, failed or skipped."""
        self.actions.append({"kind": kind, "worker": worker_id, "role": role, "outcome": outcome,
                             "detail": detail, "wall_time": time.time()})
        self.action_totals[(kind, role, outcome)] += 1

    def to_dict(self) -> dict[str, Any]:
        return {"decisions": list(self.recent), "actions": list(self.actions)}


class PlannerCollector(Collector):
    """Prometheus families of the planner, read from the DecisionLog."""

    def __init__(self, deployment: str, log: Callable[[], DecisionLog], enabled: Callable[[], bool]) -> None:
        self._deployment = deployment
        self._log = log
        self._enabled = enabled

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        log = self._log()
        decisions = CounterMetricFamily("dyn_planner_decisions", "Planner decisions by action and role",
                                        labels=["deployment", "action", "role"])
        for (action, role), n in sorted(log.totals.items()):
            decisions.add_metric([self._deployment, action, role], float(n))
        yield decisions
        actions = CounterMetricFamily("dyn_planner_actions", "Scaling actions the daemon carried out",
                                      labels=["deployment", "kind", "role", "outcome"])
        for (kind, role, outcome), n in sorted(log.action_totals.items()):
            actions.add_metric([self._deployment, kind, role, outcome], float(n))
        yield actions
        enabled = GaugeMetricFamily("dyn_planner_enabled", "1 when the SLO planner drives the counts",
                                    labels=["deployment"])
        enabled.add_metric([self._deployment], 1.0 if self._enabled() else 0.0)
        yield enabled
