"""Retention: after a configurable age, a task's files go; its row stays as the record.

A finished task becomes `expired` (polling it answers 553: finished, output gone). A failed or
cancelled task keeps its state and error text, but its input and log files go too: patient data
should not outlive its use just because the model failed on it.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from inference_server.contract import TaskStatus
from private_api.blobs import BlobStore
from private_api.models import Task, utcnow

log = logging.getLogger(__name__)

BATCH = 500


def expire_old_tasks(*, session: Session, blobs: BlobStore, max_age: timedelta) -> int:
    """Remove the files of terminal tasks that ended more than `max_age` ago; returns how many."""
    cutoff = utcnow() - max_age
    tasks = session.scalars(
        select(Task)
        .where(
            Task.status.in_([TaskStatus.FINISHED, TaskStatus.FAILED, TaskStatus.CANCELLED]),
            Task.finished_at < cutoff,
            or_(
                Task.input_blob_key.is_not(None),
                Task.output_blob_key.is_not(None),
                Task.log_blob_key.is_not(None),
            ),
        )
        .limit(BATCH)
        .with_for_update(skip_locked=True)
    ).all()
    doomed: list[str | None] = []
    for task in tasks:
        doomed += [task.input_blob_key, task.output_blob_key, task.log_blob_key]
        task.input_blob_key = task.output_blob_key = task.log_blob_key = None
        if task.status == TaskStatus.FINISHED:
            task.status = TaskStatus.EXPIRED
    # Rows first, files after the commit: a crash in between leaves orphan files, never a row
    # pointing at a file that is gone.
    session.commit()
    for key in doomed:
        blobs.delete(key)
    if tasks:
        log.info("retention: removed the files of %d task(s) that ended before %s", len(tasks), cutoff)
    return len(tasks)
