"""Cancels pushed by the private API: a running task's container is stopped at once.

The private API publishes a cancelled (or deleted) task's uid on the fanout exchange
`cancel_exchange_name(queue base)`; every consumer reads it through an exclusive auto-delete
queue of its own, on a connection of its own in a thread of its own, so the consumer's main
connection (and its loop) is left alone. A uid this consumer does not run is ignored. While the
broker is away nothing is heard here: the task's heartbeat (keep_running false) is the fallback.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pika
import pika.exceptions

from inference_server.backoff import Backoff
from inference_server.contract import CANCEL_EXCHANGE_TYPE, TASK_UID_RE, cancel_exchange_name

log = logging.getLogger(__name__)

# How often the listening thread looks at its stop flag.
TURN_S = 0.5
BROKER_ERRORS: tuple[type[BaseException], ...] = (pika.exceptions.AMQPError, OSError)


class CancelListener:
    """Calls `on_cancel(uid)` from its own thread for every pushed cancel; `start`, then `stop`."""

    def __init__(
        self,
        rabbitmq_url: str,
        queue_base: str,
        on_cancel: Callable[[str], None],
        *,
        heartbeat_s: int = 30,
        backoff_max_s: float = 30.0,
    ) -> None:
        self._parameters = pika.URLParameters(rabbitmq_url)
        if "heartbeat=" not in rabbitmq_url:
            self._parameters.heartbeat = heartbeat_s
        self._exchange = cancel_exchange_name(queue_base)
        self._on_cancel = on_cancel
        self._backoff = Backoff(backoff_max_s)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # Set once a queue is bound: from then on every push reaches this consumer.
        self.listening = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cancel-listener", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=TURN_S * 4)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._listen()
            except BROKER_ERRORS as exc:
                self.listening.clear()
                delay = self._backoff.next()
                log.warning("cancel listener: RabbitMQ connection lost (%r); again in %.1fs", exc, delay)
                self._stopping.wait(delay)

    def _listen(self) -> None:
        connection = pika.BlockingConnection(self._parameters)
        try:
            channel = connection.channel()
            channel.exchange_declare(self._exchange, CANCEL_EXCHANGE_TYPE, durable=True)
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue, self._exchange)
            channel.basic_consume(queue, self._on_message, auto_ack=True)
            self._backoff.reset()
            self.listening.set()
            log.info("cancel listener: listening on exchange %s", self._exchange)
            while not self._stopping.is_set():
                connection.process_data_events(time_limit=TURN_S)
        finally:
            self.listening.clear()
            if connection.is_open:
                try:
                    connection.close()
                except BROKER_ERRORS as exc:
                    log.debug("cancel listener: closing the connection: %r", exc)

    def _on_message(self, _channel: object, _method: object, _properties: object, body: bytes) -> None:
        uid = body.decode("utf-8", errors="replace")
        if not TASK_UID_RE.fullmatch(uid):
            log.warning("cancel listener: ignoring a message that is not a task uid")
            return
        try:
            self._on_cancel(uid)
        except Exception:
            # One bad callback must not end the listening; the heartbeat stays the fallback.
            log.exception("cancel listener: handling the cancel of task %s failed", uid)
