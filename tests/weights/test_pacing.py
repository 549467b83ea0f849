"""The serving peer's token bucket: a share of the bandwidth it measured on its own batches."""

from __future__ import annotations

import asyncio

import pytest

from dyn.weights.pacing import SharePacer

MB = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_first_batch_goes_at_once_then_the_rate_is_share_times_measured_bandwidth():
    clock = Clock()
    pacer = SharePacer(0.25, 64 * MB, clock=clock)
    assert pacer.delay_for(64 * MB) == 0.0  # nothing measured yet: full speed
    pacer.record(64 * MB, 0.064)  # 1 GB/s unpaced
    assert pacer.rate_bps == pytest.approx(0.25e9)
    assert pacer.delay_for(64 * MB) == pytest.approx(64 * MB / 0.25e9)  # the bucket is empty
    clock.now += 64 * MB / 0.25e9
    assert pacer.delay_for(64 * MB) == 0.0


def test_full_share_never_waits_and_bad_shares_are_refused():
    pacer = SharePacer(1.0, MB)
    pacer.record(MB, 0.001)
    assert all(pacer.delay_for(MB) == 0.0 for _ in range(10))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="share"):
            SharePacer(bad, MB)


def test_acquire_spreads_batches_over_time():
    async def scenario() -> float:
        pacer = SharePacer(0.5, MB)
        pacer.record(MB, 0.01)  # 100 MB/s -> 50 MB/s allowed: 20 ms per 1 MB batch
        loop = asyncio.get_running_loop()
        start = loop.time()
        for _ in range(4):
            await pacer.acquire(MB)
        return loop.time() - start

    elapsed = asyncio.run(scenario())
    assert elapsed >= 0.055  # first batch from the burst, then three waits of ~20 ms
