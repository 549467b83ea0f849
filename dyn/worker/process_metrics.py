"""What a worker reports: heartbeat metrics for the daemon and the snapshot Prometheus scrapes.

A mixin of WorkerProcess (dyn.worker.process): it reads the engine (through its
loop), the request plane, the hand-off, tiers and weight figures the process holds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from dyn.worker.telemetry import engine_rates, process_telemetry


STATS_WAIT_S = 0.5
"""How long a heartbeat waits for the engine thread to come between two steps."""


class ProcessMetrics:
    """Figures of WorkerProcess's parts, as heartbeat values and as Prometheus gauges/counters."""

    _engine_figures: dict[str, float] | None = None
    """The engine's last figures (sent again while a long step runs)."""

    async def _metrics(self) -> tuple[dict[str, float], dict]:
        """Heartbeat: cumulative engine figures, recent rates, process and GPU telemetry."""
        values = await self._engine_values()
        values.update(engine_rates(self._rates, values))
        if self.handoff is not None and not hasattr(self.handoff.stats, "pull_failures"):
            values.update({"kv_offers": self.handoff.stats.offers, "kv_pulls": self.handoff.stats.pulls,
                           "kv_local_fallbacks": self.handoff.stats.local_fallbacks})
        elif self.handoff is not None:
            h = self.handoff.stats
            values.update({"kv_offers": h.offers, "kv_pulls": h.pulls, "kv_pull_failures": h.pull_failures,
                           "kv_local_fallbacks": h.local_fallbacks, "kv_bytes_pulled": h.bytes_pulled,
                           "kv_pull_seconds": h.seconds_pulling})
            for path, num_bytes in h.bytes_by_transport.items():
                values[f"shuttle_bytes.{path}"] = float(num_bytes)
                seconds = h.seconds_by_transport.get(path, 0.0)
                values[f"shuttle_gbps.{path}"] = num_bytes / seconds / 1e9 if seconds > 0 else 0.0
        values.update(process_telemetry(self._cpu))
        values.update(self._gpu.sample())
        values.update(self._weight_values())
        info = {"role": self.config.role}
        if self.weights.source:
            info["weights"] = self.weights.info()
        if self.load_error:
            info["error"] = self.load_error
        elif not self._gpu.is_available and self.config.gpus:
            info["gpu_telemetry"] = self._gpu.reason
        return values, info

    async def _refresh_scrape(self) -> None:
        values = await self._engine_values()
        values.update(self._gpu.sample())
        values.update(self._weight_values())
        self._scraped = values

    def _weight_values(self) -> dict[str, float]:
        values = self.weights.metrics()
        if self.weight_server is not None:
            values["weights_served_bytes"] = float(self.weight_server.stats.num_bytes)
            values["weights_pacing_wait_seconds"] = self.weight_server.pacer.seconds_waited
        return values

    async def _engine_values(self) -> dict[str, float]:
        """Engine and request-plane figures; cumulative ones only grow (counters for Prometheus).

        The engine's own figures come from its thread between two steps. A long step (a vLLM
        kernel compiled on first use, a huge prefill) must not hold the heartbeat back: the daemon
        would take the worker for dead within seconds and relaunch it, and the request that caused
        the step would migrate and do the same to the next worker. So after STATS_WAIT_S the last
        figures go out again, with `engine_step_s` saying how long the step has run; a stuck step
        is the worker's own to detect (engine_loop.STEP_LIMIT_S)."""
        if self.loop is None or not self.loop.is_alive:
            return {}
        asked = self.loop.submit(
            lambda e: (e.stats(), dataclasses.asdict(e.connector) if hasattr(e, "connector") else {}))
        waiting = asyncio.wrap_future(asked)
        done, _ = await asyncio.wait({waiting}, timeout=STATS_WAIT_S)
        if not done and self._engine_figures is not None:
            waiting.cancel()  # (cancels `asked` too: skipped by the engine thread unless begun)
            return {**self._engine_figures, "engine_step_s": self.loop.busy_s()}
        stats, connector = await waiting
        total = max(stats.num_kv_blocks_total, 1)
        values = {
            "num_running": stats.num_running, "num_waiting": stats.num_waiting,
            "kv_blocks_used": stats.num_kv_blocks_used, "kv_blocks_total": stats.num_kv_blocks_total,
            "kv_usage": stats.num_kv_blocks_used / total,
            "prefix_hit_blocks": stats.prefix_hit_blocks, "prefix_lookup_blocks": stats.prefix_lookup_blocks,
            "num_computed_tokens": stats.num_computed_tokens,
            "num_generated_tokens": stats.num_generated_tokens,
            "waiting_prefill_tokens": stats.num_waiting_prefill_tokens,
            "num_preemptions": stats.num_preemptions, "tier_hit_blocks": stats.num_tier_hit_blocks,
            "requests_total": self.server.requests_total, "cancels_total": self.server.cancels_total,
            "request_errors_total": self.server.errors_total,
            "kv_events_published": self.kv_events.events_published,
            "in_flight": self.server.num_in_flight, "bad_messages": self.server.bad.total,
            "uptime_s": time.monotonic() - self._started_at,
        }
        # vLLM's KV connector (disaggregated vLLM workers): transfers, hits, fallbacks.
        values.update({f"kv_connector.{key}": value for key, value in connector.items()})
        if self.kv_bridge is not None:
            values.update({f"vllm_kv_events.{key}": value
                           for key, value in dataclasses.asdict(self.kv_bridge.stats).items()})
        if self.tiers is not None:
            values["kv_tier_blocks.host"] = len(self.tiers)
            below = self.tiers.below
            if below is not None and hasattr(below, "__len__"):
                values["kv_tier_blocks.disk"] = len(below)
        self._engine_figures = {k: float(v) for k, v in values.items()}
        return {**self._engine_figures, "engine_step_s": 0.0}
