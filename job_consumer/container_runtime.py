"""The container engine a consumer runs its tasks' containers on: Docker or Podman.

Both are driven through the Docker Engine API (the docker SDK): Podman's Docker-compatible
service answers it. What differs between them lives here and nowhere else: how the engine is
reached and started, how a GPU is handed to a container, and the options one engine needs that
the other does not. `runner.py` builds the common options and asks the runtime for the rest.

Where an Apptainer/Singularity runtime would plug in: Apptainer has no engine API, so it
would be a third implementation of `ContainerRuntime` whose `client` is an adapter offering the
few calls `runner.py` makes (containers.create/start/wait/kill/stop/logs/remove/list,
images.get, info) on top of `apptainer instance` and SIF files; GPUs through `--nv` with
NVIDIA_VISIBLE_DEVICES. It is not packaged for Debian 12, so it is not built here.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

import docker
import docker.errors
import requests
from docker.types import DeviceRequest, Ulimit

log = logging.getLogger(__name__)

RuntimeName = Literal["docker", "podman"]
RUNTIME_NAMES: tuple[RuntimeName, ...] = ("docker", "podman")

# Podman's own default rlimits are refused where the host lacks CAP_SYS_RESOURCE ("error
# setting rlimit type 7/6"), so every container gets explicit ones; these are Docker's usual.
PODMAN_ULIMITS = (
    Ulimit(name="nofile", soft=1048576, hard=1048576),
    Ulimit(name="nproc", soft=65536, hard=65536),
)
# A unix socket path longer than this is refused by the kernel (sun_path is 108 bytes).
MAX_SOCKET_PATH = 100
PODMAN_START_TIMEOUT_S = 30.0


class ContainerRuntimeError(RuntimeError):
    """The container engine cannot be reached or started: the consumer must not start."""


class ContainerRuntime(ABC):
    """What the consumer needs from a container engine."""

    # Reported at registration (ConsumerRegistration.runtime).
    name: RuntimeName

    @property
    @abstractmethod
    def client(self) -> docker.DockerClient:
        """A docker-SDK client for the engine; valid between start() and stop()."""

    @abstractmethod
    def start(self) -> None:
        """Make the engine reachable (idempotent)."""

    @abstractmethod
    def stop(self) -> None:
        """Release what start() made (idempotent)."""

    @abstractmethod
    def gpu_options(self, gpu: str) -> dict[str, Any]:
        """The `containers.create` options that give a container the host GPU `gpu` (index or UUID)."""

    def container_options(self) -> dict[str, Any]:
        """Options every container of this engine needs besides the common ones."""
        return {}

    def image_id(self, tag: str) -> str | None:
        """The ID of the image `tag` names now; None when the engine has none or cannot say."""
        try:
            image_id = self.client.images.get(tag).id
        except docker.errors.ImageNotFound:
            return None
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            log.warning("could not inspect image %r: %s", tag, exc)
            return None
        return str(image_id) if image_id else None


class DockerRuntime(ContainerRuntime):
    """The Docker engine DOCKER_HOST names (or the given client's); it runs on its own."""

    name: RuntimeName = "docker"

    def __init__(self, client: docker.DockerClient | None = None) -> None:
        self._client = client
        self._owns_client = client is None

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self.start()
        assert self._client is not None
        return self._client

    def start(self) -> None:
        if self._client is None:
            self._client = docker.from_env()

    def stop(self) -> None:
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None

    def gpu_options(self, gpu: str) -> dict[str, Any]:
        return {"device_requests": [DeviceRequest(device_ids=[gpu], capabilities=[["gpu"]])]}


class PodmanRuntime(ContainerRuntime):
    """Podman through its Docker-compatible service: the one at `url` (run by the operator), or
    else one this consumer starts on a private socket under `socket_dir` and stops at exit."""

    name: RuntimeName = "podman"

    def __init__(
        self, *, url: str | None = None, socket_dir: Path | None = None, podman: str = "podman"
    ) -> None:
        self.url = url
        self.socket_dir = socket_dir
        self.podman = podman
        self._client: docker.DockerClient | None = None
        self._service: subprocess.Popen[bytes] | None = None
        self._own_socket_dir: Path | None = None
        self._service_log: Path | None = None

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self.start()
        assert self._client is not None
        return self._client

    @property
    def starts_service(self) -> bool:
        return self.url is None

    def start(self) -> None:
        if self._client is not None:
            return
        url = self.url or self._start_service()
        client = docker.DockerClient(base_url=url)
        if self._service is not None:
            self._wait_until_answering(client)
        self._client = client

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._service is not None:
            self._service.terminate()
            try:
                self._service.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._service.kill()
                self._service.wait()
            self._service = None
        if self._own_socket_dir is not None:
            shutil.rmtree(self._own_socket_dir, ignore_errors=True)
            self._own_socket_dir = None

    def _socket_path(self) -> Path:
        if self.socket_dir is not None:
            candidate = self.socket_dir.resolve() / "podman.sock"
            if len(str(candidate)) <= MAX_SOCKET_PATH:
                self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                return candidate
        # A work dir too deep for a socket path: a private folder of its own instead.
        self._own_socket_dir = Path(tempfile.mkdtemp(prefix="is-podman-"))
        return self._own_socket_dir / "podman.sock"

    def _start_service(self) -> str:
        if shutil.which(self.podman) is None:
            raise ContainerRuntimeError(f"{self.podman!r} is not installed (IS_CONTAINER_RUNTIME=podman)")
        socket_path = self._socket_path()
        socket_path.unlink(missing_ok=True)  # a crashed consumer's socket
        url = f"unix://{socket_path}"
        log.info("starting the Podman service on %s", url)
        # --time=0: it serves until stopped, however long the consumer waits between tasks.
        # Its messages go to a file, not a pipe nobody reads (a full pipe would stall it).
        self._service_log = socket_path.with_suffix(".log")
        with self._service_log.open("wb") as service_log:
            self._service = subprocess.Popen(
                [self.podman, "system", "service", "--time=0", url],
                stdin=subprocess.DEVNULL,
                stdout=service_log,
                stderr=subprocess.STDOUT,
            )
        return url

    def _wait_until_answering(self, client: docker.DockerClient) -> None:
        assert self._service is not None
        deadline = time.monotonic() + PODMAN_START_TIMEOUT_S
        while True:
            if self._service.poll() is not None:
                said = self._service_log.read_text(errors="replace") if self._service_log else ""
                self._service = None
                raise ContainerRuntimeError(f"the Podman service exited at start: {said.strip()[-500:]}")
            try:
                client.ping()
                return
            except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
                if time.monotonic() >= deadline:
                    self.stop()
                    raise ContainerRuntimeError(f"the Podman service did not answer: {exc}") from exc
            # Polling a socket that is not there yet: there is nothing to wait on instead.
            time.sleep(0.05)

    def gpu_options(self, gpu: str) -> dict[str, Any]:
        # CDI (Container Device Interface): the NVIDIA container toolkit's generated spec
        # (`nvidia-ctk cdi generate`) names each GPU nvidia.com/gpu=<index or UUID>.
        return {"devices": [f"nvidia.com/gpu={gpu}"]}

    def container_options(self) -> dict[str, Any]:
        return {"ulimits": list(PODMAN_ULIMITS)}


def runtime_named(
    name: RuntimeName, *, podman_url: str | None = None, work_dir: Path | None = None
) -> ContainerRuntime:
    """The runtime IS_CONTAINER_RUNTIME names, not started yet."""
    if name == "podman":
        return PodmanRuntime(url=podman_url, socket_dir=work_dir / "podman" if work_dir is not None else None)
    return DockerRuntime()
