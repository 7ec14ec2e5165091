"""The container runtimes the consumer's tests run over: the shared Docker engine, and a Podman
service of the session's own on a temporary socket, its store holding the test images.

`container_runtime` is parametrised over both; a test taking it (or `runner`, `engine`) runs on
each. The images come from Docker (built by tests/images.py) and are copied into Podman's store
(local_platform/examples.py's copy_images_to_podman, the one place that copies).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from job_consumer.container_runtime import RUNTIME_NAMES, ContainerRuntime, DockerRuntime, PodmanRuntime
from local_platform.examples import copy_images_to_podman
from tests.images import build_test_images


@pytest.fixture(scope="session")
def podman_runtime(
    tmp_path_factory: pytest.TempPathFactory, docker_client: docker.DockerClient, base_image: str
) -> Iterator[PodmanRuntime]:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: scripts/setup.sh installs it")
    runtime = PodmanRuntime(socket_dir=tmp_path_factory.mktemp("podman"))
    runtime.start()
    test_images = build_test_images(docker_client, base_image)
    copy_images_to_podman(docker_client, list(test_images))
    yield runtime
    runtime.stop()


@pytest.fixture(scope="session", params=RUNTIME_NAMES)
def container_runtime(request: pytest.FixtureRequest, docker_client: docker.DockerClient) -> ContainerRuntime:
    if request.param == "podman":
        podman: PodmanRuntime = request.getfixturevalue("podman_runtime")
        return podman
    return DockerRuntime(docker_client)


@pytest.fixture
def engine(container_runtime: ContainerRuntime) -> docker.DockerClient:
    """The client of the engine the test's containers run on."""
    return container_runtime.client


def podman_service_pids(url: str) -> list[int]:
    """The `podman system service` processes serving this socket URL."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        if b"service" in args and url.encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids
