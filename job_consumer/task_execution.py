"""Running one claimed task: download and unpack, run the model, judge the run, report back.

Everything here runs on the task's worker thread, except `heartbeat`, which the connection
thread calls while the task runs; nothing here touches pika.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import NoReturn, TypeVar

from inference_server.backoff import Backoff
from inference_server.contract import OUTPUT_LOG_MAX_BYTES, FailureCategory, RunTimes, TaskFailure
from inference_server.file_trees import directory_size, make_inert
from inference_server.zipsafe import UnsafeZipError, ZipLimits, zip_directory
from job_consumer.active_task import ActiveTask, StopReason
from job_consumer.config import ConsumerSettings
from job_consumer.image_pull import ImagePuller, ImagePullError, puller_for
from job_consumer.live_logs import LiveLog, LogRefused
from job_consumer.prepared_containers import PreparedContainer, PreparedContainers
from job_consumer.private_client import PrivateApiClient, PrivateApiHttpError, PrivateApiUnavailable
from job_consumer.progress import Progress, latest_progress
from job_consumer.runner import ModelRunError, ModelRunner, RunResult
from job_consumer.verdict import Failed, Stopped, output_too_large, run_error, verdict_for
from job_consumer.workspace import ModelCache, ModelZipMismatch, TaskWorkspace

log = logging.getLogger(__name__)

LOG_PREFIX = "[inference-server]"
# At most this many removed special files are named in a task's log.
INERT_NOTE_LINES = 20
T = TypeVar("T")


class _TaskError(Exception):
    """The task failed; `run_times` are the model container's, when it ran before the failure."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        exit_code: int | None = None,
        category: FailureCategory = FailureCategory.INFRASTRUCTURE,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.exit_code = exit_code
        self.category = category
        self.run_times = RunTimes()

    @classmethod
    def of(cls, failure: Failed) -> _TaskError:
        return cls(
            failure.reason,
            retryable=failure.retryable,
            exit_code=failure.exit_code,
            category=failure.category,
        )


class TaskExecutor:
    """Runs a consumer's tasks, each on its own worker thread: its settings, private API client,
    runner and models are shared by all of them.

    `stopping_now` says whether the consumer was told to stop at once: reports then get only a
    few seconds to reach an unreachable API, so shutting down is not held up for minutes.
    """

    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        api: PrivateApiClient,
        runner: ModelRunner,
        models: ModelCache,
        stopping_now: Callable[[], bool],
        prepared: PreparedContainers | None = None,
    ) -> None:
        self.settings = settings
        self.work_dir = settings.resolved_work_dir
        self.api = api
        self.runner = runner
        self.models = models
        self._stopping_now = stopping_now
        self.prepared = prepared
        # Tasks the result cache answered, no container run; worker threads count them.
        self.cache_hits = 0
        self._counts_lock = threading.Lock()

    def work(self, task: ActiveTask) -> None:
        """Everything for one task, on its worker thread. No exception leaves this function."""
        workspace: TaskWorkspace | None = None
        try:
            workspace = TaskWorkspace.create(
                self.work_dir, task.uid, self.settings.consumer_id, attempt=task.claim.task.attempts
            )
            task.workspace = workspace
            self._execute(task, workspace)
        except _TaskError as exc:
            self._report_failure(
                task,
                str(exc),
                retryable=exc.retryable,
                exit_code=exc.exit_code,
                run_times=exc.run_times,
                category=exc.category,
            )
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
            if self.prepared is not None:
                # The answer has gone out: the model's next container is prepared meanwhile.
                self.prepared.task_done(task.claim.model)

    def _image_puller(self) -> ImagePuller:
        settings = self.settings
        return puller_for(
            self.runner.runtime.client,
            settings.model_registry,
            settings.registry_username,
            settings.registry_password_file,
        )

    def heartbeat(self, task: ActiveTask) -> None:
        """Renew the task's lease; stop the task when it was cancelled or the lease is lost."""
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

    def _execute(self, task: ActiveTask, workspace: TaskWorkspace) -> None:
        model = task.claim.model
        if task.stop_reason is not None:
            self._finish_stopped(task, task.stop_reason)
            return
        try:
            self._image_puller().ensure(model.container_tag)
        except ImagePullError as exc:
            raise _TaskError(
                str(exc), retryable=exc.retryable, category=FailureCategory.IMAGE_MISSING
            ) from exc
        # For a cacheable model the image is resolved to its ID once, asked about, and then run
        # by that ID: a tag rebuilt in between cannot make the run differ from what was asked.
        image: str | None = None
        if model.cacheable:
            image = self.runner.image_id(model.container_tag)
            if image is not None and self._answered_from_cache(task, image):
                return
        if task.stop_reason is not None:
            self._finish_stopped(task, task.stop_reason)
            return
        params = task.claim.task.params
        params_file = workspace.write_params(params) if params is not None else None
        # Reserved before the download, so that a container created for this task is created
        # while the input downloads.
        reservation = self._reserve_container(task, workspace, params_file, image)
        prepared: PreparedContainer | None = None
        try:
            try:
                self._with_retry(task, lambda: self.api.download_input(task.uid, workspace.input_zip))
                workspace.unpack_input(self._input_limits(task))
            except UnsafeZipError as exc:
                raise _TaskError(f"input zip refused: {exc}", retryable=False) from exc
            except PrivateApiHttpError as exc:
                self._raise_for_download(task, "input", exc)
            model_dir = self._mounted_model_dir(task, workspace)
            prepared = self._prepared_container(reservation, task, model_dir, params_file)
            reservation = None
            if task.stop_reason is not None:
                if prepared is not None and self.prepared is not None:
                    self.prepared.discard(prepared)
                    prepared = None
                self._finish_stopped(task, task.stop_reason)
                return
            if prepared is not None and self.prepared is not None:
                if self.prepared.hand_over(prepared, task.uid, workspace):
                    image = prepared.image_id
                else:
                    self.prepared.discard(prepared)
                    prepared = None
            # The runner owns the container from here on (it removes it, started or not).
            self._run_and_conclude(task, workspace, model_dir, params_file, image, prepared)
        finally:
            if reservation is not None:
                self._discard_reservation(reservation)
            if prepared is not None and self.prepared is not None:
                self.prepared.release_slot(prepared)

    def _reserve_container(
        self, task: ActiveTask, workspace: TaskWorkspace, params_file: Path | None, image: str | None
    ) -> Future[PreparedContainer | None] | None:
        """The container this task starts instead of creating one after its download (see
        prepared_containers); none for a model_from task, whose /model is its own download."""
        if self.prepared is None or task.claim.task.model_from is not None:
            return None
        return self.prepared.reserve(task.uid, task.claim.model, image, workspace, params_file)

    def _prepared_container(
        self,
        reservation: Future[PreparedContainer | None] | None,
        task: ActiveTask,
        model_dir: Path | None,
        params_file: Path | None,
    ) -> PreparedContainer | None:
        if reservation is None or self.prepared is None:
            return None
        try:
            prepared = reservation.result()
        except Exception:
            log.exception("task %s: no prepared container; creating one", task.uid)
            return None
        if prepared is None:
            return None
        fits = self.prepared.fits(prepared, task.uid, task.claim.model, model_dir, params_file)
        if task.stop_reason is not None or not fits:
            self.prepared.discard(prepared)
            return None
        return prepared

    def _discard_reservation(self, reservation: Future[PreparedContainer | None]) -> None:
        """A task that ended before its run: what was reserved for it goes."""
        assert self.prepared is not None
        try:
            prepared = reservation.result()
        except Exception:
            return
        if prepared is not None:
            self.prepared.discard(prepared)

    def _run_and_conclude(
        self,
        task: ActiveTask,
        workspace: TaskWorkspace,
        model_dir: Path | None,
        params_file: Path | None,
        image: str | None,
        prepared: PreparedContainer | None,
    ) -> None:
        model = task.claim.model
        live_log = self._live_log(task)
        # A container started ahead sees its slot's folders (the input was moved there).
        input_dir = (prepared.run_input_dir if prepared is not None else None) or workspace.input_dir
        output_dir = (prepared.run_output_dir if prepared is not None else None) or workspace.output_dir
        try:
            result = self.runner.run(
                task_uid=task.uid,
                model=model,
                input_dir=input_dir,
                output_dir=output_dir,
                model_dir=model_dir,
                params_file=params_file,
                image=image,
                should_stop=task.should_stop,
                on_output=live_log.feed,
                prepared=prepared.container if prepared is not None else None,
                gate=prepared.gate if prepared is not None else None,
            )
            if prepared is not None:
                PreparedContainers.collect_output(prepared, workspace)
        except ModelRunError as exc:
            live_log.stop()
            # What the model printed before the run was lost stays, above why.
            printed = live_log.text()
            if printed and not printed.endswith("\n"):
                printed += "\n"
            self._upload_logs(task, f"{printed}{LOG_PREFIX} {exc}\n", live_log.progress)
            raise _TaskError.of(run_error(exc)) from exc
        finally:
            # Nothing live may land after the final log, which replaces it.
            live_log.stop()
        try:
            self._conclude(task, workspace, result)
        except _TaskError as exc:
            # Whatever failed after the run, the container did run: the platform records when.
            exc.run_times = result.run_times
            raise

    def _conclude(self, task: ActiveTask, workspace: TaskWorkspace, result: RunResult) -> None:
        """Judge a run and report it: its log, then its output or why it failed."""
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
        # The progress too: a line printed just before the exit may not have been shipped live.
        final_log = self._scrub(self._compose_logs(task, result) + _removed_note(removed))
        progress = latest_progress(result.logs)
        verdict = verdict_for(result, task.stop_reason, max_output_bytes=self.settings.max_output_bytes)
        if isinstance(verdict, (Stopped, Failed)) or inert_error is not None:
            self._upload_logs(task, final_log, progress)
        if isinstance(verdict, Stopped):
            self._finish_stopped(task, verdict.reason)
            return
        if isinstance(verdict, Failed):
            raise _TaskError.of(verdict)
        if inert_error is not None:
            raise _TaskError(f"could not check /output: {_os_reason(inert_error)}", retryable=False)
        self._upload_output(task, workspace, result.run_times, final_log, progress)

    def _upload_output(
        self,
        task: ActiveTask,
        workspace: TaskWorkspace,
        run_times: RunTimes,
        final_log: str,
        progress: Progress | None,
    ) -> None:
        """The output, with the final log in the same request when it is small enough (else, and
        whenever the output does not go up, the log goes up on its own first)."""
        with_output = len(final_log.encode("utf-8", errors="replace")) <= OUTPUT_LOG_MAX_BYTES
        if not with_output:
            self._upload_logs(task, final_log, progress)
        limit = self.settings.max_output_bytes
        try:
            try:
                if directory_size(workspace.output_dir, stop_above=limit) > limit:
                    raise _TaskError.of(output_too_large(limit))
                files = zip_directory(
                    workspace.output_dir, workspace.output_zip, self.settings.output_zip_limits
                )
            except UnsafeZipError as exc:
                raise _TaskError(f"output refused: /output cannot be zipped: {exc}", retryable=False) from exc
            except OSError as exc:
                raise _TaskError(f"could not zip /output: {_os_reason(exc)}", retryable=True) from exc
        except _TaskError:
            if with_output:
                self._upload_logs(task, final_log, progress)
            raise
        carried = final_log if with_output else None
        try:
            self._with_run_times(
                task,
                run_times,
                lambda times: self.api.upload_output(
                    task.uid, workspace.output_zip, times, final_log=carried, progress=progress
                ),
            )
        except PrivateApiHttpError as exc:
            if exc.is_conflict:
                log.warning("task %s: output not accepted (%s); discarded", task.uid, exc.detail)
                return
            if with_output:
                self._upload_logs(task, final_log, progress)
            raise _TaskError(f"output refused by the private API: {exc.detail}", retryable=False) from exc
        log.info("task %s: finished, %d output file(s) uploaded", task.uid, files)

    def _input_limits(self, task: ActiveTask) -> ZipLimits:
        """An upload passed the input limits at the door. An input_from upstream's output was
        made under the output limits (weights and masks compress far beyond an input's ratio,
        it may be empty): it is checked against those, or a chain would refuse its own outputs."""
        if task.claim.task.input_from is not None:
            return self.settings.output_zip_limits
        return self.settings.input_zip_limits

    def _answered_from_cache(self, task: ActiveTask, image_id: str) -> bool:
        """Whether the private API finished the task from a cached output (nothing to run).

        The cache only saves work: when it cannot answer, the task runs."""
        try:
            answer = self.api.cache_lookup(task.uid, image_id)
        except PrivateApiUnavailable as exc:
            log.warning("task %s: result cache not reachable (%s); running the task", task.uid, exc)
            return False
        except PrivateApiHttpError as exc:
            if exc.is_conflict:
                # The task is not ours any more: the stop check after the lookup ends it.
                task.stop(StopReason.LEASE_LOST)
            else:
                log.warning("task %s: result cache lookup refused (%s); running the task", task.uid, exc)
            return False
        if not answer.hit:
            log.info("task %s: not in the result cache (image %s); running it", task.uid, image_id)
            return False
        log.info(
            "task %s: answered from the result cache (output of task %s); no container run",
            task.uid,
            answer.cached_from,
        )
        with self._counts_lock:
            self.cache_hits += 1
        return True

    def _mounted_model_dir(self, task: ActiveTask, workspace: TaskWorkspace) -> Path | None:
        """What the container gets at /model: a model_from upstream's output, else the model's
        own zip, unpacked; None for a model without one."""
        if task.claim.task.model_from is not None:
            return self._model_from_dir(task, workspace)
        return self._model_dir(task, workspace) if task.claim.model.model_available else None

    def _model_from_dir(self, task: ActiveTask, workspace: TaskWorkspace) -> Path:
        """The upstream's output, unpacked into this attempt's own folder.

        Not the shared model cache: the claim announces no digest of that output, so a cache
        keyed by it would save the unpacking but never the download, and it would keep one
        task's weights on disk for days where one downstream task mostly reads them once."""
        upstream = task.claim.task.model_from
        try:
            self._with_retry(task, lambda: self.api.download_model_from(task.uid, workspace.model_zip))
            workspace.unpack_model(self.settings.output_zip_limits)
        except UnsafeZipError as exc:
            raise _TaskError(f"output of model_from task {upstream} refused: {exc}", retryable=False) from exc
        except PrivateApiHttpError as exc:
            self._raise_for_download(task, f"output of model_from task {upstream}", exc)
        return workspace.model_dir

    def _model_dir(self, task: ActiveTask, workspace: TaskWorkspace) -> Path:
        model = task.claim.model

        def fetch(dest: Path) -> str:
            return self._with_retry(task, lambda: self.api.download_model_zip(model.human_readable_id, dest))

        try:
            if model.model_zip_sha256:
                return self.models.get(model.model_zip_sha256, fetch)
            fetch(workspace.model_zip)
            return self.models.unpack_uncached(workspace.model_zip, workspace.model_dir)
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

    def _finish_stopped(self, task: ActiveTask, reason: StopReason) -> None:
        if reason == StopReason.SHUTDOWN:
            try:
                self._with_retry(
                    task,
                    lambda: self.api.release(task.uid, f"consumer {self.settings.consumer_id} shut down"),
                )
                log.info("task %s: released back to the queue", task.uid)
            except PrivateApiHttpError as exc:
                log.warning("task %s: release refused (%s)", task.uid, exc)
        elif reason == StopReason.CANCELLED:
            log.info("task %s: stopped because it was cancelled", task.uid)
        else:
            log.warning("task %s: stopped because another consumer holds its lease", task.uid)

    def _report_failure(
        self,
        task: ActiveTask,
        error: str,
        *,
        retryable: bool,
        exit_code: int | None = None,
        run_times: RunTimes | None = None,
        category: FailureCategory = FailureCategory.INFRASTRUCTURE,
    ) -> None:
        if task.stop_reason == StopReason.LEASE_LOST:
            log.warning("task %s: failed (%s) but the lease is lost; not reporting", task.uid, error)
            return
        error = self._scrub(error)
        log.warning("task %s: failed: %s", task.uid, error.splitlines()[0] if error else "")
        failure = TaskFailure(
            error=error[:20_000], exit_code=exit_code, retryable=retryable, failure=category
        )
        try:
            self._with_run_times(
                task,
                run_times or RunTimes(),
                lambda times: self.api.fail(task.uid, failure.model_copy(update=times.model_dump())),
            )
        except PrivateApiHttpError as exc:
            log.warning("task %s: failure report refused (%s)", task.uid, exc)
        except PrivateApiUnavailable as exc:
            log.error(
                "task %s: could not report the failure (%s); the lease reaper will retry it", task.uid, exc
            )

    def _live_log(self, task: ActiveTask) -> LiveLog:
        """The run's output shipped while it runs (the issue's live logs), already shipping."""

        def ship(text: str, progress: Progress | None) -> None:
            try:
                self.api.upload_logs(task.uid, self._scrub(text), progress)
            except PrivateApiHttpError as exc:
                if exc.is_conflict or exc.status_code == 404:
                    raise LogRefused(exc.detail) from exc
                raise

        live_log = LiveLog(
            max_bytes=self.settings.max_log_bytes,
            ship=ship,
            cap_marker=f"{LOG_PREFIX} live log stopped at {self.settings.max_log_bytes} bytes; "
            "the end of the log follows when the task ends",
        )
        live_log.start(name=f"live-log-{task.uid}")
        return live_log

    def _upload_logs(self, task: ActiveTask, text: str, progress: Progress | None = None) -> None:
        text = self._scrub(text)
        try:
            self._with_retry(task, lambda: self.api.upload_logs(task.uid, text, progress))
        except PrivateApiHttpError as exc:
            log.info("task %s: logs not accepted (%s)", task.uid, exc.detail)
        except PrivateApiUnavailable as exc:
            log.warning("task %s: logs not uploaded (%s)", task.uid, exc)

    def _with_run_times(self, task: ActiveTask, run_times: RunTimes, report: Callable[[RunTimes], T]) -> T:
        """Report a verdict with the run's times; should the API find them impossible (422: this
        host's clock is far off), report it again without them, as the verdict matters more."""
        try:
            return self._with_retry(task, lambda: report(run_times))
        except PrivateApiHttpError as exc:
            if exc.status_code != 422 or run_times.run_started_at is None:
                raise
            log.warning("task %s: run times refused (%s); reported without them", task.uid, exc.detail)
            return self._with_retry(task, lambda: report(RunTimes()))

    def _with_retry(self, task: ActiveTask, call: Callable[[], T]) -> T:
        """Retry a private API call while the API is unreachable, up to IS_REPORT_RETRY_S."""
        budget = 5.0 if self._stopping_now() else self.settings.report_retry_s
        deadline = time.monotonic() + budget
        backoff = Backoff(min(10.0, self.settings.reconnect_backoff_max_s))
        while True:
            try:
                return call()
            except PrivateApiUnavailable as exc:
                delay = backoff.next()
                if task.stop_reason == StopReason.LEASE_LOST or time.monotonic() + delay > deadline:
                    raise
                log.warning("task %s: private API unavailable (%s); retrying in %.1fs", task.uid, exc, delay)
                time.sleep(delay)

    def _scrub(self, text: str) -> str:
        """Task errors and logs go to users: no host paths in them (work dir, task folders)."""
        for path in {str(self.work_dir), os.path.realpath(self.work_dir)}:
            text = text.replace(path, "<work dir>")
        return text

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
