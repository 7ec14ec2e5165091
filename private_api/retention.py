"""Retention: after a configurable age, a task's files go; its row stays as the record.

A finished task becomes `expired` (polling it answers 553: finished, output gone). A failed or
cancelled task keeps its state and error text, but its input and log files go too: patient data
should not outlive its use just because the model failed on it.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, or_, select, update
from sqlalchemy.orm import Session

from inference_server.contract import TaskStatus
from private_api import blob_sharing, chains
from private_api.blobs import BlobStore
from private_api.models import Task, utcnow

log = logging.getLogger(__name__)

BATCH = 500
EXPIRABLE = (TaskStatus.FINISHED, TaskStatus.FAILED, TaskStatus.CANCELLED)


def expire_old_tasks(*, session: Session, blobs: BlobStore, max_age: timedelta) -> int:
    """Remove the files of terminal tasks that ended more than `max_age` ago; returns how many.

    Each row changes by a conditional update, like every other state change: a task deleted or
    changed meanwhile (by its owner, say) no longer matches, keeps what that change left, and its
    files are not touched here.
    """
    cutoff = utcnow() - max_age
    rows = session.execute(
        select(
            Task.id,
            Task.uid,
            Task.status,
            Task.input_blob_key,
            Task.output_blob_key,
            Task.log_blob_key,
            Task.model_from_blob_key,
        )
        .where(
            Task.status.in_(EXPIRABLE),
            Task.finished_at < cutoff,
            or_(
                Task.input_blob_key.is_not(None),
                Task.output_blob_key.is_not(None),
                Task.log_blob_key.is_not(None),
                Task.model_from_blob_key.is_not(None),
            ),
        )
        .limit(BATCH)
    ).all()
    session.rollback()
    expired = 0
    for row in rows:
        # Rows first, files after the commit: a crash in between leaves orphan files, never a
        # row pointing at a file that is gone.
        changed = session.execute(
            update(Task)
            .where(
                Task.id == row.id,
                Task.status == row.status,
                Task.input_blob_key.is_not_distinct_from(row.input_blob_key),
                Task.output_blob_key.is_not_distinct_from(row.output_blob_key),
                Task.log_blob_key.is_not_distinct_from(row.log_blob_key),
                Task.model_from_blob_key.is_not_distinct_from(row.model_from_blob_key),
            )
            .values(
                input_blob_key=None,
                output_blob_key=None,
                log_blob_key=None,
                model_from_blob_key=None,
                status=TaskStatus.EXPIRED if row.status == TaskStatus.FINISHED else row.status,
            )
            .execution_options(synchronize_session=False)
        )
        session.commit()
        # An UPDATE's result is a CursorResult, with its rowcount; Session.execute is typed as Result.
        if cast(CursorResult[Any], changed).rowcount != 1:
            continue
        expired += 1
        # A cached result's output or an upstream's output may be another task's too.
        blob_sharing.release(
            session,
            blobs,
            (row.input_blob_key, row.output_blob_key, row.log_blob_key, row.model_from_blob_key),
        )
        # Whatever still waits on it can never have its output now.
        chains.settle(session=session, uid=row.uid)
    if expired:
        log.info("retention: removed the files of %d task(s) that ended before %s", expired, cutoff)
    return expired
