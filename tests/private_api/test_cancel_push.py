"""A cancel or delete of a task that ran is pushed on the cancel exchange, for its consumer to stop
it at once; a broker that is away never fails the cancel."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pika
import pytest
from fastapi.testclient import TestClient

from inference_server.contract import CANCEL_EXCHANGE_TYPE, TaskStatus, cancel_exchange_name
from tests.private_api.helpers import claim, register_model, submit_ok


class CancelProbe:
    """A queue of its own bound to the cancel exchange, as each consumer's listener has."""

    def __init__(self, rabbitmq_url: str, queue_base: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
        self.channel = self.connection.channel()
        exchange = cancel_exchange_name(queue_base)
        self.channel.exchange_declare(exchange, CANCEL_EXCHANGE_TYPE, durable=True)
        self.queue = self.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.channel.queue_bind(self.queue, exchange)

    def received(self, timeout_s: float = 5.0) -> list[str]:
        """What came in until nothing more arrives for a moment (or `timeout_s` in all)."""
        uids: list[str] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _method, _properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if body is None:
                if uids:
                    break
                time.sleep(0.05)
                continue
            uids.append(body.decode())
        return uids

    def close(self) -> None:
        self.connection.close()


@pytest.fixture
def cancels(rabbitmq_url: str, queue_name: str) -> Iterator[CancelProbe]:
    probe = CancelProbe(rabbitmq_url, queue_name)
    yield probe
    probe.close()


def test_cancelling_a_running_task_pushes_its_uid(client: TestClient, cancels: CancelProbe) -> None:
    register_model(client)
    uid = submit_ok(client)["uid"]
    assert claim(client, uid).status_code == 200
    response = client.post(f"/tasks/{uid}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == TaskStatus.CANCELLED
    assert cancels.received() == [uid]


def test_deleting_a_running_task_pushes_its_uid(client: TestClient, cancels: CancelProbe) -> None:
    register_model(client)
    uid = submit_ok(client)["uid"]
    assert claim(client, uid).status_code == 200
    assert client.delete(f"/tasks/{uid}").status_code == 200
    assert cancels.received() == [uid]


def test_cancelling_a_task_that_never_ran_pushes_nothing(client: TestClient, cancels: CancelProbe) -> None:
    register_model(client)
    uid = submit_ok(client)["uid"]
    assert client.post(f"/tasks/{uid}/cancel").json()["status"] == TaskStatus.CANCELLED
    assert cancels.received(timeout_s=1.0) == []


def test_a_broker_that_is_away_never_fails_the_cancel(start_app, make_settings) -> None:
    client = start_app(make_settings())
    register_model(client)
    uid = submit_ok(client)["uid"]
    assert claim(client, uid).status_code == 200
    # The broker goes away after the task was published: the cancel's push has nowhere to go.
    client.app.state.publisher._parameters = pika.URLParameters("amqp://guest:guest@127.0.0.1:1/%2F")  # type: ignore[attr-defined]
    client.app.state.publisher.close()  # type: ignore[attr-defined]
    response = client.post(f"/tasks/{uid}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == TaskStatus.CANCELLED
