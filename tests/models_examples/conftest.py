"""Fixtures for the example model tests: the images, built once, and a sandboxed runner."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from job_consumer.config import ConsumerSettings
from job_consumer.container_runtime import DockerRuntime
from job_consumer.runner import LABEL_CONSUMER, ModelRunner
from models_examples.catalog import BuiltImage, build_example_images


@pytest.fixture(scope="session")
def example_images(docker_client: docker.DockerClient, base_image: str) -> list[BuiltImage]:
    return build_example_images(docker_client, base_image)


@pytest.fixture
def example_runner(
    docker_client: docker.DockerClient, tmp_path: Path, test_session_id: str
) -> Iterator[ModelRunner]:
    """Runs examples exactly as the consumer would: default sandbox, unprivileged, no network."""
    settings = ConsumerSettings(
        service_token="unused-by-the-runner",
        consumer_id=f"{test_session_id}-examples-{secrets.token_hex(3)}",
        work_dir=tmp_path / "work",
        default_timeout_s=120,
        default_memory_mb=1024,
        default_cpus=1,
    )
    yield ModelRunner(DockerRuntime(docker_client), settings)
    leftovers = docker_client.containers.list(
        all=True, sparse=True, filters={"label": f"{LABEL_CONSUMER}={settings.consumer_id}"}
    )
    for container in leftovers:
        container.remove(force=True)
    assert not leftovers
