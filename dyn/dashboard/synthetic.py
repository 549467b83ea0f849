"""Synthetic status payloads shaped like the daemon's `status {"detail": true}` reply.

For the renderer's benchmark and tests at rack scale (72 or 576 workers)
without starting that many processes. `step` advances the cumulative
counters as traffic would.
"""

from __future__ import annotations

import random
from typing import Any


def synthetic_payload(num_workers: int, *, gpus_per_node: int = 4, domain_size: int = 72,
                      seed: int = 0) -> dict[str, Any]:
    """num_workers one-GPU workers (1/3 prefill, 2/3 decode), one frontend, NVL domains of domain_size."""
    rng = random.Random(seed)
    workers: list[dict[str, Any]] = [{
        "id": "frontend", "role": "frontend", "node": "tray-0", "gpus": [], "pid": 1000, "state": "ready",
        "heartbeat_age_s": 0.4, "restarts": 0, "addresses": {}, "error": "",
        "metrics": {"requests_total": 0.0, "in_flight": 0.0, "cpu_percent": 35.0}}]
    num_prefill = num_workers // 3
    for i in range(num_workers):
        role, idx = ("prefill", i) if i < num_prefill else ("decode", i - num_prefill)
        node, gpu = divmod(i, gpus_per_node)
        metrics = {
            "num_running": float(rng.randint(0, 64)), "num_waiting": float(rng.randint(0, 8)),
            "kv_usage": rng.random(), "kv_blocks_used": 0.0, "kv_blocks_total": 4096.0,
            "num_generated_tokens": 0.0, "prefix_hit_blocks": 0.0, "prefix_lookup_blocks": 0.0,
            "tokens_per_s": rng.uniform(500, 3000), "prefix_hit_rate": rng.random(),
            "cpu_percent": rng.uniform(5, 30), "rss_bytes": 2.0e9,
            f"gpu.{gpu}.util_percent": rng.uniform(20, 100), f"gpu.{gpu}.memory_used_bytes": 6.0e10,
            f"gpu.{gpu}.temperature_celsius": rng.uniform(40, 80), f"gpu.{gpu}.power_watts": 600.0,
            "shuttle_gbps.nvlink": rng.uniform(0, 40) if role == "prefill" else 0.0,
            "shuttle_gbps.tcp": rng.uniform(0, 2) if role == "prefill" else 0.0,
        }
        workers.append({
            "id": f"{role}-{idx}", "role": role, "node": f"tray-{node}", "gpus": [gpu], "pid": 2000 + i,
            "state": "ready", "heartbeat_age_s": round(rng.uniform(0, 1), 3), "restarts": 0,
            "domain": f"nvl72-{i // domain_size}", "addresses": {}, "error": "", "metrics": metrics})
    return {"name": f"synthetic-{num_workers}", "state": "running", "uptime_s": 3723.0, "error": "",
            "slo": {"ttft_ms": 300.0, "itl_ms": 25.0}, "num_processes": len(workers),
            "num_ready": len(workers), "workers": workers,
            "events": ["12:00:00 all processes ready"], "decisions": [], "daemon": {}}


def step(payload: dict[str, Any], seconds: float, *, seed: int = 1) -> None:
    """Advance every cumulative counter by `seconds` of traffic (in place)."""
    rng = random.Random(seed)
    for w in payload["workers"]:
        m = w["metrics"]
        if w["role"] == "frontend":
            m["requests_total"] += 20.0 * seconds
            continue
        m["num_generated_tokens"] += m["tokens_per_s"] * seconds
        lookups = rng.uniform(50, 100) * seconds
        m["prefix_lookup_blocks"] += lookups
        m["prefix_hit_blocks"] += lookups * m["prefix_hit_rate"]
