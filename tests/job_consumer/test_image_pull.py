"""Pulling a model's image from the lab registry on first use: against a real registry (the
Debian docker-registry stand-in, with a login) and the real Docker engine."""

from __future__ import annotations

import contextlib
import io
import secrets
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from job_consumer.image_pull import (
    ImagePuller,
    ImagePullError,
    RegistryLogin,
    names_registry,
    read_registry_login,
)
from local_platform.ports import free_port
from tests.helpers import wait_until
from tests.traefik.helpers import REPO_ROOT

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REGISTRY_IMAGE = "inference-server/standin-registry:latest"
USERNAME = "lab"


@pytest.fixture(scope="module")
def registry_image(docker_client: docker.DockerClient, base_image: str) -> str:
    docker_client.images.build(
        path=str(REPO_ROOT / "docker-images" / "registry"),
        tag=REGISTRY_IMAGE,
        buildargs={"BASE_IMAGE": base_image},
        pull=False,
        rm=True,
    )
    return REGISTRY_IMAGE


@pytest.fixture(scope="module")
def registry(
    docker_client: docker.DockerClient, registry_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A registry asking for a login, on a loopback port (the engine trusts plain HTTP there);
    yields its address and password."""
    password = secrets.token_urlsafe(16)
    secret_dir = tmp_path_factory.mktemp("registry-secret")
    (secret_dir / "password").write_text(password)
    secret_dir.chmod(0o755)
    (secret_dir / "password").chmod(0o644)
    port = free_port()
    container = docker_client.containers.run(
        registry_image,
        detach=True,
        name=f"is-test-registry-{secrets.token_hex(4)}",
        environment={"REGISTRY_USER": USERNAME, "REGISTRY_PASSWORD_FILE": "/run/secrets/password"},
        volumes={str(secret_dir): {"bind": "/run/secrets", "mode": "ro"}},
        ports={"5000/tcp": ("127.0.0.1", port)},
    )
    address = f"127.0.0.1:{port}"
    try:

        def answers() -> bool:
            try:
                docker_client.api.login(USERNAME, password, registry=address, reauth=True)
            except docker.errors.APIError:
                return False
            return True

        wait_until(answers, 60, "the registry to accept the login", 0.5)
        yield address, password
    finally:
        container.remove(force=True, v=True)


@pytest.fixture
def pushed_model(
    docker_client: docker.DockerClient, base_image: str, registry: tuple[str, str]
) -> Iterator[str]:
    """A model image of its own, pushed to the registry and then removed from the engine, so a
    pull is the only way back; yields its tag as a model would name it (no registry part)."""
    address, password = registry
    tag = f"inference-server/test-pull-{secrets.token_hex(4)}:1"
    dockerfile = f'ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nLABEL pulled-test={tag}\nCMD ["true"]\n'
    image, _ = docker_client.images.build(
        fileobj=io.BytesIO(dockerfile.encode()), tag=f"{address}/{tag}", buildargs={"BASE_IMAGE": base_image}
    )
    repository, _, version = f"{address}/{tag}".rpartition(":")
    for line in docker_client.images.push(
        repository,
        tag=version,
        auth_config={"username": USERNAME, "password": password},
        stream=True,
        decode=True,
    ):
        assert "error" not in line, line
    docker_client.images.remove(f"{address}/{tag}")
    assert image.id is not None
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(image.id)
    try:
        yield tag
    finally:
        for name in (tag, f"{address}/{tag}"):
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(name, force=True)


def test_missing_image_is_pulled_once_and_kept_under_the_model_tag(
    docker_client: docker.DockerClient, registry: tuple[str, str], pushed_model: str
) -> None:
    address, password = registry
    puller = ImagePuller(docker_client, address, RegistryLogin(USERNAME, password))
    assert puller.ensure(pushed_model) is True
    assert docker_client.images.get(pushed_model).labels["pulled-test"] == pushed_model
    # Kept: the next task finds it on the engine and asks no registry.
    assert puller.ensure(pushed_model) is False
    assert ImagePuller(docker_client, "127.0.0.1:1", None).ensure(pushed_model) is False


def test_unknown_tag_fails_without_retry(
    docker_client: docker.DockerClient, registry: tuple[str, str]
) -> None:
    address, password = registry
    puller = ImagePuller(docker_client, address, RegistryLogin(USERNAME, password))
    with pytest.raises(ImagePullError) as raised:
        puller.ensure(f"inference-server/no-such-model-{secrets.token_hex(4)}:1")
    assert raised.value.retryable is False
    assert "no-such-model" in str(raised.value)


def test_refused_login_fails_without_retry(
    docker_client: docker.DockerClient, registry: tuple[str, str], pushed_model: str
) -> None:
    address, _ = registry
    puller = ImagePuller(docker_client, address, RegistryLogin(USERNAME, "not-the-password"))
    with pytest.raises(ImagePullError) as raised:
        puller.ensure(pushed_model)
    assert raised.value.retryable is False
    assert "refused" in str(raised.value)


def test_unreachable_registry_is_retryable(docker_client: docker.DockerClient) -> None:
    puller = ImagePuller(docker_client, f"127.0.0.1:{free_port()}", None)
    with pytest.raises(ImagePullError) as raised:
        puller.ensure(f"inference-server/test-pull-{secrets.token_hex(4)}:1")
    assert raised.value.retryable is True
    assert "could not be reached" in str(raised.value)


def test_no_registry_configured_fails_without_retry(docker_client: docker.DockerClient) -> None:
    with pytest.raises(ImagePullError) as raised:
        ImagePuller(docker_client, "", None).ensure(f"inference-server/absent-{secrets.token_hex(4)}:1")
    assert raised.value.retryable is False
    assert "IS_MODEL_REGISTRY" in str(raised.value)


def test_registry_names_and_login_file(tmp_path: Path) -> None:
    assert names_registry("lab.example:5000/team/model:3")
    assert names_registry("localhost/model")
    assert names_registry("10.0.0.1:5000/model:1")
    assert not names_registry("inference-server/model:1")
    assert not names_registry("model:1")
    assert read_registry_login("", "") is None
    password_file = tmp_path / "password"
    password_file.write_text("s3cret\n")
    assert read_registry_login("lab", str(password_file)) == RegistryLogin("lab", "s3cret")
    with pytest.raises(ValueError, match="IS_REGISTRY_PASSWORD_FILE"):
        read_registry_login("lab", "")
    with pytest.raises(ValueError, match="cannot read"):
        read_registry_login("lab", str(tmp_path / "missing"))
