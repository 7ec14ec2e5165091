"""Pushing the cancel of a running task to the consumers (the heartbeat stays the fallback)."""

from __future__ import annotations

import logging

from inference_server.contract import TaskPublic, TaskStatus
from private_api.queue import TaskPublisher

log = logging.getLogger(__name__)


def push_cancel(publisher: TaskPublisher, task: TaskPublic) -> None:
    """After the commit of a cancel or delete: tell the consumers, when the task had started.
    Never raises: a lost push only means the consumer learns it at its next heartbeat."""
    if task.status not in (TaskStatus.CANCELLED, TaskStatus.DELETED) or task.started_at is None:
        return
    try:
        pushed = publisher.publish_cancel(task.uid)
    except Exception:
        log.exception(
            "task %s: pushing its cancel failed; its consumer learns it at its next heartbeat", task.uid
        )
        return
    if not pushed:
        log.info(
            "task %s: cancel not pushed (broker unreachable); its consumer learns it at its next heartbeat",
            task.uid,
        )
