"""The worker's Prometheus names, read from the heartbeat dict (keys in dyn.worker.telemetry).

Cumulative figures are `_total` counters; levels are gauges with their unit
in the name. Rates (tokens/s, GB/s) stay out: Prometheus derives them with
rate(), and exposing our own would double-smooth them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, ProcessCollector

from dyn.metrics.snapshot import Labels, MetricSpec, Snapshot, SnapshotCollector

WORKER_SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("num_running", "dyn_worker_running_requests", "gauge", "Requests in the running batch"),
    MetricSpec("num_waiting", "dyn_worker_waiting_requests", "gauge", "Requests queued for a batch slot"),
    MetricSpec("in_flight", "dyn_worker_in_flight_requests", "gauge", "Request streams open on the request plane"),
    MetricSpec("waiting_prefill_tokens", "dyn_worker_waiting_prefill_tokens", "gauge",
               "Prompt tokens not yet computed"),
    MetricSpec("engine_step_s", "dyn_worker_engine_step_seconds", "gauge",
               "How long the engine step now running has run (0 between steps; the worker exits past 300 s)"),
    MetricSpec("kv_blocks_used", "dyn_worker_kv_blocks_used", "gauge", "KV blocks in use, engine tier"),
    MetricSpec("kv_blocks_total", "dyn_worker_kv_blocks_capacity", "gauge", "KV blocks, engine tier"),
    MetricSpec("kv_usage", "dyn_worker_kv_usage_ratio", "gauge", "Engine-tier KV blocks used / capacity"),
    MetricSpec("kv_tier_blocks", "dyn_worker_kv_tier_blocks", "gauge", "KV blocks held by a lower tier",
               label="tier"),
    MetricSpec("requests_total", "dyn_worker_requests", "counter", "Requests accepted"),
    MetricSpec("cancels_total", "dyn_worker_cancelled_requests", "counter", "Requests cancelled"),
    MetricSpec("request_errors_total", "dyn_worker_request_errors", "counter",
               "Request-plane messages whose handling raised (logged; the request failed, retryable)"),
    MetricSpec("num_generated_tokens", "dyn_worker_generated_tokens", "counter", "Tokens sampled"),
    MetricSpec("num_computed_tokens", "dyn_worker_computed_tokens", "counter",
               "Tokens run through the model (prefill and decode)"),
    MetricSpec("prefix_hit_blocks", "dyn_worker_prefix_cache_hit_blocks", "counter",
               "Prompt blocks found in the prefix cache"),
    MetricSpec("prefix_lookup_blocks", "dyn_worker_prefix_cache_lookup_blocks", "counter",
               "Prompt blocks looked up in the prefix cache"),
    MetricSpec("tier_hit_blocks", "dyn_worker_kv_tier_hit_blocks", "counter",
               "Prefix blocks brought back from a lower tier instead of recomputed"),
    MetricSpec("num_preemptions", "dyn_worker_preemptions", "counter", "Requests preempted for KV space"),
    MetricSpec("bad_messages", "dyn_worker_bad_messages", "counter", "Malformed messages dropped"),
    MetricSpec("shuttle_bytes", "dyn_worker_shuttle_bytes", "counter", "KV bytes moved by the shuttle",
               label="path"),
    MetricSpec("weights_load_seconds", "dyn_worker_weights_load_seconds", "gauge",
               "Seconds this worker took to fill its weights, by source (disk, peer, peer+disk)", label="source"),
    MetricSpec("time_to_ready_seconds", "dyn_worker_time_to_ready_seconds", "gauge",
               "Process start to ready, by where the weights came from", label="source"),
    MetricSpec("weights_served_bytes", "dyn_worker_weights_served_bytes", "counter",
               "Weight bytes streamed to starting peers"),
    MetricSpec("weights_pacing_wait_seconds", "dyn_worker_weights_pacing_wait_seconds", "counter",
               "Seconds peer batches waited for this worker's bandwidth share"),
    MetricSpec("kv_connector", "dyn_worker_kv_connector", "counter",
               "vLLM KV connector: remote prefills, loaded prompt tokens, transfers, fallbacks", label="stat"),
    MetricSpec("gpu", "dyn_gpu_utilization_ratio", "gauge", "GPU busy time share (NVML)", scale=0.01,
               label="gpu", field="util_percent"),
    MetricSpec("gpu", "dyn_gpu_memory_used_bytes", "gauge", "GPU memory in use (NVML)",
               label="gpu", field="memory_used_bytes"),
    MetricSpec("gpu", "dyn_gpu_memory_total_bytes", "gauge", "GPU memory (NVML)",
               label="gpu", field="memory_total_bytes"),
    MetricSpec("gpu", "dyn_gpu_temperature_celsius", "gauge", "GPU temperature (NVML)",
               label="gpu", field="temperature_celsius"),
    MetricSpec("gpu", "dyn_gpu_power_watts", "gauge", "GPU power draw (NVML)",
               label="gpu", field="power_watts"),
    MetricSpec("gpu", "dyn_gpu_nvlink_transmit_bytes", "counter", "NVLink bytes sent (NVML)",
               label="gpu", field="nvlink_tx_bytes"),
    MetricSpec("gpu", "dyn_gpu_nvlink_receive_bytes", "counter", "NVLink bytes received (NVML)",
               label="gpu", field="nvlink_rx_bytes"),
)


def worker_registry(snapshot: Snapshot, labels: Labels) -> CollectorRegistry:
    """A fresh registry: the worker's families plus the standard process_* ones (CPU, RSS)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(WORKER_SPECS, snapshot, labels))
    ProcessCollector(registry=registry)
    return registry
