"""The real parts every other test relies on, as scripts/setup.sh leaves them."""

from __future__ import annotations

import contextlib
import secrets
import uuid

import docker
import pika
import psycopg
import pytest

from tests.conftest import POSTGRES_ADMIN_DSN


@pytest.mark.docker
def test_docker_runs_base_image_with_bind_mount_and_no_network(docker_client, base_image, tmp_path):
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "hello.txt").write_text("from the host")
    (tmp_path / "output").mkdir(mode=0o777)
    (tmp_path / "output").chmod(0o777)
    script = (
        "cat /input/hello.txt > /output/copy.txt; "
        "ls /sys/class/net > /output/interfaces.txt; "
        "python3 -c 'import sys; print(sys.version_info[0])' > /output/python.txt"
    )
    name = f"is-infra-{uuid.uuid4().hex[:8]}"
    try:
        container = docker_client.containers.run(
            base_image,
            ["sh", "-c", script],
            name=name,
            network_mode="none",
            volumes={
                str(tmp_path / "input"): {"bind": "/input", "mode": "ro"},
                str(tmp_path / "output"): {"bind": "/output", "mode": "rw"},
            },
            detach=True,
        )
        result = container.wait(timeout=60)
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.containers.get(name).remove(force=True)
    assert result["StatusCode"] == 0
    assert (tmp_path / "output" / "copy.txt").read_text() == "from the host"
    assert (tmp_path / "output" / "interfaces.txt").read_text().split() == ["lo"]
    assert (tmp_path / "output" / "python.txt").read_text().strip() == "3"


@pytest.mark.docker
def test_base_image_input_mount_is_read_only(docker_client, base_image, tmp_path):
    output = docker_client.containers.run(
        base_image,
        ["sh", "-c", "touch /input/x 2>&1 || echo refused"],
        network_mode="none",
        volumes={str(tmp_path): {"bind": "/input", "mode": "ro"}},
        remove=True,
    )
    assert b"refused" in output
    assert not (tmp_path / "x").exists()


def test_rabbitmq_keeps_a_persistent_message_on_a_durable_queue(rabbitmq_url, queue_name):
    body = secrets.token_hex(16).encode()
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare(queue_name, durable=True)
        channel.basic_publish(
            "", queue_name, body, pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
        )
    finally:
        connection.close()

    # A second connection sees it: the message lives in the broker, not in the client.
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        channel = connection.channel()
        declared = channel.queue_declare(queue_name, durable=True, passive=True)
        assert declared.method.message_count == 1
        method, properties, received = channel.basic_get(queue_name, auto_ack=False)
        assert received == body
        assert properties.delivery_mode == pika.DeliveryMode.Persistent.value
        channel.basic_ack(method.delivery_tag)
    finally:
        connection.close()


def test_postgresql_accepts_a_connection_and_a_transaction():
    with psycopg.connect(POSTGRES_ADMIN_DSN) as connection:
        row = connection.execute("select current_user, version()").fetchone()
    assert row is not None
    assert row[0] == "inference_test"
    assert row[1].startswith("PostgreSQL")


def test_postgres_url_fixture_gives_an_empty_database(postgres_url):
    from sqlalchemy import create_engine, inspect

    engine = create_engine(postgres_url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
