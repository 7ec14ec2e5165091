"""The consumer's cancel listener against the real RabbitMQ: a pushed uid reaches the callback."""

from __future__ import annotations

import threading
import time

import pika

from inference_server.contract import cancel_exchange_name
from job_consumer.cancel_listener import CancelListener
from private_api.queue import TaskPublisher
from tests.helpers import wait_until

UID = "a" * 32


def test_a_pushed_cancel_reaches_every_listener_and_stop_ends_it(rabbitmq_url: str, queue_name: str) -> None:
    heard: dict[str, list[str]] = {"first": [], "second": []}
    listeners = [
        CancelListener(rabbitmq_url, queue_name, heard[name].append, backoff_max_s=1.0) for name in heard
    ]
    publisher = TaskPublisher(rabbitmq_url, queue_name)
    try:
        for listener in listeners:
            listener.start()
        for listener in listeners:
            assert listener.listening.wait(10)
        assert publisher.publish_cancel(UID)
        wait_until(lambda: all(heard.values()), 5, "both listeners hearing the cancel", interval=0.02)
        assert heard == {"first": [UID], "second": [UID]}
    finally:
        publisher.close()
        started = time.monotonic()
        for listener in listeners:
            listener.stop()
        assert time.monotonic() - started < 5
    assert not any(thread.name == "cancel-listener" for thread in threading.enumerate())


def test_what_is_not_a_task_uid_is_ignored_and_a_failing_callback_does_not_end_listening(
    rabbitmq_url: str, queue_name: str
) -> None:
    heard: list[str] = []

    def on_cancel(uid: str) -> None:
        heard.append(uid)
        if len(heard) == 1:
            raise RuntimeError("the first one fails")

    listener = CancelListener(rabbitmq_url, queue_name, on_cancel)
    listener.start()
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        assert listener.listening.wait(10)
        channel = connection.channel()
        for body in (b"not a uid!", UID.encode(), ("b" * 32).encode()):
            channel.basic_publish(cancel_exchange_name(queue_name), "", body)
        wait_until(lambda: len(heard) == 2, 5, "two uids heard", interval=0.02)
        assert heard == [UID, "b" * 32]
    finally:
        connection.close()
        listener.stop()
