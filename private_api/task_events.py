"""Telling waiting callers the moment a task's state changes (POST PrivateRoutes.TASKS_WAIT).

Waiting costs no thread and no database connection: each wait is an asyncio future in this
process's one TaskEvents. One loop reads the state of every watched task in one query (a short
hop to a worker thread, one connection for the query only) whenever

- a transaction of this process that changed a task committed: `task_rows.update_task` marks the
  session and the sessionmaker's after_commit hook (`attach`) pokes the loop, so a change made
  here reaches its waiters within one query; and
- RECHECK_S passed, so changes made by other private API processes are seen too, and a pending
  task's new waiting_reason (consumers came or went).

Pokes while a read runs are folded into the next read, so a burst of commits costs one query
more, not one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping

import anyio.to_thread
from sqlalchemy import event, select
from sqlalchemy.orm import Session, sessionmaker

from inference_server.contract import TaskPublic, TaskWaitAnswer, state_is_current
from private_api.models import Task
from private_api.scheduling import SchedulingPolicy, waiting_reasons
from private_api.task_rows import TASK_CHANGED_MARK, task_public

log = logging.getLogger(__name__)

RECHECK_S = 0.5
# SQLite's default limit of bound parameters is far above this; PostgreSQL has none that matters.
READ_CHUNK = 500


class _Waiter:
    """One wait: the states its caller saw, and the answer once one of them is out of date."""

    def __init__(self, states: Mapping[str, Iterable[str]]) -> None:
        self.states = {uid: frozenset(seen) for uid, seen in states.items()}
        self.answer: asyncio.Future[TaskWaitAnswer] = asyncio.get_running_loop().create_future()

    def check(self, current: Mapping[str, TaskPublic]) -> None:
        if self.answer.done():
            return
        changed: list[TaskPublic] = []
        unknown: list[str] = []
        for uid, seen in self.states.items():
            task = current.get(uid)
            if task is None:
                unknown.append(uid)
            elif not all(state_is_current(state, task) for state in seen):
                changed.append(task)
        if changed or unknown:
            self.answer.set_result(TaskWaitAnswer(changed=changed, unknown=unknown))


class TaskEvents:
    """The private API process's notifier; `start` and `stop` it in the app's lifespan."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        policy: SchedulingPolicy | None = None,
        recheck_s: float = RECHECK_S,
    ) -> None:
        self._sessions = sessions
        # With it, a pending task's state includes its waiting_reason, as GET /tasks/{uid} shows.
        self._policy = policy
        self._recheck_s = recheck_s
        self._waiters: set[_Waiter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poked: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None
        self.reads = 0  # how many state reads ran (tests and metrics: reads, not waiters, cost)

    def attach(self, sessions: sessionmaker[Session]) -> None:
        """Poke after every commit of a session from `sessions` that changed a task."""
        event.listen(sessions, "after_commit", self._after_commit)
        event.listen(sessions, "after_rollback", self._after_rollback)

    def _after_commit(self, session: Session) -> None:
        if session.info.pop(TASK_CHANGED_MARK, False):
            self.poke()

    @staticmethod
    def _after_rollback(session: Session) -> None:
        session.info.pop(TASK_CHANGED_MARK, None)

    def poke(self) -> None:
        """A task changed: read the watched tasks again now. Safe from any thread."""
        loop, poked = self._loop, self._poked
        if loop is None or poked is None or not self._waiters:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
            loop.call_soon_threadsafe(poked.set)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._poked = asyncio.Event()
        self._runner = asyncio.create_task(self._run(), name="task-events")

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        for waiter in self._waiters:
            if not waiter.answer.done():
                waiter.answer.set_result(TaskWaitAnswer())
        self._waiters.clear()

    async def wait(self, states: Mapping[str, Iterable[str]], timeout_s: float) -> TaskWaitAnswer:
        """The tasks whose state is not one of those `states` gives for them, as soon as there
        are any (at once if there are already), or an empty answer after `timeout_s`."""
        if self._poked is None:
            raise RuntimeError("TaskEvents.wait before start")
        if not states:
            return TaskWaitAnswer()
        waiter = _Waiter(states)
        self._waiters.add(waiter)
        self._poked.set()  # the first read tells whether something changed already
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.answer), timeout_s)
        except TimeoutError:
            return TaskWaitAnswer()
        finally:
            self._waiters.discard(waiter)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def _run(self) -> None:
        assert self._poked is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self._recheck_s)
            self._poked.clear()
            if not self._waiters:
                continue
            waiters = list(self._waiters)
            uids = {uid for waiter in waiters for uid in waiter.states}
            try:
                current = await anyio.to_thread.run_sync(self._read, uids)
            except Exception:
                # The database away: waiters wait on (their callers' time-outs end them), and
                # the next round tries again.
                log.exception("reading the state of %d watched tasks failed", len(uids))
                await asyncio.sleep(self._recheck_s)
                continue
            for waiter in waiters:
                waiter.check(current)

    def _read(self, uids: set[str]) -> dict[str, TaskPublic]:
        self.reads += 1
        ordered = sorted(uids)
        current: dict[str, TaskPublic] = {}
        with self._sessions() as session:
            for start in range(0, len(ordered), READ_CHUNK):
                chunk = ordered[start : start + READ_CHUNK]
                tasks = list(session.scalars(select(Task).where(Task.uid.in_(chunk))))
                reasons = {} if self._policy is None else waiting_reasons(session, self._policy, tasks)
                for task in tasks:
                    current[task.uid] = task_public(task)
                    current[task.uid].waiting_reason = reasons.get(task.uid)
        return current
