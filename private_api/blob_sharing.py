"""Blobs several tasks point at: a cached result's output, an upstream's output used as a
chained task's input. They are shared, never copied, so a file goes only when no task still
holds it: deleting or expiring one task never removes another's output.

Callers clear their own row's keys and commit first, then call `release`. A task that starts
sharing a blob sets its key, commits, and then checks with `still_stored` that the file was not
released in between (a hit that finds it gone is a miss).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from private_api.blobs import BlobStore
from private_api.models import Task

log = logging.getLogger(__name__)


def is_held(session: Session, key: str) -> bool:
    """Whether any task row still points at the blob, as input, output or model_from."""
    held = session.scalar(
        select(Task.id)
        .where(
            or_(
                Task.input_blob_key == key,
                Task.output_blob_key == key,
                # A chained task's /model: an upstream's output (chains.py).
                Task.model_from_blob_key == key,
            )
        )
        .limit(1)
    )
    return held is not None


def release(session: Session, blobs: BlobStore, keys: Iterable[str | None]) -> None:
    """Delete each blob no task holds any more (call after committing the rows that let go)."""
    for key in keys:
        if key is None:
            continue
        if is_held(session, key):
            log.info("blob %s kept: another task still holds it", key)
            continue
        blobs.delete(key)
    session.rollback()  # end the read transaction the checks opened


def still_stored(blobs: BlobStore, key: str) -> bool:
    return blobs.exists(key)
