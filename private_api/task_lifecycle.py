"""Tasks as users see them: submit, publish, look up, list, cancel and delete, and their files."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from inference_server.contract import AuditAction, FailureCategory, TaskPublic, TaskStatus, WebhookEvent
from private_api import audit, blob_sharing, chains, webhooks
from private_api.access import Actor, owner_conditions, visible_task
from private_api.blobs import BlobStore, StoredBlob
from private_api.config import PrivateSettings
from private_api.exceptions import ActorForbidden, Conflict, DomainError, NotFound, TooManyActiveTasks
from private_api.keys import submission_limits
from private_api.model_registry import required_model
from private_api.models import ApiKey, Model, Task, utcnow
from private_api.outbox import Publish, dispatch
from private_api.queue import TaskPublisher
from private_api.scheduling import SchedulingPolicy, pending_task_waiting_reason, waiting_reasons
from private_api.task_rows import (
    ACTIVE_STATUSES,
    load_task,
    new_task_uid,
    sql_time,
    task_public,
    update_task,
)

log = logging.getLogger(__name__)


# How soon a caller at its limit of active tasks is told to try again (Retry-After).
ACTIVE_LIMIT_RETRY_AFTER_S = 10


def check_submission(
    *, session: Session, actor: Actor | None, priority: int, settings: PrivateSettings, lock: bool = False
) -> None:
    """Refuse a submission above the key's maximum priority (403) or past its number of active
    tasks (429 with Retry-After). The route calls it before the upload is received, so a refused
    body is never stored, and `create_task` again in its insert transaction with `lock`: the
    key's row is locked (SELECT ... FOR UPDATE, on PostgreSQL) until the insert commits, so two
    submissions of one key are counted one after the other and never both pass the limit.
    `actor` None is the platform itself: no limits."""
    if actor is None:
        return
    if lock and actor.name is not None:
        session.execute(select(ApiKey.id).where(ApiKey.name == actor.name).with_for_update())
    limits = submission_limits(
        session,
        name=actor.name,
        is_operator=actor.is_operator,
        default_max_priority=settings.default_max_priority,
        default_max_active_tasks=settings.default_max_active_tasks,
    )
    who = "anonymous submissions" if actor.name is None else f"key {actor.name!r}"
    if priority > limits.max_priority:
        raise ActorForbidden(
            f"priority {priority} is above the maximum priority of {who} ({limits.max_priority}); "
            "an operator may raise it (inference-server keys set NAME --max-priority N)"
        )
    if limits.max_active_tasks and actor.name is not None:
        active = session.scalar(
            select(func.count())
            .select_from(Task)
            .where(Task.owner == actor.name, Task.status.in_(ACTIVE_STATUSES))
        )
        if (active or 0) >= limits.max_active_tasks:
            raise TooManyActiveTasks(
                f"{who} has {active} pending or running tasks, its limit of active tasks "
                f"({limits.max_active_tasks}); submit again once one ends or is cancelled",
                ACTIVE_LIMIT_RETRY_AFTER_S,
            )


def create_task(
    *,
    session: Session,
    model_human_readable_id: str,
    priority: int,
    input_blob: StoredBlob | None,
    owner: str | None = None,
    actor: Actor | None = None,
    settings: PrivateSettings | None = None,
    params: dict[str, Any] | None = None,
    use_cache: bool = True,
    input_from: str | None = None,
    model_from: str | None = None,
    webhook_url: str | None = None,
) -> TaskPublic:
    """Insert a pending task for an already stored input; the caller deletes the blob if this raises.

    Instead of `input_blob`, `input_from` names the task whose output is the input; `model_from`
    the task whose output is mounted at /model (chains.py: both must be `actor`'s own, and the
    task waits unpublished until they finish).

    With `settings`, the acting key's limits are checked again in the insert's transaction
    (`check_submission`). Publishing is a separate step (`publish_task`) after the commit, so a
    broker outage never loses an accepted task nor fails the submit.
    """
    chains.check_input_source(has_zip=input_blob is not None, input_from=input_from)
    if settings is not None:
        try:
            check_submission(session=session, actor=actor, priority=priority, settings=settings, lock=True)
        except DomainError:
            session.rollback()
            raise
    model = required_model(session, model_human_readable_id)
    try:
        chained = chains.resolve_upstreams(session, actor=actor, input_from=input_from, model_from=model_from)
    except DomainError:
        session.rollback()
        raise
    given_input = (
        {} if input_blob is None else {"input_blob_key": input_blob.key, "input_sha256": input_blob.sha256}
    )
    task = Task(
        uid=new_task_uid(),
        model=model,
        status=TaskStatus.PENDING,
        priority=priority,
        attempts=0,
        created_at=utcnow(),
        owner=owner,
        params=params,  # checked already: task_params.submitted_params
        use_cache=use_cache,
        input_from=chained.input_from,
        model_from=chained.model_from,
        **given_input,
        **chained.columns,
        webhook_url=webhook_url,  # checked already: webhooks.accepted_webhook_url
    )
    session.add(task)
    try:
        session.flush()
        public = task_public(task)
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        # The model was deleted between the lookup and the insert.
        raise NotFound(f"model {model_human_readable_id!r} is not registered") from exc
    log.info("task %s accepted for model %s (priority %d)", public.uid, model_human_readable_id, priority)
    # An upstream that changed just before this commit settled without seeing this task.
    for upstream in chained.uids:
        chains.settle(session=session, uid=upstream)
    return public


def publish_task(*, session: Session, publisher: TaskPublisher, policy: SchedulingPolicy, uid: str) -> bool:
    """Put a freshly committed task on the queue unless the scheduler holds it back; never raises
    for broker or bookkeeping errors."""
    task_id = session.scalar(select(Task.id).where(Task.uid == uid))
    session.rollback()  # end the read; publishing may wait on the broker
    if task_id is None:
        return False
    return dispatch(session, publisher, policy, task_id) == Publish.DONE


def get_task(
    *, session: Session, uid: str, actor: Actor | None = None, policy: SchedulingPolicy | None = None
) -> TaskPublic:
    """The task; with `policy`, a pending one says why it waits (waiting_reason)."""
    task = visible_task(session, uid, actor)
    public = task_public(task)
    if policy is not None and task.status == TaskStatus.PENDING:
        public.waiting_reason = pending_task_waiting_reason(session, policy, task)
    return public


@dataclass(frozen=True)
class TaskFilters:
    """What a task list may be narrowed to, beside its state: a model's id, an owner's key name,
    and the start of a uid (LIKE wildcards in it match only themselves)."""

    model: str | None = None
    owner: str | None = None
    uid_prefix: str | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = []
        if self.model is not None:
            conditions.append(Task.model.has(Model.human_readable_id == self.model))
        if self.owner is not None:
            # Added to the caller's own scope, never instead of it: a user naming someone else
            # gets an empty list.
            conditions.append(Task.owner == self.owner)
        if self.uid_prefix is not None:
            conditions.append(Task.uid.startswith(self.uid_prefix, autoescape=True))
        return conditions


def list_tasks(
    *,
    session: Session,
    actor: Actor | None,
    status: TaskStatus | None = None,
    limit: int = 100,
    offset: int = 0,
    policy: SchedulingPolicy | None = None,
    filters: TaskFilters | None = None,
) -> list[TaskPublic]:
    """The tasks `actor` may see, newest first; deleted ones are left out. With `policy`, pending
    ones say why they wait (waiting_reason).

    Anonymous callers get an empty list: anonymous tasks are reachable only by their uid, and
    listing them would hand every anonymous caller the uids of all the others.
    """
    if actor is not None and actor.name is None and not actor.is_operator:
        return []
    statement = select(Task).where(Task.status != TaskStatus.DELETED, *owner_conditions(actor))
    if status is not None:
        statement = statement.where(Task.status == status)
    if filters is not None:
        statement = statement.where(*filters.conditions())
    tasks = list(session.scalars(statement.order_by(Task.id.desc()).offset(offset).limit(limit)))
    reasons = waiting_reasons(session, policy, tasks) if policy is not None else {}
    return [task_public(task).model_copy(update={"waiting_reason": reasons.get(task.uid)}) for task in tasks]


def input_blob_key(*, session: Session, uid: str, actor: Actor | None = None) -> str:
    task = visible_task(session, uid, actor)
    if task.input_blob_key is None:
        raise NotFound(f"task {uid} has no input")
    return task.input_blob_key


def model_from_blob_key(*, session: Session, uid: str, actor: Actor | None = None) -> str:
    """The upstream output a chained task mounts at /model (its own model's zip otherwise)."""
    task = visible_task(session, uid, actor)
    if task.model_from is None:
        raise NotFound(f"task {uid} has no model_from: its model's own zip is mounted at /model")
    if task.model_from_blob_key is None:
        raise NotFound(f"task {uid} waits for upstream {task.model_from}: its output does not exist yet")
    return task.model_from_blob_key


def output_blob_key(*, session: Session, uid: str, actor: Actor | None = None) -> str:
    task = visible_task(session, uid, actor)
    if task.status != TaskStatus.FINISHED:
        raise Conflict(f"task {uid} is {task.status}; an output exists only once it is finished")
    if task.output_blob_key is None:
        raise NotFound(f"task {uid} is finished but its output is missing")
    return task.output_blob_key


def log_blob_key(*, session: Session, uid: str, actor: Actor | None = None) -> str | None:
    return visible_task(session, uid, actor).log_blob_key


def cancel_task(*, session: Session, uid: str, actor: Actor | None = None) -> TaskPublic:
    """pending/running -> cancelled; a terminal task is answered unchanged.

    A running task's consumer learns it from its next heartbeat (keep_running false).
    """
    changed = update_task(
        session,
        Task.uid == uid,
        Task.status.in_(ACTIVE_STATUSES),
        *owner_conditions(actor),
        status=TaskStatus.CANCELLED,
        failure=FailureCategory.CANCELLED,
        finished_at=utcnow(),
        lease_expires_at=None,
    )
    task = visible_task(session, uid, actor)
    if changed:
        webhooks.enqueue(session, task, WebhookEvent.CANCELLED)
        audit.record(session, audit.AuditActor.of(actor), AuditAction.TASK_CANCELLED, uid)
    public = task_public(task)
    session.commit()
    if changed:
        log.info("task %s cancelled", uid)
        chains.settle(session=session, uid=uid)  # what waits on it is cancelled too
    return public


def delete_task(*, session: Session, blobs: BlobStore, uid: str, actor: Actor | None = None) -> TaskPublic:
    """Cancel if active, mark deleted, drop the input/output/log files; the row stays as a tombstone."""
    changed = update_task(
        session,
        Task.uid == uid,
        Task.status != TaskStatus.DELETED,
        *owner_conditions(actor),
        status=TaskStatus.DELETED,
        finished_at=func.coalesce(Task.finished_at, sql_time(utcnow())),
        lease_expires_at=None,
    )
    if not changed:
        session.rollback()
        raise NotFound(f"task {uid} is unknown or was deleted")
    task = load_task(session, uid)
    assert task is not None  # the UPDATE above just matched it, under our write lock
    keys = (task.input_blob_key, task.output_blob_key, task.log_blob_key, task.model_from_blob_key)
    task.input_blob_key = task.output_blob_key = task.log_blob_key = task.model_from_blob_key = None
    public = task_public(task)
    audit.record(session, audit.AuditActor.of(actor), AuditAction.TASK_DELETED, uid)
    session.commit()
    blob_sharing.release(session, blobs, keys)
    log.info("task %s deleted", uid)
    chains.settle(session=session, uid=uid)  # what still waits on it fails
    return public
