"""What the readiness probe and /metrics ask of the database."""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from inference_server.contract import TaskStatus
from private_api.models import Task


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
