"""Tasks as consumers hold them: claim, heartbeat, output, failure, release, logs, and the
reaper that takes tasks back from consumers that stopped renewing their lease."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, NoReturn

from sqlalchemy import and_, case, or_, select
from sqlalchemy.orm import Session

from inference_server.contract import (
    FailureCategory,
    HeartbeatReply,
    ModelPublic,
    RunTimes,
    TaskClaim,
    TaskFailure,
    TaskPublic,
    TaskRelease,
    TaskStatus,
    WebhookEvent,
)
from private_api import chains, consumer_registry, webhooks
from private_api.blobs import BlobStore, StoredBlob
from private_api.exceptions import Conflict, ConsumerDraining, NotFound, Unprocessable
from private_api.models import Task, utcnow
from private_api.outbox import dispatch
from private_api.queue import TaskPublisher
from private_api.scheduling import SchedulingPolicy
from private_api.task_rows import BATCH_SIZE, describe_holder, load_task, sql_time, task_public, update_task
from private_api.uploads import FinalLog, store_log

log = logging.getLogger(__name__)

# A consumer may still upload the log of a task cancelled under it.
LOG_WRITABLE_STATUSES = (TaskStatus.RUNNING, TaskStatus.CANCELLED)
# Consumers may run on other hosts than the private API: their clocks may disagree by this much
# before a reported run time counts as impossible.
RUN_TIMES_CLOCK_SKEW = timedelta(minutes=5)
# A task taken back from its consumer: pending, held by nobody, and waiting for the outbox to
# publish it again (it publishes what has no published_at).
BACK_TO_PENDING: dict[str, Any] = {
    "status": TaskStatus.PENDING,
    "consumer_id": None,
    "lease_expires_at": None,
    "published_at": None,
}


def _held_by(uid: str, consumer_id: str) -> tuple[Any, ...]:
    """The conditions under which a consumer's write applies: it still runs the task."""
    return (Task.uid == uid, Task.status == TaskStatus.RUNNING, Task.consumer_id == consumer_id)


def _commit_and_view(
    session: Session, uid: str, event: WebhookEvent | None = None
) -> tuple[Task, TaskPublic]:
    """The task as just written and its public view, built before the commit expires the row;
    `event` goes to its webhook in the same commit."""
    task = load_task(session, uid)
    assert task is not None
    if event is not None:
        webhooks.enqueue(session, task, event)
    public = task_public(task)
    session.commit()
    return task, public


def _raise_not_holder(session: Session, uid: str, consumer_id: str) -> NoReturn:
    """Explain why a consumer's request on a task it should hold did not apply."""
    session.rollback()
    task = load_task(session, uid)
    if task is None:
        raise NotFound(f"task {uid} is unknown")
    raise Conflict(f"consumer {consumer_id!r} does not hold task {uid}: it is {describe_holder(task)}")


def claim_task(
    *,
    session: Session,
    uid: str,
    consumer_id: str,
    lease_seconds: int,
    max_attempts: int,
    leases_enforced: bool = True,
) -> TaskClaim:
    """pending -> running for this consumer (or the same claim again, or an expired lease taken
    over, unless leases are in their grace period after an outage: see maintenance). A draining
    consumer gets only the same claim again: it learns of the drain from its next registry
    heartbeat, and a task it claimed meanwhile would run after the operator was told it takes
    no more."""
    now = utcnow()
    draining = consumer_registry.is_draining(session, consumer_id)
    same_holder = and_(Task.status == TaskStatus.RUNNING, Task.consumer_id == consumer_id)
    claimable = [same_holder] if draining else [Task.status == TaskStatus.PENDING, same_holder]
    if leases_enforced and not draining:
        claimable.append(
            and_(
                Task.status == TaskStatus.RUNNING,
                Task.lease_expires_at < now,
                Task.attempts < max_attempts,
            )
        )
    won = update_task(
        session,
        Task.uid == uid,
        or_(*claimable),
        status=TaskStatus.RUNNING,
        # SET expressions see the row as it was, so `same_holder` means "was already ours".
        attempts=case((same_holder, Task.attempts), else_=Task.attempts + 1),
        started_at=case((same_holder, Task.started_at), else_=sql_time(now)),
        # A new attempt has not run its container yet: the last attempt's run times go.
        run_started_at=case((same_holder, Task.run_started_at), else_=None),
        run_finished_at=case((same_holder, Task.run_finished_at), else_=None),
        # Nor reported progress: the last attempt's would read as this one's.
        progress=case((same_holder, Task.progress), else_=None),
        progress_message=case((same_holder, Task.progress_message), else_=None),
        consumer_id=consumer_id,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
    )
    if not won:
        session.rollback()
        task = load_task(session, uid)
        if task is None:
            raise NotFound(f"task {uid} is unknown")
        if draining and task.status in (TaskStatus.PENDING, TaskStatus.RUNNING):
            raise ConsumerDraining(f"consumer {consumer_id} is draining: it takes no new task")
        lapsed = task.status == TaskStatus.RUNNING and task.lease_expires_at and task.lease_expires_at < now
        if lapsed and leases_enforced:
            raise Conflict(f"task {uid} used all {max_attempts} attempts; it will be marked failed")
        raise Conflict(f"task {uid} cannot be claimed: it is {describe_holder(task)}")
    task = load_task(session, uid)
    assert task is not None
    # Only a new attempt sets started_at to this claim's `now`; the holder claiming again is not news.
    if task.started_at == now:
        webhooks.enqueue(session, task, WebhookEvent.RUNNING)
    claim = TaskClaim(
        task=task_public(task), model=ModelPublic.model_validate(task.model), lease_seconds=lease_seconds
    )
    session.commit()
    log.info("task %s claimed by %s (attempt %d)", uid, consumer_id, task.attempts)
    return claim


def heartbeat(*, session: Session, uid: str, consumer_id: str, lease_seconds: int) -> HeartbeatReply:
    """Extend the lease; keep_running false once the task was cancelled or deleted under the consumer."""
    extended = update_task(
        session,
        Task.uid == uid,
        Task.status == TaskStatus.RUNNING,
        Task.consumer_id == consumer_id,
        lease_expires_at=utcnow() + timedelta(seconds=lease_seconds),
    )
    if extended:
        session.commit()
        return HeartbeatReply(keep_running=True, status=TaskStatus.RUNNING)
    session.rollback()
    task = load_task(session, uid)
    if task is None:
        raise NotFound(f"task {uid} is unknown")
    if task.consumer_id == consumer_id and task.status.is_terminal:
        return HeartbeatReply(keep_running=False, status=task.status)
    raise Conflict(f"consumer {consumer_id!r} does not hold task {uid}: it is {describe_holder(task)}")


def require_holder(
    *,
    session: Session,
    uid: str,
    consumer_id: str,
    statuses: tuple[TaskStatus, ...] = (TaskStatus.RUNNING,),
) -> None:
    """Early refusal before a consumer's upload streams in; the final write checks again."""
    task = load_task(session, uid)
    if task is None:
        raise NotFound(f"task {uid} is unknown")
    if task.consumer_id != consumer_id or task.status not in statuses:
        raise Conflict(f"consumer {consumer_id!r} does not hold task {uid}: it is {describe_holder(task)}")


def check_run_times(*, session: Session, uid: str, run_times: RunTimes) -> None:
    """Refuse (422) run times no run of this task can have had: ending in the future, or starting
    before the task was created, by more than two hosts' clocks may disagree."""
    if run_times.run_started_at is None or run_times.run_finished_at is None:
        return
    created_at = session.scalar(select(Task.created_at).where(Task.uid == uid))
    if created_at is None:
        raise NotFound(f"task {uid} is unknown")
    now = utcnow()
    if run_times.run_finished_at > now + RUN_TIMES_CLOCK_SKEW:
        raise Unprocessable(
            f"run_finished_at {run_times.run_finished_at.isoformat()} is in the future "
            f"(the private API's clock says {now.isoformat()})"
        )
    if run_times.run_started_at < created_at - RUN_TIMES_CLOCK_SKEW:
        raise Unprocessable(
            f"run_started_at {run_times.run_started_at.isoformat()} is before task {uid} was created "
            f"({created_at.isoformat()})"
        )


def store_output(
    *,
    session: Session,
    uid: str,
    consumer_id: str,
    output_blob: StoredBlob,
    run_times: RunTimes | None = None,
    publisher: TaskPublisher | None = None,
    policy: SchedulingPolicy | None = None,
) -> TaskPublic:
    """running -> finished with its output and its run times, once; the caller deletes the blob if
    this raises. Tasks waiting on its output get it (chains.settle), and with `publisher` go to
    the queue at once."""
    run_times = run_times or RunTimes()
    check_run_times(session=session, uid=uid, run_times=run_times)
    finished = update_task(
        session,
        *_held_by(uid, consumer_id),
        Task.output_blob_key.is_(None),
        status=TaskStatus.FINISHED,
        output_blob_key=output_blob.key,
        output_sha256=output_blob.sha256,
        exit_code=0,
        error=None,
        failure=None,
        finished_at=utcnow(),
        run_started_at=run_times.run_started_at,
        run_finished_at=run_times.run_finished_at,
        lease_expires_at=None,
    )
    if not finished:
        _raise_not_holder(session, uid, consumer_id)
    _task, public = _commit_and_view(session, uid, WebhookEvent.FINISHED)
    log.info("task %s finished on %s (%d output bytes)", uid, consumer_id, output_blob.size)
    chains.settle(session=session, uid=uid, publisher=publisher, policy=policy)
    return public


def fail_task(
    *,
    session: Session,
    publisher: TaskPublisher,
    uid: str,
    consumer_id: str,
    failure: TaskFailure,
    max_attempts: int,
    policy: SchedulingPolicy,
) -> TaskPublic:
    """A retryable failure with attempts left goes back to pending (republished); else failed.
    Its run times replace the last attempt's, none included (this attempt ran no container)."""
    check_run_times(session=session, uid=uid, run_times=failure)
    held = _held_by(uid, consumer_id)
    run_times = {"run_started_at": failure.run_started_at, "run_finished_at": failure.run_finished_at}
    retried = failure.retryable and update_task(
        session,
        *held,
        Task.attempts < max_attempts,
        **BACK_TO_PENDING,
        error=failure.error,
        exit_code=failure.exit_code,
        **run_times,
    )
    if not retried and not update_task(
        session,
        *held,
        status=TaskStatus.FAILED,
        error=failure.error,
        failure=failure.failure or FailureCategory.INFRASTRUCTURE,
        exit_code=failure.exit_code,
        **run_times,
        finished_at=utcnow(),
        lease_expires_at=None,
    ):
        _raise_not_holder(session, uid, consumer_id)
    task, public = _commit_and_view(session, uid, None if retried else WebhookEvent.FAILED)
    log.info(
        "task %s %s after attempt %d on %s: %s",
        uid,
        task.status,
        task.attempts,
        consumer_id,
        failure.error[:200],
    )
    if retried:
        # A retry: it goes ahead of the fresh tasks of its priority (broker_priority).
        dispatch(session, publisher, policy, task.id)
    else:
        chains.settle(session=session, uid=uid)  # what waits on it fails too
    return public


def release_task(
    *,
    session: Session,
    publisher: TaskPublisher,
    policy: SchedulingPolicy,
    uid: str,
    consumer_id: str,
    release: TaskRelease,
) -> TaskPublic:
    """running -> pending unrun (consumer shutdown, infrastructure trouble); the attempt is not counted."""
    released = update_task(
        session,
        *_held_by(uid, consumer_id),
        **BACK_TO_PENDING,
        attempts=case((Task.attempts > 0, Task.attempts - 1), else_=0),
    )
    if not released:
        _raise_not_holder(session, uid, consumer_id)
    task, public = _commit_and_view(session, uid)
    log.info("task %s released by %s: %s", uid, consumer_id, release.reason[:200])
    dispatch(session, publisher, policy, task.id)
    return public


def store_logs(
    *,
    session: Session,
    blobs: BlobStore,
    uid: str,
    consumer_id: str,
    log_blob: StoredBlob,
    progress: float | None = None,
    progress_message: str | None = None,
) -> None:
    """Replace the task's log (the whole text so far: a retried upload changes nothing), and its
    progress when the upload carries one; the caller deletes `log_blob` if this raises."""
    reported = {} if progress is None else {"progress": progress, "progress_message": progress_message}
    task = load_task(session, uid)
    if task is None:
        raise NotFound(f"task {uid} is unknown")
    old_key = task.log_blob_key
    replaced = update_task(
        session,
        Task.uid == uid,
        Task.consumer_id == consumer_id,
        Task.status.in_(LOG_WRITABLE_STATUSES),
        # Only over the log we saw, so a concurrent replacement is not silently orphaned.
        Task.log_blob_key.is_(None) if old_key is None else Task.log_blob_key == old_key,
        log_blob_key=log_blob.key,
        **reported,
    )
    if not replaced:
        _raise_not_holder(session, uid, consumer_id)
    session.commit()
    blobs.delete(old_key)


def store_final_log(
    *,
    session: Session,
    blobs: BlobStore,
    uid: str,
    consumer_id: str,
    final_log: FinalLog,
    max_bytes: int,
) -> None:
    """The final log an output upload carried, stored as a log upload would be."""
    log_blob = store_log(blobs, final_log.text, max_bytes=max_bytes)
    try:
        store_logs(
            session=session,
            blobs=blobs,
            uid=uid,
            consumer_id=consumer_id,
            log_blob=log_blob,
            progress=final_log.progress,
            progress_message=final_log.progress_message,
        )
    except BaseException:
        blobs.delete(log_blob.key)
        raise


def reap_expired_leases(
    *,
    session: Session,
    publisher: TaskPublisher,
    max_attempts: int,
    policy: SchedulingPolicy | None = None,
    limit: int = BATCH_SIZE,
) -> int:
    """Running tasks whose consumer stopped heartbeating: back to pending, or failed when out of attempts."""
    now = utcnow()
    rows = session.execute(
        select(Task.id, Task.uid, Task.priority, Task.attempts, Task.consumer_id)
        .where(Task.status == TaskStatus.RUNNING, Task.lease_expires_at < now)
        .order_by(Task.lease_expires_at)
        .limit(limit)
    ).all()
    session.rollback()
    requeued: list[Any] = []
    gave_up: list[str] = []
    for row in rows:
        expired = (Task.id == row.id, Task.status == TaskStatus.RUNNING, Task.lease_expires_at < now)
        if update_task(
            session,
            *expired,
            Task.attempts < max_attempts,
            **BACK_TO_PENDING,
        ):
            requeued.append(row)
            log.warning("lease of task %s on %s expired; back to pending", row.uid, row.consumer_id)
        elif update_task(
            session,
            *expired,
            status=TaskStatus.FAILED,
            failure=FailureCategory.INFRASTRUCTURE,
            error=(
                f"consumer {row.consumer_id!r} stopped renewing its lease; "
                f"gave up after {row.attempts} attempts"
            ),
            finished_at=now,
            lease_expires_at=None,
        ):
            gave_up.append(row.uid)
            log.warning("lease of task %s expired on its last attempt; failed", row.uid)
            webhooks.enqueue_for_uid(session, row.uid, WebhookEvent.FAILED)
        session.commit()
    for row in requeued:
        dispatch(session, publisher, policy or SchedulingPolicy(), row.id)
    for uid in gave_up:
        chains.settle(session=session, uid=uid)  # what waits on it fails too
    return len(requeued) + len(gave_up)
