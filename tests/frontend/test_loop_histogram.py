"""LoopHistogram (the frontend's TTFT/ITL histograms) reads as prometheus_client's Histogram."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from dyn.frontend.metrics import FrontendMetrics, LoopHistogram


def _exposed(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_exposition_equals_prometheus_clients_histogram():
    buckets = (.0005, .001, .0025, .01, 1)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = LoopHistogram("x_seconds", "Time of x", buckets, ours)
    reference = Histogram("x_seconds", "Time of x", buckets=buckets, registry=theirs)
    # on a bound, between bounds, below the first, past the last
    for value in (0.0, 0.0005, 0.0006, 0.001, 0.003, 0.5, 1.0, 7.0, 0.0002):
        fast.observe(value)
        reference.observe(value)
    assert _exposed(ours) == _exposed(theirs)
    assert 'x_seconds_bucket{le="0.0005"} 3.0' in _exposed(ours)
    assert 'x_seconds_bucket{le="+Inf"} 9.0' in _exposed(ours)


def test_planner_reads_the_cumulative_buckets():
    metrics = FrontendMetrics()
    for value in (0.0004, 0.002, 0.002, 100.0):
        metrics.itl.observe(value)
    metrics.ttft.observe(0.02)
    buckets = metrics.latency_buckets()
    assert buckets["itl_le.0.0005"] == 1 and buckets["itl_le.0.0025"] == 3 and buckets["itl_le.2.5"] == 3
    assert buckets["itl_le.inf"] == 4
    assert buckets["ttft_le.0.01"] == 0 and buckets["ttft_le.0.025"] == 1 and buckets["ttft_le.inf"] == 1
