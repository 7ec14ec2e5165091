"""Fixtures for the consumer tests: test images, settings, a runner."""

from __future__ import annotations

import contextlib
import io
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from inference_server.contract import TaskQueue
from job_consumer.config import ConsumerSettings
from job_consumer.consumer import Consumer
from job_consumer.container_runtime import ContainerRuntime, DockerRuntime, PodmanRuntime
from job_consumer.runner import LABEL_CONSUMER, ModelRunner
from local_platform.examples import copy_images_to_podman
from tests.images import build_test_images, dockerfile_for
from tests.job_consumer.stack import CONSUMER_TOKEN, PrivateApiServer


@pytest.fixture(scope="session")
def test_images(docker_client: docker.DockerClient, base_image: str) -> dict[str, str]:
    return build_test_images(docker_client, base_image)


@pytest.fixture
def build_image(
    request: pytest.FixtureRequest, docker_client: docker.DockerClient, base_image: str
) -> Iterator[Callable[[str, str], str]]:
    """Builds a tiny image (tag, command as JSON) from the base image; returns its ID. Every
    image built is removed afterwards, so give it a tag of the test's own (helpers.unique_tag).
    A test on Podman (`container_runtime`) finds it in Podman's store too."""
    built: list[str] = []
    # Only a test that runs over the runtimes asks for one; the others run on Docker alone.
    runtime: ContainerRuntime | None = (
        request.getfixturevalue("container_runtime") if "container_runtime" in request.fixturenames else None
    )
    podman = runtime.client if isinstance(runtime, PodmanRuntime) else None

    def build(tag: str, command_json: str) -> str:
        image, _ = docker_client.images.build(
            fileobj=io.BytesIO(dockerfile_for(command_json).encode()),
            tag=tag,
            buildargs={"BASE_IMAGE": base_image},
            rm=True,
            forcerm=True,
            pull=False,
        )
        built.append(str(image.id))
        if podman is not None:
            copy_images_to_podman(docker_client, [tag])
        return str(image.id)

    yield build
    for image_id in built:
        for client in (docker_client, podman):
            if client is not None:
                with contextlib.suppress(docker.errors.NotFound):
                    client.images.remove(image_id, force=True)


@pytest.fixture
def consumer_id(test_session_id: str) -> str:
    return f"{test_session_id}-{secrets.token_hex(3)}"


@pytest.fixture
def make_settings(tmp_path: Path, consumer_id: str) -> Callable[..., ConsumerSettings]:
    def make(**overrides) -> ConsumerSettings:
        values = {
            "service_token": "test-service-token",
            "consumer_id": consumer_id,
            "work_dir": tmp_path / "work",
            "default_timeout_s": 60,
            "default_memory_mb": 256,
            "default_cpus": 1,
            "default_pids": 64,
            "stop_grace_s": 1,
        }
        values.update(overrides)
        return ConsumerSettings(**values)

    return make


@pytest.fixture
def settings(make_settings) -> ConsumerSettings:
    return make_settings()


@pytest.fixture
def runner(container_runtime: ContainerRuntime, settings: ConsumerSettings) -> Iterator[ModelRunner]:
    yield ModelRunner(container_runtime, settings)
    # Whatever a test did, it leaves no container of this consumer behind.
    leftovers = container_runtime.client.containers.list(
        all=True, sparse=True, filters={"label": f"{LABEL_CONSUMER}={settings.consumer_id}"}
    )
    for container in leftovers:
        container.remove(force=True)
    assert not leftovers, f"containers left behind: {[c.name for c in leftovers]}"


@pytest.fixture
def cpu_queue(queue_name: str) -> str:
    """The queue of the test's CPU tasks (deleted with `queue_name`)."""
    return TaskQueue.CPU.queue_name(queue_name)


@pytest.fixture
def gpu_queue(queue_name: str) -> str:
    return TaskQueue.GPU.queue_name(queue_name)


@pytest.fixture
def private_api(
    tmp_path: Path, sqlite_url: str, rabbitmq_url: str, queue_name: str
) -> Iterator[PrivateApiServer]:
    server = PrivateApiServer(
        data_dir=tmp_path / "api-data",
        database_url=sqlite_url,
        rabbitmq_url=rabbitmq_url,
        queue_name=queue_name,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def consumer_runtime(docker_client: docker.DockerClient) -> ContainerRuntime:
    """The runtime `make_consumer`'s consumers use: Docker, unless a test module runs over both
    (test_consumer.py overrides this with `container_runtime`); the scheduling tests are not
    doubled, as what they check happens above the runtime."""
    return DockerRuntime(docker_client)


@pytest.fixture
def make_consumer(
    make_settings,
    private_api: PrivateApiServer,
    rabbitmq_url: str,
    queue_name: str,
    consumer_runtime: ContainerRuntime,
) -> Iterator[Callable[..., Consumer]]:
    """Consumers wired to the test's private API and queue; their leftovers are checked afterwards."""
    made: list[Consumer] = []

    def make(max_tasks: int | None = None, **overrides) -> Consumer:
        values = {
            "private_api_url": private_api.url,
            "rabbitmq_url": rabbitmq_url,
            "queue_name": queue_name,
            "service_token": CONSUMER_TOKEN,
            "heartbeat_interval_s": 0.5,
            "reconnect_backoff_max_s": 2,
            "report_retry_s": 5,
        }
        values.update(overrides)
        values.setdefault("container_runtime", consumer_runtime.name)
        consumer = Consumer(make_settings(**values), max_tasks=max_tasks, runtime=consumer_runtime)
        made.append(consumer)
        return consumer

    yield make
    for consumer in made:
        consumer.request_stop(now=True)
        leftovers = consumer_runtime.client.containers.list(
            all=True, sparse=True, filters={"label": f"{LABEL_CONSUMER}={consumer.settings.consumer_id}"}
        )
        for container in leftovers:
            container.remove(force=True)
        assert not leftovers, f"containers left behind: {[c.name for c in leftovers]}"
