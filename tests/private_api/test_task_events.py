"""The batched long poll POST /tasks/wait and the notifier behind it (private_api/task_events.py)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import update

from inference_server.contract import (
    PrivateRoutes,
    TaskPublic,
    TaskStatus,
    TaskWaitAnswer,
    WakeOn,
    task_state,
)
from private_api.db import make_engine, make_session_factory
from private_api.models import Task
from private_api.scheduling import SchedulingPolicy
from private_api.task_events import TaskEvents
from private_api.task_rows import update_task
from tests.private_api.helpers import claim, register_model, submit_ok


def _wait(client, states: dict[str, list[str]], timeout_s: float) -> TaskWaitAnswer:
    response = client.post(PrivateRoutes.TASKS_WAIT, json={"states": states, "timeout_s": timeout_s})
    assert response.status_code == 200, response.text
    return TaskWaitAnswer.model_validate(response.json())


def _pending_task(client) -> TaskPublic:
    """A new task as GET /tasks/{uid} shows it: with its waiting_reason, part of its state."""
    register_model(client)
    uid = submit_ok(client)["uid"]
    return TaskPublic.model_validate(client.get(PrivateRoutes.TASK.format(uid=uid)).json())


def test_a_state_other_than_the_one_seen_is_answered_at_once(client) -> None:
    task = _pending_task(client)
    started = time.monotonic()
    answer = _wait(client, {task.uid: ["running:"]}, timeout_s=10)
    assert time.monotonic() - started < 2
    assert [changed.uid for changed in answer.changed] == [task.uid]
    assert answer.changed[0].status == TaskStatus.PENDING


def test_a_change_made_here_answers_the_wait_within_a_fraction_of_a_second(client) -> None:
    task = _pending_task(client)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_wait, client, {task.uid: [task_state(task)]}, 20)
        time.sleep(0.3)  # let the wait register first; the answer is what is measured
        assert not waiting.done()
        claimed_at = time.monotonic()
        assert claim(client, task.uid).status_code == 200
        answer = waiting.result(timeout=10)
        latency = time.monotonic() - claimed_at
    assert [(changed.uid, changed.status) for changed in answer.changed] == [(task.uid, TaskStatus.RUNNING)]
    assert latency < 0.4  # a commit here pokes the notifier; the 0.5 s re-check is not needed


def test_a_wait_for_the_end_is_not_answered_by_the_start_but_by_the_end(client) -> None:
    task = _pending_task(client)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(_wait, client, {task.uid: [task_state(task, WakeOn.END)]}, 20)
        time.sleep(0.3)  # let the wait register first
        assert claim(client, task.uid).status_code == 200
        time.sleep(0.8)  # past RECHECK_S: a wait woken by the start would have its answer
        assert not waiting.done()
        cancelled = client.post(PrivateRoutes.TASK_CANCEL.format(uid=task.uid))
        assert cancelled.status_code == 200, cancelled.text
        answer = waiting.result(timeout=10)
    assert [(changed.uid, changed.status) for changed in answer.changed] == [(task.uid, TaskStatus.CANCELLED)]


def test_no_change_answers_empty_after_the_timeout(client) -> None:
    task = _pending_task(client)
    started = time.monotonic()
    answer = _wait(client, {task.uid: [task_state(task)]}, timeout_s=1)
    assert 0.9 <= time.monotonic() - started < 5
    assert answer == TaskWaitAnswer()


def test_unknown_uids_are_named(client) -> None:
    answer = _wait(client, {"no-such-task-uid-000000000000": ["pending:"]}, timeout_s=5)
    assert answer.unknown == ["no-such-task-uid-000000000000"]


def test_a_change_made_by_another_process_is_seen_by_the_recheck(client, settings) -> None:
    task = _pending_task(client)
    other_process = make_engine(settings.database_url)
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(_wait, client, {task.uid: [task_state(task)]}, 20)
            time.sleep(0.3)
            with other_process.begin() as connection:
                connection.execute(
                    update(Task).where(Task.uid == task.uid).values(status=TaskStatus.CANCELLED)
                )
            changed_at = time.monotonic()
            answer = waiting.result(timeout=10)
            latency = time.monotonic() - changed_at
    finally:
        other_process.dispose()
    assert [changed.status for changed in answer.changed] == [TaskStatus.CANCELLED]
    assert latency < 1.5  # RECHECK_S is 0.5


@pytest.mark.parametrize(
    "body", [{"states": {}, "timeout_s": 61}, {"states": {}}, {"states": [], "timeout_s": 1}]
)
def test_bad_wait_bodies_are_422(client, body) -> None:
    response = client.post(PrivateRoutes.TASKS_WAIT, json=body)
    assert response.status_code == 422
    assert response.json()["detail"]


def test_many_waiters_are_answered_by_one_read_per_change(client, settings) -> None:
    """The notifier alone: 300 waits on one task cost one read when it changes, not 300."""
    task = _pending_task(client)
    sessions = make_session_factory(make_engine(settings.database_url))

    async def scenario() -> tuple[list[TaskWaitAnswer], int]:
        events = TaskEvents(
            sessions, policy=SchedulingPolicy.of(settings), recheck_s=30
        )  # no periodic re-check: pokes only
        events.attach(sessions)
        await events.start()
        try:
            waits = [asyncio.create_task(events.wait({task.uid: [task_state(task)]}, 20)) for _ in range(300)]
            while events.waiting < 300:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # the first read (done on registration) is over
            reads_before = events.reads

            def cancel() -> None:
                with sessions() as session:
                    assert update_task(session, Task.uid == task.uid, status=TaskStatus.CANCELLED)
                    session.commit()

            await asyncio.to_thread(cancel)
            answers = await asyncio.wait_for(asyncio.gather(*waits), 10)
            return answers, events.reads - reads_before
        finally:
            await events.stop()

    try:
        answers, reads = asyncio.run(scenario())
    finally:
        sessions.kw["bind"].dispose()
    assert all([changed.status for changed in answer.changed] == [TaskStatus.CANCELLED] for answer in answers)
    assert reads == 1


def test_a_rolled_back_change_wakes_nobody(client, settings) -> None:
    task = _pending_task(client)
    sessions = make_session_factory(make_engine(settings.database_url))

    async def scenario() -> int:
        events = TaskEvents(sessions, policy=SchedulingPolicy.of(settings), recheck_s=30)
        events.attach(sessions)
        await events.start()
        try:
            waiting = asyncio.create_task(events.wait({task.uid: [task_state(task)]}, 1.5))
            await asyncio.sleep(0.2)
            reads_before = events.reads

            def change_then_roll_back() -> None:
                with sessions() as session:
                    assert update_task(session, Task.uid == task.uid, status=TaskStatus.CANCELLED)
                    session.rollback()
                    session.commit()  # nothing left to commit: must not poke

            await asyncio.to_thread(change_then_roll_back)
            assert await waiting == TaskWaitAnswer()
            return events.reads - reads_before
        finally:
            await events.stop()

    try:
        assert asyncio.run(scenario()) == 0
    finally:
        sessions.kw["bind"].dispose()
