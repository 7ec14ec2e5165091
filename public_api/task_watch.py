"""Waiting for a task to change: GET /api/tasks/{uid}/status?wait= and /api/tasks/{uid}/events.

Every waiting client of this process is a future in the one TaskWatch, which waits for all of
them at once with one long request to the private API (POST PrivateRoutes.TASKS_WAIT: for each
watched uid, the states its clients saw). So a thousand waiting clients hold no thread, no
database connection, no `private_api_concurrency` slot and no pooled connection each: the watch
has a connection of its own, and the slots are taken only by each client's own short reads (the
first, which also checks that the caller may see the task, and the last after a time-out).

A client whose uid and state no request in flight covers gets a new request that carries every
waiting client (after REISSUE_AFTER_S, doubled for each request already out, so a crowd arriving at
once costs a few requests, not one each). The older requests stay out until the new one has been
out SUPERSEDED_AFTER_S, so an answer they are bringing is never dropped. The private API compares
states, not events, so nothing that changed in between is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
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
    WakeOn,
    state_is_current,
    status_is_current,
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
# A request is surely with the private API this long after it was sent: older ones can go.
SUPERSEDED_AFTER_S = 0.5
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


@dataclass
class _Ask:
    """One request in flight to the private API: the states it carries, and since when."""

    states: dict[str, list[str]]
    request: asyncio.Task[TaskWaitAnswer]
    sent_at: float


class TaskWatch:
    """The process's one watcher; build it in the lifespan (it needs the running loop), `aclose` after."""

    def __init__(self, settings: PublicSettings) -> None:
        self._url = settings.private_api_url.rstrip("/") + PrivateRoutes.TASKS_WAIT
        self._session = aiohttp.ClientSession(
            headers={SERVICE_TOKEN_HEADER: settings.service_token.get_secret_value()},
            # Its own few connections: waiting never takes a pooled one from the relayed calls.
            connector=aiohttp.TCPConnector(limit=8, keepalive_timeout=60),
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
        """The task once `state` (a task_state) no longer describes it; None after `timeout_s`; raises
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

    def _uncovered(self, asks: list[_Ask]) -> bool:
        """Whether some client waits on a (uid, state) that no request in flight carries."""
        return any(
            not any(waiter.state in ask.states.get(uid, ()) for ask in asks)
            for uid, waiters in self._waiters.items()
            for waiter in waiters
        )

    async def _run(self) -> None:
        # Oldest first. Each request carries every client waiting when it was sent, so a younger
        # one covers the older ones; they are cancelled only once it has been out for
        # SUPERSEDED_AFTER_S. Cancelling them at once lost the answer they were bringing, and
        # under a steady stream of new clients no answer got through for as long as it lasted.
        asks: list[_Ask] = []
        try:
            while True:
                self._registered.clear()
                now = time.monotonic()
                if len(asks) > 1 and now - asks[-1].sent_at >= SUPERSEDED_AFTER_S:
                    for superseded in asks[:-1]:
                        superseded.request.cancel()
                    del asks[:-1]
                wake_at = asks[-1].sent_at + SUPERSEDED_AFTER_S if len(asks) > 1 else math.inf
                if self._uncovered(asks):
                    # A crowd arriving at once costs a few requests: each one more in flight
                    # doubles the pause before the next.
                    due = asks[-1].sent_at + REISSUE_AFTER_S * 2 ** (len(asks) - 1) if asks else now
                    if due <= now:
                        asks.append(self._send(self._states()))
                    else:
                        wake_at = min(wake_at, due)
                if not asks:
                    await self._registered.wait()
                    continue
                registered = asyncio.create_task(self._registered.wait())
                try:
                    await asyncio.wait(
                        [registered, *(ask.request for ask in asks)],
                        timeout=None if wake_at == math.inf else max(0.0, wake_at - time.monotonic()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    registered.cancel()
                if self._settle([ask for ask in asks if ask.request.done()]):
                    await asyncio.sleep(RETRY_AFTER_S)
                asks = [ask for ask in asks if not ask.request.done()]
        finally:
            for ask in asks:
                ask.request.cancel()

    def _send(self, states: dict[str, list[str]]) -> _Ask:
        return _Ask(states, asyncio.create_task(self._ask(states)), time.monotonic())

    def _settle(self, done: list[_Ask]) -> bool:
        """Deliver the answers of finished requests; whether one of them failed."""
        failed = False
        for ask in done:
            if ask.request.cancelled():
                continue
            error = ask.request.exception()
            if error is None:
                self._deliver(ask.request.result())
            else:
                log.warning("waiting on the private API for %d task(s) failed: %r", len(ask.states), error)
                failed = True
        return failed

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
            for waiter in list(self._waiters.get(task.uid, ())):
                if not state_is_current(waiter.state, task) and not waiter.answer.done():
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
    on: WakeOn = WakeOn.CHANGE,
) -> bytes:
    """The task's status JSON as soon as what the caller saw (`seen`, a status; else the state
    now) is out of date as far as `on` cares, or after `wait_s` as it is then; at once for a task
    that has ended, which will not change again. Unknown or not the caller's: the same error as
    the plain status read."""
    task = watch.known(uid, caller)
    if task is None or (seen is not None and not status_is_current(seen, task, on)):
        # The read checks that the caller may see the task; `known` skips it for a while after.
        body = await watch.read_once(uid, caller, lambda: service.task_status_json(api, uid, caller=caller))
        task = TaskPublic.model_validate_json(body)
        watch.remember(uid, caller, task)
        if task.status.is_terminal or (seen is not None and not status_is_current(seen, task, on)):
            return body
    elif task.status.is_terminal:
        return task.model_dump_json().encode()
    # A state remembered from an earlier answer may be out of date: the private API compares
    # it with the task as it is, and answers at once if they differ.
    with contextlib.suppress(TaskGone):  # the read below answers for it
        changed = await watch.changed(uid, task_state(task, on), wait_s)
        if changed is not None:
            # Who may see a task never changes; the caller's key is checked on every request.
            watch.remember(uid, caller, changed)
            return changed.model_dump_json().encode()
    return await watch.read_once(uid, caller, lambda: service.task_status_json(api, uid, caller=caller))


def server_sent_event(task: TaskPublic) -> bytes:
    return f"event: {task.status.value}\ndata: {task.model_dump_json()}\n\n".encode()


async def task_events(
    watch: TaskWatch, task: TaskPublic, *, on: WakeOn = WakeOn.CHANGE, keepalive_s: float | None = None
) -> AsyncIterator[bytes]:
    """`task` (as the caller may see it), then the task at each change of its state as far as
    `on` cares, until it has ended; a comment every `keepalive_s` while nothing changes."""
    idle_s = KEEPALIVE_S if keepalive_s is None else keepalive_s
    yield server_sent_event(task)
    while not task.status.is_terminal:
        try:
            changed = await watch.changed(task.uid, task_state(task, on), idle_s)
        except TaskGone:
            return
        if changed is None:
            yield KEEPALIVE
            continue
        task = changed
        yield server_sent_event(task)
