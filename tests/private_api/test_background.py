"""The private API's background loops: lease reaper and outbox, against the real RabbitMQ."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pika
import pytest

from inference_server.contract import TaskStatus
from private_api import service
from tests.private_api.helpers import (
    as_consumer,
    claim,
    make_zip,
    register_model,
    submit_ok,
    task_row,
    wait_until,
)


def test_expired_lease_goes_back_to_pending_and_is_republished(start_app, make_settings, queue):
    client = start_app(make_settings(lease_seconds=1, reaper_interval_s=0.1, max_attempts=2))
    register_model(client)
    uid = submit_ok(client, priority=5)["uid"]
    assert queue.get()[0] == uid
    assert claim(client, uid).status_code == 200

    # consumer-a "dies": no heartbeat, so the lease runs out and the reaper takes the task back.
    wait_until(lambda: task_row(client, uid).status == TaskStatus.PENDING, what="the reaper to requeue")

    body, properties = queue.get()
    assert body == uid
    assert properties.priority == 5
    # Marked published just after the broker confirmed, so possibly a moment after we got it.
    row = wait_until(lambda: (row := task_row(client, uid)).published_at and row, what="published_at")
    assert row.consumer_id is None
    assert client.post(f"/tasks/{uid}/heartbeat", headers=as_consumer("consumer-a")).status_code == 409

    # Second and last attempt also abandoned: now the task fails instead of looping forever.
    assert claim(client, uid, consumer="consumer-b").json()["task"]["attempts"] == 2
    failed = wait_until(
        lambda: (row := task_row(client, uid)).status == TaskStatus.FAILED and row, what="the reaper to fail"
    )
    assert "stopped renewing its lease" in failed.error
    assert "consumer-b" in failed.error
    assert queue.count() == 0


def test_heartbeats_keep_the_reaper_away(start_app, make_settings):
    client = start_app(make_settings(lease_seconds=1, reaper_interval_s=0.1))
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)
    first_lease = task_row(client, uid).lease_expires_at
    # A consumer beating every 0.3 s across ~2 lease lengths: the reaper must never take the task.
    # (The pause is the consumer's heartbeat interval, the behaviour under test, not a wait.)
    for _ in range(6):
        beat = client.post(f"/tasks/{uid}/heartbeat", headers=as_consumer("consumer-a"))
        assert beat.json()["keep_running"] is True
        time.sleep(0.3)
        assert task_row(client, uid).status == TaskStatus.RUNNING
    assert task_row(client, uid).lease_expires_at > first_lease


class PortForwarder:
    """A TCP port that refuses connections until `open()`, then forwards them to the broker:
    the private API sees RabbitMQ "down" and then "back", without touching the shared broker."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            self._spawn(self._pipe, client, upstream)
            self._spawn(self._pipe, upstream, client)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept
            self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pipe threads blocked in recv
            sock.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def forwarder(rabbitmq_url: str) -> Iterator[PortForwarder]:
    broker = pika.URLParameters(rabbitmq_url)
    forwarder = PortForwarder((broker.host, broker.port))
    yield forwarder
    forwarder.close()


def test_outbox_publishes_tasks_accepted_while_rabbitmq_was_unreachable(
    forwarder, rabbitmq_url, start_app, make_settings, queue
):
    # `forwarder` comes first so it is torn down last, after the app closed its connection.
    credentials = pika.URLParameters(rabbitmq_url).credentials
    url = f"amqp://{credentials.username}:{credentials.password}@127.0.0.1:{forwarder.port}/%2F"
    client = start_app(make_settings(rabbitmq_url=url, outbox_interval_s=0.2))
    register_model(client)

    uids = [submit_ok(client, priority=p)["uid"] for p in (1, 8)]

    assert client.get("/health/ready").status_code == 503
    assert all(task_row(client, uid).status == TaskStatus.PENDING for uid in uids)
    assert queue.count() == 0

    forwarder.open()  # RabbitMQ is "back"

    wait_until(
        lambda: all(task_row(client, uid).published_at is not None for uid in uids),
        timeout=20,
        what="the outbox to publish",
    )
    # Published in priority order, and consumed that way thanks to x-max-priority.
    assert [queue.get()[0], queue.get()[0]] == [uids[1], uids[0]]
    assert client.get("/health/ready").status_code == 200


def test_long_waiting_task_is_published_again_in_case_the_broker_lost_it(start_app, make_settings, queue):
    client = start_app(make_settings(outbox_interval_s=0.1, republish_after_s=2))
    register_model(client)
    waiting = submit_ok(client)["uid"]
    running = submit_ok(client)["uid"]
    claim(client, running)
    first_publish = task_row(client, waiting).published_at
    # Every message is consumed and "lost" at once; the still-pending task must come back.
    seen: list[str] = []
    wait_until(
        lambda: seen.append(queue.get()[0]) or seen.count(waiting) >= 2, timeout=15, what="a republish"
    )

    assert seen.count(running) == 1  # only its original message: a running task is not republished
    assert task_row(client, waiting).published_at > first_publish
    assert task_row(client, running).status == TaskStatus.RUNNING


def test_request_and_outbox_never_both_publish_a_task(client, queue):
    register_model(client)
    with client.app.state.session_factory() as session:
        input_blob = client.app.state.blobs.save([make_zip()], "inputs", suffix=".zip")
        uid = service.create_task(
            session=session, model_human_readable_id="seg-model", priority=0, input_blob=input_blob
        ).uid
        publisher = client.app.state.publisher
        barrier = threading.Barrier(2)
        results: list[object] = []

        def outbox_round() -> None:
            with client.app.state.session_factory() as own_session:
                barrier.wait()
                results.append(service.publish_unpublished(session=own_session, publisher=publisher))

        outbox = threading.Thread(target=outbox_round)
        outbox.start()
        barrier.wait()
        results.append(service.publish_task(session=session, publisher=publisher, uid=uid))
        outbox.join(30)

    # Exactly one of them sent it: True from the request, or a count of 1 from the outbox.
    assert sorted(map(int, results)) == [0, 1]
    assert queue.get()[0] == uid
    assert queue.count() == 0
    assert task_row(client, uid).published_at is not None
