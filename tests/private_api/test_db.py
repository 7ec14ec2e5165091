"""db.QuickQueries and the engine's pool, on the real databases."""

from __future__ import annotations

import threading

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from private_api.db import QuickQueries, make_engine, make_session_factory


def test_quick_queries_run_in_their_own_sessions_on_at_most_n_threads(database_url):
    engine = make_engine(database_url, pool_size=4)
    queries = QuickQueries(make_session_factory(engine), threads=2)
    lock = threading.Lock()
    running = 0
    most = 0
    sessions: list[Session] = []
    release = threading.Event()

    def work(*, session: Session, number: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            sessions.append(session)
            if running == 2:
                release.set()
        # Hold the thread until both reserved threads are busy: a third may not start meanwhile.
        assert release.wait(30)
        value = session.execute(text("select :n"), {"n": number}).scalar_one()
        with lock:
            running -= 1
        return value

    async def scenario() -> list[int]:
        results: list[int] = [0] * 6

        async def one(index: int) -> None:
            results[index] = await queries.run(work, number=index)

        async with anyio.create_task_group() as group:
            for index in range(6):
                group.start_soon(one, index)
        return results

    try:
        assert anyio.run(scenario) == list(range(6))
    finally:
        engine.dispose()
    assert most == 2
    assert len({id(session) for session in sessions}) == 6
    # Each session was closed by the runner: none holds a connection any more.
    assert not any(session.in_transaction() for session in sessions)


@pytest.mark.parametrize("pool_size", [1, 7])
def test_engine_keeps_pool_size_connections_and_as_many_again_for_bursts(database_url, pool_size):
    engine = make_engine(database_url, pool_size=pool_size)
    try:
        assert engine.pool.size() == pool_size
        assert engine.pool._max_overflow == pool_size
    finally:
        engine.dispose()
