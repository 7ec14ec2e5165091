"""`standalone --runtime podman --register-examples`: the example images, built by Docker, are
copied into Podman's store, and only when Podman's copy differs."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator

import docker
import pytest

from local_platform.examples import copy_images_to_podman, podman_image_id
from tests.images import SCRIPT

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def docker_only_tag(docker_client: docker.DockerClient, test_images: dict[str, str]) -> Iterator[str]:
    """A tag of a small test image that Docker has and Podman has not; removed from both after."""
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: scripts/setup.sh installs it")
    tag = f"inference-server/test-podman-copy:{secrets.token_hex(4)}"
    docker_client.images.get(SCRIPT).tag(tag)
    yield tag
    docker_client.images.remove(tag)
    # Untags only: the image itself stays for the other tags that name it.
    subprocess.run(["podman", "rmi", tag], capture_output=True, timeout=120, check=False)


def test_images_are_copied_into_podman_once(docker_client: docker.DockerClient, docker_only_tag: str) -> None:
    assert podman_image_id(docker_only_tag) is None
    docker_id = docker_client.images.get(docker_only_tag).id
    assert docker_id is not None

    assert copy_images_to_podman(docker_client, [docker_only_tag]) == [docker_only_tag]
    assert podman_image_id(docker_only_tag) == docker_id.removeprefix("sha256:")
    # The same image is there now: nothing to copy.
    assert copy_images_to_podman(docker_client, [docker_only_tag]) == []
