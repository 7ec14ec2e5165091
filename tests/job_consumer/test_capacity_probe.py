"""What a consumer declares at start-up: its GPU (NVML or simulated), cores, memory, task kinds."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from pydantic import ValidationError

from job_consumer import capacity_probe
from job_consumer.capacity_probe import CapacityProbeError, probe_capacity, usable_cpus, usable_memory_mb
from job_consumer.config import ConsumerSettings
from tests.job_consumer.test_main import REPO_ROOT

TOKEN = "capacity-probe-token-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("IS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def no_nvml(monkeypatch):
    """Any NVML call fails the test: a simulated GPU must not need the driver."""
    monkeypatch.setitem(sys.modules, "pynvml", None)


def settings(**values) -> ConsumerSettings:
    return ConsumerSettings(service_token=TOKEN, consumer_id="probe-test", **values)


def test_a_simulated_gpu_is_declared_without_nvml(no_nvml):
    declared = probe_capacity(settings(simulate_gpu_memory_mb=24576))

    [gpu] = declared.gpus
    assert (gpu.index, gpu.uuid, gpu.memory_total_mb, gpu.simulated) == (
        0,
        "GPU-simulated-probe-test",
        24576,
        True,
    )
    assert declared.takes_gpu_tasks is True
    assert declared.takes_cpu_tasks is False  # a GPU consumer leaves CPU tasks to CPU consumers
    assert declared.runtime == "docker"
    assert (
        probe_capacity(settings(simulate_gpu_memory_mb=24576, container_runtime="podman")).runtime == "podman"
    )
    assert declared.version  # the installed package's
    assert declared.max_tasks == 8


def test_a_simulated_gpu_takes_its_index_from_the_gpu_setting(no_nvml):
    declared = probe_capacity(settings(gpu="2", simulate_gpu_memory_mb=1000, take_cpu_tasks=True))
    assert declared.gpus[0].index == 2
    assert declared.takes_cpu_tasks is True  # the operator's choice


def test_a_cpu_consumer_declares_the_hosts_cores_and_memory_unless_set(no_nvml):
    declared = probe_capacity(settings())
    assert declared.gpus == []
    assert (declared.takes_gpu_tasks, declared.takes_cpu_tasks) == (False, True)
    assert declared.cpus == usable_cpus() <= os.cpu_count()
    meminfo_mb = next(
        int(line.split()[1]) // 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    assert 16 <= declared.memory_mb == usable_memory_mb() <= meminfo_mb

    chosen = probe_capacity(settings(capacity_cpus=3.5, capacity_memory_mb=4096, max_concurrent_tasks=3))
    assert (chosen.cpus, chosen.memory_mb, chosen.max_tasks) == (3.5, 4096, 3)


def test_capacity_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("IS_SERVICE_TOKEN", TOKEN)
    monkeypatch.setenv("IS_SIMULATE_GPU_MEMORY_MB", "8000")
    monkeypatch.setenv("IS_CAPACITY_CPUS", "6")
    monkeypatch.setenv("IS_CAPACITY_MEMORY_MB", "20000")
    monkeypatch.setenv("IS_MAX_CONCURRENT_TASKS", "4")
    monkeypatch.setenv("IS_TAKE_CPU_TASKS", "true")
    read = ConsumerSettings()
    assert read.gpu == "0" and read.simulates_gpu
    assert (read.capacity_cpus, read.capacity_memory_mb, read.max_concurrent_tasks) == (6, 20000, 4)
    assert read.take_cpu_tasks is True
    assert (read.hold_limit_s, read.unfit_queue_pause_s) == (60, 30)

    # Compose passes a variable it does not set as an empty string: unset, not an error.
    unset = ("IS_SIMULATE_GPU_MEMORY_MB", "IS_CAPACITY_CPUS", "IS_CAPACITY_MEMORY_MB", "IS_TAKE_CPU_TASKS")
    for name in unset:
        monkeypatch.setenv(name, "")
    blank = ConsumerSettings()
    assert blank.gpu is None and not blank.simulates_gpu
    assert (blank.capacity_cpus, blank.capacity_memory_mb, blank.take_cpu_tasks) == (None, None, None)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gpu": "GPU-1234", "simulate_gpu_memory_mb": 1000}, "named by its index"),
        ({"simulate_gpu_memory_mb": 0}, "simulate_gpu_memory_mb"),
        ({"take_cpu_tasks": False}, "would take nothing"),
        ({"max_concurrent_tasks": 0}, "max_concurrent_tasks"),
        ({"capacity_cpus": 0}, "capacity_cpus"),
        ({"capacity_memory_mb": 8}, "capacity_memory_mb"),
        ({"hold_limit_s": 0}, "hold_limit_s"),
    ],
)
def test_capacity_settings_that_make_no_sense_are_refused(values, message):
    with pytest.raises(ValidationError, match=message):
        settings(**values)


def test_a_gpu_consumer_without_nvml_refuses_to_start(no_nvml):
    with pytest.raises(CapacityProbeError, match=r"GPU 0: nvidia-ml-py \(pynvml\) is not installed"):
        probe_capacity(settings(gpu="0"))


def test_a_gpu_consumer_without_the_driver_refuses_to_start(monkeypatch):
    class NVMLError(Exception):
        pass

    def no_library() -> None:
        raise NVMLError("NVML Shared Library Not Found")

    stand_in = types.SimpleNamespace(NVMLError=NVMLError, nvmlInit=no_library)
    monkeypatch.setitem(sys.modules, "pynvml", stand_in)
    with pytest.raises(CapacityProbeError, match="NVML is not available") as caught:
        probe_capacity(settings(gpu="1"))
    assert "IS_SIMULATE_GPU_MEMORY_MB" in str(caught.value)


def test_nvml_answers_become_the_gpu_declared(monkeypatch):
    """Through a stand-in NVML (bytes answers, as older bindings give), by index and by UUID."""
    calls: list[str] = []

    class NVMLError(Exception):
        pass

    def handle_by_uuid(uuid: str) -> str:
        if uuid != "GPU-abc":
            raise NVMLError("Not Found")
        return "handle-5"

    stand_in = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: calls.append("init"),
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetHandleByIndex=lambda index: f"handle-{index}",
        nvmlDeviceGetHandleByUUID=handle_by_uuid,
        nvmlDeviceGetIndex=lambda handle: int(handle.split("-")[1]),
        nvmlDeviceGetUUID=lambda handle: b"GPU-abc",
        nvmlDeviceGetName=lambda handle: b"NVIDIA H200",
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(total=143771 * 1024 * 1024),
    )
    monkeypatch.setitem(sys.modules, "pynvml", stand_in)

    by_index = capacity_probe.nvml_gpu("5")
    assert (by_index.index, by_index.uuid, by_index.name) == (5, "GPU-abc", "NVIDIA H200")
    assert (by_index.memory_total_mb, by_index.simulated) == (143771, False)
    assert capacity_probe.nvml_gpu("GPU-abc").index == 5
    with pytest.raises(CapacityProbeError, match="GPU GPU-zzz: NVML cannot read it"):
        capacity_probe.nvml_gpu("GPU-zzz")
    assert calls == ["init", "shutdown"] * 3  # shut down again, whatever happened


def test_in_a_container_given_one_gpu_nvml_numbers_it_0_and_the_host_index_is_declared(monkeypatch):
    """Compose's consumer_gpu1: the runtime gave the consumer's container host GPU 1 alone."""

    class NVMLError(Exception):
        pass

    def by_index(index: int) -> str:
        if index != 0:
            raise NVMLError("Invalid Argument")
        return "only-gpu"

    stand_in = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=by_index,
        nvmlDeviceGetIndex=lambda handle: 0,
        nvmlDeviceGetUUID=lambda handle: "GPU-host-one",
        nvmlDeviceGetName=lambda handle: "NVIDIA H200",
        nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(total=1024 * 1024 * 1024),
    )
    monkeypatch.setitem(sys.modules, "pynvml", stand_in)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "1")

    gpu = capacity_probe.nvml_gpu("1")
    assert (gpu.index, gpu.uuid, gpu.memory_total_mb) == (1, "GPU-host-one", 1024)
    # Without the runtime's word, index 1 is looked up as such, and is not there.
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES")
    with pytest.raises(CapacityProbeError, match="GPU 1: NVML cannot read it"):
        capacity_probe.nvml_gpu("1")


def test_a_real_gpu_through_nvml():
    """Only where an NVIDIA driver is present: GPU 0 as the driver reports it."""
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no NVIDIA driver here: {exc}")
    declared = probe_capacity(settings(gpu="0"))
    [gpu] = declared.gpus
    assert gpu.index == 0 and gpu.uuid.startswith("GPU-") and not gpu.simulated
    assert gpu.memory_total_mb > 1000
    assert declared.takes_gpu_tasks and not declared.takes_cpu_tasks


def test_the_consumer_process_refuses_a_gpu_it_cannot_read(tmp_path):
    """No such GPU on any host (index 999): without a driver NVML is missing, with one the GPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IS_")}
    env |= {"IS_SERVICE_TOKEN": TOKEN, "IS_WORK_DIR": str(tmp_path / "work")}
    run = subprocess.run(
        [sys.executable, "-m", "job_consumer", "--gpu", "999"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert "refusing to start: GPU 999:" in run.stderr
    assert "Traceback" not in run.stderr
