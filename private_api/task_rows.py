"""The low-level task row operations every part of the service layer is built from.

Every state change is one conditional UPDATE (`... WHERE status = <expected>`) whose rowcount
says whether this caller won, so two consumers racing for a task, a cancel racing an output
upload, or two API replicas reaping the same lease resolve the same way on SQLite and on
PostgreSQL: exactly one wins and the others get a Conflict. Blobs are deleted only after the
commit that stops pointing at them; new blobs are removed by the caller if the commit fails.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, literal, select, update
from sqlalchemy.orm import Session

from inference_server.contract import TaskPublic, TaskStatus
from private_api.models import Task, UTCDateTime

ACTIVE_STATUSES = (TaskStatus.PENDING, TaskStatus.RUNNING)
# How many rows one round of background work (outbox, reaper) takes on.
BATCH_SIZE = 200
# Set in a session's info by a task change; its commit wakes the task waiters (task_events.py).
TASK_CHANGED_MARK = "task_changed"


def new_task_uid() -> str:
    # 192 random bits: the uid is the only thing a v1.2 client needs to read a result. One in 64
    # would start with "-", which command lines (`infer cancel UID`) take for an option, so those
    # are drawn again.
    while (uid := secrets.token_urlsafe(24)).startswith("-"):
        pass
    return uid


def sql_time(moment: datetime) -> ColumnElement[datetime]:
    """A datetime as a SQL value of the UTC column type (for CASE/COALESCE expressions)."""
    return literal(moment, UTCDateTime())


def update_task(session: Session, *conditions: Any, **values: Any) -> bool:
    """One conditional UPDATE; True when exactly this call changed the row."""
    result = session.execute(
        update(Task).where(*conditions).values(**values).execution_options(synchronize_session=False)
    )
    # An UPDATE's result is a CursorResult, with its rowcount; Session.execute is typed as Result.
    changed = cast(CursorResult[Any], result).rowcount == 1
    if changed:
        session.info[TASK_CHANGED_MARK] = True
    return changed


def load_task(session: Session, uid: str) -> Task | None:
    statement = select(Task).where(Task.uid == uid).execution_options(populate_existing=True)
    return session.scalars(statement).first()


def task_public(task: Task) -> TaskPublic:
    return TaskPublic.model_validate(task)


def describe_holder(task: Task) -> str:
    """Who holds a task, or its state when nobody does (for Conflict details)."""
    if task.status == TaskStatus.RUNNING:
        return f"running on consumer {task.consumer_id!r}"
    return str(task.status)
