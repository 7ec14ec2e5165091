"""Runs the platform's services as local processes: the embedded default, and the test harness.

Each service is its own OS process (as in production), so a test can SIGKILL a consumer or
restart the private API exactly as a crash would, and `standalone` is the same code path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import httpx

from inference_server.contract import SERVICE_TOKEN_HEADER
from inference_server.data_folder import OPERATOR_KEY_FILE
from job_consumer.container_runtime import RUNTIME_NAMES
from local_platform.operator_key import ensure_operator_key
from local_platform.ports import free_port
from local_platform.service_process import ServiceProcess

log = logging.getLogger(__name__)

# The private API's tokens, one per caller (private_api/deps.py, ROUTE_GRANTS): the full-access
# one stays with the launcher (readiness checks, example registration, tests); each service is
# handed only its own.
SERVICE_TOKEN_FILE = "service.token"
PUBLIC_API_TOKEN_FILE = "public-api.token"
CONSUMER_TOKEN_FILE = "consumer.token"
# What Prometheus presents to read the public API's /metrics (IS_METRICS_TOKEN).
METRICS_TOKEN_FILE = "metrics.token"
# What only the private API may hold: the database (its URL carries the password) and the
# other services' tokens. The public API also gets no RabbitMQ URL: it never talks to the broker.
_PRIVATE_API_ONLY_ENV: tuple[str, ...] = ("IS_DATABASE_URL", "IS_PUBLIC_API_TOKEN", "IS_CONSUMER_TOKEN")
_NOT_FOR_PUBLIC_API_ENV: tuple[str, ...] = (*_PRIVATE_API_ONLY_ENV, "IS_RABBITMQ_URL")
# A consumer's identity: the launcher gives each consumer its own, so none inherits the launcher's
# (a CPU consumer must not pick up a GPU index exported in the operator's shell).
_CONSUMER_IDENTITY_ENV: tuple[str, ...] = ("IS_GPU", "IS_SIMULATE_GPU_MEMORY_MB", "IS_CONSUMER_ID")
DEFAULT_SIMULATED_GPU_MEMORY_MB = 24576
# The engines a consumer can run model containers on (job_consumer reads IS_CONTAINER_RUNTIME).
CONTAINER_RUNTIMES: tuple[str, ...] = RUNTIME_NAMES


def _env_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class _IsSettings:
    """Settings of a service, each field named as its IS_ variable (None: the service's default)."""

    def env(self) -> dict[str, str]:
        values = ((spec.name, getattr(self, spec.name)) for spec in fields(self))
        return {f"IS_{name.upper()}": _env_value(value) for name, value in values if value is not None}


@dataclass(frozen=True)
class ConsumerCapacity(_IsSettings):
    """What each consumer may give its tasks together (job_consumer/config.py reads these)."""

    capacity_cpus: float | None = None
    capacity_memory_mb: int | None = None
    max_concurrent_tasks: int | None = None


@dataclass(frozen=True)
class SchedulingSettings(_IsSettings):
    """The private API's settings for placing tasks (private_api/config.py reads these)."""

    lease_seconds: int | None = None
    # A consumer silent this long is listed as lost.
    consumer_lost_after_s: float | None = None
    # Each owner's tasks waiting in the broker at most; the rest wait in the database for a turn.
    fair_share_queued_per_owner: int | None = None
    # A task no registered consumer could ever run fails after this long (None: it waits).
    unrunnable_timeout_s: float | None = None


@dataclass(frozen=True)
class ConsumerSpec:
    """One consumer the platform runs: its process name, its id, and the GPU it owns if any."""

    name: str
    consumer_id: str
    gpu: str | None = None
    # A simulated GPU of this many MiB instead of a real one (machines without a GPU).
    simulated_gpu_memory_mb: int | None = None


def load_or_create_secret(path: Path, nbytes: int = 32) -> str:
    """A secret kept in the data folder, so restarts of the platform agree on it."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(nbytes)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value + "\n")
    return value


@dataclass
class LocalPlatform:
    """Private API, public API and consumers as child processes sharing one data folder: `consumers`
    CPU-only ones, one per id in `gpus`, and `simulate_gpus` owning a simulated GPU each."""

    data_dir: Path
    public_port: int
    consumers: int = 1
    gpus: list[str] = field(default_factory=list)
    simulate_gpus: int = 0
    simulated_gpu_memory_mb: int = DEFAULT_SIMULATED_GPU_MEMORY_MB
    consumer_capacity: ConsumerCapacity = field(default_factory=ConsumerCapacity)
    # Whether the GPU consumers also take CPU tasks, the operator's choice (None: the consumer's
    # default). CPU consumers always take them: they take nothing else.
    gpu_consumers_take_cpu_tasks: bool | None = None
    # The engine every consumer runs model containers on, one of CONTAINER_RUNTIMES (None: the
    # consumer's default, or IS_CONTAINER_RUNTIME from the launcher's environment).
    container_runtime: str | None = None
    scheduling: SchedulingSettings = field(default_factory=SchedulingSettings)
    private_port: int | None = None
    host: str = "127.0.0.1"
    rabbitmq_url: str | None = None
    queue_name: str | None = None
    database_url: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # Set in the consumers' environment only, last, over everything else (e.g. DOCKER_HOST
    # pointing nowhere, to prove a Podman consumer needs no Docker engine).
    consumer_extra_env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable
    # The command consumers are started with, before `-m job_consumer` (None: [python]); e.g. a
    # `setpriv` prefix and an interpreter that user may run, for a consumer as another user.
    consumer_interpreter: list[str] | None = None
    # Standalone use: create an operator key in <data_dir>/operator.key on start if none is there.
    create_operator_key: bool = False
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    # Process name -> consumer id, for every consumer started.
    consumer_ids: dict[str, str] = field(default_factory=dict)
    # Set by start() when create_operator_key made a new key: its name.
    operator_key_created: str | None = None

    def __post_init__(self) -> None:
        if self.container_runtime is not None and self.container_runtime not in CONTAINER_RUNTIMES:
            raise ValueError(
                f"container runtime {self.container_runtime!r} is not one of {', '.join(CONTAINER_RUNTIMES)}"
            )
        self.data_dir = self.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.private_port is None:
            self.private_port = free_port()
        self.service_token = os.environ.get("IS_SERVICE_TOKEN") or load_or_create_secret(
            self.data_dir / SERVICE_TOKEN_FILE
        )
        self.public_api_token = os.environ.get("IS_PUBLIC_API_TOKEN") or load_or_create_secret(
            self.data_dir / PUBLIC_API_TOKEN_FILE
        )
        self.consumer_token = os.environ.get("IS_CONSUMER_TOKEN") or load_or_create_secret(
            self.data_dir / CONSUMER_TOKEN_FILE
        )
        self.metrics_token = os.environ.get("IS_METRICS_TOKEN") or load_or_create_secret(
            self.data_dir / METRICS_TOKEN_FILE
        )

    @property
    def public_url(self) -> str:
        return f"http://{self.host}:{self.public_port}"

    @property
    def private_url(self) -> str:
        return f"http://{self.host}:{self.private_port}"

    @property
    def operator_key_file(self) -> Path:
        return self.data_dir / OPERATOR_KEY_FILE

    @property
    def resolved_database_url(self) -> str:
        return (
            self.database_url
            or self.extra_env.get("IS_DATABASE_URL")
            or os.environ.get("IS_DATABASE_URL")
            or f"sqlite:///{self.data_dir / 'inference.db'}"
        )

    def base_env(self) -> dict[str, str]:
        """What the private API gets: every token and every connection."""
        env = dict(os.environ)
        env.update(
            {
                "IS_DATA_DIR": str(self.data_dir),
                "IS_SERVICE_TOKEN": self.service_token,
                "IS_PUBLIC_API_TOKEN": self.public_api_token,
                "IS_CONSUMER_TOKEN": self.consumer_token,
                "IS_PRIVATE_API_URL": self.private_url,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env["IS_DATABASE_URL"] = self.resolved_database_url
        if self.rabbitmq_url:
            env["IS_RABBITMQ_URL"] = self.rabbitmq_url
        if self.queue_name:
            env["IS_QUEUE_NAME"] = self.queue_name
        env.update(self.extra_env)
        return env

    def service_env(self, module: str) -> dict[str, str]:
        """The environment of one service: its own token as IS_SERVICE_TOKEN (the name every
        service reads as "the token I present") and nothing it does not use."""
        env = self.base_env()
        if module == "private_api":
            env.update(self.scheduling.env())
            return env
        if module == "public_api":
            withheld, token = _NOT_FOR_PUBLIC_API_ENV, self.public_api_token
        else:
            withheld, token = _PRIVATE_API_ONLY_ENV, self.consumer_token
        for name in withheld:
            env.pop(name, None)
        env["IS_SERVICE_TOKEN"] = token
        if module == "public_api":
            env["IS_METRICS_TOKEN"] = self.metrics_token  # the only service that checks it
        return env

    def _service(self, name: str, module: str, *args: str) -> ServiceProcess:
        process = ServiceProcess(
            name=name,
            argv=[self.python, "-m", module, *args],
            env=self.service_env(module),
            log_path=self.data_dir / "logs" / f"{name}.log",
        )
        self.processes[name] = process
        return process

    def start(self, timeout: float = 60.0) -> None:
        try:
            private = self._service(
                "private-api", "private_api", "--host", self.host, "--port", str(self.private_port)
            )
            private.start()
            self.wait_healthy(private, f"{self.private_url}/health/ready", timeout)
            if self.create_operator_key:
                # After the private API is ready: it has migrated the database by then.
                self.operator_key_created = ensure_operator_key(
                    self.resolved_database_url, self.operator_key_file
                )
            public = self._service(
                "public-api", "public_api", "--host", self.host, "--port", str(self.public_port)
            )
            public.start()
            self.wait_healthy(public, f"{self.public_url}/health/ready", timeout)
            for spec in self.consumer_specs():
                self.start_consumer_spec(spec)
        except BaseException:
            self.stop()
            raise

    def consumer_name(self, index: int) -> str:
        return f"consumer-{index}"

    def _consumer_id(self, suffix: str) -> str:
        # Stable for one data folder (a restarted consumer finds its own crash leftovers) and
        # distinct between folders (two platforms on one engine never clean up each other's).
        folder_tag = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:8]
        return f"{socket.gethostname()}-{folder_tag}-{suffix}"

    def cpu_consumer_spec(self, index: int) -> ConsumerSpec:
        return ConsumerSpec(name=self.consumer_name(index), consumer_id=self._consumer_id(str(index)))

    def gpu_consumer_spec(self, gpu: str, simulated_gpu_memory_mb: int | None = None) -> ConsumerSpec:
        """The consumer owning GPU `gpu`: a real one, or a simulated one of that many MiB."""
        return ConsumerSpec(
            name=f"consumer-gpu{gpu}",
            consumer_id=self._consumer_id(f"gpu{gpu}"),
            gpu=gpu,
            simulated_gpu_memory_mb=simulated_gpu_memory_mb,
        )

    def consumer_specs(self) -> list[ConsumerSpec]:
        """Every consumer start() runs: the CPU ones, then one per real GPU, then the simulated."""
        if self.gpus and self.simulate_gpus:
            # Both would number their GPUs from 0: two consumers would claim one index.
            raise ValueError("real and simulated GPUs cannot be mixed on one platform")
        return [
            *(self.cpu_consumer_spec(index) for index in range(self.consumers)),
            *(self.gpu_consumer_spec(gpu) for gpu in self.gpus),
            *(
                self.gpu_consumer_spec(str(index), self.simulated_gpu_memory_mb)
                for index in range(self.simulate_gpus)
            ),
        ]

    def consumer_env(self, spec: ConsumerSpec) -> dict[str, str]:
        """A consumer's environment: the platform's, its capacity, its container runtime, its own
        GPU if it has one, and consumer_extra_env over all of them."""
        env = self.service_env("job_consumer")
        for name in _CONSUMER_IDENTITY_ENV:
            env.pop(name, None)
        env.update(self.consumer_capacity.env())
        if spec.gpu is not None:
            env["IS_GPU"] = spec.gpu
            if self.gpu_consumers_take_cpu_tasks is not None:
                env["IS_TAKE_CPU_TASKS"] = _env_value(self.gpu_consumers_take_cpu_tasks)
        if spec.simulated_gpu_memory_mb is not None:
            env["IS_SIMULATE_GPU_MEMORY_MB"] = str(spec.simulated_gpu_memory_mb)
        if self.container_runtime is not None:
            env["IS_CONTAINER_RUNTIME"] = self.container_runtime
        env.update(self.consumer_extra_env)
        return env

    def start_consumer_spec(self, spec: ConsumerSpec) -> ServiceProcess:
        process = ServiceProcess(
            name=spec.name,
            argv=[
                *(self.consumer_interpreter or [self.python]),
                "-m",
                "job_consumer",
                "--consumer-id",
                spec.consumer_id,
            ],
            env=self.consumer_env(spec),
            log_path=self.data_dir / "logs" / f"{spec.name}.log",
        )
        self.processes[spec.name] = process
        self.consumer_ids[spec.name] = spec.consumer_id
        process.start()
        return process

    def start_consumer(self, index: int) -> ServiceProcess:
        """Start CPU consumer `index` (again, under the same id, if it ran before)."""
        return self.start_consumer_spec(self.cpu_consumer_spec(index))

    def consumer_process(self, consumer_id: str) -> ServiceProcess:
        """The process of the consumer a task's consumer_id names."""
        for name, known_id in self.consumer_ids.items():
            if known_id == consumer_id:
                return self.processes[name]
        raise KeyError(f"no consumer {consumer_id!r} was started by this platform")

    def restart(self, name: str, timeout: float = 60.0) -> None:
        process = self.processes[name]
        process.stop()
        process.start()
        process.restarts += 1
        if name == "private-api":
            self.wait_healthy(process, f"{self.private_url}/health/ready", timeout)
        elif name == "public-api":
            self.wait_healthy(process, f"{self.public_url}/health/ready", timeout)

    def wait_healthy(self, process: ServiceProcess, url: str, timeout: float) -> None:
        # The private API answers readiness only to a service token; the launcher holds the
        # full-access one.
        headers = {SERVICE_TOKEN_HEADER: self.service_token}
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if not process.running:
                raise RuntimeError(f"{process.name} exited during start-up:\n{process.log_tail()}")
            try:
                response = httpx.get(url, headers=headers, timeout=2.0)
                if response.status_code == 200:
                    return
                last_error = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last_error = str(exc)
            time.sleep(0.1)
        raise RuntimeError(
            f"{process.name} not ready at {url} after {timeout:.0f}s ({last_error}):\n{process.log_tail()}"
        )

    def stop(self, timeout: float = 20.0) -> None:
        # Consumers first, so none is left running a task against an API that is gone.
        ordered = sorted(self.processes.values(), key=lambda p: not p.name.startswith("consumer"))
        for process in ordered:
            process.send(signal.SIGTERM)
        for process in ordered:
            process.stop(timeout)

    def supervise_once(self) -> list[str]:
        """Restart any child that died on its own; returns the names restarted."""
        restarted = []
        for process in self.processes.values():
            if process.popen is not None and not process.running:
                log.warning(
                    "%s exited with %s; restarting it\n%s",
                    process.name,
                    process.popen.returncode,
                    process.log_tail(10),
                )
                process.start()
                process.restarts += 1
                restarted.append(process.name)
        return restarted
