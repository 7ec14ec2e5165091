"""Fixtures shared by every test package: the real RabbitMQ, PostgreSQL and Docker engine.

`make test` runs scripts/setup.sh first, so these services are up; a fixture that cannot
reach one fails loudly rather than skipping, because a skipped infrastructure test proves nothing.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator

import docker
import pika
import psycopg
import pytest

from inference_server.contract import TaskQueue, cancel_exchange_name

pytest_plugins = ["tests.platform_fixtures", "tests.container_runtimes"]

RABBITMQ_URL = os.environ.get("IS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
POSTGRES_ADMIN_DSN = os.environ.get(
    "IS_TEST_POSTGRES_DSN", "postgresql://inference_test:inference_test@127.0.0.1:5432/inference_test"
)
BASE_IMAGE = os.environ.get("IS_BASE_IMAGE", "inference-server/base:bookworm")
# Every container, volume and queue a test session makes carries this, so cleanup checks
# look only at what this session made even when other sessions share the engine.
TEST_SESSION_ID = f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    connection.close()
    return RABBITMQ_URL


def _delete_queue(rabbitmq_url: str, name: str) -> None:
    """The queue `name`, the per-class queues the platform derives from it (TaskQueue) and its
    cancel exchange."""
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        channel = connection.channel()
        for queue in (name, *(task_queue.queue_name(name) for task_queue in TaskQueue)):
            channel.queue_delete(queue)
        channel.exchange_delete(cancel_exchange_name(name))
    finally:
        connection.close()


@pytest.fixture
def queue_name(rabbitmq_url: str) -> Iterator[str]:
    """A queue name no other test uses; the queue is deleted afterwards."""
    name = f"is-test-{TEST_SESSION_ID}-{secrets.token_hex(4)}"
    yield name
    _delete_queue(rabbitmq_url, name)


@pytest.fixture(scope="module")
def module_queue_name(rabbitmq_url: str) -> Iterator[str]:
    """Like `queue_name`, shared by one module's tests, so a platform they share starts once."""
    name = f"is-test-{TEST_SESSION_ID}-{secrets.token_hex(4)}"
    yield name
    _delete_queue(rabbitmq_url, name)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.from_env()
    client.ping()
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_client: docker.DockerClient) -> str:
    docker_client.images.get(BASE_IMAGE)
    return BASE_IMAGE


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (SQLAlchemy URL), dropped after the test."""
    name = f"is_test_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'inference.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request) -> str:
    """Runs a test once against SQLite and once against PostgreSQL."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture(scope="session")
def test_session_id() -> str:
    return TEST_SESSION_ID
