"""The metrics endpoints: real HTTP on loopback, parsed with prometheus-client's own parser."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dyn.dashboard.synthetic import synthetic_payload
from dyn.metrics.daemon import daemon_registry
from dyn.metrics.server import MetricsServer, MetricsServerError
from dyn.metrics.worker import worker_registry


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def _scrape(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return await response.text()


def test_worker_endpoint_parses_and_counters_move():
    values = {"num_running": 3.0, "requests_total": 5.0, "num_generated_tokens": 100.0, "kv_usage": 0.25,
              "gpu.2.util_percent": 80.0, "gpu.2.memory_used_bytes": 1e9, "gpu.2.nvlink_tx_bytes": 4096.0,
              "shuttle_bytes.nvlink": 1e6, "shuttle_bytes.tcp": 10.0, "kv_tier_blocks.host": 7.0}
    refreshes = []

    async def refresh() -> None:
        refreshes.append(1)

    async def scenario():
        registry = worker_registry(lambda: values, lambda: {"process": "decode-0", "role": "decode"})
        async with MetricsServer(registry, "127.0.0.1", refresh=refresh) as server:
            assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/metrics")
            first = _samples(await _scrape(server.url))
            values["requests_total"] += 2
            values["num_generated_tokens"] += 50
            values["shuttle_bytes.nvlink"] += 5e5
            second = _samples(await _scrape(server.url))
        return first, second

    first, second = asyncio.run(scenario())
    w = (("process", "decode-0"), ("role", "decode"))
    assert first[("dyn_worker_running_requests", w)] == 3.0
    assert first[("dyn_worker_kv_usage_ratio", w)] == 0.25
    assert first[("dyn_gpu_utilization_ratio", tuple(sorted(w + (("gpu", "2"),))))] == pytest.approx(0.8)
    assert first[("dyn_gpu_memory_used_bytes", tuple(sorted(w + (("gpu", "2"),))))] == 1e9
    assert first[("dyn_worker_kv_tier_blocks", tuple(sorted(w + (("tier", "host"),))))] == 7.0
    assert first[("dyn_worker_shuttle_bytes_total", tuple(sorted(w + (("path", "tcp"),))))] == 10.0
    assert second[("dyn_worker_requests_total", w)] - first[("dyn_worker_requests_total", w)] == 2
    assert second[("dyn_worker_generated_tokens_total", w)] == 150
    nvlink = tuple(sorted(w + (("path", "nvlink"),)))
    assert second[("dyn_worker_shuttle_bytes_total", nvlink)] > first[("dyn_worker_shuttle_bytes_total", nvlink)]
    assert any(name == "process_cpu_seconds_total" for name, _ in first)
    assert len(refreshes) == 2
    # Families absent from the snapshot are left out, never reported as zero.
    assert not any(name.startswith("dyn_gpu_power") for name, _ in first)


def test_daemon_endpoint_from_status_payload():
    payload = synthetic_payload(6)
    payload["workers"][1]["state"] = "failed"
    payload["workers"][1]["restarts"] = 2
    payload["daemon"] = {"messages_total": 42, "bad_messages": 1, "max_loop_lag_s": 0.01}

    async def scenario():
        async with MetricsServer(daemon_registry(lambda: payload), "127.0.0.1") as server:
            return _samples(await _scrape(server.url))

    s = asyncio.run(scenario())
    dep = ("deployment", "synthetic-6")
    assert s[("dyn_deployment_phase", (dep, ("phase", "running")))] == 1.0
    assert s[("dyn_deployment_phase", (dep, ("phase", "failed")))] == 0.0
    assert s[("dyn_daemon_processes", (dep, ("role", "prefill"), ("state", "failed")))] == 1.0
    assert s[("dyn_daemon_processes", (dep, ("role", "decode"), ("state", "ready")))] == 4.0
    restarts = ("dyn_daemon_process_restarts_total",
                (dep, ("node", "tray-0"), ("process", "prefill-0"), ("role", "prefill")))
    assert s[restarts] == 2.0
    assert s[("dyn_daemon_control_messages_total", (dep,))] == 42.0


def test_bind_failure_names_the_address():
    async def scenario():
        server = MetricsServer(worker_registry(dict, dict), "192.0.2.1")  # TEST-NET: not ours
        await server.start()

    with pytest.raises(MetricsServerError, match="192.0.2.1.*bind_address"):
        asyncio.run(scenario())
