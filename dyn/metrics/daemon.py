"""The planner daemon's Prometheus families, read from its own status payload.

Reading the payload the CLI gets (rather than the daemon's internals) keeps
one source of truth: what `dyn status` says and what Prometheus scrapes
cannot disagree.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

StatusSource = Callable[[], Mapping[str, Any]]

PHASES = ("starting", "running", "degraded", "failed", "stopping", "stopped", "ended")


class DaemonCollector(Collector):
    def __init__(self, status: StatusSource) -> None:
        self._status = status

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        payload = self._status()
        name = str(payload.get("name", ""))
        daemon = payload.get("daemon") or {}
        workers = payload.get("workers") or []

        phase = GaugeMetricFamily("dyn_deployment_phase", "1 for the deployment's current phase",
                                  labels=["deployment", "phase"])
        for p in sorted({*PHASES, str(payload.get("state", ""))}):
            phase.add_metric([name, p], 1.0 if p == payload.get("state") else 0.0)
        yield phase

        by_state = GaugeMetricFamily("dyn_daemon_processes", "Processes by role and state",
                                     labels=["deployment", "role", "state"])
        for (role, state), n in sorted(Counter((str(w.get("role")), str(w.get("state"))) for w in workers).items()):
            by_state.add_metric([name, role, state], n)
        yield by_state

        labels = ["deployment", "process", "role", "node"]
        restarts = CounterMetricFamily("dyn_daemon_process_restarts", "Relaunches of a process",
                                       labels=labels)
        age = GaugeMetricFamily("dyn_daemon_heartbeat_age_seconds", "Time since a process's last "
                                "heartbeat", labels=labels)
        for w in workers:
            key = [name, str(w.get("id")), str(w.get("role")), str(w.get("node"))]
            restarts.add_metric(key, float(w.get("restarts") or 0))
            if w.get("heartbeat_age_s") is not None:
                age.add_metric(key, float(w["heartbeat_age_s"]))
        yield restarts
        yield age

        for key, metric, help_text in (("messages_total", "dyn_daemon_control_messages",
                                        "Control-plane messages received"),
                                       ("bad_messages", "dyn_daemon_bad_messages",
                                        "Malformed control messages dropped")):
            if key in daemon:
                family = CounterMetricFamily(metric, help_text, labels=["deployment"])
                family.add_metric([name], float(daemon[key]))
                yield family
        if "max_loop_lag_s" in daemon:
            lag = GaugeMetricFamily("dyn_daemon_max_tick_seconds", "Longest supervision tick so far",
                                    labels=["deployment"])
            lag.add_metric([name], float(daemon["max_loop_lag_s"]))
            yield lag
        if "uptime_s" in payload:
            up = GaugeMetricFamily("dyn_deployment_uptime_seconds", "Since `dyn up` created it",
                                   labels=["deployment"])
            up.add_metric([name], float(payload["uptime_s"]))
            yield up


def daemon_registry(status: StatusSource) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DaemonCollector(status))
    ProcessCollector(registry=registry)
    return registry
