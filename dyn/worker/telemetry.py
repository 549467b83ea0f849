"""Process and GPU telemetry for heartbeats and the metrics endpoint.

CPU share and RSS come from /proc with no extra dependency. GPU figures come
from NVML (`pynvml`, package nvidia-ml-py) when a GPU is there; on a CPU-only
node `nvmlInit` raises, and `GpuTelemetry` simply reports nothing.

Heartbeat keys (flat, so they fit `Heartbeat.metrics: dict[str, float]`):

    cpu_percent, rss_bytes                     this process
    gpu.<i>.util_percent                       NVML index i (physical, not CUDA_VISIBLE_DEVICES)
    gpu.<i>.memory_used_bytes / memory_total_bytes
    gpu.<i>.temperature_celsius, gpu.<i>.power_watts
    gpu.<i>.nvlink_tx_bytes / nvlink_rx_bytes  cumulative, all links
    gpu.<i>.nvlink_gbps                        recent tx+rx rate
    tokens_per_s, prefix_hit_rate              engine, recent window
    kv_tier_blocks.<tier>                      lower KV tiers (host, disk)
    shuttle_bytes.<path>, shuttle_gbps.<path>  KV shuttle, cumulative and recent
"""

from __future__ import annotations

import logging
import os
import resource
import time
from types import ModuleType
from typing import Callable, Mapping

log = logging.getLogger(__name__)

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_ALL_LINKS = 0xFFFFFFFF
"""NVML field scope meaning "summed over every NVLink of the device"."""

Clock = Callable[[], float]


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


class RateMeter:
    """Per-second rates of cumulative counters between two samples.

    A counter that went backwards (the engine was replaced) restarts from the
    new value instead of producing a negative rate.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._last: tuple[float, dict[str, float]] | None = None

    def sample(self, counters: Mapping[str, float]) -> dict[str, float]:
        now = self._clock()
        previous, self._last = self._last, (now, dict(counters))
        if previous is None:
            return {key: 0.0 for key in counters}
        then, old = previous
        elapsed = max(now - then, 1e-6)
        return {key: max(0.0, value - old.get(key, value)) / elapsed for key, value in counters.items()}


def engine_rates(meter: RateMeter, values: Mapping[str, float]) -> dict[str, float]:
    """tokens/s, recent prefix hit rate and shuttle GB/s per path from cumulative heartbeat values."""
    keys = {k: values[k] for k in ("num_generated_tokens", "prefix_hit_blocks", "prefix_lookup_blocks")
            if k in values}
    keys.update({k: v for k, v in values.items() if k.startswith("shuttle_bytes.")})
    rates = meter.sample(keys)
    out = {"tokens_per_s": rates.get("num_generated_tokens", 0.0)}
    lookups = rates.get("prefix_lookup_blocks", 0.0)
    if lookups > 0:
        out["prefix_hit_rate"] = rates.get("prefix_hit_blocks", 0.0) / lookups
    elif values.get("prefix_lookup_blocks"):
        out["prefix_hit_rate"] = values.get("prefix_hit_blocks", 0.0) / values["prefix_lookup_blocks"]
    for key, rate in rates.items():
        if key.startswith("shuttle_bytes."):
            out["shuttle_gbps." + key[len("shuttle_bytes."):]] = rate / 1e9
    return out


class GpuTelemetry:
    """NVML readings for a fixed set of GPU indices; inert when NVML or a GPU is missing.

    `nvml` is the pynvml module (injectable for tests). Every reading that a
    device does not support is left out rather than reported as zero.
    """

    def __init__(self, gpu_indices: tuple[int, ...], *, nvml: ModuleType | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.gpu_indices = tuple(gpu_indices)
        self.reason = ""
        """Why there is no GPU telemetry ("" when there is)."""
        self._nvml = None
        self._handles: dict[int, object] = {}
        self._nvlink = RateMeter(clock)
        if not self.gpu_indices:
            self.reason = "no GPUs assigned"
            return
        try:
            nvml = nvml if nvml is not None else _import_pynvml()
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError, ...
            self.reason = f"NVML unavailable: {exc}"
            log.info("no GPU telemetry: %s", self.reason)
            return
        self._nvml = nvml
        for index in self.gpu_indices:
            try:
                self._handles[index] = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError as exc:
                log.warning("no NVML handle for GPU %d: %s", index, exc)
        if not self._handles:
            self.reason = f"NVML knows none of GPUs {list(self.gpu_indices)}"

    @property
    def is_available(self) -> bool:
        return bool(self._handles)

    def sample(self) -> dict[str, float]:
        if not self._handles:
            return {}
        out: dict[str, float] = {}
        for index, handle in self._handles.items():
            for field, read in self._readers():
                try:
                    out[f"gpu.{index}.{field}"] = float(read(handle))
                except self._nvml.NVMLError:
                    continue
            out.update(self._nvlink_bytes(index, handle))
        counters = {k: v for k, v in out.items() if k.endswith(("nvlink_tx_bytes", "nvlink_rx_bytes"))}
        rates = self._nvlink.sample(counters)
        for index in self._handles:
            tx, rx = f"gpu.{index}.nvlink_tx_bytes", f"gpu.{index}.nvlink_rx_bytes"
            if tx in rates or rx in rates:
                out[f"gpu.{index}.nvlink_gbps"] = (rates.get(tx, 0.0) + rates.get(rx, 0.0)) / 1e9
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml, self._handles = None, {}

    def _readers(self):
        n = self._nvml
        return (("util_percent", lambda h: n.nvmlDeviceGetUtilizationRates(h).gpu),
                ("memory_used_bytes", lambda h: n.nvmlDeviceGetMemoryInfo(h).used),
                ("memory_total_bytes", lambda h: n.nvmlDeviceGetMemoryInfo(h).total),
                ("temperature_celsius", lambda h: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)),
                ("power_watts", lambda h: n.nvmlDeviceGetPowerUsage(h) / 1000.0))

    def _nvlink_bytes(self, index: int, handle: object) -> dict[str, float]:
        n = self._nvml
        fields = [(n.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, _ALL_LINKS),
                  (n.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, _ALL_LINKS)]
        try:
            values = n.nvmlDeviceGetFieldValues(handle, fields)
        except n.NVMLError:
            return {}
        out = {}
        for name, value in zip(("nvlink_tx_bytes", "nvlink_rx_bytes"), values):
            if value.nvmlReturn == 0:  # NVML_SUCCESS; otherwise not supported (no NVLink)
                out[f"gpu.{index}.{name}"] = float(value.value.ullVal) * 1024.0  # KiB -> bytes
        return out


def _import_pynvml() -> ModuleType:
    import pynvml

    return pynvml


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
