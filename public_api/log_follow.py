"""Following a task's log while it runs: GET /api/tasks/{uid}/logs?follow=true.

The consumer replaces the stored log with the whole text so far at least once a second, and with
the final log once the run is over. Following polls the private API every POLL_S (each poll its
own requests there, so nothing, a database connection least of all, is held in between) and
sends what was added since the last poll. Should the text change other than by growing (the
final log of a run past IS_MAX_LOG_BYTES keeps the end where the live one kept the start), the
new text follows whole after a marker line.

It ends once the task has ended and its final log is in: a finished or failed task's consumer
uploads that log before it reports the verdict, so one read after the end is seen is enough. A
cancelled run's consumer uploads it after it learns of the cancellation (its next heartbeat) and
has stopped the container, so a cancelled task that ran is followed for CANCELLED_FINAL_LOG_S more.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator

from inference_server.contract import Principal, TaskPublic, TaskStatus
from public_api import service
from public_api.errors import PublicAPIError
from public_api.upstream import PrivateAPI

log = logging.getLogger(__name__)

POLL_S = 0.5
# A consumer's heartbeat (5 s by default) plus its stop grace (2 s) and the upload, with room.
CANCELLED_FINAL_LOG_S = 30.0
REPLACED_MARKER = b"\n[inference-server] the log was replaced by the final log, which follows whole\n"


class _Sent:
    """What the follower has sent so far: its length and digest (not the text: up to the cap)."""

    def __init__(self) -> None:
        self.length = 0
        self.digest = hashlib.sha256()

    def new_part(self, text: bytes) -> bytes:
        """What of `text` the follower has not sent yet; updates what it has sent."""
        if len(text) >= self.length and hashlib.sha256(text[: self.length]).digest() == self.digest.digest():
            added = text[self.length :]
        else:
            added = REPLACED_MARKER + text
        self.length = len(text)
        self.digest = hashlib.sha256(text)
        return added


async def read_log(api: PrivateAPI, uid: str, *, caller: Principal | None) -> bytes:
    response = await service.open_logs(api, uid, caller=caller)
    try:
        return await response.aread()
    finally:
        await response.aclose()


async def follow_log(
    api: PrivateAPI, task: TaskPublic, *, caller: Principal | None, poll_s: float = POLL_S
) -> AsyncIterator[bytes]:
    """The log of `task` (as last read) as it grows, until the task has ended and its final log is in."""
    sent = _Sent()
    cancelled_deadline: float | None = None
    try:
        while True:
            added = sent.new_part(await read_log(api, task.uid, caller=caller))
            if added:
                yield added
            if task.status.is_terminal:
                if task.status != TaskStatus.CANCELLED or task.started_at is None:
                    return
                if cancelled_deadline is None:
                    cancelled_deadline = time.monotonic() + CANCELLED_FINAL_LOG_S
                elif time.monotonic() >= cancelled_deadline:
                    return
            await asyncio.sleep(poll_s)
            # The status before the log: a finished or failed task's final log is in by then.
            task = await service.get_task(api, task.uid, caller=caller)
    except PublicAPIError as exc:
        # Headers are sent: the stream can only end (the task deleted, the private API gone).
        log.info("following the log of task %s ended: %s", task.uid, exc)
