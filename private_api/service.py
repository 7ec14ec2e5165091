"""What the private API does, as keyword-only functions over a Session; routes stay thin.

Every state change is one conditional UPDATE (`... WHERE status = <expected>`) whose rowcount
says whether this caller won, so two consumers racing for a task, a cancel racing an output
upload, or two API replicas reaping the same lease resolve the same way on SQLite and on
PostgreSQL: exactly one wins and the others get a Conflict. Blobs are deleted only after the
commit that stops pointing at them; new blobs are removed by the caller if the commit fails.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, NoReturn

from sqlalchemy import ColumnElement, and_, case, delete, func, literal, or_, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from inference_server.contract import (
    MODEL_SWITCHES,
    HeartbeatReply,
    ModelPublic,
    ModelUpdate,
    TaskClaim,
    TaskFailure,
    TaskPublic,
    TaskRelease,
    TaskStatus,
)
from private_api.blobs import BlobStore, StoredBlob
from private_api.exceptions import ActorForbidden, Conflict, NotFound, Unprocessable
from private_api.models import Model, Task, UTCDateTime, utcnow
from private_api.queue import TaskPublisher
from private_api.schemas import ModelCreate

log = logging.getLogger(__name__)

ACTIVE_STATUSES = (TaskStatus.PENDING, TaskStatus.RUNNING)
# A consumer may still upload the log of a task cancelled under it.
LOG_WRITABLE_STATUSES = (TaskStatus.RUNNING, TaskStatus.CANCELLED)
BATCH_SIZE = 200


def new_task_uid() -> str:
    # 192 random bits: the uid is the only thing a v1.2 client needs to read a result.
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class Actor:
    """Whom a relayed user request acts for, as the public API states it (X-Acting-* headers).

    `name` None is an anonymous caller. An operator sees every task; anyone else sees only the
    tasks recorded under their name, and anonymous callers only anonymous tasks. A task someone
    may not see answers exactly like an unknown one, so its existence is never revealed.
    Functions given no actor serve the platform itself (consumers, operator tools): no limits.
    """

    name: str | None
    is_operator: bool = False


def _owner_conditions(actor: Actor | None) -> tuple[ColumnElement[bool], ...]:
    """SQL conditions restricting tasks to those `actor` may see (none for the platform, operators)."""
    if actor is None or actor.is_operator:
        return ()
    if actor.name is None:
        return (Task.owner.is_(None),)
    return (Task.owner == actor.name,)


def _may_see(actor: Actor | None, task: Task) -> bool:
    return actor is None or actor.is_operator or task.owner == actor.name


# --- helpers ----------------------------------------------------------------------------------


def _at(moment: datetime) -> ColumnElement[datetime]:
    """A datetime as a SQL value of the UTC column type (for CASE/COALESCE expressions)."""
    return literal(moment, UTCDateTime())


def _update_task(session: Session, *conditions: Any, **values: Any) -> bool:
    """One conditional UPDATE; True when exactly this call changed the row."""
    result = session.execute(
        update(Task).where(*conditions).values(**values).execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def _load_task(session: Session, uid: str) -> Task | None:
    statement = select(Task).where(Task.uid == uid).execution_options(populate_existing=True)
    return session.scalars(statement).first()


def _visible_task(session: Session, uid: str, actor: Actor | None = None) -> Task:
    task = _load_task(session, uid)
    if task is None or task.status == TaskStatus.DELETED or not _may_see(actor, task):
        raise NotFound(f"task {uid} is unknown or was deleted")
    return task


def _load_model(session: Session, human_readable_id: str) -> Model | None:
    return session.scalars(select(Model).where(Model.human_readable_id == human_readable_id)).first()


def _required_model(session: Session, human_readable_id: str) -> Model:
    model = _load_model(session, human_readable_id)
    if model is None:
        raise NotFound(f"model {human_readable_id!r} is not registered")
    return model


def _task_public(task: Task) -> TaskPublic:
    return TaskPublic.model_validate(task)


def _describe_holder(task: Task) -> str:
    if task.status == TaskStatus.RUNNING:
        return f"running on consumer {task.consumer_id!r}"
    return str(task.status)


def _raise_not_holder(session: Session, uid: str, consumer_id: str) -> NoReturn:
    """Explain why a consumer's request on a task it should hold did not apply."""
    session.rollback()
    task = _load_task(session, uid)
    if task is None:
        raise NotFound(f"task {uid} is unknown")
    raise Conflict(f"consumer {consumer_id!r} does not hold task {uid}: it is {_describe_holder(task)}")


class Publish(StrEnum):
    DONE = "done"
    SKIPPED = "skipped"  # someone else is publishing it, or it is no longer pending
    FAILED = "failed"  # broker (or database) unavailable: left to the outbox loop


def _publish(
    session: Session,
    publisher: TaskPublisher,
    *,
    task_id: int,
    uid: str,
    priority: int,
    previous: datetime | None = None,
) -> Publish:
    """Put a committed pending task on the queue, once, even with the outbox racing a request.

    published_at is claimed by a conditional UPDATE *before* publishing, so of two publishers
    only the winner sends; a failed publish hands the claim back for the outbox. (A crash
    between claim and publish leaves the task marked but unsent; the outbox's republish
    safety net picks it up after `republish_after_s`.)
    """
    if publisher.backing_off:
        return Publish.FAILED  # spare the database a claim we would hand back at once
    claimed_at = utcnow()
    try:
        claimed = _update_task(
            session,
            Task.id == task_id,
            Task.status == TaskStatus.PENDING,
            Task.published_at.is_(None) if previous is None else Task.published_at == previous,
            published_at=claimed_at,
        )
        session.commit()
    except SQLAlchemyError:
        session.rollback()
        log.warning("could not mark task %s for publishing; the outbox retries", uid, exc_info=True)
        return Publish.FAILED
    if not claimed:
        return Publish.SKIPPED
    if publisher.publish(uid, priority):
        return Publish.DONE
    try:
        _update_task(session, Task.id == task_id, Task.published_at == claimed_at, published_at=previous)
        session.commit()
    except SQLAlchemyError:
        session.rollback()
        log.warning("task %s stays marked though unpublished; republished later", uid, exc_info=True)
    return Publish.FAILED


# --- models -----------------------------------------------------------------------------------


def list_models(*, session: Session) -> list[ModelPublic]:
    models = session.scalars(select(Model).order_by(Model.human_readable_id))
    return [ModelPublic.model_validate(model) for model in models]


def get_model(*, session: Session, human_readable_id: str) -> ModelPublic:
    return ModelPublic.model_validate(_required_model(session, human_readable_id))


def ensure_model_name_free(*, session: Session, human_readable_id: str) -> None:
    """Cheap early refusal, so a duplicate does not upload a large zip first (create re-checks)."""
    if _load_model(session, human_readable_id) is not None:
        raise Conflict(f"a model named {human_readable_id!r} already exists")


def refuse_loosened_isolation(actor: Actor | None, values: dict[str, Any]) -> None:
    """Only operators loosen a model's isolation. Others reach the model routes only through
    the IS_ANONYMOUS_MODELS compatibility switch, which must not open the host to them."""
    if actor is None or actor.is_operator:
        return
    for switch in MODEL_SWITCHES:
        if values.get(switch):
            raise ActorForbidden(f"only an operator key may set {switch}")


def create_model(
    *, session: Session, params: ModelCreate, model_zip: StoredBlob | None, actor: Actor | None = None
) -> ModelPublic:
    """Register a model; the caller deletes `model_zip` if this raises."""
    refuse_loosened_isolation(actor, params.model_dump())
    if params.model_available and model_zip is None:
        raise Unprocessable("model_available=true needs the model zip in the multipart file field 'zip_file'")
    if model_zip is not None and not params.model_available:
        raise Unprocessable("a model zip was sent but model_available is false; send model_available=true")
    model = Model(
        **params.model_dump(),
        model_zip_key=model_zip.key if model_zip else None,
        model_zip_sha256=model_zip.sha256 if model_zip else None,
        created_at=utcnow(),
    )
    session.add(model)
    try:
        session.flush()
        public = ModelPublic.model_validate(model)
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"a model named {params.human_readable_id!r} already exists") from exc
    log.info("registered model %s (%s)", model.human_readable_id, model.container_tag)
    return public


def update_model(
    *, session: Session, human_readable_id: str, changes: ModelUpdate, actor: Actor | None = None
) -> ModelPublic:
    """Change a model's description or limits: only the fields present in `changes` (a limit set
    to None returns to the platform default). Tasks claimed from now on run with the new values."""
    values = changes.model_dump(exclude_unset=True)
    refuse_loosened_isolation(actor, values)
    model = _required_model(session, human_readable_id)
    for field, value in values.items():
        setattr(model, field, value)
    public = ModelPublic.model_validate(model)
    session.commit()
    log.info("updated model %s: %s", human_readable_id, sorted(changes.model_fields_set))
    return public


def model_zip_key(*, session: Session, human_readable_id: str) -> str:
    model = _required_model(session, human_readable_id)
    if model.model_zip_key is None:
        raise NotFound(f"model {human_readable_id!r} has no model zip")
    return model.model_zip_key


def delete_model(
    *, session: Session, blobs: BlobStore, human_readable_id: str, actor: Actor | None = None
) -> ModelPublic:
    """Remove a model with its zip and its finished tasks; refused while tasks are pending or
    running, and to anyone but an operator while it holds tasks of other owners."""
    model = _required_model(session, human_readable_id)
    public = ModelPublic.model_validate(model)
    if actor is not None and not actor.is_operator:
        others = session.scalar(
            select(func.count())
            .select_from(Task)
            .where(Task.model_id == model.id, Task.owner.is_distinct_from(actor.name))
        )
        if others:
            raise ActorForbidden(
                f"model {human_readable_id!r} holds {others} tasks of other owners; "
                "only an operator may remove it"
            )
    active = session.scalar(
        select(func.count())
        .select_from(Task)
        .where(Task.model_id == model.id, Task.status.in_(ACTIVE_STATUSES))
    )
    if active:
        raise Conflict(
            f"model {human_readable_id!r} has {active} pending or running tasks; cancel them first"
        )
    old_tasks = session.execute(
        select(Task.input_blob_key, Task.output_blob_key, Task.log_blob_key).where(Task.model_id == model.id)
    ).all()
    session.execute(
        delete(Task)
        .where(Task.model_id == model.id, Task.status.not_in(ACTIVE_STATUSES))
        .execution_options(synchronize_session=False)
    )
    session.delete(model)
    try:
        session.commit()
    except IntegrityError as exc:
        # A task was submitted between the check and the delete: its foreign key stops us.
        session.rollback()
        raise Conflict(f"model {human_readable_id!r} received a task meanwhile; try again") from exc
    for keys in old_tasks:
        for key in keys:
            blobs.delete(key)
    blobs.delete(model.model_zip_key)
    log.info("deleted model %s and %d finished tasks", human_readable_id, len(old_tasks))
    return public


# --- tasks: the user side -----------------------------------------------------------------------


def create_task(
    *,
    session: Session,
    model_human_readable_id: str,
    priority: int,
    input_blob: StoredBlob,
    owner: str | None = None,
) -> TaskPublic:
    """Insert a pending task for an already stored input; the caller deletes the blob if this raises.

    Publishing is a separate step (`publish_task`) after the commit, so a broker outage never
    loses an accepted task nor fails the submit.
    """
    model = _required_model(session, model_human_readable_id)
    task = Task(
        uid=new_task_uid(),
        model=model,
        status=TaskStatus.PENDING,
        priority=priority,
        attempts=0,
        input_blob_key=input_blob.key,
        input_sha256=input_blob.sha256,
        created_at=utcnow(),
        owner=owner,
    )
    session.add(task)
    try:
        session.flush()
        public = _task_public(task)
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        # The model was deleted between the lookup and the insert.
        raise NotFound(f"model {model_human_readable_id!r} is not registered") from exc
    log.info("task %s accepted for model %s (priority %d)", public.uid, model_human_readable_id, priority)
    return public


def publish_task(*, session: Session, publisher: TaskPublisher, uid: str) -> bool:
    """Put a freshly committed task on the queue; never raises for broker or bookkeeping errors."""
    row = session.execute(select(Task.id, Task.priority).where(Task.uid == uid)).first()
    session.rollback()  # end the read; publishing may wait on the broker
    if row is None:
        return False
    return _publish(session, publisher, task_id=row.id, uid=uid, priority=row.priority) == Publish.DONE


def get_task(*, session: Session, uid: str, actor: Actor | None = None) -> TaskPublic:
    return _task_public(_visible_task(session, uid, actor))


def list_tasks(
    *,
    session: Session,
    actor: Actor | None,
    status: TaskStatus | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[TaskPublic]:
    """The tasks `actor` may see, newest first; deleted ones are left out.

    Anonymous callers get an empty list: anonymous tasks are reachable only by their uid, and
    listing them would hand every anonymous caller the uids of all the others.
    """
    if actor is not None and actor.name is None and not actor.is_operator:
        return []
    statement = select(Task).where(Task.status != TaskStatus.DELETED, *_owner_conditions(actor))
    if status is not None:
        statement = statement.where(Task.status == status)
    tasks = session.scalars(statement.order_by(Task.id.desc()).offset(offset).limit(limit))
    return [_task_public(task) for task in tasks]


def input_blob_key(*, session: Session, uid: str, actor: Actor | None = None) -> str:
    task = _visible_task(session, uid, actor)
    if task.input_blob_key is None:
        raise NotFound(f"task {uid} has no input")
    return task.input_blob_key


def output_blob_key(*, session: Session, uid: str, actor: Actor | None = None) -> str:
    task = _visible_task(session, uid, actor)
    if task.status != TaskStatus.FINISHED:
        raise Conflict(f"task {uid} is {task.status}; an output exists only once it is finished")
    if task.output_blob_key is None:
        raise NotFound(f"task {uid} is finished but its output is missing")
    return task.output_blob_key


def log_blob_key(*, session: Session, uid: str, actor: Actor | None = None) -> str | None:
    return _visible_task(session, uid, actor).log_blob_key


def cancel_task(*, session: Session, uid: str, actor: Actor | None = None) -> TaskPublic:
    """pending/running -> cancelled; a terminal task is answered unchanged.

    A running task's consumer learns it from its next heartbeat (keep_running false).
    """
    changed = _update_task(
        session,
        Task.uid == uid,
        Task.status.in_(ACTIVE_STATUSES),
        *_owner_conditions(actor),
        status=TaskStatus.CANCELLED,
        finished_at=utcnow(),
        lease_expires_at=None,
    )
    task = _visible_task(session, uid, actor)
    public = _task_public(task)
    session.commit()
    if changed:
        log.info("task %s cancelled", uid)
    return public


def delete_task(*, session: Session, blobs: BlobStore, uid: str, actor: Actor | None = None) -> TaskPublic:
    """Cancel if active, mark deleted, drop the input/output/log files; the row stays as a tombstone."""
    changed = _update_task(
        session,
        Task.uid == uid,
        Task.status != TaskStatus.DELETED,
        *_owner_conditions(actor),
        status=TaskStatus.DELETED,
        finished_at=func.coalesce(Task.finished_at, _at(utcnow())),
        lease_expires_at=None,
    )
    if not changed:
        session.rollback()
        raise NotFound(f"task {uid} is unknown or was deleted")
    task = _load_task(session, uid)
    assert task is not None  # the UPDATE above just matched it, under our write lock
    keys = (task.input_blob_key, task.output_blob_key, task.log_blob_key)
    task.input_blob_key = task.output_blob_key = task.log_blob_key = None
    public = _task_public(task)
    session.commit()
    for key in keys:
        blobs.delete(key)
    log.info("task %s deleted", uid)
    return public


# --- tasks: the consumer side ---------------------------------------------------------------------


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
    over, unless leases are in their grace period after an outage: see maintenance)."""
    now = utcnow()
    same_holder = and_(Task.status == TaskStatus.RUNNING, Task.consumer_id == consumer_id)
    claimable = [Task.status == TaskStatus.PENDING, same_holder]
    if leases_enforced:
        claimable.append(
            and_(
                Task.status == TaskStatus.RUNNING,
                Task.lease_expires_at < now,
                Task.attempts < max_attempts,
            )
        )
    won = _update_task(
        session,
        Task.uid == uid,
        or_(*claimable),
        status=TaskStatus.RUNNING,
        # SET expressions see the row as it was, so `same_holder` means "was already ours".
        attempts=case((same_holder, Task.attempts), else_=Task.attempts + 1),
        started_at=case((same_holder, Task.started_at), else_=_at(now)),
        consumer_id=consumer_id,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
    )
    if not won:
        session.rollback()
        task = _load_task(session, uid)
        if task is None:
            raise NotFound(f"task {uid} is unknown")
        lapsed = task.status == TaskStatus.RUNNING and task.lease_expires_at and task.lease_expires_at < now
        if lapsed and leases_enforced:
            raise Conflict(f"task {uid} used all {max_attempts} attempts; it will be marked failed")
        raise Conflict(f"task {uid} cannot be claimed: it is {_describe_holder(task)}")
    task = _load_task(session, uid)
    assert task is not None
    claim = TaskClaim(
        task=_task_public(task), model=ModelPublic.model_validate(task.model), lease_seconds=lease_seconds
    )
    session.commit()
    log.info("task %s claimed by %s (attempt %d)", uid, consumer_id, task.attempts)
    return claim


def heartbeat(*, session: Session, uid: str, consumer_id: str, lease_seconds: int) -> HeartbeatReply:
    """Extend the lease; keep_running false once the task was cancelled or deleted under the consumer."""
    extended = _update_task(
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
    task = _load_task(session, uid)
    if task is None:
        raise NotFound(f"task {uid} is unknown")
    if task.consumer_id == consumer_id and task.status.is_terminal:
        return HeartbeatReply(keep_running=False, status=task.status)
    raise Conflict(f"consumer {consumer_id!r} does not hold task {uid}: it is {_describe_holder(task)}")


def require_holder(
    *,
    session: Session,
    uid: str,
    consumer_id: str,
    statuses: tuple[TaskStatus, ...] = (TaskStatus.RUNNING,),
) -> None:
    """Early refusal before a consumer's upload streams in; the final write checks again."""
    task = _load_task(session, uid)
    if task is None:
        raise NotFound(f"task {uid} is unknown")
    if task.consumer_id != consumer_id or task.status not in statuses:
        raise Conflict(f"consumer {consumer_id!r} does not hold task {uid}: it is {_describe_holder(task)}")


def store_output(*, session: Session, uid: str, consumer_id: str, output_blob: StoredBlob) -> TaskPublic:
    """running -> finished with its output, once; the caller deletes the blob if this raises."""
    finished = _update_task(
        session,
        Task.uid == uid,
        Task.status == TaskStatus.RUNNING,
        Task.consumer_id == consumer_id,
        Task.output_blob_key.is_(None),
        status=TaskStatus.FINISHED,
        output_blob_key=output_blob.key,
        output_sha256=output_blob.sha256,
        exit_code=0,
        error=None,
        finished_at=utcnow(),
        lease_expires_at=None,
    )
    if not finished:
        _raise_not_holder(session, uid, consumer_id)
    task = _load_task(session, uid)
    assert task is not None
    public = _task_public(task)
    session.commit()
    log.info("task %s finished on %s (%d output bytes)", uid, consumer_id, output_blob.size)
    return public


def fail_task(
    *,
    session: Session,
    publisher: TaskPublisher,
    uid: str,
    consumer_id: str,
    failure: TaskFailure,
    max_attempts: int,
) -> TaskPublic:
    """A retryable failure with attempts left goes back to pending (republished); else failed."""
    held = (Task.uid == uid, Task.status == TaskStatus.RUNNING, Task.consumer_id == consumer_id)
    retried = failure.retryable and _update_task(
        session,
        *held,
        Task.attempts < max_attempts,
        status=TaskStatus.PENDING,
        error=failure.error,
        exit_code=failure.exit_code,
        consumer_id=None,
        lease_expires_at=None,
        published_at=None,
    )
    if not retried and not _update_task(
        session,
        *held,
        status=TaskStatus.FAILED,
        error=failure.error,
        exit_code=failure.exit_code,
        finished_at=utcnow(),
        lease_expires_at=None,
    ):
        _raise_not_holder(session, uid, consumer_id)
    task = _load_task(session, uid)
    assert task is not None
    public = _task_public(task)
    session.commit()
    log.info(
        "task %s %s after attempt %d on %s: %s",
        uid,
        task.status,
        task.attempts,
        consumer_id,
        failure.error[:200],
    )
    if retried:
        _publish(session, publisher, task_id=task.id, uid=uid, priority=task.priority)
    return public


def release_task(
    *, session: Session, publisher: TaskPublisher, uid: str, consumer_id: str, release: TaskRelease
) -> TaskPublic:
    """running -> pending unrun (consumer shutdown, infrastructure trouble); the attempt is not counted."""
    released = _update_task(
        session,
        Task.uid == uid,
        Task.status == TaskStatus.RUNNING,
        Task.consumer_id == consumer_id,
        status=TaskStatus.PENDING,
        attempts=case((Task.attempts > 0, Task.attempts - 1), else_=0),
        consumer_id=None,
        lease_expires_at=None,
        published_at=None,
    )
    if not released:
        _raise_not_holder(session, uid, consumer_id)
    task = _load_task(session, uid)
    assert task is not None
    public = _task_public(task)
    session.commit()
    log.info("task %s released by %s: %s", uid, consumer_id, release.reason[:200])
    _publish(session, publisher, task_id=task.id, uid=uid, priority=task.priority)
    return public


def store_logs(
    *, session: Session, blobs: BlobStore, uid: str, consumer_id: str, log_blob: StoredBlob
) -> None:
    """Replace the task's log; the caller deletes `log_blob` if this raises."""
    task = _load_task(session, uid)
    if task is None:
        raise NotFound(f"task {uid} is unknown")
    old_key = task.log_blob_key
    replaced = _update_task(
        session,
        Task.uid == uid,
        Task.consumer_id == consumer_id,
        Task.status.in_(LOG_WRITABLE_STATUSES),
        # Only over the log we saw, so a concurrent replacement is not silently orphaned.
        Task.log_blob_key.is_(None) if old_key is None else Task.log_blob_key == old_key,
        log_blob_key=log_blob.key,
    )
    if not replaced:
        _raise_not_holder(session, uid, consumer_id)
    session.commit()
    blobs.delete(old_key)


# --- background work -----------------------------------------------------------------------------


def publish_unpublished(
    *,
    session: Session,
    publisher: TaskPublisher,
    republish_after_s: float | None = None,
    limit: int = BATCH_SIZE,
) -> int:
    """The outbox: publish pending tasks that never reached the queue (broker down at submit or
    requeue); returns how many were published.

    With `republish_after_s`, pending tasks published longer ago than that are published again:
    a safety net for messages lost with the broker's data or a deleted queue, which would
    otherwise strand their tasks. The duplicate this makes when nothing was lost is harmless;
    it loses the atomic claim and the consumer skips it.
    """
    waiting = Task.published_at.is_(None)
    if republish_after_s is not None:
        waiting = or_(waiting, Task.published_at < utcnow() - timedelta(seconds=republish_after_s))
    rows = session.execute(
        select(Task.id, Task.uid, Task.priority, Task.published_at)
        .where(Task.status == TaskStatus.PENDING, waiting)
        .order_by(case((Task.published_at.is_(None), 0), else_=1), Task.priority.desc(), Task.id)
        .limit(limit)
    ).all()
    session.rollback()
    published = 0
    for row in rows:
        outcome = _publish(
            session, publisher, task_id=row.id, uid=row.uid, priority=row.priority, previous=row.published_at
        )
        if outcome == Publish.FAILED:
            break  # broker still away: the next round tries again
        if outcome == Publish.DONE:
            published += 1
    if published:
        log.info("outbox published %d waiting tasks", published)
    return published


def reap_expired_leases(
    *, session: Session, publisher: TaskPublisher, max_attempts: int, limit: int = BATCH_SIZE
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
    failed = 0
    for row in rows:
        expired = (Task.id == row.id, Task.status == TaskStatus.RUNNING, Task.lease_expires_at < now)
        if _update_task(
            session,
            *expired,
            Task.attempts < max_attempts,
            status=TaskStatus.PENDING,
            consumer_id=None,
            lease_expires_at=None,
            published_at=None,
        ):
            requeued.append(row)
            log.warning("lease of task %s on %s expired; back to pending", row.uid, row.consumer_id)
        elif _update_task(
            session,
            *expired,
            status=TaskStatus.FAILED,
            error=(
                f"consumer {row.consumer_id!r} stopped renewing its lease; "
                f"gave up after {row.attempts} attempts"
            ),
            finished_at=now,
            lease_expires_at=None,
        ):
            failed += 1
            log.warning("lease of task %s expired on its last attempt; failed", row.uid)
        session.commit()
    for row in requeued:
        _publish(session, publisher, task_id=row.id, uid=row.uid, priority=row.priority)
    return len(requeued) + failed


# --- observability -------------------------------------------------------------------------------


def task_counts(*, session: Session) -> dict[TaskStatus, int]:
    counts = dict.fromkeys(TaskStatus, 0)
    for status, count in session.execute(select(Task.status, func.count()).group_by(Task.status)):
        counts[TaskStatus(status)] = count
    return counts


def database_problem(*, session: Session) -> str | None:
    """None when the database answers, else why not (for the readiness probe)."""
    try:
        session.execute(text("SELECT 1"))
        session.rollback()
    except SQLAlchemyError as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None
