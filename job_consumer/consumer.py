"""The consumer loop: take task ids from RabbitMQ, claim them, run them, report back.

Threads: the calling thread owns the pika connection (pika is not thread-safe) and, while a
task runs, keeps both heartbeats going - RabbitMQ's, by processing data events, and the task
lease's, by calling the private API. One worker thread runs the task itself and never touches
pika. The queue message is acked right after a successful claim: from then on the lease, not
the broker, guards the task, so a task may run far longer than RabbitMQ's consumer timeout.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import NoReturn, TypeVar

import docker
import docker.errors
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from inference_server.contract import TASK_QUEUE_ARGUMENTS, TASK_UID_RE, TaskClaim, TaskFailure
from inference_server.zipsafe import UnsafeZipError, directory_size, make_inert, zip_directory
from job_consumer.config import ConsumerSettings
from job_consumer.private_client import PrivateApiClient, PrivateApiHttpError, PrivateApiUnavailable
from job_consumer.runner import ModelRunError, ModelRunner, RunResult
from job_consumer.workspace import (
    ModelCache,
    ModelZipMismatch,
    TaskWorkspace,
    make_private_dir,
    owned_task_dirs,
    remove_owned,
)

log = logging.getLogger(__name__)

LOG_PREFIX = "[inference-server]"
ERROR_TAIL_LINES = 20
ERROR_TAIL_CHARS = 4000
# At most this many removed special files are named in a task's log.
INERT_NOTE_LINES = 20
T = TypeVar("T")


class StopReason(StrEnum):
    SHUTDOWN = "shutdown"  # second SIGTERM: stop now and give the task back to the queue
    CANCELLED = "cancelled"  # the private API says the task was cancelled or deleted
    LEASE_LOST = "lease_lost"  # another consumer holds the task now; our results are void


class ConsumerConfigError(RuntimeError):
    """A set-up error reconnecting cannot fix (credentials, a queue declared differently)."""


class _TaskError(Exception):
    def __init__(self, message: str, *, retryable: bool, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.exit_code = exit_code


class ActiveTask:
    """The task in hand. Its stop flag is a plain attribute: signal handlers set it."""

    def __init__(self, claim: TaskClaim) -> None:
        self.claim = claim
        self.uid = claim.task.uid
        self.stop_reason: StopReason | None = None
        # Its work folder, once made: the sweep must leave it alone.
        self.workspace: TaskWorkspace | None = None

    def stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def should_stop(self) -> bool:
        return self.stop_reason is not None


class _Backoff:
    def __init__(self, cap_s: float, first_s: float = 0.5) -> None:
        self.cap_s = cap_s
        self.first_s = first_s
        self._current = 0.0

    def next(self) -> float:
        self._current = min(self.cap_s, self._current * 2 if self._current else self.first_s)
        # Jitter, so consumers that lost the broker together do not all come back in step.
        return self._current * random.uniform(0.75, 1.0)

    def reset(self) -> None:
        self._current = 0.0


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
        self.models = ModelCache(self.work_dir, settings.consumer_id, settings.zip_limits)
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
        self._api_backoff = _Backoff(settings.reconnect_backoff_max_s)
        self._next_cleanup = 0.0

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

    def _scrub(self, text: str) -> str:
        """Task errors and logs go to users: no host paths in them (work dir, task folders)."""
        for path in {str(self.work_dir), os.path.realpath(self.work_dir)}:
            text = text.replace(path, "<work dir>")
        return text

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
        backoff = _Backoff(self.settings.reconnect_backoff_max_s)
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

    def _on_message(self, _channel: BlockingChannel, method, _properties, body: bytes) -> None:
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
            elif time.monotonic() >= self._next_cleanup:
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

    # --- one task ------------------------------------------------------------------------------

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
                    self._heartbeat(task)
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

    def _heartbeat(self, task: ActiveTask) -> None:
        if task.stop_reason in (StopReason.CANCELLED, StopReason.LEASE_LOST):
            return
        try:
            reply = self.api.heartbeat(task.uid)
        except PrivateApiUnavailable as exc:
            # The lease outlives a few missed beats; if it does lapse, the next beat says so (409).
            log.warning("task %s: heartbeat failed (%s)", task.uid, exc)
            return
        except PrivateApiHttpError as exc:
            if exc.is_conflict:
                log.warning("task %s: lease lost (%s); stopping the container", task.uid, exc.detail)
                task.stop(StopReason.LEASE_LOST)
            else:
                log.warning("task %s: heartbeat refused (%s)", task.uid, exc)
            return
        except Exception:
            # The task runs on in its own thread; the next beat tries again.
            log.exception("task %s: heartbeat failed unexpectedly", task.uid)
            return
        if not reply.keep_running:
            log.info("task %s: %s by the private API; stopping the container", task.uid, reply.status)
            task.stop(StopReason.CANCELLED)

    def _work(self, task: ActiveTask) -> None:
        """Worker thread: everything for one task. No exception leaves this function."""
        workspace: TaskWorkspace | None = None
        try:
            workspace = TaskWorkspace.create(
                self.work_dir, task.uid, self.settings.consumer_id, attempt=task.claim.task.attempts
            )
            task.workspace = workspace
            self._execute(task, workspace)
        except _TaskError as exc:
            self._report_failure(task, str(exc), retryable=exc.retryable, exit_code=exc.exit_code)
        except PrivateApiUnavailable as exc:
            log.error(
                "task %s: private API unreachable (%s); the lease reaper will requeue it", task.uid, exc
            )
        except Exception as exc:
            # Whatever it was, it ends this task only: the reason goes to the task (host paths
            # scrubbed by _report_failure), the consumer takes the next one.
            log.exception("task %s: unexpected consumer error", task.uid)
            self._report_failure(task, f"consumer error: {type(exc).__name__}: {exc}", retryable=True)
        finally:
            if workspace is not None:
                try:
                    workspace.remove()
                except Exception as exc:  # owned, so the periodic sweep tries again
                    log.warning("task %s: could not remove %s yet: %r", task.uid, workspace.root, exc)
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

    def _execute(self, task: ActiveTask, workspace: TaskWorkspace) -> None:
        model = task.claim.model
        if task.should_stop():
            self._finish_stopped(task)
            return
        try:
            self._with_retry(task, lambda: self.api.download_input(task.uid, workspace.input_zip))
            workspace.unpack_input(self.settings.zip_limits)
        except UnsafeZipError as exc:
            raise _TaskError(f"input zip refused: {exc}", retryable=False) from exc
        except PrivateApiHttpError as exc:
            self._raise_for_download(task, "input", exc)
        model_dir = self._model_dir(task, workspace) if model.model_available else None

        if task.should_stop():
            self._finish_stopped(task)
            return
        try:
            result = self.runner.run(
                task_uid=task.uid,
                model=model,
                input_dir=workspace.input_dir,
                output_dir=workspace.output_dir,
                model_dir=model_dir,
                should_stop=task.should_stop,
            )
        except ModelRunError as exc:
            self._upload_logs(task, f"{LOG_PREFIX} {exc}\n")
            raise _TaskError(str(exc), retryable=exc.retryable) from exc
        # Before anything on the host reads the output: only regular files and folders, no
        # setuid/setgid bits. The model has exited; nothing changes the folder any more.
        inert_error: OSError | None = None
        removed: list[str] = []
        try:
            removed = make_inert(workspace.output_dir)
        except OSError as exc:
            inert_error = exc
        log.info(
            "task %s: container done in %.1fs (exit %s%s%s%s)",
            task.uid,
            result.duration_s,
            result.exit_code,
            ", timed out" if result.timed_out else "",
            ", out of memory" if result.oom_killed else "",
            ", stopped" if result.cancelled else "",
        )
        self._upload_logs(task, self._compose_logs(task, result) + _removed_note(removed))
        # A shutdown request that came after the model exited does not void its result.
        if result.cancelled or task.stop_reason in (StopReason.CANCELLED, StopReason.LEASE_LOST):
            self._finish_stopped(task)
            return
        if result.output_too_large:
            raise self._output_too_large(result.exit_code)
        if result.timed_out:
            raise _TaskError(
                f"timeout: the model ran longer than its {result.limits.timeout_s} s limit and was killed",
                retryable=False,
                exit_code=result.exit_code,
            )
        if result.oom_killed:
            raise _TaskError(
                f"out of memory: the model went over its {result.limits.memory_mb} MB limit and was killed"
                f" (exit code {result.exit_code})",
                retryable=False,
                exit_code=result.exit_code,
            )
        if result.exit_code != 0:
            raise _TaskError(
                f"model exited with code {result.exit_code}; last log lines:\n{_tail(result.logs)}",
                retryable=False,
                exit_code=result.exit_code,
            )
        if inert_error is not None:
            raise _TaskError(f"could not check /output: {_os_reason(inert_error)}", retryable=False)
        limit = self.settings.max_output_bytes
        try:
            if directory_size(workspace.output_dir, stop_above=limit) > limit:
                raise self._output_too_large()
            files = zip_directory(workspace.output_dir, workspace.output_zip, self.settings.output_zip_limits)
        except UnsafeZipError as exc:
            raise _TaskError(f"output refused: /output cannot be zipped: {exc}", retryable=False) from exc
        except OSError as exc:
            raise _TaskError(f"could not zip /output: {_os_reason(exc)}", retryable=True) from exc
        try:
            self._with_retry(task, lambda: self.api.upload_output(task.uid, workspace.output_zip))
        except PrivateApiHttpError as exc:
            if exc.is_conflict:
                log.warning("task %s: output not accepted (%s); discarded", task.uid, exc.detail)
                return
            raise _TaskError(f"output refused by the private API: {exc.detail}", retryable=False) from exc
        log.info("task %s: finished, %d output file(s) uploaded", task.uid, files)

    def _output_too_large(self, exit_code: int | None = None) -> _TaskError:
        return _TaskError(
            f"output too large: the model wrote more than {self.settings.max_output_bytes} bytes to "
            "/output (the consumer's IS_MAX_OUTPUT_BYTES) and was stopped",
            retryable=False,
            exit_code=exit_code,
        )

    def _model_dir(self, task: ActiveTask, workspace: TaskWorkspace) -> Path:
        model = task.claim.model

        def fetch(dest: Path) -> str:
            return self._with_retry(task, lambda: self.api.download_model_zip(model.human_readable_id, dest))

        try:
            if model.model_zip_sha256:
                return self.models.get(model.model_zip_sha256, fetch)
            fetch(workspace.model_zip)
            return self.models.unpack_uncached(workspace.model_zip, workspace.root / "model")
        except UnsafeZipError as exc:
            raise _TaskError(
                f"model zip of {model.human_readable_id!r} refused: {exc}", retryable=False
            ) from exc
        except ModelZipMismatch as exc:
            raise _TaskError(str(exc), retryable=True) from exc
        except PrivateApiHttpError as exc:
            self._raise_for_download(task, f"model zip of {model.human_readable_id!r}", exc)

    def _raise_for_download(self, task: ActiveTask, what: str, exc: PrivateApiHttpError) -> NoReturn:
        if exc.is_conflict:
            task.stop(StopReason.LEASE_LOST)
        raise _TaskError(
            f"could not download the {what}: {exc.detail}", retryable=exc.status_code != 404
        ) from exc

    def _finish_stopped(self, task: ActiveTask) -> None:
        if task.stop_reason == StopReason.SHUTDOWN:
            try:
                self._with_retry(
                    task,
                    lambda: self.api.release(task.uid, f"consumer {self.settings.consumer_id} shut down"),
                )
                log.info("task %s: released back to the queue", task.uid)
            except PrivateApiHttpError as exc:
                log.warning("task %s: release refused (%s)", task.uid, exc)
        elif task.stop_reason == StopReason.CANCELLED:
            log.info("task %s: stopped because it was cancelled", task.uid)
        else:
            log.warning("task %s: stopped because another consumer holds its lease", task.uid)

    def _report_failure(
        self, task: ActiveTask, error: str, *, retryable: bool, exit_code: int | None = None
    ) -> None:
        if task.stop_reason == StopReason.LEASE_LOST:
            log.warning("task %s: failed (%s) but the lease is lost; not reporting", task.uid, error)
            return
        error = self._scrub(error)
        log.warning("task %s: failed: %s", task.uid, error.splitlines()[0] if error else "")
        failure = TaskFailure(error=error[:20_000], exit_code=exit_code, retryable=retryable)
        try:
            self._with_retry(task, lambda: self.api.fail(task.uid, failure))
        except PrivateApiHttpError as exc:
            log.warning("task %s: failure report refused (%s)", task.uid, exc)
        except PrivateApiUnavailable as exc:
            log.error(
                "task %s: could not report the failure (%s); the lease reaper will retry it", task.uid, exc
            )

    def _upload_logs(self, task: ActiveTask, text: str) -> None:
        text = self._scrub(text)
        try:
            self._with_retry(task, lambda: self.api.upload_logs(task.uid, text))
        except PrivateApiHttpError as exc:
            log.info("task %s: logs not accepted (%s)", task.uid, exc.detail)
        except PrivateApiUnavailable as exc:
            log.warning("task %s: logs not uploaded (%s)", task.uid, exc)

    def _with_retry(self, task: ActiveTask, call: Callable[[], T]) -> T:
        """Retry a private API call while the API is unreachable, up to IS_REPORT_RETRY_S."""
        budget = 5.0 if self._stop_now else self.settings.report_retry_s
        deadline = time.monotonic() + budget
        backoff = _Backoff(min(10.0, self.settings.reconnect_backoff_max_s))
        while True:
            try:
                return call()
            except PrivateApiUnavailable as exc:
                delay = backoff.next()
                if task.stop_reason == StopReason.LEASE_LOST or time.monotonic() + delay > deadline:
                    raise
                log.warning("task %s: private API unavailable (%s); retrying in %.1fs", task.uid, exc, delay)
                time.sleep(delay)

    def _compose_logs(self, task: ActiveTask, result: RunResult) -> str:
        logs = result.logs
        encoded = logs.encode("utf-8", errors="replace")
        if len(encoded) > self.settings.max_log_bytes:
            cut = len(encoded) - self.settings.max_log_bytes
            logs = f"{LOG_PREFIX} log truncated: the first {cut} bytes were dropped\n" + encoded[cut:].decode(
                "utf-8", errors="replace"
            )
        notes = []
        if result.timed_out:
            notes.append(f"killed after the {result.limits.timeout_s} s timeout")
        if result.oom_killed:
            notes.append(f"killed: out of memory (limit {result.limits.memory_mb} MB)")
        if result.cancelled:
            notes.append(f"stopped ({task.stop_reason or 'stop requested'})")
        notes.append(f"exit code {result.exit_code}, ran {result.duration_s:.1f} s")
        if logs and not logs.endswith("\n"):
            logs += "\n"
        return logs + "".join(f"{LOG_PREFIX} {note}\n" for note in notes)

    # --- housekeeping ----------------------------------------------------------------------------

    def _cleanup(self) -> None:
        """Remove what a crash of this consumer left: labelled containers, work dirs, temp dirs.

        Never fatal, at start-up neither: whatever cannot be removed now is logged and tried
        again at the next sweep, and the consumer goes on serving tasks meanwhile."""
        self._next_cleanup = time.monotonic() + self.settings.cleanup_interval_s
        keep_uid, keep_dir = self.current_task_uid, self.current_workspace
        try:
            removed = self.runner.remove_leftovers(keep_task_uid=keep_uid)
            if removed:
                log.info("removed %d leftover container(s)", removed)
        except Exception as exc:
            log.warning("could not remove leftover containers: %r", exc)
        try:
            folders = owned_task_dirs(self.work_dir, self.settings.consumer_id)
        except Exception as exc:
            log.warning("could not list the work dir %s: %r", self.work_dir, exc)
            folders = []
        for folder in folders:
            if folder == keep_dir:
                continue
            try:
                remove_owned(folder)
                log.info("removed stale work dir %s", folder)
            except Exception as exc:
                log.warning("could not remove stale work dir %s yet: %r", folder, exc)
        try:
            self.models.remove_own_temp_dirs()
        except Exception as exc:
            log.warning("could not remove stale model temp dirs yet: %r", exc)
        idle_days = self.settings.model_cache_max_idle_days
        if idle_days > 0:
            try:
                pruned = self.models.prune(idle_days * 86400)
                if pruned:
                    log.info("removed %d unpacked model(s) unused for %g days", pruned, idle_days)
            except Exception as exc:
                log.warning("could not prune the model cache yet: %r", exc)


def _os_reason(exc: OSError) -> str:
    """An OSError without the host path it names (names relative to a folder are kept)."""
    name = exc.filename if isinstance(exc.filename, str) and not exc.filename.startswith("/") else None
    reason = exc.strerror or type(exc).__name__
    return f"{reason} ({name!r})" if name else reason


def _removed_note(removed: list[str]) -> str:
    if not removed:
        return ""
    shown = [entry[:300] for entry in removed[:INERT_NOTE_LINES]]
    more = f" and {len(removed) - len(shown)} more" if len(removed) > len(shown) else ""
    return (
        f"{LOG_PREFIX} removed {len(removed)} file(s) from /output that are not regular files or folders "
        f"(only those are returned){more}:\n" + "".join(f"{LOG_PREFIX}   {entry}\n" for entry in shown)
    )


def _tail(logs: str) -> str:
    lines = logs.rstrip("\n").splitlines()[-ERROR_TAIL_LINES:]
    return "\n".join(lines)[-ERROR_TAIL_CHARS:]
