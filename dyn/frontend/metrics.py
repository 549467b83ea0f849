"""Prometheus metrics of one frontend: its own registry, never the global one.

Request counters and latency histograms are updated on the request path;
per-worker gauges (queue depth, prefix-cache hit rate, shuttle traffic) are
read from the worker pool at scrape time, so they cost nothing per request.
Shuttle figures come from worker heartbeat metrics named
`shuttle_bytes.<path>` (cumulative) and `shuttle_gbps.<path>` (recent rate).
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from dyn.frontend.breaker import STATE_VALUES, BreakerBoard
from dyn.frontend.workers import WorkerPool
from dyn.router.router import Router

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)
_E2E_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class FrontendMetrics:
    def __init__(self, pool: WorkerPool | None = None, router: Router | None = None,
                 breakers: BreakerBoard | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("dyn_frontend_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.in_flight = Gauge("dyn_frontend_requests_in_flight", "Generation requests being served",
                               registry=r)
        self.ttft = LoopHistogram("dyn_frontend_ttft_seconds", "Time to first token", _TTFT_BUCKETS, r)
        self.itl = LoopHistogram("dyn_frontend_itl_seconds", "Time between streamed tokens", _ITL_BUCKETS, r)
        self.e2e = Histogram("dyn_frontend_request_duration_seconds", "Request latency, end to end",
                             buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("dyn_frontend_prompt_tokens", "Prompt tokens in", registry=r)
        self.completion_tokens = Counter("dyn_frontend_completion_tokens", "Tokens generated",
                                         registry=r)
        self.cached_tokens = Counter("dyn_frontend_cached_prompt_tokens",
                                     "Prompt tokens served from a worker's prefix cache", registry=r)
        self.prefill_paths = Counter("dyn_frontend_prefill", "Where prompts were prefilled",
                                     ["path"], registry=r)
        self.prefilled = {path: self.prefill_paths.labels(path) for path in ("local", "remote", "fallback")}
        """`prefill_paths` by path, bound once (one is counted per request)."""
        self.rejected = Counter("dyn_frontend_rejected", "Requests refused by backpressure",
                                registry=r)
        self.cancelled = Counter("dyn_frontend_cancelled", "Requests cancelled on a worker "
                                 "(client disconnect or stop string)", ["reason"], registry=r)
        self.migrations = Counter("dyn_requests_migrated", "Requests moved to another worker "
                                  "mid-stream after their worker died or stalled", registry=r)
        self.migration_failures = Counter("dyn_frontend_migration_limit", "Requests failed after "
                                          "router.max_migrations migrations", registry=r)
        self.retries = Counter("dyn_frontend_retries", "Re-sends of requests that failed before "
                               "their first token", registry=r)
        self.unknown_hints = Counter("dyn_frontend_unknown_hint_fields", "Hint fields (dyn, nvext) this "
                                     "server does not know, ignored", ["field"], registry=r)
        self.speculative_prefills = Counter("dyn_frontend_speculative_prefills", "Next-turn prefills "
                                            "sent after a turn (agent hint), by outcome", ["outcome"],
                                            registry=r)
        self.lora_requests = Counter("dyn_frontend_lora_requests", "Generation requests naming a LoRA adapter "
                                     "(recipe model.lora_adapters) as their model", ["adapter"], registry=r)
        self.lora_ttft = Histogram("dyn_frontend_lora_ttft_seconds", "Time to first token of the requests "
                                   "naming a LoRA adapter", ["adapter"], buckets=_TTFT_BUCKETS, registry=r)
        self.lora_e2e = Histogram("dyn_frontend_lora_request_duration_seconds", "Latency, end to end, of the "
                                  "requests naming a LoRA adapter", ["adapter"], buckets=_E2E_BUCKETS, registry=r)
        self.open_connections = Gauge("dyn_frontend_open_connections", "HTTP connections open on this "
                                      "replica (set when replicas share its port)", registry=r)
        self.rebalanced = Counter("dyn_frontend_connections_rebalanced", "Connections closed after a "
                                  "response because this replica held more than its share of the shared "
                                  "port's (the client reconnects and the kernel deals again)", registry=r)
        if pool is not None:
            r.register(_PoolCollector(pool, router, breakers))
        self.num_requests = 0
        self.num_osl_requests = 0
        self.num_osl_tokens = 0
        """Requests with an expected-output-length hint and their sum (heartbeat -> planner)."""
        self.num_rejected = 0
        self._request_counters: dict[tuple[str, int], Any] = {}
        """`requests` children by (endpoint, status): `labels()` takes a lock and checks its
        arguments on every call, and this is counted once per HTTP request."""

    def count_request(self, endpoint: str, status: int) -> None:
        self.num_requests += 1
        if status in (429, 503):
            self.num_rejected += 1
            self.rejected.inc()
        child = self._request_counters.get((endpoint, status))
        if child is None:
            child = self._request_counters[(endpoint, status)] = self.requests.labels(endpoint, str(status))
        child.inc()

    def latency_buckets(self) -> dict[str, float]:
        """Cumulative TTFT/ITL histogram buckets as `ttft_le.<bound>` counts (the planner takes deltas)."""
        buckets: dict[str, float] = {}
        for name, histogram in (("ttft", self.ttft), ("itl", self.itl)):
            for sample in histogram.collect()[0].samples:
                if sample.name.endswith("_bucket") and sample.labels["le"] != "+Inf":
                    buckets[f"{name}_le.{sample.labels['le']}"] = sample.value
                elif sample.name.endswith("_count"):
                    buckets[f"{name}_le.inf"] = sample.value
        return buckets

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LoopHistogram(Collector):
    """A Prometheus histogram observed on the event loop's thread only (its scrape runs there too).

    prometheus_client's Histogram takes two locks and walks its buckets in Python for each
    observation (1.0 us here); a bisect and two adds cost 0.2 us, and the frontend observes the
    time between tokens for every streamed token. Exposed exactly as a Histogram of the same
    name and buckets (`_bucket{le=...}`, `_count`, `_sum`; no `_created`)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(float(b) for b in buckets)
        self._labels = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        self._counts = [0] * (len(self._bounds) + 1)
        """Observations per bucket, not cumulative; the last one past every bound."""
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1  # (the first bound >= value: "le")
        self._sum += value

    def collect(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self._name, self._documentation,
                                      buckets=list(zip(self._labels, accumulate(self._counts))),
                                      sum_value=self._sum)]


class _PoolCollector(Collector):
    """Per-worker gauges, read from the pool's latest heartbeat metrics when scraped."""

    def __init__(self, pool: WorkerPool, router: Router | None, breakers: BreakerBoard | None) -> None:
        self._pool = pool
        self._router = router
        self._breakers = breakers

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue = GaugeMetricFamily("dyn_worker_queue_depth", "Requests waiting for a batch slot",
                                  labels=["worker", "role"])
        in_flight = GaugeMetricFamily("dyn_worker_in_flight", "Requests this frontend has open",
                                      labels=["worker", "role"])
        hit_rate = GaugeMetricFamily("dyn_worker_prefix_cache_hit_rate",
                                     "Prompt blocks found in the prefix cache / looked up",
                                     labels=["worker"])
        shuttle_bytes = GaugeMetricFamily("dyn_shuttle_bytes", "KV bytes moved by the shuttle",
                                          labels=["worker", "path"])
        shuttle_rate = GaugeMetricFamily("dyn_shuttle_gbps", "Recent shuttle throughput (GB/s)",
                                         labels=["worker", "path"])
        total_hits = total_lookups = 0.0
        indexed = GaugeMetricFamily("dyn_router_indexed_blocks", "KV blocks the router's index holds",
                                    labels=["worker", "tier"])
        router = self._router
        for w in self._pool.workers.values():
            if router is not None:
                for tier, count in router.index.num_blocks(w.id).items():
                    indexed.add_metric([w.id, tier], count)
            queue.add_metric([w.id, w.role], w.queue_depth)
            in_flight.add_metric([w.id, w.role], w.in_flight)
            lookups = w.metrics.get("prefix_lookup_blocks", 0.0)
            hits = w.metrics.get("prefix_hit_blocks", 0.0)
            if lookups > 0:
                hit_rate.add_metric([w.id], hits / lookups)
                total_hits, total_lookups = total_hits + hits, total_lookups + lookups
            for key, value in w.metrics.items():
                if key.startswith("shuttle_bytes."):
                    shuttle_bytes.add_metric([w.id, key[14:]], value)
                elif key.startswith("shuttle_gbps."):
                    shuttle_rate.add_metric([w.id, key[13:]], value)
        hit_blocks = CounterMetricFamily("dyn_prefix_cache_hit_blocks",
                                         "Prompt blocks served from a worker's cache (sum over workers)")
        hit_blocks.add_metric([], total_hits)
        lookup_blocks = CounterMetricFamily("dyn_prefix_cache_lookup_blocks",
                                            "Prompt blocks looked up in workers' caches (sum over workers)")
        lookup_blocks.add_metric([], total_lookups)
        overall = GaugeMetricFamily("dyn_prefix_cache_hit_rate",
                                    "Prefix-cache hit rate over all workers (blocks)")
        overall.add_metric([], total_hits / total_lookups if total_lookups else 0.0)
        circuit = GaugeMetricFamily("dyn_worker_circuit_state", "Circuit breaker per worker: "
                                    "0 closed, 1 half-open, 2 open", labels=["worker"])
        states = self._breakers.states() if self._breakers is not None else {}
        for wid in self._pool.workers:
            circuit.add_metric([wid], STATE_VALUES[states.get(wid, "closed")])
        yield from (queue, in_flight, hit_rate, hit_blocks, lookup_blocks, overall, shuttle_bytes, shuttle_rate, indexed, circuit)
