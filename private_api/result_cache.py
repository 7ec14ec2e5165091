"""The result cache: a cacheable model's task answered with a finished task's output.

The consumer asks right after claiming a task of a cacheable model, naming the image ID it
resolved (a tag rebuilt with other contents has another ID, so it misses). The key hashes that
ID, the model zip's sha256 (the model_from upstream's output's instead, for a fine-tuning task),
the input's sha256 and the canonical params. It is stored on the task whether or not it hits, so
a task that misses and then finishes answers later ones. A hit shares the original's output
blob, never copies it: blob_sharing keeps a shared blob until no task holds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from inference_server.contract import CacheAnswer, TaskStatus, WebhookEvent
from private_api import blob_sharing, chains, webhooks
from private_api.blobs import BlobStore
from private_api.exceptions import Conflict, NotFound
from private_api.models import Task, utcnow
from private_api.queue import TaskPublisher
from private_api.scheduling import SchedulingPolicy
from private_api.task_params import canonical_params
from private_api.task_rows import describe_holder, load_task, update_task

log = logging.getLogger(__name__)

# Finished tasks tried per lookup: one whose output file is gone (it lost a race with a delete)
# is passed over, and a run of those is not worth more queries.
MAX_CANDIDATES = 5

MISS = CacheAnswer(hit=False)


def cache_key(
    *, image_id: str, model_zip_sha256: str | None, input_sha256: str | None, params: dict[str, Any] | None
) -> str:
    """sha256 over the parts as one JSON array, so no two different sets of parts read alike."""
    parts = [image_id, model_zip_sha256 or "", input_sha256 or "", canonical_params(params)]
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def _model_files_sha256(session: Session, task: Task) -> str | None:
    """What is mounted at /model: the model zip, or the model_from upstream's output."""
    if task.model_from_blob_key is None:
        return task.model.model_zip_sha256
    upstream_sha256 = session.scalar(
        select(Task.output_sha256).where(Task.output_blob_key == task.model_from_blob_key).limit(1)
    )
    # A blob key names one stored file for good, so it identifies the contents as well.
    return upstream_sha256 or f"blob:{task.model_from_blob_key}"


def _held_task(session: Session, uid: str, consumer_id: str) -> Task:
    task = load_task(session, uid)
    if task is None:
        raise NotFound(f"task {uid} is unknown")
    if task.status != TaskStatus.RUNNING or task.consumer_id != consumer_id:
        session.rollback()
        raise Conflict(f"consumer {consumer_id!r} does not hold task {uid}: it is {describe_holder(task)}")
    return task


def _held_by(uid: str, consumer_id: str) -> tuple[Any, ...]:
    return (Task.uid == uid, Task.status == TaskStatus.RUNNING, Task.consumer_id == consumer_id)


def _finished_with_key(
    session: Session, key: str, uid: str, owner: str | None, across_owners: bool
) -> list[tuple[str, str | None, str | None]]:
    """Finished tasks with this key and an output, newest first: (uid, output key, its sha256);
    only the owner's own unless across_owners."""
    same_owner = () if across_owners else (Task.owner == owner,)
    rows = session.execute(
        select(Task.uid, Task.output_blob_key, Task.output_sha256)
        .where(
            Task.cache_key == key,
            Task.status == TaskStatus.FINISHED,
            Task.output_blob_key.is_not(None),
            Task.uid != uid,
            *same_owner,
        )
        .order_by(Task.finished_at.desc())
        .limit(MAX_CANDIDATES)
    ).all()
    session.rollback()  # end the read before the file system is asked
    return [(row.uid, row.output_blob_key, row.output_sha256) for row in rows]


def _held_by_another(session: Session, blob_key: str, task_id: int) -> bool:
    other = session.scalar(
        select(Task.id)
        .where(
            Task.id != task_id,
            or_(Task.input_blob_key == blob_key, Task.output_blob_key == blob_key),
        )
        .limit(1)
    )
    return other is not None


def lookup(
    *,
    session: Session,
    blobs: BlobStore,
    uid: str,
    consumer_id: str,
    image_id: str,
    across_owners: bool = False,
    publisher: TaskPublisher | None = None,
    policy: SchedulingPolicy | None = None,
) -> CacheAnswer:
    """Store the task's cache key; unless it was submitted with cache=false, finish it from a
    finished task with the same key whose output is still stored. Only its holder may ask.
    A hit is a finish like any other: its webhook hears of it, and what waits on it goes on
    (chains.settle; with `publisher`, published at once)."""
    answered = session.execute(
        select(Task.cached_from).where(
            Task.uid == uid, Task.status == TaskStatus.FINISHED, Task.consumer_id == consumer_id
        )
    ).first()
    if answered is not None and answered.cached_from is not None:
        # The same consumer asking again (its first answer was lost on the way): the same answer,
        # rather than a refusal that would make it run the task after all.
        session.rollback()
        return CacheAnswer(hit=True, cached_from=answered.cached_from)
    task = _held_task(session, uid, consumer_id)
    if not task.model.cacheable:
        session.rollback()
        return MISS
    # Anonymous callers share no identity to keep their results apart by.
    use_cache = task.use_cache and (across_owners or task.owner is not None)
    owner = task.owner
    key = cache_key(
        image_id=image_id,
        model_zip_sha256=_model_files_sha256(session, task),
        input_sha256=task.input_sha256,
        params=task.params,
    )
    if not update_task(session, *_held_by(uid, consumer_id), cache_key=key):
        session.rollback()
        _held_task(session, uid, consumer_id)  # raises: it was cancelled or taken meanwhile
    session.commit()
    if not use_cache:
        log.info("task %s: cache=false, runs (key %s)", uid, key[:12])
        return MISS
    for original_uid, output_key, output_sha256 in _finished_with_key(
        session, key, uid, owner, across_owners
    ):
        if output_key is None or not blob_sharing.still_stored(blobs, output_key):
            continue
        if _finish_from(session, blobs, uid, consumer_id, original_uid, output_key, output_sha256):
            log.info("task %s answered from the cache: the output of task %s", uid, original_uid)
            chains.settle(session=session, uid=uid, publisher=publisher, policy=policy)
            return CacheAnswer(hit=True, cached_from=original_uid)
    session.rollback()
    return MISS


def _finish_from(
    session: Session,
    blobs: BlobStore,
    uid: str,
    consumer_id: str,
    original_uid: str,
    output_key: str,
    output_sha256: str | None,
) -> bool:
    """running -> finished with the original's output, shared; False when the output went meanwhile."""
    now = utcnow()
    log_blob = blobs.save(
        [
            f"[{now.isoformat()}] answered from the result cache: the output of task {original_uid} "
            "(same image ID, model files, input and params); no container ran.\n".encode()
        ],
        "logs",
        suffix=".txt",
    )
    before = session.execute(
        select(Task.id, Task.log_blob_key, Task.lease_expires_at).where(Task.uid == uid)
    ).one()
    finished = update_task(
        session,
        *_held_by(uid, consumer_id),
        Task.output_blob_key.is_(None),
        status=TaskStatus.FINISHED,
        output_blob_key=output_key,
        output_sha256=output_sha256,
        cached_from=original_uid,
        exit_code=0,
        error=None,
        log_blob_key=log_blob.key,
        finished_at=now,
        # No container ran on this attempt.
        run_started_at=None,
        run_finished_at=None,
        lease_expires_at=None,
    )
    if not finished:
        session.rollback()
        blobs.delete(log_blob.key)
        _held_task(session, uid, consumer_id)  # raises: it was cancelled or taken meanwhile
        return False
    # In the hit's own commit, so the event is never lost. Should the hit be undone below (a
    # delete raced it), the run's own "finished" follows later: receivers take events at least
    # once, repeats included.
    webhooks.enqueue_for_uid(session, uid, WebhookEvent.FINISHED)
    session.commit()
    # A delete of the original that cleared its keys before our commit may already have found
    # the blob unheld (blob_sharing.release): only a holder besides us proves it is still kept.
    if _held_by_another(session, output_key, before.id) and blobs.exists(output_key):
        session.rollback()
        blobs.delete(before.log_blob_key)
        return True
    # Back to running as it was, for its consumer to run it: the shared output was released.
    update_task(
        session,
        Task.id == before.id,
        Task.status == TaskStatus.FINISHED,
        Task.cached_from == original_uid,
        status=TaskStatus.RUNNING,
        output_blob_key=None,
        output_sha256=None,
        cached_from=None,
        exit_code=None,
        log_blob_key=before.log_blob_key,
        finished_at=None,
        lease_expires_at=before.lease_expires_at,
    )
    session.commit()
    blobs.delete(log_blob.key)
    log.warning("task %s: the output of task %s went while answering from it; it runs", uid, original_uid)
    return False
