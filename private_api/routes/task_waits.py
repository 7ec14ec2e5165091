"""The batched long poll the public API's task watcher waits on (task_events.py)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from inference_server.contract import PrivateRoutes, TaskWaitAnswer, TaskWaitRequest
from inference_server.serving import app_state
from private_api.deps import require_service_token
from private_api.task_events import TaskEvents

router = APIRouter(tags=["tasks"], dependencies=[Depends(require_service_token)])

TaskEventsDep = Annotated[TaskEvents, Depends(app_state("task_events"))]


async def _until_disconnected(request: Request) -> None:
    # The body is read already: the next message is the disconnect (or the end of the answer).
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post(PrivateRoutes.TASKS_WAIT, response_model=TaskWaitAnswer)
async def wait_for_tasks(wait: TaskWaitRequest, request: Request, events: TaskEventsDep) -> TaskWaitAnswer:
    """Answered as soon as one of the tasks is in a state other than those given for it (at once
    if one is already), or after timeout_s with an empty answer. Holds no thread and no database
    connection while it waits; a caller that hangs up ends its wait."""
    answer = asyncio.ensure_future(events.wait(wait.states, wait.timeout_s))
    hang_up = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait((answer, hang_up), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in (hang_up, answer):
            if not waiting.done():
                waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
    # The caller hung up: the answer goes nowhere.
    return answer.result() if not answer.cancelled() else TaskWaitAnswer()
