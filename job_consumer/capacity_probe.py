"""What this consumer has to give its tasks, read once at start-up: its GPU (through NVML, or a
simulated one), the CPU cores and memory its tasks may use together, how many tasks it runs at
once, and which kinds of task it takes. The result is what it registers with the private API.
"""

from __future__ import annotations

import logging
import os
import socket
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from inference_server.contract import ConsumerRegistration, GpuInfo
from job_consumer.config import ConsumerSettings
from job_consumer.runner import NVIDIA_VISIBLE_DEVICES

log = logging.getLogger(__name__)

MIB = 1024 * 1024
PACKAGE = "inference-server"
CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")


class CapacityProbeError(RuntimeError):
    """The consumer cannot say what it has (a GPU NVML cannot read): it must not start."""


def probe_capacity(settings: ConsumerSettings) -> ConsumerRegistration:
    gpus = [probe_gpu(settings.gpu, settings)] if settings.gpu is not None else []
    takes_cpu_tasks = settings.take_cpu_tasks if settings.take_cpu_tasks is not None else not gpus
    return ConsumerRegistration(
        host=socket.gethostname()[:255] or "unknown",
        runtime=settings.container_runtime,
        version=package_version(),
        gpus=gpus,
        cpus=settings.capacity_cpus or usable_cpus(),
        memory_mb=settings.capacity_memory_mb or usable_memory_mb(),
        max_tasks=settings.max_concurrent_tasks,
        takes_gpu_tasks=bool(gpus),
        takes_cpu_tasks=takes_cpu_tasks,
    )


def probe_gpu(gpu: str, settings: ConsumerSettings) -> GpuInfo:
    if settings.simulate_gpu_memory_mb is not None:
        return GpuInfo(
            index=int(gpu),
            uuid=f"GPU-simulated-{settings.consumer_id}",
            name="simulated GPU",
            memory_total_mb=settings.simulate_gpu_memory_mb,
            simulated=True,
        )
    return nvml_gpu(gpu)


def nvml_gpu(gpu: str) -> GpuInfo:
    """The GPU named by index or UUID, as the NVIDIA driver reports it."""
    try:
        import pynvml  # type: ignore[import-untyped]
    except ImportError as exc:
        raise CapacityProbeError(
            f"GPU {gpu}: nvidia-ml-py (pynvml) is not installed, so the GPU cannot be read"
        ) from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise CapacityProbeError(
            f"GPU {gpu}: NVML is not available ({exc}); a GPU consumer needs the NVIDIA driver, "
            "or IS_SIMULATE_GPU_MEMORY_MB for a simulated GPU. GPU tasks never run on the CPU"
        ) from exc
    try:
        handle = _nvml_handle(pynvml, gpu)
        return GpuInfo(
            # The host's index, which the consumer names in its device requests, also where
            # NVML in the consumer's own container numbers the GPU differently.
            index=int(gpu) if gpu.isdigit() else int(pynvml.nvmlDeviceGetIndex(handle)),
            uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
            name=_text(pynvml.nvmlDeviceGetName(handle))[:256],
            memory_total_mb=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // MIB,
        )
    except pynvml.NVMLError as exc:
        raise CapacityProbeError(f"GPU {gpu}: NVML cannot read it ({exc})") from exc
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.debug("NVML shutdown: %s", exc)


def _nvml_handle(pynvml: Any, gpu: str) -> Any:
    if not gpu.isdigit():
        return pynvml.nvmlDeviceGetHandleByUUID(gpu)
    # A consumer in a container the NVIDIA runtime gave its one GPU (Compose's device
    # reservation, Swarm's NVIDIA_VISIBLE_DEVICES) sees that GPU alone, numbered 0 whatever its
    # index on the host; the runtime names the host's index in NVIDIA_VISIBLE_DEVICES.
    if os.environ.get(NVIDIA_VISIBLE_DEVICES, "").strip() == gpu and int(pynvml.nvmlDeviceGetCount()) == 1:
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    return pynvml.nvmlDeviceGetHandleByIndex(int(gpu))


def _text(value: object) -> str:
    # Older NVML bindings answer bytes, newer ones str.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def usable_cpus() -> float:
    """The cores this process may run on, lowered to its cgroup's CPU quota if it has one."""
    cores = float(len(os.sched_getaffinity(0)) or os.cpu_count() or 1)
    try:
        quota, period = (CGROUP_ROOT / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return max(cores, 0.01)


def usable_memory_mb() -> int:
    """The host's memory (MemTotal), lowered to its cgroup's memory limit if it has one."""
    total = 0
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) // 1024  # kB
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (CGROUP_ROOT / "memory.max").read_text().strip()
        if limit != "max":
            total = min(total, int(limit) // MIB) if total else int(limit) // MIB
    except (OSError, ValueError):
        pass
    return max(total, 16)


def package_version() -> str:
    try:
        return version(PACKAGE)[:64]
    except PackageNotFoundError:
        return ""
