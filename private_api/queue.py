"""Putting task ids on RabbitMQ, after the database commit, with publisher confirms.

The database is the truth and the queue only carries ids, so a publish that fails is not an
error for the caller: the task stays unpublished (published_at NULL) and the outbox loop in
maintenance.py publishes it once the broker is back.

Tasks go to one queue per class, `<queue_name>.cpu` and `<queue_name>.gpu` (TaskQueue), so a
GPU task waiting for a GPU never delays a CPU task, nor the reverse; each message carries the
task's needs as headers (TaskNeeds.to_headers), so a consumer sees whether it fits before it
claims. Messages left on the single queue of earlier versions are not read any more: their
tasks are still pending in the database, and the outbox's republish safety net
(republish_after_s) puts them on the new queues.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from inference_server.backoff import Backoff
from inference_server.capacity import TaskNeeds
from inference_server.contract import (
    CANCEL_EXCHANGE_TYPE,
    MAX_PRIORITY,
    TASK_QUEUE_ARGUMENTS,
    TaskQueue,
    broker_priority,
    cancel_exchange_name,
)

log = logging.getLogger(__name__)

# The three ways a publish goes wrong: the connection is gone (StreamLostError and friends are
# AMQPConnectionError), the channel was closed (e.g. queue deleted, declare refused), or the
# socket failed below pika. Anything else is a bug and propagates.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.StreamLostError,
    pika.exceptions.AMQPChannelError,
    OSError,
)


class TaskPublisher:
    """One lazily (re)connected BlockingConnection, shared by request threads under a lock.

    pika's BlockingConnection is not thread-safe, hence the lock; `keep_alive` must be called
    every few seconds (the maintenance loop does) so broker heartbeats are answered while idle.
    """

    def __init__(
        self,
        url: str,
        queue_name: str,
        *,
        connect_timeout_s: float = 5.0,
        first_backoff_s: float = 0.5,
        max_backoff_s: float = 15.0,
    ) -> None:
        self.queue_name = queue_name
        self.queue_names = {queue: queue.queue_name(queue_name) for queue in TaskQueue}
        self.cancel_exchange = cancel_exchange_name(queue_name)
        self._parameters = pika.URLParameters(url)
        self._parameters.connection_attempts = 1
        self._parameters.socket_timeout = connect_timeout_s
        self._parameters.stack_timeout = connect_timeout_s * 2
        # A broker under a memory alarm blocks publishers; give up rather than hold every submit.
        self._parameters.blocked_connection_timeout = 10
        # No jitter: one publisher per private API process, no crowd of clients to spread out.
        self._backoff = Backoff(max_backoff_s, first_backoff_s, jitter=False)
        self._lock = threading.Lock()
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._retry_at = 0.0
        self.last_error: str | None = None

    # --- connection handling (call with the lock held) -----------------------------------

    def _open_channel(self) -> BlockingChannel | None:
        if self._channel is not None and self._channel.is_open:
            return self._channel
        self._drop()
        if time.monotonic() < self._retry_at:
            return None
        try:
            connection = pika.BlockingConnection(self._parameters)
            try:
                channel = connection.channel()
                for name in self.queue_names.values():
                    channel.queue_declare(name, durable=True, arguments=TASK_QUEUE_ARGUMENTS)
                channel.exchange_declare(self.cancel_exchange, CANCEL_EXCHANGE_TYPE, durable=True)
                channel.confirm_delivery()
            except BaseException:
                connection.close()
                raise
        except BROKER_ERRORS as exc:
            self._note_failure(exc)
            return None
        self._connection, self._channel = connection, channel
        if self._backoff.failures:
            log.info("connected to RabbitMQ again after %d failed attempts", self._backoff.failures)
        self._backoff.reset()
        self._retry_at = 0.0
        self.last_error = None
        return channel

    def _note_failure(self, exc: BaseException) -> None:
        backoff = self._backoff.next()
        self._retry_at = time.monotonic() + backoff
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("RabbitMQ unreachable (%s); next try in %.1fs", self.last_error, backoff)

    def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and connection.is_open:
            # It is being thrown away; a failed goodbye changes nothing.
            with contextlib.suppress(*BROKER_ERRORS):
                connection.close()

    # --- public API -------------------------------------------------------------------------

    @property
    def backing_off(self) -> bool:
        """True while a recent connection failure says not to try yet (no lock: a hint only)."""
        return self._channel is None and time.monotonic() < self._retry_at

    def publish(self, uid: str, *, needs: TaskNeeds, priority: int, retry: bool) -> bool:
        """Put one task id on its class's queue, ahead of the fresh tasks of its priority when it
        is a `retry`; True once the broker confirmed it, False otherwise."""
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            priority=broker_priority(max(0, min(priority, MAX_PRIORITY)), retry=retry),
            content_type="text/plain",
            headers=needs.to_headers(),
        )
        return self._publish(
            f"publishing task {uid}",
            exchange="",
            routing_key=self.queue_names[needs.queue],
            body=uid.encode("utf-8"),
            properties=properties,
            mandatory=True,
        )

    def publish_cancel(self, uid: str) -> bool:
        """Tell every consumer at once that task `uid` was cancelled, so the one running it stops
        its container now rather than at its next heartbeat (which stays the fallback). True
        once the broker took it; False, never an exception, when it did not."""
        # Not mandatory: with no consumer listening nobody runs the task anyway.
        return self._publish(
            f"pushing the cancel of task {uid}",
            exchange=self.cancel_exchange,
            routing_key="",
            body=uid.encode("utf-8"),
            properties=pika.BasicProperties(content_type="text/plain"),
        )

    def _publish(
        self,
        what: str,
        *,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: pika.BasicProperties,
        mandatory: bool = False,
    ) -> bool:
        """basic_publish, True once the broker took it. A connection that died while idle is only
        noticed on use: one retry on a fresh one. Unroutable/nacked (queue deleted under us) or a
        dead connection: reopen, which also re-declares the queues and the exchange."""
        with self._lock:
            for attempt in (1, 2):
                channel = self._open_channel()
                if channel is None:
                    return False
                try:
                    channel.basic_publish(
                        exchange=exchange,
                        routing_key=routing_key,
                        body=body,
                        properties=properties,
                        mandatory=mandatory,
                    )
                    return True
                except BROKER_ERRORS as exc:
                    log.warning("%s failed (attempt %d): %r", what, attempt, exc)
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self._drop()
            return False

    def check(self) -> str | None:
        """None when the broker is reachable, else why not (for the readiness probe)."""
        with self._lock:
            channel = self._open_channel()
            if channel is None:
                return self.last_error or "not connected"
            try:
                self._connection.process_data_events(time_limit=0)  # type: ignore[union-attr]
            except BROKER_ERRORS as exc:
                self._note_failure(exc)
                self._drop()
                return self.last_error
            return None

    def keep_alive(self) -> None:
        """Answer broker heartbeats on an idle connection; notices a dead one early."""
        with self._lock:
            if self._connection is None or not self._connection.is_open:
                return
            try:
                self._connection.process_data_events(time_limit=0)
            except BROKER_ERRORS as exc:
                log.warning("RabbitMQ connection lost while idle: %r", exc)
                self._drop()

    def close(self) -> None:
        with self._lock:
            self._drop()
