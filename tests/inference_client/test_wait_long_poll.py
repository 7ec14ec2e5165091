"""InferenceClient.wait: a long poll on servers that have it, plain polling on older ones."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from inference_client.client import InferenceClient
from inference_server.contract import WAIT_PARAM, WAKE_ON_PARAM, PublicRoutes, TaskPublic, TaskStatus, WakeOn
from tests.helpers import ServerThread
from tests.public_api.stack import ConsumerDriver, make_zip, submit

UID = "u" * 32


class OlderServer:
    """The status route of a server from before ?wait=: it ignores the parameter, or refuses it.
    The task finishes `finishes_after_s` after the first request."""

    def __init__(self, *, refuses_wait: bool, finishes_after_s: float = 0.6) -> None:
        self.requests: list[tuple[float, bool]] = []  # (when, asked to wait)
        self.app = FastAPI()
        self.app.get(PublicRoutes.TASK_STATUS)(self.status)
        self._refuses_wait = refuses_wait
        self._finishes_after_s = finishes_after_s

    async def status(self, uid: str, request: Request) -> JSONResponse:
        waits = WAIT_PARAM in request.query_params
        self.requests.append((time.monotonic(), waits))
        if waits and self._refuses_wait:
            return JSONResponse({"detail": "unknown query parameter"}, status_code=422)
        finished = time.monotonic() - self.requests[0][0] >= self._finishes_after_s
        task = TaskPublic(
            uid=uid,
            model_human_readable_id="m",
            status=TaskStatus.FINISHED if finished else TaskStatus.PENDING,
            created_at=datetime.now(UTC),
        )
        return JSONResponse(task.model_dump(mode="json"))


@pytest.fixture(params=[False, True], ids=["ignores-wait", "refuses-wait"])
def older_server(request: pytest.FixtureRequest) -> Iterator[OlderServer]:
    server = OlderServer(refuses_wait=request.param)
    thread = ServerThread(server.app, name="older-server").start()
    server.url = thread.url  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        thread.stop()


def test_an_older_server_is_polled_at_the_poll_interval(older_server: OlderServer) -> None:
    with InferenceClient(older_server.url) as client:  # type: ignore[attr-defined]
        task = client.wait(UID, poll_interval=0.2, timeout=30)
    assert task.status == TaskStatus.FINISHED
    asked_to_wait = [waits for _, waits in older_server.requests]
    assert asked_to_wait.count(True) == 1  # one try, then plain polls
    assert asked_to_wait[-1] is False
    # Polls are spaced by the interval (0.6 s at 0.2 s: a handful), not fired back to back.
    assert len(older_server.requests) <= 8
    plain = [when for when, waits in older_server.requests if not waits]
    assert all(later - earlier >= 0.15 for earlier, later in itertools.pairwise(plain))


def test_wait_learns_the_end_from_a_long_poll_not_the_next_poll(
    public_url: str, model_id: str, consumer: ConsumerDriver
) -> None:
    uid = submit(public_url, model_id)
    consumer.claim(uid)
    changes: list[TaskStatus] = []
    with InferenceClient(public_url) as client, ThreadPoolExecutor(1) as pool:
        # A poll interval far longer than the test: only a long poll can see the end in time.
        waiting = pool.submit(
            client.wait, uid, poll_interval=60, timeout=60, on_change=lambda t: changes.append(t.status)
        )
        deadline = time.monotonic() + 10
        while not changes and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # the long poll is in flight
        finished_at = time.monotonic()
        consumer.finish(uid, make_zip({"out.txt": b"out"}))
        task = waiting.result(timeout=30)
        latency = time.monotonic() - finished_at
    assert task.status == TaskStatus.FINISHED
    assert changes == [TaskStatus.RUNNING, TaskStatus.FINISHED]
    assert latency < 2


class RecordingServer:
    """A status route that records each request's query and says the task finished."""

    def __init__(self) -> None:
        self.queries: list[dict[str, str]] = []
        self.app = FastAPI()
        self.app.get(PublicRoutes.TASK_STATUS)(self.status)

    async def status(self, uid: str, request: Request) -> JSONResponse:
        self.queries.append(dict(request.query_params))
        # Pending at the first, plain read: the second request is the long poll.
        status = TaskStatus.PENDING if len(self.queries) == 1 else TaskStatus.FINISHED
        task = TaskPublic(uid=uid, model_human_readable_id="m", status=status, created_at=datetime.now(UTC))
        return JSONResponse(task.model_dump(mode="json"))


@pytest.mark.parametrize(("reports_changes", "wake_on"), [(False, WakeOn.END.value), (True, None)])
def test_wait_asks_to_be_woken_by_the_end_unless_it_reports_changes(
    reports_changes: bool, wake_on: str | None
) -> None:
    server = RecordingServer()
    thread = ServerThread(server.app, name="recording-server").start()
    try:
        with InferenceClient(thread.url) as client:
            on_change = (lambda _task: None) if reports_changes else None
            task = client.wait(UID, poll_interval=60, timeout=30, on_change=on_change)
    finally:
        thread.stop()
    assert task.status == TaskStatus.FINISHED
    first, long_poll = server.queries
    assert WAIT_PARAM not in first
    assert WAIT_PARAM in long_poll
    assert long_poll.get(WAKE_ON_PARAM) == wake_on
