"""The GPUs of this host as NVML sees them: `inference-server standalone --gpus all` starts one
consumer for each."""

from __future__ import annotations

import importlib
from types import ModuleType


class GpuDetectionError(RuntimeError):
    """No GPU could be listed; the message says why and what to do, in one line."""


def _nvml() -> ModuleType:
    # Imported by name: the binding is installed only where GPUs are used, and without it the
    # rest of the launcher works as before.
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:
        raise GpuDetectionError(
            "--gpus all lists the GPUs through NVML, but its Python binding is missing "
            f"({exc}); install the nvidia-ml-py package, or name the GPUs: --gpus 0,1"
        ) from exc


def detect_gpus() -> list[str]:
    """The index of every GPU the NVIDIA driver reports, as consumer GPU ids ("0", "1", ...)."""
    nvml = _nvml()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise GpuDetectionError(
            f"--gpus all: NVML did not start ({exc}); is an NVIDIA GPU and its driver present? "
            "Without one, --simulate-gpus N runs consumers with simulated GPUs"
        ) from exc
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as exc:
        raise GpuDetectionError(f"--gpus all: NVML could not count the GPUs ({exc})") from exc
    finally:
        nvml.nvmlShutdown()
    if count == 0:
        raise GpuDetectionError(
            "--gpus all: the NVIDIA driver reports no GPU; --simulate-gpus N runs consumers with "
            "simulated GPUs"
        )
    return [str(index) for index in range(count)]
