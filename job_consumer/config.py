"""The consumer's settings: read once from IS_* environment variables at start-up."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, field_validator, model_validator

from inference_server.contract import CONSUMER_ID_RE
from inference_server.settings import BrokerSettings, ZipLimitSettings
from job_consumer.container_runtime import RuntimeName


def _default_consumer_id(gpu: str | None) -> str:
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:80] or "consumer"
    # A GPU consumer keeps its id across restarts, so the leftovers of a crash (containers,
    # work dirs) are recognised as its own and cleaned; a CPU consumer may share the host.
    return f"{host}-gpu{gpu}" if gpu is not None else f"{host}-{os.getpid()}"


class ConsumerSettings(BrokerSettings, ZipLimitSettings):
    private_api_url: str = "http://127.0.0.1:8001"
    # The GPU this consumer owns: an index or a UUID as NVML knows it; None for a CPU consumer.
    gpu: str | None = None
    # A GPU of this many MiB that does not exist, for machines without one: tasks are placed as
    # on a real GPU and their containers get the same environment, but no device. Without
    # IS_GPU, the simulated GPU is index 0.
    simulate_gpu_memory_mb: int | None = Field(default=None, ge=1, le=16 * 1024 * 1024)
    # What this consumer's tasks may use together (packing); unset: the host's cores and memory.
    capacity_cpus: PositiveFloat | None = None
    capacity_memory_mb: int | None = Field(default=None, ge=16)
    max_concurrent_tasks: int = Field(default=8, ge=1, le=1024)
    # Whether a GPU consumer also runs CPU tasks (unset: a GPU consumer does not, a CPU one does).
    take_cpu_tasks: bool | None = None
    # How long a delivered task that does not fit beside the running ones is held for them to
    # make room, before it is handed back to the queue for another consumer.
    hold_limit_s: PositiveFloat = 60.0
    # How long a queue is left alone after it delivered a task this consumer can never run.
    unfit_queue_pause_s: PositiveFloat = 30.0
    consumer_id: str = ""
    # The engine its tasks' containers run on (job_consumer/container_runtime.py).
    container_runtime: RuntimeName = "docker"
    # An operator-run Podman service (unix:///run/podman/podman.sock); unset: the consumer starts
    # its own on a private socket in its work dir and stops it at exit.
    podman_url: str | None = None
    # Rootless Podman on a cgroup v1 host ignores memory, CPU and PID limits (Podman says so and
    # runs the container anyway), so such a consumer refuses to start unless the operator
    # accepts models running unlimited there.
    allow_unenforced_limits: bool = False
    # Where a model image missing from this engine is pulled from (host[:port] of the lab
    # registry; empty: never pulled), and the login for it: a username and the file holding the
    # password (a Swarm secret). job_consumer/image_pull.py.
    model_registry: str = ""
    registry_username: str = ""
    registry_password_file: str = ""
    data_dir: Path = Path("./data")
    work_dir: Path | None = None

    heartbeat_interval_s: PositiveFloat = 5.0
    amqp_heartbeat_s: NonNegativeInt = 30
    http_connect_timeout_s: PositiveFloat = 5.0
    http_read_timeout_s: PositiveFloat = 30.0
    reconnect_backoff_max_s: PositiveFloat = 30.0
    cleanup_interval_s: PositiveFloat = 300.0
    # How long finished work keeps trying to reach an unreachable private API before leaving
    # the task to the lease reaper.
    report_retry_s: NonNegativeFloat = 120.0

    default_timeout_s: int = Field(default=3600, ge=1)
    default_memory_mb: int = Field(default=8192, ge=16)
    default_cpus: PositiveFloat = 2.0
    default_pids: int = Field(default=512, ge=8)
    stop_grace_s: NonNegativeInt = 2
    max_log_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    # What a model may write to /output. Checked every second while it runs, so a runaway model
    # is stopped before it fills the consumer's disk, and again before the output is zipped.
    max_output_bytes: int = Field(default=20 * 1024**3, ge=1)
    # Unpacked models no task on this host used for this long are removed (0: kept for ever).
    # Far above any task's run time: a model in use is mounted into a running container.
    model_cache_max_idle_days: NonNegativeFloat = 7.0

    # Keep the next container of expected models created ahead (job_consumer/prepared_containers.py).
    prepare_containers: bool = True
    # A prepared container unused for this long is removed (a warm model's is created anew).
    prepared_idle_s: PositiveFloat = 600.0
    # How many of the models this consumer ran last keep a prepared container.
    prepared_recent_models: int = Field(default=3, ge=1, le=64)
    # How often prepared containers are checked (idle, image changed) and warm models re-read.
    prepared_check_interval_s: PositiveFloat = 30.0
    # Start prepared containers ahead too, held at a gate until their task's input is in place
    # (job_consumer/container_gate.py), with this static shell (Debian's busybox-static). Without
    # a usable one, containers are only created ahead.
    prepared_start_ahead: bool = True
    gate_shell: Path | None = Path("/bin/busybox")

    # Size of the tmpfs at /tmp of a model that does not set tmp_mb; it counts against the
    # model's memory limit. Besides /output, the only place a model may write by default.
    default_tmp_mb: int = Field(default=256, ge=1, le=1024 * 1024)

    @field_validator(
        "gpu",
        "simulate_gpu_memory_mb",
        "capacity_cpus",
        "capacity_memory_mb",
        "take_cpu_tasks",
        "podman_url",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # Compose files pass a variable they do not set as an empty string.
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fill_derived(self) -> ConsumerSettings:
        if self.simulate_gpu_memory_mb is not None:
            self.gpu = self.gpu or "0"
            if not self.gpu.isdigit():
                raise ValueError(f"a simulated GPU is named by its index, not {self.gpu!r} (IS_GPU)")
        if self.gpu is None and self.take_cpu_tasks is False:
            raise ValueError("a consumer without a GPU that takes no CPU tasks would take nothing")
        if not self.consumer_id:
            self.consumer_id = _default_consumer_id(self.gpu)
        if not CONSUMER_ID_RE.match(self.consumer_id):
            raise ValueError(
                f"consumer id {self.consumer_id!r} must be 1-128 letters, digits, '.', '_' or '-'"
            )
        # Bind mounts need absolute host paths, so the work dir is resolved here once.
        self.work_dir = (self.work_dir or self.data_dir / "work").resolve()
        return self

    @property
    def simulates_gpu(self) -> bool:
        return self.simulate_gpu_memory_mb is not None

    @property
    def resolved_work_dir(self) -> Path:
        assert self.work_dir is not None  # set by the validator
        return self.work_dir
