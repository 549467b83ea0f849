"""What the daemon tells others: the status payload (CLI) and the worker list (frontends)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dyn.planner.health import ProcessSlot

if TYPE_CHECKING:
    from dyn.config.topology import Topology

_SHOWN_METRICS = ("num_running", "num_waiting", "kv_usage", "kv_blocks_used", "kv_blocks_total",
                  "cpu_percent", "rss_bytes", "requests_total")


def slot_status(slot: ProcessSlot, now: float, topology: "Topology | None" = None) -> dict[str, Any]:
    age = slot.heartbeat_age(now)
    entry: dict[str, Any] = {
        "id": slot.id, "role": slot.role, "node": slot.node, "gpus": list(slot.gpus), "pid": slot.pid,
        "state": slot.state, "state_age_s": round(now - slot.state_since, 3),
        "heartbeat_age_s": None if age is None else round(age, 3),
        "restarts": slot.num_restarts, "addresses": dict(slot.addresses), "log_path": slot.log_path,
        "error": slot.error, "last_failure": slot.last_failure, "log_tail": slot.log_tail,
    }
    for key in _SHOWN_METRICS:
        if key in slot.metrics:
            entry[key] = slot.metrics[key]
    if topology is not None:  # detailed status (`dyn top`): everything the heartbeat carried
        entry["metrics"], entry["info"] = dict(slot.metrics), dict(slot.info)
        entry["domain"] = topology.domain_of(slot.node, slot.gpus[0]) if slot.gpus else None
    return entry


def status_payload(*, name: str, phase: str, started_at: float, wall_now: float, now: float,
                   frontend_url: str, config_hash: str, slots: list[ProcessSlot], events: list[str],
                   error: str, daemon: dict[str, Any],
                   detail: "tuple[Topology, dict[str, float]] | None" = None) -> dict[str, Any]:
    topology, slo = detail if detail is not None else (None, None)
    workers = [slot_status(s, now, topology) for s in slots]
    extra = {"slo": slo} if slo is not None else {}
    return {**extra,
        "name": name, "state": phase, "uptime_s": round(wall_now - started_at, 3),
        "frontend_url": frontend_url, "config_hash": config_hash, "error": error,
        "num_ready": sum(1 for w in workers if w["state"] == "ready"), "num_processes": len(workers),
        "workers": workers, "events": events[-10:], "daemon": daemon,
    }


def worker_list(slots: list[ProcessSlot]) -> list[dict[str, Any]]:
    """`update_workers` payload for the frontends: every worker process the daemon knows."""
    return [{"id": s.id, "role": s.role, "node": s.node, "gpus": list(s.gpus), "state": s.state,
             "addresses": dict(s.addresses), "metrics": dict(s.metrics)}
            for s in slots if s.role != "frontend"]
