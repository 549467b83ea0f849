"""Sliding-window figures from cumulative counters: what `dyn top` shows "over the last minute".

Every source (worker heartbeats, the frontend's histograms) reports
cumulative values; a window keeps (time, value) samples and answers with the
difference between its newest and oldest sample, the way Prometheus's
rate() and histogram_quantile() do. Pure data, driven by explicit times.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Mapping

WINDOW_S = 60.0


class CounterWindow:
    """Per-second rate of one cumulative counter over the last `window_s`."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        if self._samples and value < self._samples[-1][1]:
            self._samples.clear()  # the counter restarted (process relaunched)
        self._samples.append((now, value))
        _expire(self._samples, now, self.window_s)

    def rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else None


@dataclass(frozen=True, slots=True)
class Buckets:
    """A cumulative Prometheus histogram: upper bounds (ending in +inf) and counts."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]

    def minus(self, older: "Buckets") -> "Buckets":
        if older.bounds != self.bounds:
            return self
        return Buckets(self.bounds, tuple(max(0.0, a - b) for a, b in zip(self.counts, older.counts)))


class HistogramWindow:
    """Quantiles of the observations made in the last `window_s`."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, Buckets]] = deque()

    def add(self, now: float, buckets: Buckets) -> None:
        if self._samples and buckets.counts and buckets.counts[-1] < self._samples[-1][1].counts[-1]:
            self._samples.clear()
        self._samples.append((now, buckets))
        _expire(self._samples, now, self.window_s)

    def count(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        recent = self._samples[-1][1].minus(self._samples[0][1])
        return recent.counts[-1] if recent.counts else 0.0

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1) of the window's observations; None when it saw none."""
        if len(self._samples) < 2:
            return None
        return bucket_quantile(q, self._samples[-1][1].minus(self._samples[0][1]))


def bucket_quantile(q: float, buckets: Buckets) -> float | None:
    """Linear interpolation inside the bucket holding rank q*total (Prometheus semantics).

    An answer in the +inf bucket is reported as the largest finite bound.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], got {q}")
    if not buckets.counts or buckets.counts[-1] <= 0:
        return None
    rank = q * buckets.counts[-1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(buckets.bounds, buckets.counts):
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def buckets_from_samples(samples: Mapping[float, float]) -> Buckets:
    """{le: cumulative count} (as parsed from /metrics) -> Buckets sorted by bound."""
    bounds = tuple(sorted(samples))
    return Buckets(bounds, tuple(samples[b] for b in bounds))


def _expire(samples: deque, now: float, window_s: float) -> None:
    # Keep one sample at or before the window's start so the window is full-width.
    while len(samples) > 2 and samples[1][0] <= now - window_s:
        samples.popleft()
