"""Bound what streaming weights takes from a serving peer: a token bucket over bytes.

The bucket's rate is `share` x the bandwidth the peer reached on its own
unpaced batches (bytes / busy seconds, an exponential average), so the share
means the same on NVLink, shm or tcp: at 0.25 the peer spends at most a
quarter of its wall time moving weights, whatever the path. Burst is one batch.
"""

from __future__ import annotations

import asyncio
import time


class SharePacer:
    def __init__(self, share: float, burst_bytes: int, *, clock=time.monotonic) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"bandwidth share must be in (0, 1], got {share}")
        self.share = share
        self.burst_bytes = burst_bytes
        self.bandwidth_bps: float | None = None
        """Measured unpaced bandwidth, bytes/s (None until the first batch)."""
        self.seconds_waited = 0.0
        self._tokens = float(burst_bytes)
        self._clock = clock
        self._last = clock()
        self._lock = asyncio.Lock()

    @property
    def rate_bps(self) -> float | None:
        return None if self.bandwidth_bps is None or self.share >= 1.0 else self.share * self.bandwidth_bps

    def delay_for(self, num_bytes: int) -> float:
        """Seconds until `num_bytes` may go (0: now); takes the tokens when it returns 0."""
        self._refill()
        rate = self.rate_bps
        if rate is None or self._tokens >= min(num_bytes, self.burst_bytes):
            self._tokens -= num_bytes
            return 0.0
        return (min(num_bytes, self.burst_bytes) - self._tokens) / rate

    async def acquire(self, num_bytes: int) -> None:
        async with self._lock:  # batches go out in request order
            while (wait_s := self.delay_for(num_bytes)) > 0:
                self.seconds_waited += wait_s
                await asyncio.sleep(wait_s)

    def record(self, num_bytes: int, busy_s: float) -> None:
        """A batch of `num_bytes` took `busy_s` of streaming: update the bandwidth estimate."""
        if busy_s <= 0 or num_bytes <= 0:
            return
        sample = num_bytes / busy_s
        self.bandwidth_bps = sample if self.bandwidth_bps is None else 0.7 * self.bandwidth_bps + 0.3 * sample

    def _refill(self) -> None:
        now = self._clock()
        rate = self.rate_bps
        if rate is not None:
            self._tokens = min(float(self.burst_bytes), self._tokens + (now - self._last) * rate)
        else:
            self._tokens = float(self.burst_bytes)
        self._last = now
