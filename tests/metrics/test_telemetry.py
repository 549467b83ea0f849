"""Worker telemetry: NVML through an injected fake module, the no-GPU path, and rates."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dyn.worker.telemetry import GpuTelemetry, RateMeter, engine_rates


class _NvmlError(Exception):
    pass


class FakeNvml:
    """The slice of pynvml GpuTelemetry uses; GPU 1 has no NVLink and no power sensor."""

    NVMLError = _NvmlError
    NVML_TEMPERATURE_GPU = 0
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX = 138
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 139

    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init = fail_init
        self.tx_kib = {0: 1000, 1: 0}
        self.shut = False

    def nvmlInit(self):
        if self.fail_init:
            raise _NvmlError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetHandleByIndex(self, i):
        if i > 1:
            raise _NvmlError("Invalid Argument")
        return i

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=[75, 10][h])

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=[40e9, 1e9][h], total=80e9)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return [61, 35][h]

    def nvmlDeviceGetPowerUsage(self, h):
        if h == 1:
            raise _NvmlError("Not Supported")
        return 550_000

    def nvmlDeviceGetFieldValues(self, h, fields):
        assert all(scope == 0xFFFFFFFF for _, scope in fields)
        ok = 0 if h == 0 else 3  # NVML_ERROR_NOT_SUPPORTED
        return [SimpleNamespace(nvmlReturn=ok, value=SimpleNamespace(ullVal=self.tx_kib[h])),
                SimpleNamespace(nvmlReturn=ok, value=SimpleNamespace(ullVal=2 * self.tx_kib[h]))]


def test_gpu_readings_units_and_nvlink_rate():
    nvml, clock = FakeNvml(), [100.0]
    gpu = GpuTelemetry((0, 1, 5), nvml=nvml, clock=lambda: clock[0])
    assert gpu.is_available
    first = gpu.sample()
    assert first["gpu.0.util_percent"] == 75 and first["gpu.1.util_percent"] == 10
    assert first["gpu.0.memory_used_bytes"] == 40e9 and first["gpu.0.memory_total_bytes"] == 80e9
    assert first["gpu.0.temperature_celsius"] == 61
    assert first["gpu.0.power_watts"] == 550.0
    assert "gpu.1.power_watts" not in first          # unsupported: left out, not zero
    assert "gpu.1.nvlink_tx_bytes" not in first      # no NVLink on that GPU
    assert first["gpu.0.nvlink_tx_bytes"] == 1000 * 1024
    assert not any(k.startswith("gpu.5.") for k in first)  # NVML does not know GPU 5
    nvml.tx_kib[0] += 2 * 1024 * 1024  # +2 GiB sent, +4 GiB received in 2 s
    clock[0] += 2.0
    second = gpu.sample()
    assert second["gpu.0.nvlink_gbps"] == pytest.approx(6 * 2**30 / 2 / 1e9)
    gpu.close()
    assert nvml.shut and gpu.sample() == {}


def test_no_gpu_library_or_device_is_not_an_error():
    gpu = GpuTelemetry((0,), nvml=FakeNvml(fail_init=True))
    assert not gpu.is_available and "Library Not Found" in gpu.reason
    assert gpu.sample() == {}
    assert GpuTelemetry(()).sample() == {}
    # The real pynvml on this CPU-only machine: nvmlInit raises, telemetry stays quiet.
    real = GpuTelemetry((0,))
    assert real.sample() == {} or real.is_available


def test_engine_rates_tokens_hit_rate_and_shuttle():
    clock = [0.0]
    meter = RateMeter(clock=lambda: clock[0])
    values = {"num_generated_tokens": 100.0, "prefix_hit_blocks": 10.0, "prefix_lookup_blocks": 20.0,
              "shuttle_bytes.nvlink": 0.0}
    first = engine_rates(meter, values)
    assert first["tokens_per_s"] == 0.0 and first["prefix_hit_rate"] == 0.5  # cumulative until a window
    clock[0] = 2.0
    values.update({"num_generated_tokens": 700.0, "prefix_hit_blocks": 40.0, "prefix_lookup_blocks": 60.0,
                   "shuttle_bytes.nvlink": 8e9})
    second = engine_rates(meter, values)
    assert second["tokens_per_s"] == 300.0
    assert second["prefix_hit_rate"] == 0.75
    assert second["shuttle_gbps.nvlink"] == 4.0
    clock[0] = 3.0
    values["num_generated_tokens"] = 5.0  # engine replaced: counter restarted, no negative rate
    assert engine_rates(meter, values)["tokens_per_s"] == 0.0
