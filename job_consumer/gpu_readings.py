"""What a consumer's real GPUs use now, read through NVML for its registry heartbeat (the
platform's inference_gpu_* metrics). Simulated GPUs have nothing to read and give nothing."""

from __future__ import annotations

import logging

from inference_server.contract import GpuInfo, GpuReading

log = logging.getLogger(__name__)


def read_gpu_readings(gpus: list[GpuInfo]) -> list[GpuReading]:
    """One reading per real GPU; none when NVML cannot be read (a metric gap, never a failed
    heartbeat: the consumer's liveness must not hang on its monitoring)."""
    real = [gpu for gpu in gpus if not gpu.simulated]
    if not real:
        return []
    try:
        import pynvml  # type: ignore[import-untyped]

        pynvml.nvmlInit()
    except Exception as exc:  # ImportError or NVMLError: both mean no reading this time
        log.debug("NVML not readable for GPU metrics: %s", exc)
        return []
    try:
        readings = []
        for gpu in real:
            handle = pynvml.nvmlDeviceGetHandleByUUID(gpu.uuid)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
            readings.append(
                GpuReading(
                    index=gpu.index,
                    memory_used_bytes=int(memory.used),
                    utilization_ratio=min(1.0, max(0.0, int(utilization.gpu) / 100)),
                )
            )
        return readings
    except pynvml.NVMLError as exc:
        log.warning("NVML could not read the GPUs' use: %s", exc)
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.debug("NVML shutdown: %s", exc)
