"""Chained tasks: a task whose input (`input_from`) or /model (`model_from`) is another task's output.

Submission. The dependent names its upstream by uid; the upstream must already exist, be the
caller's own (an operator may chain any task, an anonymous caller only anonymous tasks: the
rule of access.visible_task, so a foreign task answers like an unknown one), and not have ended
without an output. Because an upstream must exist before its dependent is accepted, a dependent
can never name a task submitted after it, nor itself: every chain is a DAG, cycles cannot be
made, and a whole graph is submitted at once upstream first, without waiting for any task to run.

Waiting. Until the upstream finishes, the dependent's input_blob_key (or model_from_blob_key) is
NULL: it is pending, unpublished, and says so (scheduling, upstreams.waiting_reason).

Settling. After every change of a task's state, `settle` looks at what waits on it:
- finished: the waiting dependents get its output, the same blob (shared, never copied; see
  blob_sharing), and are published at once when nothing else holds them;
- failed, cancelled, deleted or expired: they end, and so does what waits on them, transitively:
  cancelled when the upstream was cancelled, failed otherwise, with "upstream <uid> ..." as error.
Every step is a conditional update, so `settle` may run twice, or race another `settle`, and the
result is the same; `settle_stranded` (the maintenance loop) settles whatever a crash between an
upstream's change and its `settle` left waiting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, aliased

from inference_server.contract import TASK_UID_RE, FailureCategory, TaskStatus, TaskSubmitFields, WebhookEvent
from private_api import upstreams, webhooks
from private_api.access import Actor, may_see
from private_api.exceptions import Conflict, NotFound, Unprocessable
from private_api.models import Task, utcnow
from private_api.outbox import dispatch
from private_api.queue import TaskPublisher
from private_api.scheduling import SchedulingPolicy
from private_api.task_rows import BATCH_SIZE, update_task

log = logging.getLogger(__name__)

# What an upstream that ended without an output did, as its dependents' error says it.
ENDED_HOW = {
    TaskStatus.FAILED: "failed",
    TaskStatus.CANCELLED: "was cancelled",
    TaskStatus.DELETED: "was deleted",
    TaskStatus.EXPIRED: "expired",
}

WEBHOOK_EVENT = {TaskStatus.CANCELLED: WebhookEvent.CANCELLED, TaskStatus.FAILED: WebhookEvent.FAILED}


def check_input_source(*, has_zip: bool, input_from: str | None) -> None:
    """A task's input is its zip or an upstream's output: exactly one of them (422 otherwise)."""
    if has_zip and input_from is not None:
        raise Unprocessable(
            f"give either the {TaskSubmitFields.ZIP_FILE!r} file or {TaskSubmitFields.INPUT_FROM!r}, "
            "not both: with input_from the upstream task's output is the input"
        )
    if not has_zip and input_from is None:
        raise Unprocessable(
            f"the multipart body has no file field {TaskSubmitFields.ZIP_FILE!r} "
            f"(nor {TaskSubmitFields.INPUT_FROM!r}, an upstream task's uid)"
        )


def named_upstream(field_name: str, value: str | None) -> str | None:
    """The uid a form field names; an empty field names nothing, and what cannot be a uid is
    refused here (422) rather than looked up and echoed back whole."""
    if value is None or not value.strip():
        return None
    uid = value.strip()
    if not TASK_UID_RE.match(uid):
        raise Unprocessable(f"{field_name}: {uid[:80]!r} is not a task uid")
    return uid


@dataclass(frozen=True)
class NamedUpstreams:
    """The upstreams a new task names, as its row records them: the uids, and the outputs of
    those that have finished already (the others' keys stay NULL until `settle`)."""

    input_from: str | None = None
    model_from: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)

    @property
    def uids(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(uid for uid in (self.input_from, self.model_from) if uid is not None))


def _usable_upstream(session: Session, actor: Actor | None, uid: str, field_name: str) -> Task:
    """The upstream row, locked against changes (FOR SHARE) until the new task commits: on
    PostgreSQL it can neither end nor lose its output between this check and the insert.
    SQLite takes no lock for a read: a delete of a finished upstream in that instant can leave
    the new task an input whose file is gone, and the task fails when its consumer fetches it
    (SQLite serves one host and the tests; an ended upstream settling is covered either way)."""
    task = session.scalars(
        select(Task)
        .where(Task.uid == uid)
        .with_for_update(read=True, of=Task)
        .execution_options(populate_existing=True)
    ).first()
    if task is None or task.status == TaskStatus.DELETED or not may_see(actor, task):
        raise NotFound(f"{field_name}: task {uid} is unknown or was deleted")
    ended = ENDED_HOW.get(task.status)
    if ended is not None:
        raise Conflict(f"{field_name}: task {uid} {ended}; it has no output to build on")
    if task.status == TaskStatus.FINISHED and task.output_blob_key is None:
        raise Conflict(f"{field_name}: task {uid} finished but its output is missing")
    return task


def resolve_upstreams(
    session: Session, *, actor: Actor | None, input_from: str | None, model_from: str | None
) -> NamedUpstreams:
    """Check the named upstreams (404 unknown or not the caller's, 409 ended without output) and
    take the outputs of those finished already. Call inside the insert's transaction."""
    columns: dict[str, Any] = {}
    if input_from is not None:
        upstream = _usable_upstream(session, actor, input_from, TaskSubmitFields.INPUT_FROM)
        if upstream.status == TaskStatus.FINISHED:
            columns["input_blob_key"] = upstream.output_blob_key
            columns["input_sha256"] = upstream.output_sha256
    if model_from is not None:
        upstream = _usable_upstream(session, actor, model_from, TaskSubmitFields.MODEL_FROM)
        if upstream.status == TaskStatus.FINISHED:
            columns["model_from_blob_key"] = upstream.output_blob_key
    return NamedUpstreams(input_from=input_from, model_from=model_from, columns=columns)


def settle(
    *,
    session: Session,
    uid: str,
    publisher: TaskPublisher | None = None,
    policy: SchedulingPolicy | None = None,
) -> None:
    """Call after task `uid` changed state and committed: hand its output to what waits on it,
    or end what waits on it (see the module's docstring). With a publisher, dependents that are
    now ready are published at once rather than at the outbox's next round.

    Never raises for database trouble: the change it follows is committed already, and the
    maintenance loop's `settle_stranded` finishes the job."""
    try:
        upstream = session.execute(
            select(Task.status, Task.output_blob_key, Task.output_sha256).where(Task.uid == uid)
        ).first()
        session.rollback()
        if upstream is None:
            return
        if upstream.status == TaskStatus.FINISHED and upstream.output_blob_key is not None:
            ready = _hand_over(session, uid)
            if publisher is not None:
                for task_id in ready:
                    dispatch(session, publisher, policy or SchedulingPolicy(), task_id)
        elif upstream.status in ENDED_HOW or upstream.status == TaskStatus.FINISHED:
            _end_dependents(session, uid)
    except SQLAlchemyError:
        session.rollback()
        log.warning("could not settle the tasks waiting on %s; the maintenance loop will", uid, exc_info=True)


def _hand_over(session: Session, uid: str) -> list[int]:
    """The finished upstream's output becomes the waiting dependents' input or /model; returns
    the ids of those that now wait for nothing and are not published yet."""
    # Locked like at submission: a delete of the upstream waits for this commit, then finds the
    # dependents holding the blob (blob_sharing.is_held) and leaves it.
    upstream = session.execute(
        select(Task.status, Task.output_blob_key, Task.output_sha256)
        .where(Task.uid == uid)
        .with_for_update(read=True)
    ).first()
    if upstream is None or upstream.status != TaskStatus.FINISHED or upstream.output_blob_key is None:
        session.rollback()
        return []
    pending = Task.status == TaskStatus.PENDING
    session.execute(
        update(Task)
        .where(pending, Task.input_from == uid, Task.input_blob_key.is_(None))
        .values(input_blob_key=upstream.output_blob_key, input_sha256=upstream.output_sha256)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Task)
        .where(pending, Task.model_from == uid, Task.model_from_blob_key.is_(None))
        .values(model_from_blob_key=upstream.output_blob_key)
        .execution_options(synchronize_session=False)
    )
    ready = list(
        session.scalars(
            select(Task.id).where(
                pending,
                (Task.input_from == uid) | (Task.model_from == uid),
                Task.published_at.is_(None),
                upstreams.has_its_upstream_outputs(),
            )
        )
    )
    session.commit()
    if ready:
        log.info("task %s finished: %d dependent task(s) got its output", uid, len(ready))
    return ready


def _end_dependents(session: Session, uid: str) -> int:
    """End every task waiting on `uid`, and on those, transitively; returns how many ended."""
    ended = 0
    causes = [uid]
    while causes:
        cause = causes.pop()
        status = session.scalar(select(Task.status).where(Task.uid == cause))
        how = ENDED_HOW.get(status) if status is not None else None
        how = how or "ended without an output"
        # A cancellation is passed on as one; anything else makes the dependents fail.
        outcome = TaskStatus.CANCELLED if status == TaskStatus.CANCELLED else TaskStatus.FAILED
        waiting = list(session.scalars(select(Task.uid).where(upstreams.waits_on(cause))))
        for dependent in waiting:
            if update_task(
                session,
                Task.uid == dependent,
                upstreams.waits_on(cause),
                status=outcome,
                error=f"upstream {cause} {how}",
                failure=(
                    FailureCategory.CANCELLED
                    if outcome == TaskStatus.CANCELLED
                    else FailureCategory.UPSTREAM_FAILED
                ),
                finished_at=utcnow(),
                lease_expires_at=None,
            ):
                ended += 1
                causes.append(dependent)
                # Told in the same commit, like every other end of a task.
                webhooks.enqueue_for_uid(session, dependent, WEBHOOK_EVENT[outcome])
                log.info("task %s %s: upstream %s %s", dependent, outcome, cause, how)
        session.commit()
    return ended


def settle_stranded(
    *,
    session: Session,
    publisher: TaskPublisher | None = None,
    policy: SchedulingPolicy | None = None,
    limit: int = BATCH_SIZE,
) -> int:
    """Settle upstreams that ended while tasks still wait on them (a crash between the change and
    its `settle`, or a change made where no `settle` is called); returns how many were settled."""
    upstream = aliased(Task)
    stuck: set[str] = set()
    for named, key in ((Task.input_from, Task.input_blob_key), (Task.model_from, Task.model_from_blob_key)):
        stuck.update(
            session.scalars(
                select(upstream.uid)
                .join(Task, named == upstream.uid)
                .where(
                    Task.status == TaskStatus.PENDING,
                    key.is_(None),
                    upstream.status.not_in((TaskStatus.PENDING, TaskStatus.RUNNING)),
                )
                .distinct()
                .limit(limit)
            )
        )
    session.rollback()
    for uid in sorted(stuck):
        settle(session=session, uid=uid, publisher=publisher, policy=policy)
    return len(stuck)
