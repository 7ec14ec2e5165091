"""The container runtime interface: what differs between Docker and Podman, and the Podman
service a consumer starts for itself, or finds an operator's."""

from __future__ import annotations

import os
import resource
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from pydantic import ValidationError

from job_consumer.config import ConsumerSettings
from job_consumer.container_runtime import (
    SIGKILL_EXIT_CODE,
    SOCKET_FOLDER_PREFIX,
    SOCKET_NAME,
    ContainerRuntime,
    ContainerRuntimeError,
    DockerRuntime,
    PodmanRuntime,
    podman_ulimits,
    runtime_named,
)
from tests import images
from tests.container_runtimes import podman_service_pids


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a path short enough for a unix socket (pytest's tmp_path often is not)."""
    with tempfile.TemporaryDirectory(prefix="isrt", dir="/tmp") as folder:
        yield Path(folder)


def test_docker_asks_for_a_gpu_by_device_request_and_podman_by_cdi_name():
    [request] = DockerRuntime(client=None).gpu_options("3")["device_requests"]
    assert request["DeviceIDs"] == ["3"] and request["Capabilities"] == [["gpu"]]
    assert PodmanRuntime().gpu_options("3") == {"devices": ["nvidia.com/gpu=3"]}
    assert PodmanRuntime().gpu_options("GPU-1a2b") == {"devices": ["nvidia.com/gpu=GPU-1a2b"]}


def test_podman_containers_get_explicit_rlimits_within_this_processes_own():
    ulimits = {ulimit["Name"]: ulimit for ulimit in podman_ulimits()}
    assert set(ulimits) == {"nofile", "nproc"}
    for name, which in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        _, hard = resource.getrlimit(which)
        assert ulimits[name]["Soft"] == ulimits[name]["Hard"] > 0
        assert hard == resource.RLIM_INFINITY or ulimits[name]["Hard"] <= hard
    assert PodmanRuntime().container_options() == {"ulimits": podman_ulimits()}
    assert DockerRuntime(client=None).container_options() == {}


def test_a_read_only_root_gets_read_only_tmpfs_where_podman_would_mount_writable_ones():
    assert DockerRuntime(client=None).read_only_rootfs_tmpfs() == {}
    mounts = PodmanRuntime().read_only_rootfs_tmpfs()
    assert set(mounts) == {"/run", "/var/tmp"}
    assert all(options.startswith("ro,") for options in mounts.values())


@pytest.mark.parametrize(
    ("state", "killed_by_consumer", "docker_says", "podman_says"),
    [
        ({"OOMKilled": True, "ExitCode": SIGKILL_EXIT_CODE}, False, True, True),
        # Podman's conmon missed the OOM kill: a SIGKILL nobody else sent is the memory limit's.
        ({"OOMKilled": False, "ExitCode": SIGKILL_EXIT_CODE}, False, False, True),
        # The consumer killed it (timeout, cancel, output limit): not out of memory.
        ({"OOMKilled": False, "ExitCode": SIGKILL_EXIT_CODE}, True, False, False),
        ({"OOMKilled": False, "ExitCode": 1}, False, False, False),
    ],
)
def test_out_of_memory_as_each_runtime_reads_it(state, killed_by_consumer, docker_says, podman_says):
    assert DockerRuntime(client=None).oom_killed(state, killed_by_consumer=killed_by_consumer) is docker_says
    assert PodmanRuntime().oom_killed(state, killed_by_consumer=killed_by_consumer) is podman_says


@pytest.mark.docker
def test_image_ids_are_the_same_on_both_engines_and_none_when_missing(
    container_runtime: ContainerRuntime, docker_client: docker.DockerClient, test_images
):
    # The result cache is keyed by image ID: a model copied from Docker keeps its cache entries.
    assert container_runtime.image_id(images.SCRIPT) == docker_client.images.get(images.SCRIPT).id
    assert container_runtime.image_id("inference-server/no-such-image:1") is None


@pytest.mark.docker
def test_the_leftover_sweep_finds_containers_by_label_on_both(container_runtime, engine, test_images):
    label = f"inference-server.test-sweep={container_runtime.name}-{id(engine)}"
    created = engine.containers.create(images.SLEEP, labels=dict([label.split("=", 1)]), network_mode="none")
    try:
        found = engine.containers.list(all=True, sparse=True, filters={"label": [label]})
        assert [container.id for container in found] == [created.id]
        key, value = label.split("=", 1)
        assert found[0].attrs["Labels"][key] == value
    finally:
        created.remove(force=True)


@pytest.mark.docker
def test_a_podman_runtime_starts_its_own_service_on_a_private_socket_and_stops_it(short_dir):
    runtime = PodmanRuntime(socket_dir=short_dir)
    other = PodmanRuntime(socket_dir=short_dir)  # a second consumer on the same work dir
    runtime.start()
    other.start()
    try:
        folder, other_folder = runtime_folder(runtime), runtime_folder(other)
        assert folder.parent == other_folder.parent == short_dir and folder != other_folder
        assert runtime.starts_service and runtime.service_url == f"unix://{folder / 'api.sock'}"
        assert stat.S_ISSOCK((folder / "api.sock").stat().st_mode)
        # Only its owner may reach the folder the socket is in.
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert runtime.client.ping()
        assert "podman" in runtime.client.version()["Components"][0]["Name"].lower()
        [pid] = podman_service_pids(runtime.service_url)
    finally:
        runtime.stop()
    assert not Path(f"/proc/{pid}").exists()
    assert runtime.service_url is None
    assert not folder.exists()  # nothing of it is left in the work dir
    assert other.client.ping()  # the other consumer's service serves on
    other.stop()
    runtime.stop()  # twice is harmless
    assert list(short_dir.iterdir()) == []


def runtime_folder(runtime: PodmanRuntime) -> Path:
    assert runtime.service_url is not None
    return Path(runtime.service_url.removeprefix("unix://")).parent


@pytest.mark.docker
def test_a_work_dir_too_deep_for_a_socket_gets_a_private_temporary_folder(short_dir):
    deep = short_dir / ("d" * 120)
    runtime = PodmanRuntime(socket_dir=deep)
    runtime.start()
    try:
        socket_folder = runtime_folder(runtime)
        assert len(str(socket_folder / "api.sock")) < 100
        assert socket_folder.parent == Path(tempfile.gettempdir())
        assert runtime.client.ping()
    finally:
        runtime.stop()
    assert not socket_folder.exists()
    assert not deep.exists()


@pytest.mark.docker
def test_an_operator_run_podman_service_is_used_and_left_running(podman_runtime: PodmanRuntime):
    operators = PodmanRuntime(url=podman_runtime.service_url)
    assert not operators.starts_service
    assert operators.client.ping()
    operators.stop()
    assert podman_runtime.client.ping()


def test_podman_that_cannot_start_is_a_clear_error(short_dir):
    with pytest.raises(ContainerRuntimeError, match="not installed"):
        PodmanRuntime(socket_dir=short_dir, podman="no-such-podman-binary").start()
    failing = short_dir / "failing-podman"
    failing.write_text("#!/bin/sh\necho 'cannot set up storage' >&2\nexit 125\n")
    failing.chmod(0o755)
    with pytest.raises(ContainerRuntimeError, match="exited at start: cannot set up storage"):
        PodmanRuntime(socket_dir=short_dir / "sock", podman=str(failing)).start()


@pytest.mark.docker
def test_a_docker_runtime_leaves_a_client_it_was_given_open(docker_client):
    runtime = DockerRuntime(docker_client)
    assert runtime.client is docker_client
    runtime.stop()
    assert docker_client.ping()


def test_the_runtime_is_a_setting_docker_by_default(monkeypatch, tmp_path):
    monkeypatch.setenv("IS_SERVICE_TOKEN", "test-service-token")
    assert ConsumerSettings().container_runtime == "docker"
    monkeypatch.setenv("IS_CONTAINER_RUNTIME", "podman")
    monkeypatch.setenv("IS_PODMAN_URL", "unix:///run/podman/podman.sock")
    settings = ConsumerSettings(work_dir=tmp_path)
    assert settings.container_runtime == "podman"
    runtime = runtime_named(settings.container_runtime, podman_url=settings.podman_url, work_dir=tmp_path)
    assert isinstance(runtime, PodmanRuntime) and runtime.url == "unix:///run/podman/podman.sock"
    assert isinstance(runtime_named("docker"), DockerRuntime)
    monkeypatch.setenv("IS_CONTAINER_RUNTIME", "singularity")
    with pytest.raises(ValidationError, match="container_runtime"):
        ConsumerSettings()


ROOTLESS_V1 = {"SecurityOptions": ["name=seccomp,profile=default", "name=rootless"], "CgroupVersion": "1"}


@pytest.mark.parametrize(
    "info",
    [
        {"SecurityOptions": ["name=seccomp,profile=default"], "CgroupVersion": "1"},  # rootful, v1
        {"SecurityOptions": ["name=rootless"], "CgroupVersion": "2"},  # rootless, v2
    ],
)
def test_podman_whose_limits_hold_is_accepted(info) -> None:
    PodmanRuntime(url="unix:///operator/podman.sock")._refuse_unenforced_limits(info)


def test_rootless_podman_on_cgroup_v1_is_refused_unless_the_operator_allows_it(caplog) -> None:
    with pytest.raises(ContainerRuntimeError, match="ignores memory, CPU and PID limits"):
        PodmanRuntime(url="unix:///operator/podman.sock")._refuse_unenforced_limits(ROOTLESS_V1)
    allowed = PodmanRuntime(url="unix:///operator/podman.sock", allow_unenforced_limits=True)
    allowed._refuse_unenforced_limits(ROOTLESS_V1)
    assert "WITHOUT memory, CPU or PID limits" in caplog.text


def test_the_sweep_removes_dead_podman_socket_folders_only(tmp_path) -> None:
    def socket_folder(name: str, *, listening: bool, age_s: float) -> tuple[Path, socket.socket | None]:
        folder = tmp_path / name
        folder.mkdir()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(folder / SOCKET_NAME))
        if listening:
            server.listen(1)
        else:
            server.close()  # the socket file stays, nothing answers: a SIGKILLed consumer's
        then = time.time() - age_s
        os.utime(folder, (then, then))
        return folder, server if listening else None

    dead, _ = socket_folder(f"{SOCKET_FOLDER_PREFIX}dead", listening=False, age_s=3600)
    alive, server = socket_folder(f"{SOCKET_FOLDER_PREFIX}alive", listening=True, age_s=3600)
    young, _ = socket_folder(f"{SOCKET_FOLDER_PREFIX}young", listening=False, age_s=0)
    other = tmp_path / "not-a-socket-folder"
    other.mkdir()
    try:
        removed = PodmanRuntime(url="unix:///operator/podman.sock").remove_dead_services(tmp_path)
    finally:
        assert server is not None
        server.close()
    assert removed == 1
    assert not dead.exists()
    assert alive.exists() and young.exists() and other.exists()
    assert DockerRuntime().remove_dead_services(tmp_path) == 0
