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
import os
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
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
# setting rlimit type 7/6"), so every container gets explicit ones, never above what this
# process may have (raising a hard limit is what needs that capability). The process count is
# kept well below Podman's own (its service lowers it to 32768 here): it counts per user
# across the host, and every task runs as the same user; the pids limit bounds each container.
PODMAN_RLIMITS = {"nofile": (resource.RLIMIT_NOFILE, 1048576), "nproc": (resource.RLIMIT_NPROC, 16384)}
# What a container killed by SIGKILL exits with (128 + 9).
SIGKILL_EXIT_CODE = 137
SOCKET_FOLDER_PREFIX = "podman-"
SOCKET_NAME = "api.sock"
# A socket folder younger than this may belong to a consumer still starting its service.
DEAD_SERVICE_MIN_AGE_S = 60.0
# A unix socket path longer than this is refused by the kernel (sun_path is 108 bytes).
MAX_SOCKET_PATH = 100
PODMAN_START_TIMEOUT_S = 30.0


def without_proxy_lookups(client: docker.DockerClient) -> docker.DockerClient:
    """The client, told not to look for proxy settings in the environment when it talks over a
    local socket: `requests` scans os.environ for them on every call (8-11 % of a consumer's CPU
    under load, by py-spy), and a Unix socket is never proxied. A TCP engine keeps the lookups."""
    if client.api.base_url.startswith("http+docker://"):
        client.api.trust_env = False
    return client


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

    def remove_dead_services(self, work_dir: Path) -> int:
        """Remove what services of crashed consumers left in the work dir; how many went."""
        return 0

    @abstractmethod
    def gpu_options(self, gpu: str) -> dict[str, Any]:
        """The `containers.create` options that give a container the host GPU `gpu` (index or UUID)."""

    def container_options(self) -> dict[str, Any]:
        """Options every container of this engine needs besides the common ones."""
        return {}

    def read_only_rootfs_tmpfs(self) -> dict[str, str]:
        """Tmpfs mounts (path: options) a container with a read-only root filesystem needs on
        this engine besides /tmp, so that /tmp stays the one writable place on both."""
        return {}

    def oom_killed(self, state: Mapping[str, Any], *, killed_by_consumer: bool) -> bool:
        """Whether the container whose inspected `State` this is was killed for its memory."""
        return bool(state.get("OOMKilled"))

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
            self._client = without_proxy_lookups(docker.from_env())

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
        self,
        *,
        url: str | None = None,
        socket_dir: Path | None = None,
        podman: str = "podman",
        allow_unenforced_limits: bool = False,
    ) -> None:
        self.url = url
        self.allow_unenforced_limits = allow_unenforced_limits
        self.socket_dir = socket_dir
        self.podman = podman
        self._client: docker.DockerClient | None = None
        self._service: subprocess.Popen[bytes] | None = None
        self._own_socket_dir: Path | None = None
        self._service_log: Path | None = None
        # The socket of the service this runtime started, while it runs.
        self.service_url: str | None = None

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
        if self.url is not None:
            self._client = without_proxy_lookups(docker.DockerClient(base_url=self.url))
        else:
            self.service_url = self._start_service()
            self._client = self._connect_when_answering(self.service_url)
        try:
            self._refuse_unenforced_limits(self._client.info())
        except BaseException:
            self.stop()
            raise

    def _refuse_unenforced_limits(self, info: dict[str, Any]) -> None:
        """Rootless Podman on cgroup v1 runs containers with no memory, CPU or PID limit at all
        ("Resource limits are not supported and ignored on cgroups V1 rootless systems"): a model
        could take the host down, so such a consumer does not start unless the operator says so."""
        rootless = "name=rootless" in (info.get("SecurityOptions") or []) or (
            self.url is None and os.geteuid() != 0
        )
        if not rootless or str(info.get("CgroupVersion")) != "1":
            return
        if self.allow_unenforced_limits:
            log.warning("rootless Podman on cgroup v1: models run WITHOUT memory, CPU or PID limits")
            return
        raise ContainerRuntimeError(
            "rootless Podman on a cgroup v1 host ignores memory, CPU and PID limits; use cgroup v2 "
            "with delegation, rootful Podman or Docker, or set IS_ALLOW_UNENFORCED_LIMITS=true to "
            "run models unlimited"
        )

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
            self.service_url = None
        if self._own_socket_dir is not None:
            shutil.rmtree(self._own_socket_dir, ignore_errors=True)
            self._own_socket_dir = None

    def remove_dead_services(self, work_dir: Path) -> int:
        """The socket folders of services whose consumer was SIGKILLed (their service went with
        it, by pdeathsig, but the folder stayed). A folder is dead when nothing answers on its
        socket; young ones are left alone, as a sibling consumer may be starting its service."""
        removed = 0
        for folder in work_dir.glob(f"{SOCKET_FOLDER_PREFIX}*"):
            if folder == self._own_socket_dir or not folder.is_dir() or folder.is_symlink():
                continue
            try:
                if time.time() - folder.stat().st_mtime < DEAD_SERVICE_MIN_AGE_S:
                    continue
                if _answers(folder / SOCKET_NAME):
                    continue
                shutil.rmtree(folder)
                removed += 1
            except OSError as exc:
                log.warning("could not remove the dead Podman socket folder %s yet: %r", folder, exc)
        return removed

    def _socket_path(self) -> Path:
        """A socket in a new private folder: under `socket_dir` (the work dir) when the path is
        short enough, else in the temp dir. Its own folder, as consumers may share a work dir."""
        parent = Path(tempfile.gettempdir())
        if self.socket_dir is not None:
            wanted = self.socket_dir.resolve()
            if len(str(wanted / f"{SOCKET_FOLDER_PREFIX}12345678" / SOCKET_NAME)) <= MAX_SOCKET_PATH:
                wanted.mkdir(parents=True, exist_ok=True)
                parent = wanted
        # mkdtemp: mode 0700, so only this user reaches the socket; removed at stop.
        self._own_socket_dir = Path(tempfile.mkdtemp(prefix=SOCKET_FOLDER_PREFIX, dir=parent))
        return self._own_socket_dir / SOCKET_NAME

    def _start_service(self) -> str:
        if shutil.which(self.podman) is None:
            raise ContainerRuntimeError(f"{self.podman!r} is not installed (IS_CONTAINER_RUNTIME=podman)")
        socket_path = self._socket_path()
        url = f"unix://{socket_path}"
        log.info("starting the Podman service on %s", url)
        # --time=0: it serves until stopped, however long the consumer waits between tasks.
        # Its messages go to a file, not a pipe nobody reads (a full pipe would stall it). It runs
        # in its own folder: conmon drops an `oom` marker in its working directory when a
        # container is killed for memory, which would otherwise land in the consumer's.
        self._service_log = socket_path.with_suffix(".log")
        with self._service_log.open("wb") as service_log:
            self._service = subprocess.Popen(
                [*_ending_with_this_thread(), self.podman, "system", "service", "--time=0", url],
                stdin=subprocess.DEVNULL,
                stdout=service_log,
                stderr=subprocess.STDOUT,
                cwd=socket_path.parent,
            )
        return url

    def _connect_when_answering(self, url: str) -> docker.DockerClient:
        """A client of the service just started, once it answers (the client asks for the
        engine's API version as it is made, so making one is the probe)."""
        deadline = time.monotonic() + PODMAN_START_TIMEOUT_S
        while True:
            assert self._service is not None
            if self._service.poll() is not None:
                said = self._service_log.read_text(errors="replace") if self._service_log else ""
                self._service = None
                self.stop()
                raise ContainerRuntimeError(f"the Podman service exited at start: {said.strip()[-500:]}")
            try:
                return without_proxy_lookups(docker.DockerClient(base_url=url))
            except docker.errors.DockerException as exc:
                if time.monotonic() >= deadline:
                    self.stop()
                    raise ContainerRuntimeError(f"the Podman service did not answer: {exc}") from exc
            # Waiting for a socket to appear: there is nothing to block on instead.
            time.sleep(0.05)

    def gpu_options(self, gpu: str) -> dict[str, Any]:
        # CDI (Container Device Interface): the NVIDIA container toolkit's generated spec
        # (`nvidia-ctk cdi generate`) names each GPU nvidia.com/gpu=<index or UUID>.
        return {"devices": [f"nvidia.com/gpu={gpu}"]}

    def container_options(self) -> dict[str, Any]:
        return {"ulimits": podman_ulimits()}

    def read_only_rootfs_tmpfs(self) -> dict[str, str]:
        # With a read-only root Podman mounts writable tmpfs on /run and /var/tmp by itself
        # (--read-only-tmpfs, which its Docker API cannot turn off); mounting read-only, tiny
        # ones there instead keeps them as read-only as under Docker.
        return {path: "ro,nosuid,nodev,size=4k" for path in ("/run", "/var/tmp")}

    def oom_killed(self, state: Mapping[str, Any], *, killed_by_consumer: bool) -> bool:
        # Podman's conmon does not always see the kernel's OOM kill (it reports OOMKilled false
        # under cgroup v1 without systemd, as on the project's machines). The OOM killer's
        # SIGKILL (exit 137) that the consumer did not send is then the memory limit's.
        if state.get("OOMKilled"):
            return True
        return not killed_by_consumer and state.get("ExitCode") == SIGKILL_EXIT_CODE


def _ending_with_this_thread() -> list[str]:
    """A prefix that makes the command get SIGTERM when the thread starting it ends, so a consumer
    killed outright (SIGKILL, no stop()) does not leave its Podman service serving for ever."""
    return ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []


def podman_ulimits() -> list[Ulimit]:
    ulimits = []
    for name, (which, usual) in PODMAN_RLIMITS.items():
        _, hard = resource.getrlimit(which)
        value = usual if hard == resource.RLIM_INFINITY else min(usual, hard)
        ulimits.append(Ulimit(name=name, soft=value, hard=value))
    return ulimits


def _answers(socket_path: Path) -> bool:
    """Whether something listens on the unix socket (a live service of another consumer)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(socket_path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def runtime_named(
    name: RuntimeName,
    *,
    podman_url: str | None = None,
    work_dir: Path | None = None,
    allow_unenforced_limits: bool = False,
) -> ContainerRuntime:
    """The runtime IS_CONTAINER_RUNTIME names, not started yet."""
    if name == "podman":
        return PodmanRuntime(
            url=podman_url, socket_dir=work_dir, allow_unenforced_limits=allow_unenforced_limits
        )
    return DockerRuntime()
