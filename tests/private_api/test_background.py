"""The private API's background loops: lease reaper and outbox, against the real RabbitMQ."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pika
import pytest
from sqlalchemy import update
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from inference_server.contract import FailureCategory, TaskStatus, broker_priority
from private_api import task_lifecycle
from private_api.maintenance import MaintenanceLoop
from private_api.models import Task, utcnow
from private_api.outbox import publish_unpublished
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
    assert properties.priority == broker_priority(5, retry=True)
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
    assert failed.failure == FailureCategory.INFRASTRUCTURE
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
        uid = task_lifecycle.create_task(
            session=session, model_human_readable_id="seg-model", priority=0, input_blob=input_blob
        ).uid
        publisher = client.app.state.publisher
        barrier = threading.Barrier(2)
        results: list[object] = []

        def outbox_round() -> None:
            with client.app.state.session_factory() as own_session:
                barrier.wait()
                results.append(publish_unpublished(session=own_session, publisher=publisher))

        outbox = threading.Thread(target=outbox_round)
        outbox.start()
        barrier.wait()
        results.append(
            task_lifecycle.publish_task(
                session=session, publisher=publisher, policy=client.app.state.scheduling, uid=uid
            )
        )
        outbox.join(30)

    # Exactly one of them sent it: True from the request, or a count of 1 from the outbox.
    assert sorted(map(int, results)) == [0, 1]
    assert queue.get()[0] == uid
    assert queue.count() == 0
    assert task_row(client, uid).published_at is not None


def test_leases_that_lapsed_while_the_api_was_down_are_renewed_not_reaped(start_app, make_settings):
    """After an outage longer than a lease, the reaper first gives consumers one lease to renew."""
    first = start_app(make_settings())
    register_model(first)
    uid = submit_ok(first)["uid"]
    assert claim(first, uid).status_code == 200
    # The private API was away for a long while: the lease lapsed ten seconds ago.
    with first.app.state.session_factory() as session:
        session.execute(
            update(Task).where(Task.uid == uid).values(lease_expires_at=utcnow() - timedelta(seconds=10))
        )
        session.commit()

    grace_s = 3
    client = start_app(make_settings(lease_seconds=grace_s, reaper_interval_s=0.1))
    # Within the grace period another consumer cannot take the task over ...
    taken = claim(client, uid, consumer="consumer-b")
    assert taken.status_code == 409, taken.text
    # ... and its own consumer, heartbeating again, resumes the lease.
    beat = client.post(f"/tasks/{uid}/heartbeat", headers=as_consumer("consumer-a"))
    assert beat.status_code == 200 and beat.json()["keep_running"] is True
    row = task_row(client, uid)
    assert (row.status, row.consumer_id, row.attempts) == (TaskStatus.RUNNING, "consumer-a", 1)
    assert row.lease_expires_at > utcnow()

    # A consumer that never comes back still loses the task, once grace and lease are over.
    requeued = wait_until(
        lambda: (row := task_row(client, uid)).status == TaskStatus.PENDING and row,
        timeout=4 * grace_s + 10,
        what="the reaper to requeue the abandoned task",
    )
    assert requeued.attempts == 1


class SwitchableSessions:
    """A session factory whose database can be switched away and back."""

    def __init__(self, real: sessionmaker) -> None:
        self.real = real
        self.down = False

    def __call__(self):
        if self.down:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database is away"))
        return self.real()


def test_the_reaper_waits_a_grace_period_after_a_database_outage(start_app, make_settings):
    client = start_app(make_settings(lease_seconds=60))
    assert client.app.state.maintenance.leases_enforced is False  # the start-up grace

    sessions = SwitchableSessions(client.app.state.session_factory)
    grace_s = 1.0
    loop = MaintenanceLoop(
        session_factory=sessions,
        publisher=client.app.state.publisher,
        max_attempts=3,
        reaper_interval_s=3600,
        outbox_interval_s=3600,
        lease_grace_s=grace_s,
    )
    assert loop.leases_enforced is True  # not started: no start-up grace
    sessions.down = True
    with pytest.raises(SQLAlchemyError):
        loop.reap_once()
    assert loop.leases_enforced is False  # nothing is reaped while the database is away
    sessions.down = False
    assert loop.reap_once() == 0  # back: this round only starts the grace
    assert loop.leases_enforced is False
    wait_until(lambda: loop.leases_enforced, timeout=grace_s + 10, what="the grace period to end")
