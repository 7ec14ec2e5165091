"""Waiting for a task to change: GET /api/tasks/{uid}/status?wait= and /api/tasks/{uid}/events.

Every waiting client of this process is a future in the one TaskWatch, which waits for all of
them at once with one long request to the private API (POST PrivateRoutes.TASKS_WAIT: for each
watched uid, the states its clients saw). So a thousand waiting clients hold no thread, no
database connection, no `private_api_concurrency` slot and no pooled connection each: the watch
has a connection of its own, and the slots are taken only by each client's own short reads (the
first, which also checks that the caller may see the task, and the last after a time-out).

A client whose uid and state the request in flight does not cover yet has it sent again
(after REISSUE_AFTER_S, so a crowd arriving at once costs a few requests, not one each); the
private API compares states, not events, so nothing that changed in between is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

import aiohttp
from fastapi import Depends
from pydantic import ValidationError

from inference_server.contract import (
    SERVICE_TOKEN_HEADER,
    Principal,
    PrivateRoutes,
    TaskPublic,
    TaskStatus,
    TaskWaitAnswer,
    TaskWaitRequest,
    task_state,
)
from inference_server.serving import app_state
from public_api import service
from public_api.config import PublicSettings
from public_api.upstream import PrivateAPI

log = logging.getLogger(__name__)

# How long one request to the private API waits at most; clients wait longer across several.
UPSTREAM_WAIT_S = 25.0
REISSUE_AFTER_S = 0.02
RETRY_AFTER_S = 0.5
# How long a caller's successful read of a task lets its next long polls of it skip that read:
# a crowd of clients polling again after each change costs the private API nothing but the wait.
READABLE_FOR_S = 10.0
PRUNE_ABOVE = 4096
# An idle event stream sends a comment this often, so proxies and clients keep it open.
KEEPALIVE_S = 15.0
KEEPALIVE = b": keep-alive\n\n"


class TaskGone(Exception):
    """The private API no longer knows a watched uid."""


class _Waiter:
    def __init__(self, uid: str, state: str) -> None:
        self.uid = uid
        self.state = state
        self.answer: asyncio.Future[TaskPublic | None] = asyncio.get_running_loop().create_future()


class TaskWatch:
    """The process's one watcher; build it in the lifespan (it needs the running loop), `aclose` after."""

    def __init__(self, settings: PublicSettings) -> None:
        self._url = settings.private_api_url.rstrip("/") + PrivateRoutes.TASKS_WAIT
        self._session = aiohttp.ClientSession(
            headers={SERVICE_TOKEN_HEADER: settings.service_token.get_secret_value()},
            # Its own few connections: waiting never takes a pooled one from the relayed calls.
            connector=aiohttp.TCPConnector(limit=4, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(
                total=None,
                connect=settings.private_api_connect_timeout_s,
                sock_read=UPSTREAM_WAIT_S + settings.private_api_read_timeout_s,
            ),
            raise_for_status=False,
        )
        self._waiters: dict[str, set[_Waiter]] = {}
        self._registered = asyncio.Event()
        # (uid, caller) -> until when the caller's read of the task counts; uid -> its latest state.
        self._readable: dict[tuple[str, str], float] = {}
        self._latest: dict[str, TaskPublic] = {}
        self._reads: dict[tuple[str, str], asyncio.Future[bytes]] = {}
        self._runner = asyncio.create_task(self._run(), name="task-watch")
        self.requests = 0  # upstream requests made (tests: a crowd costs a few, not one each)

    async def aclose(self) -> None:
        self._runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._runner
        await self._session.close()

    @staticmethod
    def _caller_key(caller: Principal | None) -> str:
        return "" if caller is None else f"{caller.role.value}:{caller.name}"

    def remember(self, uid: str, caller: Principal | None, task: TaskPublic) -> None:
        """`caller` just read `task` (so may see it): its long polls skip the read for a while."""
        if len(self._readable) > PRUNE_ABOVE:
            now = time.monotonic()
            self._readable = {key: until for key, until in self._readable.items() if until > now}
            kept = {uid for uid, _ in self._readable}
            self._latest = {uid: task for uid, task in self._latest.items() if uid in kept}
        self._readable[(uid, self._caller_key(caller))] = time.monotonic() + READABLE_FOR_S
        self._latest[uid] = task

    async def read_once(
        self, uid: str, caller: Principal | None, read: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        """`read()`, shared by every request of the same caller for the same task made while it
        runs: a crowd polling one task at once costs the private API one read, not one each."""
        key = (uid, self._caller_key(caller))
        flight = self._reads.get(key)
        if flight is None:
            flight = asyncio.ensure_future(read())
            self._reads[key] = flight
            flight.add_done_callback(lambda _done: self._reads.pop(key, None))
        return await asyncio.shield(flight)

    def known(self, uid: str, caller: Principal | None) -> TaskPublic | None:
        """The task's latest state this watch knows, if `caller` read it a moment ago."""
        until = self._readable.get((uid, self._caller_key(caller)))
        if until is None or until < time.monotonic():
            return None
        return self._latest.get(uid)

    @property
    def waiting(self) -> int:
        return sum(len(waiters) for waiters in self._waiters.values())

    async def changed(self, uid: str, state: str, timeout_s: float) -> TaskPublic | None:
        """The task once its state (task_state) is not `state`; None after `timeout_s`; raises
        TaskGone when the private API no longer knows the uid."""
        waiter = _Waiter(uid, state)
        self._waiters.setdefault(uid, set()).add(waiter)
        self._registered.set()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.answer), timeout_s)
        except TimeoutError:
            return None
        finally:
            waiting = self._waiters.get(uid)
            if waiting is not None:
                waiting.discard(waiter)
                if not waiting:
                    del self._waiters[uid]

    def _states(self) -> dict[str, list[str]]:
        return {uid: sorted({waiter.state for waiter in waiters}) for uid, waiters in self._waiters.items()}

    def _covered_by(self, states: dict[str, list[str]]) -> bool:
        return all(
            waiter.state in states.get(uid, ())
            for uid, waiters in self._waiters.items()
            for waiter in waiters
        )

    async def _run(self) -> None:
        while True:
            if not self._waiters:
                self._registered.clear()
                await self._registered.wait()
            self._registered.clear()
            states = self._states()
            asking = asyncio.create_task(self._ask(states))
            try:
                answer = await self._answer_unless_outdated(asking, states)
            except asyncio.CancelledError:
                asking.cancel()
                raise
            except Exception as exc:
                log.warning("waiting on the private API for %d task(s) failed: %r", len(states), exc)
                await asyncio.sleep(RETRY_AFTER_S)
                continue
            if answer is not None:
                self._deliver(answer)

    async def _answer_unless_outdated(
        self, asking: asyncio.Task[TaskWaitAnswer], states: dict[str, list[str]]
    ) -> TaskWaitAnswer | None:
        """The answer to `asking`; None when it was given up for a request that covers the
        clients who came since."""
        while True:
            registered = asyncio.create_task(self._registered.wait())
            try:
                await asyncio.wait((asking, registered), return_when=asyncio.FIRST_COMPLETED)
            finally:
                registered.cancel()
            if asking.done():
                return asking.result()
            self._registered.clear()
            if self._covered_by(states):
                continue
            await asyncio.sleep(REISSUE_AFTER_S)
            if asking.done():
                return asking.result()
            asking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asking
            return None

    async def _ask(self, states: dict[str, list[str]]) -> TaskWaitAnswer:
        self.requests += 1
        body = TaskWaitRequest(states=states, timeout_s=UPSTREAM_WAIT_S).model_dump(mode="json")
        async with self._session.post(self._url, json=body) as response:
            data = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {data[:300]!r}")
        try:
            return TaskWaitAnswer.model_validate_json(data)
        except ValidationError as exc:
            raise RuntimeError(f"unexpected answer: {exc}") from exc

    def _deliver(self, answer: TaskWaitAnswer) -> None:
        for task in answer.changed:
            if task.uid in self._latest:
                self._latest[task.uid] = task
            now = task_state(task)
            for waiter in list(self._waiters.get(task.uid, ())):
                if waiter.state != now and not waiter.answer.done():
                    waiter.answer.set_result(task)
        for uid in answer.unknown:
            for waiter in list(self._waiters.get(uid, ())):
                if not waiter.answer.done():
                    waiter.answer.set_exception(TaskGone(uid))


TaskWatchDep = Annotated[TaskWatch, Depends(app_state("task_watch"))]


async def status_after_change(
    api: PrivateAPI,
    watch: TaskWatch,
    uid: str,
    *,
    caller: Principal | None,
    wait_s: float,
    seen: TaskStatus | None,
) -> bytes:
    """The task's status JSON as soon as its state differs from what the caller saw (`seen`, a
    status; else the state now), or after `wait_s` as it is then. Unknown or not the caller's:
    the same error as the plain status read."""
    task = watch.known(uid, caller)
    if task is None or (seen is not None and task.status != seen):
        # The read checks that the caller may see the task; `known` skips it for a while after.
        body = await watch.read_once(uid, caller, lambda: service.task_status_json(api, uid, caller=caller))
        task = TaskPublic.model_validate_json(body)
        watch.remember(uid, caller, task)
        if seen is not None and task.status != seen:
            return body
    # A state remembered from an earlier answer may be out of date: the private API compares
    # it with the task as it is, and answers at once if they differ.
    with contextlib.suppress(TaskGone):  # the read below answers for it
        changed = await watch.changed(uid, task_state(task), wait_s)
        if changed is not None:
            # Who may see a task never changes; the caller's key is checked on every request.
            watch.remember(uid, caller, changed)
            return changed.model_dump_json().encode()
    return await watch.read_once(uid, caller, lambda: service.task_status_json(api, uid, caller=caller))


def server_sent_event(task: TaskPublic) -> bytes:
    return f"event: {task.status.value}\ndata: {task.model_dump_json()}\n\n".encode()


async def task_events(
    watch: TaskWatch, task: TaskPublic, *, keepalive_s: float | None = None
) -> AsyncIterator[bytes]:
    """`task` (as the caller may see it), then the task at each change of its state, until it
    has ended; a comment every `keepalive_s` while nothing changes."""
    idle_s = KEEPALIVE_S if keepalive_s is None else keepalive_s
    yield server_sent_event(task)
    while not task.status.is_terminal:
        try:
            changed = await watch.changed(task.uid, task_state(task), idle_s)
        except TaskGone:
            return
        if changed is None:
            yield KEEPALIVE
            continue
        task = changed
        yield server_sent_event(task)
