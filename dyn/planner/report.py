"""What the daemon tells others: the status payload (CLI) and the worker list (frontends)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from dyn.errors import DynError
from dyn.planner.health import ProcessSlot
from dyn.planner.state import frontend_urls

if TYPE_CHECKING:
    from dyn.config.recipe import Recipe
    from dyn.config.topology import Topology
    from dyn.planner.decisions import DecisionLog

VLLM_NIXL = "vllm-nixl"
"""The path of a vLLM pair: vLLM's NixlConnector moves the KV, not dyn's shuttle."""

MAX_PATH_PAIRS = 16
"""Pairs listed in the status (a 72-GPU rack has ~1,300; the counts cover all of them)."""

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
    shuttle = shuttle_counters(slot.metrics)
    if shuttle:
        entry["shuttle"] = shuttle
    weights = slot.info.get("weights") if isinstance(slot.info, dict) else None
    if isinstance(weights, dict):  # how it got its weights (fast replica start) and how long it took
        entry["weights"] = {k: weights.get(k) for k in ("source", "peer", "transport", "load_s", "ready_s",
                                                        "refetched", "fallback") if k in weights}
    if topology is not None:  # detailed status (`dyn top`): everything the heartbeat carried
        entry["metrics"], entry["info"] = dict(slot.metrics), dict(slot.info)
        entry["domain"] = topology.domain_of(slot.node, slot.gpus[0]) if slot.gpus else None
    return entry


def shuttle_counters(metrics: dict[str, float]) -> dict[str, Any]:
    """What a worker's KV pulls really did (empty for a worker that never pulls): with
    `shuttle_paths`, an operator sees whether each pair moves its KV the planned way. A vLLM
    worker's KV moves through vLLM's own connector, not dyn's shuttle: its bytes and failures
    are that connector's."""
    if "kv_pulls" not in metrics:
        return {}
    prefix = "shuttle_bytes."
    moved = {k[len(prefix):]: v for k, v in sorted(metrics.items()) if k.startswith(prefix)}
    if metrics.get("kv_connector.bytes_transferred"):
        moved[VLLM_NIXL] = metrics["kv_connector.bytes_transferred"]
    failures = metrics.get("kv_pull_failures")
    if failures is None:  # (a vLLM worker)
        failures = metrics.get("kv_connector.failed_transfers", 0.0) + metrics.get("kv_connector.pull_timeouts", 0.0)
    return {"pulls": metrics["kv_pulls"], "pull_failures": failures,
            "local_fallbacks": metrics.get("kv_local_fallbacks", 0.0), "bytes_by_transport": moved}


def status_payload(*, name: str, phase: str, started_at: float, wall_now: float, now: float,
                   frontend_url: str, config_hash: str, slots: list[ProcessSlot], events: list[str],
                   error: str, daemon: dict[str, Any],
                   detail: "tuple[Topology, dict[str, float]] | None" = None,
                   planner: dict[str, Any] | None = None, topology: "Topology | None" = None,
                   recipe: "Recipe | None" = None) -> dict[str, Any]:
    """The CLI's view. With `planner`: `decisions` (the last 20 planner decisions with their
    inputs) and `planner` (policy, last window, actions taken); with topology and recipe: the
    KV shuttle path of every prefill/decode pair; always the frontend's circuit breakers."""
    detail_topology, slo = detail if detail is not None else (None, None)
    workers = [slot_status(s, now, detail_topology) for s in slots]
    extra: dict[str, Any] = {"slo": slo} if slo is not None else {}
    if planner is not None:
        extra["decisions"] = planner.pop("decisions", [])
        extra["planner"] = planner
    extra["breakers"] = breakers(slots)
    extra["frontends"] = frontends(slots)
    extra["frontend_urls"] = frontend_urls(slots, frontend_url)
    if frontend_url.endswith(":0"):  # the recipe asked for any free port: show the one the frontend took
        frontend_url = extra["frontend_urls"][0]
    silent = silent_kv_publishers(slots)
    if silent:
        extra["kv_events_silent"] = silent
    if topology is not None and recipe is not None:
        extra["shuttle_paths"] = shuttle_paths(topology, recipe, slots)
    return {**extra,
        "name": name, "state": phase, "uptime_s": round(wall_now - started_at, 3),
        "frontend_url": frontend_url, "config_hash": config_hash, "error": error,
        "num_ready": sum(1 for w in workers if w["state"] == "ready"), "num_processes": len(workers),
        "workers": workers, "events": events[-10:], "daemon": daemon,
    }


def planner_status(note: str, enabled: bool, log: "DecisionLog", window: Any = None) -> dict[str, Any]:
    """The planner block of the status: which policy and why, its last window, decisions, actions."""
    out: dict[str, Any] = {"enabled": enabled, "policy": note, **log.to_dict()}
    if window is not None:
        out["window"] = {"duration_s": round(window.duration_s, 3), "request_rate": round(window.request_rate, 3),
                         "input_tokens": window.input_tokens, "output_tokens": window.output_tokens,
                         "cached_tokens": window.cached_tokens, "num_waiting": window.num_waiting}
    return out


def silent_kv_publishers(slots: list[ProcessSlot]) -> dict[str, dict[str, float]]:
    """Workers that cached full prompt blocks but published no KV event: the KV-aware router is
    blind to them (it routes as if their cache were empty). Never silent: `dyn status` says so."""
    out: dict[str, dict[str, float]] = {}
    for slot in slots:
        m = slot.metrics
        if slot.role in ("prefill", "decode", "both") and m.get("prefix_lookup_blocks", 0) > 0 \
                and m.get("kv_events_published", -1) == 0:
            out[slot.id] = {"requests_total": m.get("requests_total", 0),
                            "prefix_lookup_blocks": m.get("prefix_lookup_blocks", 0)}
    return out


def breakers(slots: list[ProcessSlot]) -> dict[str, str]:
    """Circuit-breaker state of each worker as the frontend reports it (open ones are not routed to)."""
    out: dict[str, str] = {}
    for slot in slots:
        if slot.role == "frontend" and isinstance(slot.info.get("breakers"), dict):
            for k, v in slot.info["breakers"].items():
                # replicas keep their own breakers: show the worst any of them holds
                if _BREAKER_RANK.get(str(v), 0) >= _BREAKER_RANK.get(out.get(str(k), ""), -1):
                    out[str(k)] = str(v)
    return out


_BREAKER_RANK = {"closed": 0, "half_open": 1, "open": 2}


def frontends(slots: list[ProcessSlot]) -> list[dict[str, Any]]:
    """Every frontend replica: its node, state, the URL clients use and the replica's own URL
    (replicas on one node share the first, SO_REUSEPORT; the second reaches that one alone)."""
    return [{"id": s.id, "node": s.node, "state": s.state, "pid": s.pid,
             "url": s.addresses.get("http", ""), "replica_url": s.addresses.get("replica", s.addresses.get("http", ""))}
            for s in slots if s.role == "frontend"]


def shuttle_paths(topology: "Topology", recipe: "Recipe", slots: list[ProcessSlot],
                  max_pairs: int = MAX_PATH_PAIRS) -> dict[str, Any]:
    """How KV would move between each live prefill and decode worker (planned from the topology;
    a worker reports what it really used in its shuttle_bytes.* metrics)."""
    from dyn.shuttle.path import Endpoint, PathChoice, choose_path
    from dyn.shuttle.transports.nixl import is_available as nixl_available

    live = [s for s in slots if s.state not in ("exited", "gave_up") and s.node]
    prefill = {s.id: Endpoint(s.node, tuple(s.gpus)) for s in live if s.role == "prefill"}
    decode = {s.id: Endpoint(s.node, tuple(s.gpus)) for s in live if s.role in ("decode", "both")}
    if recipe.mode != "disaggregated" or not prefill or not decode:
        return {"by_transport": {}, "pairs": [], "num_pairs": 0}
    if recipe.model.engine == "vllm":  # vLLM's NixlConnector moves the KV, not dyn's shuttle
        pairs = [{"prefill": p, "decode": d, "transport": VLLM_NIXL, "hop": None, "link": None,
                  "reason": "vLLM NixlConnector"}
                 for p in sorted(prefill) for d in sorted(decode)]
        return {"by_transport": {VLLM_NIXL: len(pairs)}, "pairs": pairs[:max_pairs], "num_pairs": len(pairs)}
    nixl = nixl_available()
    paths: dict[tuple[str, str], PathChoice] = {}
    errors: list[str] = []
    for p_id, p_end in prefill.items():
        for d_id, d_end in decode.items():
            try:  # the same choice the decode worker makes for its pulls (dyn.worker.kv_path)
                paths[p_id, d_id] = choose_path(topology, p_end, d_end, recipe.shuttle.transport,
                                                cuda_available=_kv_on_cuda(recipe),
                                                nixl_available=nixl)
            except DynError as exc:
                paths[p_id, d_id] = PathChoice("none", str(exc))
                errors.append(str(exc))
    counts = Counter(choice.transport for choice in paths.values())
    pairs = [{"prefill": p, "decode": d, "transport": c.transport, "hop": c.hop, "link": c.link,
              "reason": c.reason} for (p, d), c in sorted(paths.items())[:max_pairs]]
    out = {"by_transport": dict(sorted(counts.items())), "pairs": pairs, "num_pairs": len(paths)}
    if errors:
        out["error"] = errors[0] + (f" (and {len(errors) - 1} more pairs)" if len(errors) > 1 else "")
    return out


def worker_list(slots: list[ProcessSlot], topology: "Topology | None" = None) -> list[dict[str, Any]]:
    """`update_workers` payload for the frontends: every worker process the daemon knows, with
    its NVLink domain when the topology says (the router keeps a prefill/decode pair in one)."""
    return [{"id": s.id, "role": s.role, "node": s.node, "gpus": list(s.gpus), "state": s.state,
             "addresses": dict(s.addresses), "metrics": dict(s.metrics),
             "nvlink_domain": topology.domain_of(s.node, s.gpus[0]) if topology is not None and s.gpus else None}
            for s in slots if s.role != "frontend"]


def relaunch_time_s(slots: list[ProcessSlot]) -> float | None:
    """The slowest measured failure-to-ready (or launch-to-ready) time of any worker: how long a
    frontend should expect a relaunching worker to take. None before any worker was ready."""
    times = [s.ready_after_s for s in slots if s.role != "frontend" and s.ready_after_s is not None]
    return max(times) if times else None


def _kv_on_cuda(recipe: "Recipe") -> bool:
    """Whether the workers' KV blocks live in GPU memory, as the workers decide it
    (Backend.kv_on_cuda): the mock keeps its KV in host memory even when placed on GPUs."""
    return recipe.model.engine != "mock" and recipe.model.device != "cpu"
