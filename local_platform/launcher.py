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
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from inference_server.contract import SERVICE_TOKEN_HEADER
from inference_server.data_folder import OPERATOR_KEY_FILE
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
# What only the private API may hold: the database (its URL carries the password) and the
# other services' tokens. The public API also gets no RabbitMQ URL: it never talks to the broker.
_PRIVATE_API_ONLY_ENV: tuple[str, ...] = ("IS_DATABASE_URL", "IS_PUBLIC_API_TOKEN", "IS_CONSUMER_TOKEN")
_NOT_FOR_PUBLIC_API_ENV: tuple[str, ...] = (*_PRIVATE_API_ONLY_ENV, "IS_RABBITMQ_URL")


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
    """Private API, public API and N consumers as child processes sharing one data folder."""

    data_dir: Path
    public_port: int
    consumers: int = 1
    private_port: int | None = None
    host: str = "127.0.0.1"
    rabbitmq_url: str | None = None
    queue_name: str | None = None
    database_url: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable
    # Standalone use: create an operator key in <data_dir>/operator.key on start if none is there.
    create_operator_key: bool = False
    processes: dict[str, ServiceProcess] = field(default_factory=dict)
    # Set by start() when create_operator_key made a new key: its name.
    operator_key_created: str | None = None

    def __post_init__(self) -> None:
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
            return env
        if module == "public_api":
            withheld, token = _NOT_FOR_PUBLIC_API_ENV, self.public_api_token
        else:
            withheld, token = _PRIVATE_API_ONLY_ENV, self.consumer_token
        for name in withheld:
            env.pop(name, None)
        env["IS_SERVICE_TOKEN"] = token
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
            for index in range(self.consumers):
                self.start_consumer(index)
        except BaseException:
            self.stop()
            raise

    def consumer_name(self, index: int) -> str:
        return f"consumer-{index}"

    def start_consumer(self, index: int, gpu: str | None = None) -> ServiceProcess:
        # Stable for one data folder (a restarted consumer finds its own crash leftovers) and
        # distinct between folders (two platforms on one engine never clean up each other's).
        folder_tag = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:8]
        args = ["--consumer-id", f"{socket.gethostname()}-{folder_tag}-{index}"]
        if gpu is not None:
            args += ["--gpu", gpu]
        consumer = self._service(self.consumer_name(index), "job_consumer", *args)
        consumer.start()
        return consumer

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
