"""The simulator's report: `dyn bench --json`'s keys (built by dyn.bench.report) plus the sim's own.

Extra keys: gpu_seconds, goodput_per_gpu (SLO-meeting requests per GPU-second,
i.e. goodput_rps / mean GPUs held), slo_attainment (share of requests within
the TTFT and ITL targets), decisions (the planner's, with time, action and
reason), timeline (per planner interval: replicas per role, GPUs, latency,
hit rate) and sim (the settings that produced it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dyn.bench.report import RequestResult, build_report
from dyn.bench.runner import BenchConfig
from dyn.bench.stats import PERCENTILES
from dyn.bench.synth import PromptSynthesizer
from dyn.sim.cluster import Simulation


def sim_report(sim: Simulation, duration_s: float, trace_block_tokens: int,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = sim.recipe.planner
    results = [_result(r) for r in sim.requests]
    hits = sum(w.hit_blocks for w in sim.workers.values())
    lookups = sum(w.lookup_blocks for w in sim.workers.values())
    config = BenchConfig(base_url="http://simulated", model=sim.recipe.model.served_name,
                         max_requests=len(sim.requests), slo_ttft_ms=spec.ttft_ms, slo_itl_ms=spec.itl_ms)
    counters = {config.hit_metric: float(hits), config.lookup_metric: float(lookups)}
    synth = PromptSynthesizer(trace_block_tokens or sim.block_size, trace_block_tokens or sim.block_size)
    data = dict(build_report(results, config, duration_s, counters, synth, not_sent=0).data)
    data["itl_ms"] = _weighted_summary(list(sim.itl_steps.items()))
    gpu_seconds = sim.gpu_seconds()
    met = data["slo"]["met"]
    data["gpu_seconds"] = gpu_seconds
    data["mean_gpus"] = gpu_seconds / duration_s if duration_s > 0 else 0.0
    data["goodput_per_gpu"] = met / gpu_seconds if gpu_seconds > 0 else 0.0
    data["slo_attainment"] = met / len(results) if results else 0.0
    data["decisions"] = [d.to_dict() for d in sim.decisions]
    data["timeline"] = [{"time_s": t.time_s, "gpus": t.gpus, **t.counts, **t.window} for t in sim.ticks]
    data["handoffs"] = {"total": sim.num_handoffs, "cross_domain": sim.cross_domain_handoffs,
                        "cross_domain_share": sim.cross_domain_handoffs / sim.num_handoffs if sim.num_handoffs else 0.0,
                        "cross_domain_gb": sim.cross_domain_bytes / 1e9}
    data["kv_events"] = {"batches": sim.kv_event_batches, "block_hashes": sim.kv_event_hashes,
                         "batches_per_s": sim.kv_event_batches / duration_s if duration_s > 0 else 0.0,
                         "block_hashes_per_s": sim.kv_event_hashes / duration_s if duration_s > 0 else 0.0}
    data["sim"] = {"router": sim.router.policy.name, "domain_routing": sim.domains is not None,
                   "block_tokens": sim.block_size, "planner": sim.planner.spec.enabled,
                   "profile": sim.profile.method, "workers_launched": len(sim.workers),
                   "startup_s": sim.config.startup_s, **(extra or {})}
    return data


def _result(req) -> RequestResult:
    ok = req.error is None and req.finish_s is not None
    ttft = req.first_token_s - req.arrival_s if req.first_token_s is not None else None
    e2e = req.finish_s - req.arrival_s if req.finish_s is not None else None
    # num_chunks == output_tokens with no gaps: the report takes ITL from us (_weighted_summary).
    return RequestResult(idx=req.idx, ok=ok, error=req.error, prompt_tokens=req.input_tokens,
                         output_tokens=req.output_tokens if ok else None,
                         num_chunks=req.output_tokens if ok else 0, start_s=req.arrival_s,
                         ttft_s=ttft, e2e_s=e2e)


def _weighted_summary(steps: list[tuple[float, int]]) -> dict[str, float | None]:
    """Token-level ITL percentiles (ms): each decode step is a gap for every sequence in it."""
    if not steps:
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None}
    arr = np.array(steps, dtype=float)
    order = np.argsort(arr[:, 0])
    durations, weights = arr[order, 0] * 1e3, arr[order, 1]
    cum = np.cumsum(weights)
    out: dict[str, float | None] = {}
    for p in PERCENTILES:
        idx = int(np.searchsorted(cum, p / 100.0 * cum[-1], side="left"))
        out[f"p{p}"] = float(durations[min(idx, len(durations) - 1)])
    out["mean"] = float(np.sum(durations * weights) / cum[-1])
    return out
