"""The whole platform as local processes (private API, public API, consumers), for end-to-end and
fault-injection tests; loaded by tests/conftest.py as a pytest plugin."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from local_platform.examples import register_model
from local_platform.launcher import LocalPlatform
from local_platform.ports import free_port
from models_examples.catalog import EXAMPLES, build_example_images
from tests.images import build_test_images

PlatformFactory = Callable[..., LocalPlatform]


@pytest.fixture(scope="session")
def example_images(docker_client: docker.DockerClient, base_image: str) -> list[str]:
    build_example_images(docker_client, base_image)
    return [example.container_tag for example in EXAMPLES]


@pytest.fixture(scope="session")
def test_images(docker_client: docker.DockerClient, base_image: str) -> dict[str, str]:
    return build_test_images(docker_client, base_image)


@pytest.fixture
def platform_factory(tmp_path: Path, rabbitmq_url: str, queue_name: str) -> Iterator[PlatformFactory]:
    """Starts platforms on this test's own queue and data folder; all are stopped afterwards."""
    started: list[LocalPlatform] = []

    def start(consumers: int = 1, create_operator_key: bool = False, **extra_env: str) -> LocalPlatform:
        platform = LocalPlatform(
            data_dir=tmp_path / f"platform{len(started)}",
            public_port=free_port(),
            consumers=consumers,
            rabbitmq_url=rabbitmq_url,
            queue_name=queue_name,
            create_operator_key=create_operator_key,
            extra_env={
                "IS_REAPER_INTERVAL_S": "0.5",
                # The end-to-end and fault tests are about delivery, not access: they call the
                # public API without a key, as v1.2 clients do. Access is tested with the
                # switches off in tests/public_api/test_permissions.py (pass "false" to override).
                "IS_ANONYMOUS_TASKS": "true",
                "IS_ANONYMOUS_MODELS": "true",
                **extra_env,
            },
        )
        started.append(platform)
        platform.start()
        return platform

    yield start
    for platform in started:
        platform.stop()


def register_examples_on(platform: LocalPlatform) -> None:
    for example in EXAMPLES:
        register_model(platform.private_url, platform.service_token, example)
