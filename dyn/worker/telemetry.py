"""Process telemetry without extra dependencies: CPU share and RSS from /proc."""

from __future__ import annotations

import os
import resource
import time

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class CpuMeter:
    """CPU percent of this process since the previous call (100 = one full core)."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), _cpu_seconds())

    def sample(self) -> float:
        now, cpu = time.monotonic(), _cpu_seconds()
        then, cpu_then = self._last
        self._last = (now, cpu)
        return 100.0 * (cpu - cpu_then) / max(now - then, 1e-6)


def process_telemetry(meter: CpuMeter) -> dict[str, float]:
    return {"cpu_percent": meter.sample(), "rss_bytes": float(rss_bytes())}


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

