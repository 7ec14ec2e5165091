"""What a chained task waits for: the conditions the scheduler and chains.py share.

A task submitted with `input_from` or `model_from` names an upstream task by uid. Until that
upstream finishes, the matching blob key of the dependent (input_blob_key, model_from_blob_key)
is NULL: the task is pending but not ready, and nothing publishes it. chains.py fills the key
with the upstream's output when it finishes, or ends the dependent when the upstream cannot.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, and_, or_

from inference_server.contract import TaskStatus
from private_api.models import Task


def waiting_for(
    *,
    input_from: str | None,
    input_blob_key: str | None,
    model_from: str | None,
    model_from_blob_key: str | None,
) -> str | None:
    """The uid of the upstream whose output a pending task still lacks; None when it has all."""
    if input_from is not None and input_blob_key is None:
        return input_from
    if model_from is not None and model_from_blob_key is None:
        return model_from
    return None


def waiting_for_row(row: Any) -> str | None:
    """waiting_for of a Task row, or of a result row selecting the same four columns."""
    return waiting_for(
        input_from=row.input_from,
        input_blob_key=row.input_blob_key,
        model_from=row.model_from,
        model_from_blob_key=row.model_from_blob_key,
    )


def has_its_upstream_outputs() -> ColumnElement[bool]:
    """SQL: the task waits for no upstream (always true for a task that names none)."""
    return and_(
        or_(Task.input_from.is_(None), Task.input_blob_key.is_not(None)),
        or_(Task.model_from.is_(None), Task.model_from_blob_key.is_not(None)),
    )


def waits_on(uid: str) -> ColumnElement[bool]:
    """SQL: a pending task still waiting for the output of task `uid`."""
    return and_(
        Task.status == TaskStatus.PENDING,
        or_(
            and_(Task.input_from == uid, Task.input_blob_key.is_(None)),
            and_(Task.model_from == uid, Task.model_from_blob_key.is_(None)),
        ),
    )


def waiting_reason(upstream_uid: str, upstream_status: TaskStatus | None) -> str:
    state = upstream_status.value if upstream_status is not None else "unknown"
    return f"waiting for upstream {upstream_uid} ({state})"
