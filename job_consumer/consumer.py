"""The consumer's AMQP session and loop: take task ids from the GPU and CPU queues, claim those
that fit, hand each to a worker thread of its own (task_execution.py), keep the registry told
(registry_presence.py), and sweep up (housekeeping.py).

Threads: the calling thread owns the pika connection (pika is not thread-safe) and keeps every
heartbeat going - RabbitMQ's, by processing data events, each running task's lease and the
consumer's registry entry, by calling the private API. One worker thread per task runs it and
never touches pika. A message is acked right after a successful claim: from then on the lease,
not the broker, guards the task, so a task may run far longer than RabbitMQ's consumer timeout.

Packing: a message carries its task's needs in its headers (inference_server/capacity.py), so
the consumer knows before the claim whether the task fits. Each queue it serves is consumed
with a prefetch of one while any room is left. A task that fits beside the running ones is
claimed at once. One that fits only when others have ended is held, unacked, with its own
queue's subscription paused until they make room, so nothing of its kind overtakes it here and
priority and FIFO order hold. The other queue goes on being served, so a held GPU task never
delays a CPU task on a GPU consumer that takes both, nor the reverse. Held longer than
IS_HOLD_LIMIT_S, it goes back to the queue for another consumer.
One this consumer could never run goes back at once, and its queue is left alone for
IS_UNFIT_QUEUE_PAUSE_S (the private API publishes no task that no consumer can run, so this
is a mixed fleet's rare case).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from inference_server.backoff import Backoff
from inference_server.capacity import Capacity, TaskNeeds
from inference_server.contract import (
    CLAIM_REFUSED_DRAINING,
    TASK_QUEUE_ARGUMENTS,
    TASK_UID_RE,
    ConsumerRegistration,
    TaskQueue,
)
from job_consumer.active_task import ActiveTask, StopReason
from job_consumer.cancel_listener import CancelListener
from job_consumer.capacity_probe import probe_capacity
from job_consumer.config import ConsumerSettings
from job_consumer.container_runtime import ContainerRuntime, runtime_named
from job_consumer.housekeeping import Housekeeper
from job_consumer.prepared_containers import PreparedContainers
from job_consumer.private_client import PrivateApiClient, PrivateApiHttpError, PrivateApiUnavailable
from job_consumer.registry_presence import RegistryPresence
from job_consumer.runner import ModelRunner
from job_consumer.task_execution import TaskExecutor
from job_consumer.workspace import ModelCache, make_private_dir

log = logging.getLogger(__name__)

# The smallest task each queue could bring: room for it is room for something, so the queue is
# worth consuming.
SMALLEST_TASK = {
    TaskQueue.GPU: TaskNeeds(gpu=True, gpu_memory_mb=1),
    TaskQueue.CPU: TaskNeeds(gpu=False, memory_mb=1),
}
# Longest wait in one turn of the loop: stop requests and timers are looked at this often.
TURN_S = 1.0


class ConsumerConfigError(RuntimeError):
    """A set-up error reconnecting cannot fix (credentials, a queue declared differently)."""


@dataclass
class _Delivery:
    """A message in hand, not yet acked."""

    queue: TaskQueue
    tag: int
    body: bytes
    headers: Mapping[str, Any] | None
    received_at: float = field(default_factory=time.monotonic)

    @property
    def uid(self) -> str:
        return self.body.decode("utf-8", errors="replace").strip()

    @property
    def needs(self) -> TaskNeeds:
        # A message without (readable) needs is taken to want the whole consumer; the claim
        # tells the truth later.
        return TaskNeeds.from_headers(self.headers) or TaskNeeds(gpu=self.queue is TaskQueue.GPU)


@dataclass
class _Subscription:
    queue: TaskQueue
    name: str
    consumer_tag: str | None = None
    # Until then the queue is left alone: it delivered a task this consumer can never run.
    paused_until: float = 0.0
    # Until then (or until a running task ends) the queue is left alone: a task held from it
    # went back after the hold limit, and taking it again at once would only hold it again.
    resume_at: float = 0.0


@dataclass
class _Running:
    task: ActiveTask
    worker: threading.Thread
    next_heartbeat: float


class Consumer:
    """One consumer: one (optional) GPU, its queues, as many tasks at once as fit."""

    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        max_tasks: int | None = None,
        runtime: ContainerRuntime | None = None,
        api: PrivateApiClient | None = None,
        registration: ConsumerRegistration | None = None,
    ) -> None:
        self.settings = settings
        self.max_tasks = max_tasks
        self.work_dir = settings.resolved_work_dir
        # First, before any connection is made: a consumer that cannot say what it has
        # (a GPU NVML cannot read) refuses to start (CapacityProbeError).
        self.registration = registration or probe_capacity(settings)
        self.capacity = Capacity.of_registration(self.registration)
        self._owns_api = api is None
        self.api = api or PrivateApiClient.from_settings(settings)
        # A runtime handed in is the caller's to stop; one made here (a Podman service it may
        # start) is stopped when run() ends.
        self._owns_runtime = runtime is None
        self.runtime = runtime or runtime_named(
            settings.container_runtime,
            podman_url=settings.podman_url,
            work_dir=self.work_dir,
            allow_unenforced_limits=settings.allow_unenforced_limits,
        )
        self.runtime.start()
        self.runner = ModelRunner(self.runtime, settings, remove_in_background=True)
        self.models = ModelCache(self.work_dir, settings.consumer_id, settings.input_zip_limits)
        self.prepared = (
            PreparedContainers(
                settings,
                runner=self.runner,
                models=self.models,
                list_models=self.api.list_models,
                runs=lambda model: self.capacity.never_fits(TaskNeeds.of_model(model)) is None,
                stopping=self._should_exit,
            )
            if settings.prepare_containers
            else None
        )
        self.executor = TaskExecutor(
            settings,
            api=self.api,
            runner=self.runner,
            models=self.models,
            stopping_now=lambda: self._stop_now,
            prepared=self.prepared,
        )
        self.housekeeper = Housekeeper(
            settings, runner=self.runner, models=self.models, prepared=self.prepared
        )
        self.presence = RegistryPresence(
            self.api,
            self.registration,
            interval_s=settings.heartbeat_interval_s,
            backoff_max_s=settings.reconnect_backoff_max_s,
        )
        self.subscriptions = [
            _Subscription(queue, queue.queue_name(settings.queue_name))
            for queue, served in (
                (TaskQueue.GPU, self.capacity.takes_gpu_tasks),
                (TaskQueue.CPU, self.capacity.takes_cpu_tasks),
            )
            if served
        ]
        self.tasks_run = 0
        self.tasks_started = 0
        # Plain attributes, not Events: they are set from signal handlers, where taking a lock
        # the interrupted code may hold would deadlock.
        self._stop_requested = False
        self._stop_now = False
        # Replaced whole, never changed in place: other threads and signal handlers read it.
        self._running: dict[str, _Running] = {}
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._deliveries: list[_Delivery] = []
        # At most one task per queue waits here for room (see the module docstring).
        self._held: dict[TaskQueue, _Delivery] = {}
        # Claims wait until then after the private API failed one.
        self._claims_paused_until = 0.0
        self._reconnect_at = 0.0
        self._api_backoff = Backoff(settings.reconnect_backoff_max_s)
        self._wake = threading.Event()
        self._fatal: ConsumerConfigError | None = None
        # Cancels pushed by the private API stop a running task at once (heartbeats: fallback).
        self.cancel_listener = CancelListener(
            settings.rabbitmq_url,
            settings.queue_name,
            self._cancel_pushed,
            heartbeat_s=settings.amqp_heartbeat_s,
            backoff_max_s=settings.reconnect_backoff_max_s,
        )

    # --- control ---------------------------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @property
    def draining(self) -> bool:
        return self.presence.draining

    @property
    def queue_names(self) -> list[str]:
        return [subscription.name for subscription in self.subscriptions]

    @property
    def current_task_uids(self) -> set[str]:
        return set(self._running)

    def request_stop(self, now: bool = False) -> None:
        """now=False: finish the running tasks, then exit. now=True: stop them and hand them back."""
        self._stop_requested = True
        if now:
            self._stop_now = True
            for running in self._running.values():
                running.task.stop(StopReason.SHUTDOWN)

    def _should_exit(self) -> bool:
        if self._stop_requested:
            return True
        return self.max_tasks is not None and self.tasks_started >= self.max_tasks

    def _taking_work(self) -> bool:
        return (
            not self._should_exit()
            and not self.presence.draining
            and time.monotonic() >= self._claims_paused_until
        )

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Consume until asked to stop (or until max_tasks tasks ran); returns the tasks run."""
        log.info(
            "consumer %s starting: queues %s, private API %s, GPU %s, %g CPUs, %d MiB, up to %d task(s), "
            "work dir %s",
            self.settings.consumer_id,
            ", ".join(self.queue_names),
            self.settings.private_api_url,
            self._describe_gpu(),
            self.capacity.cpus,
            self.capacity.memory_mb,
            self.capacity.tasks,
            self.work_dir,
        )
        make_private_dir(self.work_dir)
        self._cleanup()
        if self.prepared is not None:
            self.prepared.start()
        self.cancel_listener.start()
        self.presence.beat([])
        backoff = Backoff(self.settings.reconnect_backoff_max_s)
        try:
            while not (self._should_exit() and not self._running):
                reconnect_due = time.monotonic() >= self._reconnect_at
                if self._connection is None and not self._should_exit() and reconnect_due:
                    self._try_connect(backoff)
                try:
                    self._turn()
                except pika.exceptions.AMQPError as exc:
                    # Running tasks were acked already; they run on, and we reconnect meanwhile.
                    log.warning("RabbitMQ connection lost (%r); reconnecting", exc)
                    self._disconnect()
                    self._reconnect_at = time.monotonic() + backoff.next()
        finally:
            self._disconnect()
            self.cancel_listener.stop()
            if self.prepared is not None:
                self.prepared.close()
            self.runner.close()
            if self._owns_api:
                self.api.close()
            if self._owns_runtime:
                self.runtime.stop()
        log.info("consumer %s stopped after %d task(s)", self.settings.consumer_id, self.tasks_run)
        if self._fatal is not None:
            raise self._fatal
        return self.tasks_run

    def _describe_gpu(self) -> str:
        gpu = self.registration.gpus[0] if self.registration.gpus else None
        if gpu is None:
            return "none"
        return f"{gpu.index} ({gpu.uuid}, {gpu.memory_total_mb} MiB{', simulated' if gpu.simulated else ''})"

    def _try_connect(self, backoff: Backoff) -> None:
        try:
            self._connect()
            backoff.reset()
        except (
            pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.ProbableAccessDeniedError,
        ) as exc:
            self._disconnect()
            self._give_up(ConsumerConfigError(f"RabbitMQ refused the credentials: {exc!r}"))
        except ConsumerConfigError as exc:
            self._disconnect()
            self._give_up(exc)
        except pika.exceptions.AMQPError as exc:
            log.warning("RabbitMQ connection failed (%r); reconnecting", exc)
            self._disconnect()
            self._reconnect_at = time.monotonic() + backoff.next()

    def _give_up(self, error: ConsumerConfigError) -> None:
        """Reconnecting cannot help: take nothing more, let running tasks finish, then raise."""
        if self._running:
            log.error("%s; finishing the %d running task(s) first", error, len(self._running))
        self._fatal = error
        self._stop_requested = True

    def _connect(self) -> None:
        params = pika.URLParameters(self.settings.rabbitmq_url)
        if "heartbeat=" not in self.settings.rabbitmq_url:
            # Heartbeats flow only while we process data events; the loop does so every second.
            params.heartbeat = self.settings.amqp_heartbeat_s
        self._connection = pika.BlockingConnection(params)
        channel = self._connection.channel()
        # One unacked message per subscription: long tasks must not hoard messages other
        # consumers could run, and a message that does not fit yet waits alone.
        channel.basic_qos(prefetch_count=1)
        for subscription in self.subscriptions:
            try:
                channel.queue_declare(subscription.name, durable=True, arguments=TASK_QUEUE_ARGUMENTS)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code in (403, 406):
                    raise ConsumerConfigError(
                        f"cannot declare queue {subscription.name!r}: {exc.reply_text}"
                    ) from exc
                raise
        self._channel = channel
        log.info("connected to RabbitMQ; serving %s", ", ".join(self.queue_names))
        self._update_subscriptions()

    def _disconnect(self) -> None:
        channel, connection = self._channel, self._connection
        self._channel = self._connection = None
        for subscription in self.subscriptions:
            subscription.consumer_tag = None
        unacked = self._deliveries + list(self._held.values())
        self._deliveries, self._held = [], {}
        try:
            if channel is not None and channel.is_open:
                for delivery in unacked:
                    channel.basic_nack(delivery.tag, requeue=True)
            if connection is not None and connection.is_open:
                connection.close()
        except pika.exceptions.AMQPError as exc:
            # Unacked messages go back to the queue when the connection dies anyway.
            log.debug("closing the RabbitMQ connection: %r", exc)

    def _turn(self) -> None:
        """One turn of the loop: wait for a message or a timer, then do what is due."""
        self._wait(self._seconds_to_wait())
        self._reap_finished()
        if self._stop_now:
            for running in self._running.values():
                running.task.stop(StopReason.SHUTDOWN)
        self._heartbeat_leases()
        if self.presence.due:
            self.presence.beat(sorted(self._running))
        self._handle_held()
        while self._deliveries:
            self._handle_delivery(self._deliveries.pop(0))
        self._update_subscriptions()
        if self.housekeeper.due:
            self._cleanup()

    def _seconds_to_wait(self) -> float:
        if self._deliveries:
            return 0.0
        now = time.monotonic()
        due = [now + TURN_S, now + self.presence.seconds_to_next_beat]
        due += [running.next_heartbeat for running in self._running.values()]
        return max(0.05, min(due) - now)

    def _wait(self, seconds: float) -> None:
        if self._connection is not None:
            self._connection.process_data_events(time_limit=seconds)
        else:
            self._wake.wait(seconds)
            self._wake.clear()

    def _on_message(
        self,
        queue: TaskQueue,
        _channel: BlockingChannel,
        method: pika.spec.Basic.Deliver,
        properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        # Handled by the loop, not in this callback, so the long work never nests in pika's dispatch.
        self._deliveries.append(_Delivery(queue, method.delivery_tag, body, properties.headers))

    # --- subscriptions -------------------------------------------------------------------------

    def _update_subscriptions(self) -> None:
        """Consume a queue exactly while a task from it could be taken now."""
        channel = self._channel
        if channel is None:
            return
        for subscription in self.subscriptions:
            wanted = self._wants(subscription)
            if wanted and subscription.consumer_tag is None:
                subscription.consumer_tag = channel.basic_consume(
                    subscription.name,
                    on_message_callback=partial(self._on_message, subscription.queue),
                    auto_ack=False,
                )
            elif not wanted and subscription.consumer_tag is not None:
                channel.basic_cancel(subscription.consumer_tag)
                subscription.consumer_tag = None

    def _wants(self, subscription: _Subscription) -> bool:
        now = time.monotonic()
        return (
            self._taking_work()
            and subscription.queue not in self._held
            and now >= subscription.resume_at
            and now >= subscription.paused_until
            and self._capacity_now().fits_now(SMALLEST_TASK[subscription.queue])
        )

    def _capacity_now(self) -> Capacity:
        return dataclasses.replace(
            self.capacity, running=[running.task.needs for running in self._running.values()]
        )

    # --- messages: hold, hand back, claim ----------------------------------------------------

    def _handle_held(self) -> None:
        for queue, held in list(self._held.items()):
            if not self._taking_work():
                del self._held[queue]
                self._nack(held)
            elif self._capacity_now().fits_now(held.needs):
                del self._held[queue]
                self._claim(held)
            elif time.monotonic() - held.received_at >= self.settings.hold_limit_s:
                log.info(
                    "task %s: no room for it here after %gs; handed back to %s",
                    held.uid,
                    self.settings.hold_limit_s,
                    queue.queue_name(self.settings.queue_name),
                )
                del self._held[queue]
                self._nack(held)
                self._subscription(queue).resume_at = time.monotonic() + self.settings.hold_limit_s

    def _handle_delivery(self, delivery: _Delivery) -> None:
        if not self._taking_work() or delivery.queue in self._held:
            # Stopping, draining, or a task of its queue waits for room first: leave it there.
            self._nack(delivery)
            return
        if not TASK_UID_RE.match(delivery.uid):
            log.error("dropping a queue message that is not a task uid: %r", delivery.body[:100])
            self._ack(delivery)
            return
        needs = delivery.needs
        why_never = self.capacity.never_fits(needs)
        if why_never is not None:
            subscription = self._subscription(delivery.queue)
            log.warning(
                "task %s %s, which consumer %s can never give; handed back, and %s left alone for %gs",
                delivery.uid,
                why_never,
                self.settings.consumer_id,
                subscription.name,
                self.settings.unfit_queue_pause_s,
            )
            self._nack(delivery)
            subscription.paused_until = time.monotonic() + self.settings.unfit_queue_pause_s
        elif self._capacity_now().fits_now(needs):
            self._claim(delivery)
        else:
            log.info("task %s: held until the running tasks leave room for it", delivery.uid)
            self._held[delivery.queue] = delivery
            self._update_subscriptions()

    def _subscription(self, queue: TaskQueue) -> _Subscription:
        return next(subscription for subscription in self.subscriptions if subscription.queue is queue)

    def _claim(self, delivery: _Delivery) -> None:
        uid = delivery.uid
        try:
            claim = self.api.claim(uid)
        except PrivateApiUnavailable as exc:
            log.warning("task %s: private API unavailable (%s); message requeued", uid, exc)
            self._claim_failed(delivery)
            return
        except PrivateApiHttpError as exc:
            if exc.status_code == CLAIM_REFUSED_DRAINING:
                # Drained before our next registry heartbeat said so: stop taking work now.
                log.info("task %s: handed back, this consumer is draining (%s)", uid, exc.detail)
                self.presence.follow_drain()
                self._nack(delivery)
                self._update_subscriptions()
            elif exc.status_code in (401, 403) or exc.status_code >= 500:
                # Our token or the API is wrong right now; the task itself may be fine.
                log.error("task %s: claim refused (%s); message requeued", uid, exc)
                self._claim_failed(delivery)
            else:
                log.error("task %s: claim answered %s; dropping the message", uid, exc)
                self._ack(delivery)
            return
        except Exception:
            # A reply we cannot read: the task may be fine, and if the claim did go through, the
            # lease reaper hands it on. This consumer stays up either way.
            log.exception("task %s: claim failed unexpectedly; message requeued", uid)
            self._claim_failed(delivery)
            return
        self._api_backoff.reset()
        if claim is None:
            self._ack(delivery)
            return
        task = ActiveTask(claim)
        capacity = self._capacity_now()
        why_not = capacity.never_fits(task.needs) or (
            None if capacity.fits_now(task.needs) else "does not fit beside the tasks running here"
        )
        if why_not is not None:
            # The model changed since the task was published: give it back to be published anew.
            self._ack(delivery)
            self._release(task, f"task {why_not} (consumer {self.settings.consumer_id})")
            return
        self._start(task)
        # Subscriptions without room left are cancelled before the ack frees their prefetch
        # slot, so no message comes here to wait behind this task instead of going elsewhere.
        self._update_subscriptions()
        self._ack(delivery)

    def _claim_failed(self, delivery: _Delivery) -> None:
        self._nack(delivery)
        self._claims_paused_until = time.monotonic() + self._api_backoff.next()

    def _release(self, task: ActiveTask, reason: str) -> None:
        log.warning("task %s: %s; releasing it", task.uid, reason)
        try:
            self.api.release(task.uid, reason)
        except Exception as exc:
            # Its lease runs out and the reaper hands it on.
            log.warning("task %s: could not release it (%s)", task.uid, exc)

    def _ack(self, delivery: _Delivery) -> None:
        if self._channel is not None:
            self._channel.basic_ack(delivery.tag)

    def _nack(self, delivery: _Delivery) -> None:
        if self._channel is not None:
            self._channel.basic_nack(delivery.tag, requeue=True)

    # --- running tasks: worker threads, lease heartbeats ------------------------------------

    def _start(self, task: ActiveTask) -> None:
        log.info(
            "task %s: claimed (model %s, attempt %d; %d task(s) running here now)",
            task.uid,
            task.claim.model.human_readable_id,
            task.claim.task.attempts,
            len(self._running) + 1,
        )
        if self._stop_now:
            task.stop(StopReason.SHUTDOWN)
        worker = threading.Thread(target=self._work, args=(task,), name=f"task-{task.uid}", daemon=True)
        next_heartbeat = time.monotonic() + self.settings.heartbeat_interval_s
        self._running = {**self._running, task.uid: _Running(task, worker, next_heartbeat)}
        self.tasks_started += 1
        worker.start()

    def _cancel_pushed(self, uid: str) -> None:
        """From the cancel listener's thread: stop the task's container now if it runs here."""
        running = self._running.get(uid)
        if running is not None:
            log.info("task %s: cancelled (pushed by the private API); stopping the container", uid)
            running.task.stop(StopReason.CANCELLED)

    def _reap_finished(self) -> None:
        finished = [uid for uid, running in self._running.items() if not running.worker.is_alive()]
        if not finished:
            return
        self._running = {uid: running for uid, running in self._running.items() if uid not in finished}
        self.tasks_run += len(finished)
        # Room was made: a queue paused after a hand-back may be served again.
        for subscription in self.subscriptions:
            subscription.resume_at = 0.0

    def _heartbeat_leases(self) -> None:
        for running in self._running.values():
            if time.monotonic() >= running.next_heartbeat and running.worker.is_alive():
                self.executor.heartbeat(running.task)
                running.next_heartbeat = time.monotonic() + self.settings.heartbeat_interval_s

    def _work(self, task: ActiveTask) -> None:
        """A task's worker thread: the task itself, then a word to the connection thread."""
        try:
            self.executor.work(task)
        finally:
            self._wake_connection_thread()

    def _wake_connection_thread(self) -> None:
        """End the connection thread's wait now that a task is done, instead of up to a second
        later, so its room is used at once."""
        self._wake.set()
        connection = self._connection
        if connection is None:
            return
        try:
            connection.add_callback_threadsafe(lambda: None)
        except (pika.exceptions.AMQPError, RuntimeError) as exc:
            log.debug("could not wake the connection thread: %r", exc)

    # --- housekeeping ----------------------------------------------------------------------------

    def _cleanup(self) -> None:
        self.housekeeper.sweep(keep_task_uids=self.current_task_uids)
