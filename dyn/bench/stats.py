"""Latency percentiles and Prometheus counter reads for bench reports."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from prometheus_client.parser import text_string_to_metric_families

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (numpy's default method); NaN for no values."""
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be within 0..100, got {pct}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99 and mean; None (JSON null) where there are no samples."""
    if not values:
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None}
    out: dict[str, float | None] = {f"p{p}": percentile(values, p) for p in PERCENTILES}
    out["mean"] = sum(values) / len(values)
    return out


def read_counters(text: str, names: Iterable[str]) -> dict[str, float]:
    """Sum each named sample over all its label sets, from Prometheus text format.

    A name matches a sample name as exposed (`dyn_prefix_cache_hit_blocks_total`),
    or that name without its `_total` suffix. Missing names are absent.
    """
    wanted = set(names)
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if name not in wanted and name.endswith("_total") and name[:-6] in wanted:
                name = name[:-6]
            if name in wanted:
                out[name] = out.get(name, 0.0) + float(sample.value)
    return out
