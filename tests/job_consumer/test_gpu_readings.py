"""read_gpu_readings: NVML's figures for real GPUs, nothing for simulated ones or without NVML."""

from __future__ import annotations

import sys
import types

import pytest

from inference_server.contract import GpuInfo, GpuReading
from job_consumer.gpu_readings import read_gpu_readings

REAL = GpuInfo(index=3, uuid="GPU-real", name="H200", memory_total_mb=140_000)
SIMULATED = GpuInfo(index=0, uuid="sim-0", memory_total_mb=1000, simulated=True)


class FakeNvmlError(Exception):
    pass


def fake_pynvml(*, fails: bool = False) -> types.ModuleType:
    """A stand-in for nvidia-ml-py with the calls read_gpu_readings makes (no GPU on CI)."""
    module = types.ModuleType("pynvml")
    module.NVMLError = FakeNvmlError  # type: ignore[attr-defined]
    module.nvmlInit = lambda: None  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: None  # type: ignore[attr-defined]

    def handle(uuid: str) -> str:
        if fails:
            raise FakeNvmlError("GPU is lost")
        return uuid

    module.nvmlDeviceGetHandleByUUID = handle  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=5 * 1024**3)  # type: ignore[attr-defined]
    module.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=42)  # type: ignore[attr-defined]
    return module


def test_simulated_gpus_have_no_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    assert read_gpu_readings([SIMULATED]) == []


def test_a_real_gpu_is_read_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    assert read_gpu_readings([REAL, SIMULATED]) == [
        GpuReading(index=3, memory_used_bytes=5 * 1024**3, utilization_ratio=0.42)
    ]


def test_nvml_failing_gives_no_readings_rather_than_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(fails=True))
    assert read_gpu_readings([REAL]) == []
