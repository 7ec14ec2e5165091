"""Getting committed pending tasks onto the queue exactly once, and the outbox that retries.

The database is the source of truth: a task is committed first and published after, so a broker
outage never loses an accepted task; whatever did not reach the queue the outbox sends later.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import ColumnElement, case, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from inference_server.contract import TaskStatus
from private_api.models import Task, utcnow
from private_api.queue import TaskPublisher
from private_api.task_rows import BATCH_SIZE, update_task

log = logging.getLogger(__name__)


class Publish(StrEnum):
    DONE = "done"
    SKIPPED = "skipped"  # someone else is publishing it, or it is no longer pending
    FAILED = "failed"  # broker (or database) unavailable: left to the outbox loop


def publish(
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
        claimed = update_task(
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
        update_task(session, Task.id == task_id, Task.published_at == claimed_at, published_at=previous)
        session.commit()
    except SQLAlchemyError:
        session.rollback()
        log.warning("task %s stays marked though unpublished; republished later", uid, exc_info=True)
    return Publish.FAILED


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
    waiting: ColumnElement[bool] = Task.published_at.is_(None)
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
        outcome = publish(
            session, publisher, task_id=row.id, uid=row.uid, priority=row.priority, previous=row.published_at
        )
        if outcome == Publish.FAILED:
            break  # broker still away: the next round tries again
        if outcome == Publish.DONE:
            published += 1
    if published:
        log.info("outbox published %d waiting tasks", published)
    return published
