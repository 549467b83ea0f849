"""GPU telemetry against the real NVML (GPU only; the fake-NVML tests are test_telemetry.py)."""

from __future__ import annotations

import pytest

from dyn.worker.telemetry import GpuTelemetry

pynvml = pytest.importorskip("pynvml", reason="needs nvidia-ml-py")


def _has_gpu() -> bool:
    try:
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return count > 0
    except Exception:  # no driver, no library
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU and driver (NVML)")
def test_nvml_reports_the_gpus_memory_and_utilisation():
    telemetry = GpuTelemetry((0,))
    try:
        assert telemetry.is_available, telemetry.reason
        sample = telemetry.sample()
        total = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
        assert 0 < sample["gpu.0.memory_used_bytes"] <= total
        assert 0 <= sample["gpu.0.util_percent"] <= 100
    finally:
        telemetry.close()
