"""`inference-server standalone`: which consumers its flags start and the environment each gets
(its GPU, real or simulated, its capacity), without starting the services; then the command for
real with one simulated GPU."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import httpx
import pytest

from inference_server.contract import PublicRoutes
from inference_server.data_folder import OPERATOR_KEY_FILE
from local_platform.cli import _platform_of, build_parser, main
from local_platform.gpus import GpuDetectionError, detect_gpus
from local_platform.launcher import (
    DEFAULT_SIMULATED_GPU_MEMORY_MB,
    ConsumerCapacity,
    LocalPlatform,
    SchedulingSettings,
)
from local_platform.ports import free_port
from tests.helpers import wait_until

BIN = Path(sys.executable).parent
GPU_ENV = ("IS_GPU", "IS_SIMULATE_GPU_MEMORY_MB", "IS_TAKE_CPU_TASKS")


def platform_of(tmp_path: Path, *flags: str) -> LocalPlatform:
    args = build_parser().parse_args(["standalone", "--data-dir", str(tmp_path / "data"), *flags])
    return _platform_of(args)


def gpu_env_of(platform: LocalPlatform) -> dict[str, dict[str, str]]:
    """Consumer id -> the GPU settings in its environment."""
    return {
        spec.consumer_id: {
            name: value for name, value in platform.consumer_env(spec).items() if name in GPU_ENV
        }
        for spec in platform.consumer_specs()
    }


def test_consumers_zero_and_one_simulated_gpu_start_only_the_simulated_gpu_consumer(tmp_path: Path) -> None:
    platform = platform_of(tmp_path, "--consumers", "0", "--simulate-gpus", "1", "--gpu-memory-mb", "24576")
    (spec,) = platform.consumer_specs()
    assert spec.gpu == "0" and spec.simulated_gpu_memory_mb == 24576
    assert gpu_env_of(platform) == {spec.consumer_id: {"IS_GPU": "0", "IS_SIMULATE_GPU_MEMORY_MB": "24576"}}
    print(f"standalone --consumers 0 --simulate-gpus 1: consumers {gpu_env_of(platform)}")


def test_simulated_gpus_come_beside_the_cpu_consumers_each_with_its_own_id(tmp_path: Path) -> None:
    platform = platform_of(tmp_path, "--simulate-gpus", "2")
    specs = platform.consumer_specs()
    assert [spec.gpu for spec in specs] == [None, "0", "1"]  # --consumers still counts CPU ones: 1
    assert len({spec.consumer_id for spec in specs}) == 3
    assert len({spec.name for spec in specs}) == 3
    envs = gpu_env_of(platform)
    assert envs[specs[0].consumer_id] == {}
    for spec in specs[1:]:
        assert envs[spec.consumer_id] == {
            "IS_GPU": spec.gpu,
            "IS_SIMULATE_GPU_MEMORY_MB": str(DEFAULT_SIMULATED_GPU_MEMORY_MB),
        }


def test_named_gpus_replace_the_cpu_consumer_unless_cpu_consumers_are_asked_for(tmp_path: Path) -> None:
    only_gpus = platform_of(tmp_path, "--gpus", "0, 1")
    assert [spec.gpu for spec in only_gpus.consumer_specs()] == ["0", "1"]
    assert all(spec.simulated_gpu_memory_mb is None for spec in only_gpus.consumer_specs())
    assert sorted(env["IS_GPU"] for env in gpu_env_of(only_gpus).values()) == ["0", "1"]

    both = platform_of(tmp_path, "--gpus", "1", "--consumers", "2")
    assert [spec.gpu for spec in both.consumer_specs()] == [None, None, "1"]


def test_cpu_tasks_on_gpus_is_set_on_gpu_consumers_only(tmp_path: Path) -> None:
    platform = platform_of(tmp_path, "--simulate-gpus", "1", "--no-cpu-tasks-on-gpus")
    cpu, gpu = platform.consumer_specs()
    assert "IS_TAKE_CPU_TASKS" not in platform.consumer_env(cpu)
    assert platform.consumer_env(gpu)["IS_TAKE_CPU_TASKS"] == "false"
    assert (
        platform_of(tmp_path, "--simulate-gpus", "1", "--cpu-tasks-on-gpus").consumer_env(gpu)[
            "IS_TAKE_CPU_TASKS"
        ]
        == "true"
    )
    # Neither flag: the consumer's own default.
    assert "IS_TAKE_CPU_TASKS" not in platform_of(tmp_path, "--simulate-gpus", "1").consumer_env(gpu)


@pytest.mark.parametrize(
    "flags",
    [
        ("--gpus", "all", "--simulate-gpus", "1"),  # two ways of numbering GPUs from 0
        ("--simulate-gpus", "-1"),
        ("--consumers", "-1"),
        ("--simulate-gpus", "1", "--gpu-memory-mb", "0"),
    ],
)
def test_contradictory_or_negative_flags_are_refused(
    flags: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["standalone", *flags])
    assert refused.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_gpu_memory_without_simulated_gpus_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["standalone", "--data-dir", str(tmp_path / "data"), "--gpu-memory-mb", "8000"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().count("\n") == 0 and "--simulate-gpus" in err, err
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_a_consumer_never_inherits_a_gpu_from_the_launchers_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IS_GPU", "3")
    monkeypatch.setenv("IS_SIMULATE_GPU_MEMORY_MB", "1000")
    platform = LocalPlatform(data_dir=tmp_path / "data", public_port=1, consumers=1, simulate_gpus=1)
    cpu, gpu = platform.consumer_specs()
    assert gpu_env_of(platform) == {
        cpu.consumer_id: {},
        gpu.consumer_id: {"IS_GPU": "0", "IS_SIMULATE_GPU_MEMORY_MB": str(DEFAULT_SIMULATED_GPU_MEMORY_MB)},
    }


def test_capacity_goes_to_every_consumer_and_scheduling_to_the_private_api_only(tmp_path: Path) -> None:
    platform = LocalPlatform(
        data_dir=tmp_path / "data",
        public_port=1,
        consumers=1,
        simulate_gpus=1,
        consumer_capacity=ConsumerCapacity(
            capacity_cpus=4.5, capacity_memory_mb=4096, max_concurrent_tasks=3
        ),
        scheduling=SchedulingSettings(
            lease_seconds=3, consumer_lost_after_s=2.5, fair_share_queued_per_owner=2, unrunnable_timeout_s=60
        ),
    )
    capacity = {"IS_CAPACITY_CPUS": "4.5", "IS_CAPACITY_MEMORY_MB": "4096", "IS_MAX_CONCURRENT_TASKS": "3"}
    scheduling = {
        "IS_LEASE_SECONDS": "3",
        "IS_CONSUMER_LOST_AFTER_S": "2.5",
        "IS_FAIR_SHARE_QUEUED_PER_OWNER": "2",
        "IS_UNRUNNABLE_TIMEOUT_S": "60",
    }
    for spec in platform.consumer_specs():
        env = platform.consumer_env(spec)
        assert capacity.items() <= env.items()
        assert not scheduling.keys() & env.keys()
    private = platform.service_env("private_api")
    assert scheduling.items() <= private.items()
    assert not capacity.keys() & private.keys()
    assert not scheduling.keys() & platform.service_env("public_api").keys()


@pytest.mark.parametrize("runtime", ["docker", "podman"])
def test_runtime_flag_goes_to_every_consumer_and_to_no_other_service(tmp_path: Path, runtime: str) -> None:
    platform = platform_of(tmp_path, "--runtime", runtime, "--simulate-gpus", "1")
    assert platform.container_runtime == runtime
    specs = platform.consumer_specs()
    assert len(specs) == 2  # the CPU consumer and the simulated GPU one
    for spec in specs:
        assert platform.consumer_env(spec)["IS_CONTAINER_RUNTIME"] == runtime
    for module in ("private_api", "public_api"):
        assert "IS_CONTAINER_RUNTIME" not in platform.service_env(module)


def test_without_the_runtime_flag_consumers_keep_their_own_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IS_CONTAINER_RUNTIME", raising=False)
    platform = platform_of(tmp_path)
    assert platform.container_runtime is None
    (spec,) = platform.consumer_specs()
    assert "IS_CONTAINER_RUNTIME" not in platform.consumer_env(spec)
    # The operator's exported choice reaches the consumers; the flag wins over it.
    monkeypatch.setenv("IS_CONTAINER_RUNTIME", "podman")
    assert platform.consumer_env(spec)["IS_CONTAINER_RUNTIME"] == "podman"
    flagged = platform_of(tmp_path, "--runtime", "docker")
    assert flagged.consumer_env(flagged.consumer_specs()[0])["IS_CONTAINER_RUNTIME"] == "docker"


def test_an_unknown_runtime_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["standalone", "--runtime", "apptainer"])
    assert refused.value.code == 2
    assert "--runtime" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'singularity' is not one of docker, podman"):
        LocalPlatform(data_dir=tmp_path / "data", public_port=1, container_runtime="singularity")


def test_consumer_extra_env_reaches_the_consumers_only_and_over_everything(tmp_path: Path) -> None:
    platform = LocalPlatform(
        data_dir=tmp_path / "data",
        public_port=1,
        container_runtime="podman",
        extra_env={"DOCKER_HOST": "unix:///var/run/docker.sock"},
        consumer_extra_env={"DOCKER_HOST": "unix:///nonexistent.sock", "IS_CONTAINER_RUNTIME": "docker"},
    )
    (spec,) = platform.consumer_specs()
    env = platform.consumer_env(spec)
    assert env["DOCKER_HOST"] == "unix:///nonexistent.sock"
    assert env["IS_CONTAINER_RUNTIME"] == "docker"  # applied last: a test may override anything
    assert platform.service_env("private_api")["DOCKER_HOST"] == "unix:///var/run/docker.sock"


def test_make_run_passes_runtime_only_when_asked(tmp_path: Path) -> None:
    """`make run RUNTIME=podman` adds --runtime podman; plain `make run` is unchanged."""
    root = Path(__file__).resolve().parents[2]

    def run_command(*variables: str) -> str:
        # -n prints the recipe without running it; setup is a prerequisite, so name run alone
        # with -o setup (treat it as up to date).
        completed = subprocess.run(
            ["make", "-n", "-o", "setup", "run", *variables],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return completed.stdout

    assert "--runtime" not in run_command()
    assert "--runtime podman" in run_command("RUNTIME=podman")


def test_a_started_consumer_gets_its_id_gpu_and_runtime(tmp_path: Path) -> None:
    """What the consumer process really receives: a stand-in interpreter records it."""
    record = tmp_path / "record"
    stand_in = tmp_path / "python"
    stand_in.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}.args\nenv > {record}.env\n')
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    platform = LocalPlatform(
        data_dir=tmp_path / "data",
        public_port=1,
        python=str(stand_in),
        simulated_gpu_memory_mb=8000,
        container_runtime="podman",
    )
    spec = platform.gpu_consumer_spec("1", simulated_gpu_memory_mb=8000)
    process = platform.start_consumer_spec(spec)
    assert process.wait(30) == 0
    argv = Path(f"{record}.args").read_text().split()
    assert argv == ["-m", "job_consumer", "--consumer-id", spec.consumer_id]
    env = dict(line.split("=", 1) for line in Path(f"{record}.env").read_text().splitlines() if "=" in line)
    assert env["IS_GPU"] == "1" and env["IS_SIMULATE_GPU_MEMORY_MB"] == "8000"
    assert env["IS_CONTAINER_RUNTIME"] == "podman"
    assert env["IS_SERVICE_TOKEN"] == platform.consumer_token  # its own token, not the full-access one
    assert platform.consumer_process(spec.consumer_id) is process
    assert platform.processes[spec.name] is process


# --- --gpus all --------------------------------------------------------------------------------


def fake_nvml(count: int | None, init_error: str | None = None) -> types.ModuleType:
    """A stand-in for the pynvml module: `count` GPUs, or NVML failing to start."""
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init() -> None:
        if init_error is not None:
            raise NVMLError(init_error)

    for name, value in {
        "NVMLError": NVMLError,
        "nvmlInit": init,
        "nvmlDeviceGetCount": lambda: count,
        "nvmlShutdown": lambda: None,
    }.items():
        setattr(module, name, value)
    return module


def test_gpus_all_starts_one_consumer_per_gpu_nvml_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(count=2))
    platform = platform_of(tmp_path, "--gpus", "all")
    assert [spec.gpu for spec in platform.consumer_specs()] == ["0", "1"]


@pytest.mark.parametrize(
    ("nvml", "expected"),
    [
        (None, "nvidia-ml-py"),  # the binding is not installed
        (fake_nvml(count=None, init_error="NVML Shared Library Not Found"), "driver"),
        (fake_nvml(count=0), "no GPU"),
    ],
)
def test_gpus_all_without_a_gpu_says_why_in_one_line(
    nvml: types.ModuleType | None,
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # None in sys.modules makes `import pynvml` raise ImportError.
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with pytest.raises(GpuDetectionError, match=expected):
        detect_gpus()
    code = main(["standalone", "--data-dir", str(tmp_path / "data"), "--gpus", "all"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("inference-server: error: --gpus all") and err.strip().count("\n") == 0, err
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_gpus_all_on_this_host_without_a_gpu_exits_with_the_error_not_a_traceback(tmp_path: Path) -> None:
    try:
        found = detect_gpus()
    except GpuDetectionError:
        found = []
    if found:
        pytest.skip(f"this host has GPUs {found}: --gpus all would start the platform")
    completed = subprocess.run(
        [str(BIN / "inference-server"), "standalone", "--data-dir", str(tmp_path / "data"), "--gpus", "all"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    print(f"--gpus all without a GPU: exit {completed.returncode}, stderr {completed.stderr.strip()!r}")
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert completed.stderr.startswith("inference-server: error: --gpus all")
    assert completed.stderr.strip().count("\n") == 0


# --- the command, for real ------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.slow
def test_standalone_with_consumers_0_and_one_simulated_gpu_runs_that_one_consumer(
    tmp_path: Path, queue_name: str, rabbitmq_url: str
) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = {**os.environ, "IS_QUEUE_NAME": queue_name, "IS_RABBITMQ_URL": rabbitmq_url}
    env.pop("IS_DATABASE_URL", None)  # the data folder's own SQLite database
    output = tmp_path / "standalone.out"
    with output.open("wb") as sink:
        standalone = subprocess.Popen(
            [
                str(BIN / "inference-server"),
                "standalone",
                "--port",
                str(port),
                "--data-dir",
                str(data),
                "--consumers",
                "0",
                "--simulate-gpus",
                "1",
                "--gpu-memory-mb",
                "24576",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:

        def registered_consumers() -> list[dict[str, Any]] | None:
            if not (data / OPERATOR_KEY_FILE).exists():
                return None
            key = (data / OPERATOR_KEY_FILE).read_text().strip()
            try:
                response = httpx.get(
                    f"http://127.0.0.1:{port}{PublicRoutes.CONSUMERS}",
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=10,
                )
            except httpx.HTTPError:
                return None  # not listening yet
            listed: list[dict[str, Any]] = response.json() if response.status_code == 200 else []
            return listed or None

        consumers = wait_until(registered_consumers, 120, "the standalone platform's consumer to register")
    finally:
        standalone.send_signal(signal.SIGTERM)
        code = standalone.wait(90)
    printed = output.read_text(errors="replace")
    (consumer,) = consumers
    print(
        f"standalone --consumers 0 --simulate-gpus 1 --gpu-memory-mb 24576: consumers registered "
        f"{[(c['id'], c['gpus'], c['takes_gpu_tasks'], c['takes_cpu_tasks']) for c in consumers]}; "
        f"exit {code}"
    )
    assert [(gpu["index"], gpu["memory_total_mb"], gpu["simulated"]) for gpu in consumer["gpus"]] == [
        (0, 24576, True)
    ]
    assert consumer["takes_gpu_tasks"] is True
    assert "0 CPU consumer(s), 1 consumer(s) with a simulated GPU of 24576 MiB" in printed
    assert code == 0 and "all services stopped" in printed, printed
