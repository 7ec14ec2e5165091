"""The consumer's AMQP session and loop: take task ids from RabbitMQ, claim them, hand each to
its worker thread (task_execution.py), and sweep up while idle (housekeeping.py).

Threads: the calling thread owns the pika connection (pika is not thread-safe) and, while a
task runs, keeps both heartbeats going - RabbitMQ's, by processing data events, and the task
lease's, by calling the private API. One worker thread runs the task itself and never touches
pika. The queue message is acked right after a successful claim: from then on the lease, not
the broker, guards the task, so a task may run far longer than RabbitMQ's consumer timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import docker
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from inference_server.backoff import Backoff
from inference_server.contract import TASK_QUEUE_ARGUMENTS, TASK_UID_RE, TaskClaim
from job_consumer.active_task import ActiveTask, StopReason
from job_consumer.config import ConsumerSettings
from job_consumer.housekeeping import Housekeeper
from job_consumer.private_client import PrivateApiClient, PrivateApiHttpError, PrivateApiUnavailable
from job_consumer.runner import ModelRunner
from job_consumer.task_execution import TaskExecutor
from job_consumer.workspace import ModelCache, make_private_dir

log = logging.getLogger(__name__)


class ConsumerConfigError(RuntimeError):
    """A set-up error reconnecting cannot fix (credentials, a queue declared differently)."""


class Consumer:
    """One consumer: one queue subscription, one task at a time, one (optional) GPU."""

    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        max_tasks: int | None = None,
        docker_client: docker.DockerClient | None = None,
        api: PrivateApiClient | None = None,
    ) -> None:
        self.settings = settings
        self.max_tasks = max_tasks
        self.work_dir = settings.resolved_work_dir
        self._owns_api = api is None
        self.api = api or PrivateApiClient.from_settings(settings)
        self._owns_docker = docker_client is None
        self.docker = docker_client or docker.from_env()
        self.runner = ModelRunner(self.docker, settings, remove_in_background=True)
        self.models = ModelCache(self.work_dir, settings.consumer_id, settings.input_zip_limits)
        self.executor = TaskExecutor(
            settings,
            api=self.api,
            runner=self.runner,
            models=self.models,
            stopping_now=lambda: self._stop_now,
        )
        self.housekeeper = Housekeeper(settings, runner=self.runner, models=self.models)
        self.tasks_run = 0
        # Plain attributes, not Events: they are set from signal handlers, where taking a lock
        # the interrupted code may hold would deadlock.
        self._stop_requested = False
        self._stop_now = False
        self._current: ActiveTask | None = None
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._consumer_tag: str | None = None
        self._connection_lost = False
        self._deliveries: list[tuple[int, bytes]] = []
        self._api_backoff = Backoff(settings.reconnect_backoff_max_s)

    # --- control ---------------------------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @property
    def current_task_uid(self) -> str | None:
        task = self._current
        return task.uid if task else None

    @property
    def current_workspace(self) -> Path | None:
        task = self._current
        workspace = task.workspace if task else None
        return workspace.root if workspace else None

    def request_stop(self, now: bool = False) -> None:
        """now=False: finish the current task, then exit. now=True: stop it and hand it back."""
        self._stop_requested = True
        if now:
            self._stop_now = True
            task = self._current
            if task is not None:
                task.stop(StopReason.SHUTDOWN)

    def _should_exit(self) -> bool:
        if self._stop_requested:
            return True
        return self.max_tasks is not None and self.tasks_run >= self.max_tasks

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Consume until asked to stop (or until max_tasks tasks ran); returns the tasks run."""
        log.info(
            "consumer %s starting: queue %r, private API %s, GPU %s, work dir %s",
            self.settings.consumer_id,
            self.settings.queue_name,
            self.settings.private_api_url,
            self.settings.gpu or "none",
            self.work_dir,
        )
        make_private_dir(self.work_dir)
        self._cleanup()
        backoff = Backoff(self.settings.reconnect_backoff_max_s)
        try:
            while not self._should_exit():
                try:
                    self._connect()
                    backoff.reset()
                    self._consume()
                except pika.exceptions.ConnectionClosedByBroker as exc:
                    log.warning(
                        "RabbitMQ closed the connection (%s %s); reconnecting", exc.reply_code, exc.reply_text
                    )
                except pika.exceptions.AMQPChannelError as exc:
                    log.warning("RabbitMQ channel error (%r); reconnecting", exc)
                except (
                    pika.exceptions.ProbableAuthenticationError,
                    pika.exceptions.ProbableAccessDeniedError,
                ) as exc:
                    raise ConsumerConfigError(f"RabbitMQ refused the credentials: {exc!r}") from exc
                except pika.exceptions.AMQPConnectionError as exc:
                    log.warning("RabbitMQ connection failed or lost (%r); reconnecting", exc)
                finally:
                    self._disconnect()
                if not self._should_exit():
                    self._pause(backoff.next())
        finally:
            self.runner.close()
            if self._owns_api:
                self.api.close()
            if self._owns_docker:
                self.docker.close()
        log.info("consumer %s stopped after %d task(s)", self.settings.consumer_id, self.tasks_run)
        return self.tasks_run

    def _connect(self) -> None:
        params = pika.URLParameters(self.settings.rabbitmq_url)
        if "heartbeat=" not in self.settings.rabbitmq_url:
            # Heartbeats flow only while we process data events; the loop does so every second.
            params.heartbeat = self.settings.amqp_heartbeat_s
        self._connection = pika.BlockingConnection(params)
        self._connection_lost = False
        channel = self._connection.channel()
        # One unacked message at most: long tasks must not hoard messages other consumers could run.
        channel.basic_qos(prefetch_count=1)
        try:
            channel.queue_declare(self.settings.queue_name, durable=True, arguments=TASK_QUEUE_ARGUMENTS)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code in (403, 406):
                raise ConsumerConfigError(
                    f"cannot declare queue {self.settings.queue_name!r}: {exc.reply_text}"
                ) from exc
            raise
        self._channel = channel
        self._start_consuming()
        log.info("connected to RabbitMQ; consuming %r", self.settings.queue_name)

    def _start_consuming(self) -> None:
        assert self._channel is not None
        self._consumer_tag = self._channel.basic_consume(
            self.settings.queue_name, on_message_callback=self._on_message, auto_ack=False
        )

    def _on_message(
        self,
        _channel: BlockingChannel,
        method: pika.spec.Basic.Deliver,
        _properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        # Handled by the loop, not in this callback, so the long work never nests in pika's dispatch.
        self._deliveries.append((method.delivery_tag, body))

    def _disconnect(self) -> None:
        channel, connection = self._channel, self._connection
        self._channel = self._connection = None
        self._consumer_tag = None
        deliveries, self._deliveries = self._deliveries, []
        try:
            if channel is not None and channel.is_open:
                for tag, _ in deliveries:
                    channel.basic_nack(tag, requeue=True)
            if connection is not None and connection.is_open:
                connection.close()
        except pika.exceptions.AMQPError as exc:
            # Unacked messages go back to the queue when the connection dies anyway.
            log.debug("closing the RabbitMQ connection: %r", exc)

    def _consume(self) -> None:
        while not self._should_exit():
            if self._connection is None or self._connection_lost:
                raise pika.exceptions.AMQPConnectionError("connection lost while a task ran")
            self._connection.process_data_events(time_limit=1)
            if self._deliveries:
                tag, body = self._deliveries.pop(0)
                self._handle_delivery(tag, body)
            elif self.housekeeper.due:
                self._cleanup()

    def _pause(self, seconds: float) -> None:
        """Wait, keeping the connection serviced and staying responsive to stop requests."""
        deadline = time.monotonic() + seconds
        while not self._stop_requested and (left := deadline - time.monotonic()) > 0:
            if self._connection is not None and self._connection.is_open and not self._connection_lost:
                self._connection.process_data_events(time_limit=min(1.0, left))
            else:
                time.sleep(min(0.5, left))

    def _handle_delivery(self, tag: int, body: bytes) -> None:
        assert self._channel is not None
        if self._stop_requested:
            # Arrived while we were told to stop: leave it to another consumer.
            self._channel.basic_nack(tag, requeue=True)
            return
        uid = body.decode("utf-8", errors="replace").strip()
        if not TASK_UID_RE.match(uid):
            log.error("dropping a queue message that is not a task uid: %r", body[:100])
            self._channel.basic_ack(tag)
            return
        try:
            claim = self.api.claim(uid)
        except PrivateApiUnavailable as exc:
            log.warning("task %s: private API unavailable (%s); message requeued", uid, exc)
            self._channel.basic_nack(tag, requeue=True)
            self._pause(self._api_backoff.next())
            return
        except PrivateApiHttpError as exc:
            if exc.status_code in (401, 403) or exc.status_code >= 500:
                # Our token or the API is wrong right now; the task itself may be fine.
                log.error("task %s: claim refused (%s); message requeued", uid, exc)
                self._channel.basic_nack(tag, requeue=True)
                self._pause(self._api_backoff.next())
            else:
                log.error("task %s: claim answered %s; dropping the message", uid, exc)
                self._channel.basic_ack(tag)
            return
        except Exception:
            # A reply we cannot read: the task may be fine, and if the claim did go through, the
            # lease reaper hands it on. This consumer stays up either way.
            log.exception("task %s: claim failed unexpectedly; message requeued", uid)
            self._channel.basic_nack(tag, requeue=True)
            self._pause(self._api_backoff.next())
            return
        self._api_backoff.reset()
        if claim is None:
            self._channel.basic_ack(tag)
            return
        # Stop consuming before the ack, so the prefetch slot it frees is not filled with a
        # message that would wait behind this task instead of going to an idle consumer.
        if self._consumer_tag is not None:
            self._channel.basic_cancel(self._consumer_tag)
            self._consumer_tag = None
        self._channel.basic_ack(tag)
        try:
            self._run_task(claim)
        finally:
            self.tasks_run += 1
        if not self._should_exit() and not self._connection_lost:
            self._start_consuming()

    # --- the task in hand: its worker thread, both heartbeats ------------------------------

    def _run_task(self, claim: TaskClaim) -> None:
        task = ActiveTask(claim)
        log.info(
            "task %s: claimed (model %s, attempt %d)",
            task.uid,
            claim.model.human_readable_id,
            claim.task.attempts,
        )
        self._current = task
        if self._stop_now:
            task.stop(StopReason.SHUTDOWN)
        worker = threading.Thread(target=self._work, args=(task,), name=f"task-{task.uid}", daemon=True)
        worker.start()
        interval = self.settings.heartbeat_interval_s
        next_heartbeat = time.monotonic() + interval
        try:
            while worker.is_alive():
                self._tick(max(0.05, min(1.0, next_heartbeat - time.monotonic())), worker)
                if self._stop_now:
                    task.stop(StopReason.SHUTDOWN)
                if time.monotonic() >= next_heartbeat and worker.is_alive():
                    self.executor.heartbeat(task)
                    next_heartbeat = time.monotonic() + interval
        finally:
            self._current = None

    def _tick(self, seconds: float, worker: threading.Thread) -> None:
        if self._connection is not None and not self._connection_lost:
            try:
                self._connection.process_data_events(time_limit=seconds)
                return
            except pika.exceptions.AMQPError as exc:
                # The task was acked already; it runs on and we reconnect once it is done.
                log.warning("RabbitMQ connection lost while task runs (%r)", exc)
                self._connection_lost = True
        worker.join(seconds)

    def _work(self, task: ActiveTask) -> None:
        """The task's worker thread: the task itself, then a word to the connection thread."""
        try:
            self.executor.work(task)
        finally:
            self._wake_connection_thread()

    def _wake_connection_thread(self) -> None:
        """End the connection thread's wait in process_data_events now that the task is done,
        instead of up to a second later, so the next message is taken at once."""
        connection = self._connection
        if connection is None or self._connection_lost:
            return
        try:
            connection.add_callback_threadsafe(lambda: None)
        except (pika.exceptions.AMQPError, RuntimeError) as exc:
            log.debug("could not wake the connection thread: %r", exc)

    # --- housekeeping ----------------------------------------------------------------------------

    def _cleanup(self) -> None:
        self.housekeeper.sweep(keep_task_uid=self.current_task_uid, keep_dir=self.current_workspace)
