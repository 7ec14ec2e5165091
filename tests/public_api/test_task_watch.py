"""Long polls (GET /api/tasks/{uid}/status?wait=) and event streams (/events) against a real
private API: answered on change and on time-out, only for who may see the task, and a crowd of
waiters costs the private API a few requests, not one each."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from inference_server.contract import (
    SEEN_PARAM,
    WAIT_PARAM,
    WAKE_ON_PARAM,
    ApiKeyRole,
    PublicRoutes,
    TaskStatus,
    WakeOn,
)
from public_api import task_watch
from public_api.task_watch import TaskWatch
from tests.helpers import ServerThread, wait_until
from tests.public_api.stack import (
    ConsumerDriver,
    PrivateStack,
    make_zip,
    register_model,
    start_public_api,
    submit,
)


@pytest.fixture(scope="module")
def server(private_api: PrivateStack) -> Iterator[ServerThread]:
    server = start_public_api(private_api.url)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def url(server: ServerThread) -> str:
    return server.url


@pytest.fixture(scope="module")
def watch(server: ServerThread) -> TaskWatch:
    watch: TaskWatch = server.server.config.app.state.task_watch
    return watch


@pytest.fixture(scope="module")
def model(url: str) -> str:
    return register_model(url)


def status_url(url: str, uid: str) -> str:
    return url + PublicRoutes.TASK_STATUS.format(uid=uid)


def long_poll(url: str, uid: str, wait: float, **params: object) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.get(status_url(url, uid), params={WAIT_PARAM: wait, **params}, timeout=wait + 30)
    return response, time.monotonic() - started


def waiting_on(watch: TaskWatch, count: int) -> None:
    wait_until(lambda: watch.waiting >= count, 10, f"{count} waiting clients", interval=0.01)


def report_progress(consumer: ConsumerDriver, uid: str, fraction: float, message: str) -> None:
    """The consumer ships a log whose last line is the model's progress report."""
    response = consumer.http.put(
        f"/tasks/{uid}/logs",
        content=f"INFERENCE_PROGRESS {fraction} {message}\n".encode(),
        headers={"content-type": "text/plain"},
        params={"progress": fraction, "progress_message": message},
    )
    assert response.status_code == 204, response.text


def test_a_long_poll_is_answered_as_soon_as_the_task_changes(
    url: str, model: str, watch: TaskWatch, consumer: ConsumerDriver
) -> None:
    uid = submit(url, model)
    with ThreadPoolExecutor(1) as pool:
        polling = pool.submit(long_poll, url, uid, 30)
        waiting_on(watch, 1)
        claimed_at = time.monotonic()
        consumer.claim(uid)
        response, _ = polling.result(timeout=30)
        latency = time.monotonic() - claimed_at
    assert response.status_code == 200, response.text
    assert response.json()["status"] == TaskStatus.RUNNING
    assert response.json()["uid"] == uid
    assert latency < 1.0


def test_a_long_poll_without_a_change_answers_after_its_time_with_the_status_as_it_is(
    url: str, model: str
) -> None:
    uid = submit(url, model)
    response, took = long_poll(url, uid, 1)
    assert response.status_code == 200
    assert response.json()["status"] == TaskStatus.PENDING
    assert 0.9 <= took < 5


def test_a_status_other_than_the_one_seen_is_answered_at_once(url: str, model: str) -> None:
    uid = submit(url, model)
    response, took = long_poll(url, uid, 30, **{SEEN_PARAM: TaskStatus.RUNNING.value})
    assert response.status_code == 200
    assert response.json()["status"] == TaskStatus.PENDING
    assert took < 5


def test_progress_answers_a_long_poll_too(
    url: str, model: str, watch: TaskWatch, consumer: ConsumerDriver
) -> None:
    uid = submit(url, model)
    consumer.claim(uid)
    with ThreadPoolExecutor(1) as pool:
        polling = pool.submit(long_poll, url, uid, 30, **{SEEN_PARAM: TaskStatus.RUNNING.value})
        waiting_on(watch, 1)
        report_progress(consumer, uid, 0.5, "half")
        answer, took = polling.result(timeout=30)
    assert (answer.json()["status"], answer.json()["progress"]) == (TaskStatus.RUNNING, 0.5)
    assert took < 10


def test_a_long_poll_on_end_sleeps_through_the_start_and_progress_and_wakes_at_the_end(
    url: str, model: str, watch: TaskWatch, consumer: ConsumerDriver
) -> None:
    uid = submit(url, model)
    params = {SEEN_PARAM: TaskStatus.PENDING.value, WAKE_ON_PARAM: WakeOn.END.value}
    with ThreadPoolExecutor(1) as pool:
        polling = pool.submit(long_poll, url, uid, 30, **params)
        waiting_on(watch, 1)
        consumer.claim(uid)
        report_progress(consumer, uid, 0.5, "half")
        # Long enough for a poll woken by either change to have been answered.
        time.sleep(1.0)
        assert not polling.done()
        consumer.finish(uid, make_zip({"output.txt": b"done"}))
        answer, took = polling.result(timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == TaskStatus.FINISHED
    assert took < 20


def test_a_long_poll_on_status_is_not_woken_by_progress(
    url: str, model: str, watch: TaskWatch, consumer: ConsumerDriver
) -> None:
    uid = submit(url, model)
    consumer.claim(uid)
    params = {SEEN_PARAM: TaskStatus.RUNNING.value, WAKE_ON_PARAM: WakeOn.STATUS.value}
    with ThreadPoolExecutor(1) as pool:
        polling = pool.submit(long_poll, url, uid, 30, **params)
        waiting_on(watch, 1)
        report_progress(consumer, uid, 0.25, "a quarter")
        time.sleep(1.0)
        assert not polling.done()
        consumer.finish(uid, make_zip({"output.txt": b"done"}))
        answer, _ = polling.result(timeout=30)
    assert answer.json()["status"] == TaskStatus.FINISHED


def test_a_long_poll_on_a_task_already_ended_is_answered_at_once(
    url: str, model: str, consumer: ConsumerDriver
) -> None:
    uid = submit(url, model)
    consumer.claim(uid)
    consumer.finish(uid, make_zip({"output.txt": b"done"}))
    for params in (
        {SEEN_PARAM: TaskStatus.RUNNING.value, WAKE_ON_PARAM: WakeOn.END.value},
        {WAKE_ON_PARAM: WakeOn.END.value},  # nothing seen: an ended task will not change again
        {},
    ):
        response, took = long_poll(url, uid, 30, **params)
        assert response.json()["status"] == TaskStatus.FINISHED
        assert took < 5, params


@pytest.mark.parametrize(
    "params",
    [
        {WAIT_PARAM: 0},
        {WAIT_PARAM: 61},
        {WAIT_PARAM: "soon"},
        {WAIT_PARAM: 5, SEEN_PARAM: "sleeping"},
        {WAIT_PARAM: 5, WAKE_ON_PARAM: "never"},
    ],
)
def test_bad_wait_values_are_422_with_a_detail(url: str, model: str, params: dict[str, object]) -> None:
    uid = submit(url, model)
    response = httpx.get(status_url(url, uid), params=params, timeout=30)
    assert response.status_code == 422
    assert response.json()["detail"]


def test_the_plain_status_read_is_unchanged(url: str, model: str) -> None:
    uid = submit(url, model)
    started = time.monotonic()
    response = httpx.get(status_url(url, uid), timeout=30)
    assert response.status_code == 200
    assert response.json()["status"] == TaskStatus.PENDING
    assert time.monotonic() - started < 5


def read_events(
    url: str, uid: str, headers: dict[str, str] | None = None, params: dict[str, str] | None = None
) -> list[tuple[str, dict]]:
    """The events of one stream, read to its end."""
    events: list[tuple[str, dict]] = []
    with httpx.stream(
        "GET", url + PublicRoutes.TASK_EVENTS.format(uid=uid), headers=headers, params=params, timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        deadline = time.monotonic() + 30  # keep-alives would hold a broken stream open forever
        for line in r.iter_lines():
            assert time.monotonic() < deadline, f"the stream did not end: {events}"
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                assert name is not None
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_the_event_stream_sends_each_change_and_ends_after_the_final_status(
    url: str, model: str, watch: TaskWatch, consumer: ConsumerDriver
) -> None:
    uid = submit(url, model)
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read_events, url, uid)
        waiting_on(watch, 1)
        consumer.claim(uid)
        wait_until(lambda: watch.waiting >= 1 and not reading.done(), 10, "the stream waiting again")
        time.sleep(0.2)  # the running event was sent, and the stream waits with the running state
        consumer.finish(uid, make_zip({"output.txt": b"done"}))
        events = reading.result(timeout=30)
    statuses = [name for name, _ in events]
    assert statuses == [TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.FINISHED]
    assert all(task["status"] == name and task["uid"] == uid for name, task in events)


def test_an_event_stream_on_end_sends_the_task_now_and_its_end_only(
    url: str, model: str, watch: TaskWatch, consumer: ConsumerDriver
) -> None:
    uid = submit(url, model)
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read_events, url, uid, params={WAKE_ON_PARAM: WakeOn.END.value})
        waiting_on(watch, 1)
        consumer.claim(uid)
        time.sleep(0.5)  # a stream woken by the start would have sent it by now
        consumer.finish(uid, make_zip({"output.txt": b"done"}))
        events = reading.result(timeout=30)
    assert [name for name, _ in events] == [TaskStatus.PENDING, TaskStatus.FINISHED]


def test_an_idle_event_stream_sends_keep_alive_comments(
    url: str, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(task_watch, "KEEPALIVE_S", 0.3)
    uid = submit(url, model)
    lines: list[str] = []
    with httpx.stream("GET", url + PublicRoutes.TASK_EVENTS.format(uid=uid), timeout=30) as response:
        for line in response.iter_lines():
            lines.append(line)
            if lines.count(task_watch.KEEPALIVE.decode().strip()) >= 2:
                break
    assert lines[0] == f"event: {TaskStatus.PENDING.value}"
    assert lines.count(": keep-alive") >= 2


def test_300_waiting_clients_are_all_answered_after_one_change_through_few_upstream_requests(
    url: str, model: str, watch: TaskWatch, consumer: ConsumerDriver
) -> None:
    uids = [submit(url, model) for _ in range(3)]

    async def crowd() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=400)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            polls = [
                asyncio.create_task(client.get(status_url(url, uids[i % 3]), params={WAIT_PARAM: 40}))
                for i in range(300)
            ]
            await asyncio.to_thread(waiting_on, watch, 300)
            await asyncio.sleep(0.3)  # the requests covering them are in flight
            requests_before = watch.requests
            await asyncio.to_thread(lambda: [consumer.claim(uid) for uid in uids])
            answers = await asyncio.wait_for(asyncio.gather(*polls), 30)
            crowd.requests = watch.requests - requests_before  # type: ignore[attr-defined]
            return answers

    started = time.monotonic()
    answers = asyncio.run(crowd())
    assert time.monotonic() - started < 40  # answered on change, not at the 40 s time-out
    assert [answer.status_code for answer in answers] == [200] * 300
    assert all(answer.json()["status"] == TaskStatus.RUNNING for answer in answers)
    assert crowd.requests <= 10  # type: ignore[attr-defined]


# --- who may wait -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict(private_api: PrivateStack) -> Iterator[str]:
    server = start_public_api(private_api.url, anonymous_tasks=False, anonymous_models=False)
    try:
        yield server.url
    finally:
        server.stop()


def test_waiting_and_events_follow_the_task_routes_access_rules(
    strict: str, private_api: PrivateStack, model: str
) -> None:
    owner = {"Authorization": f"Bearer {private_api.create_key(f'waiter-a-{time.time_ns()}')}"}
    other = {"Authorization": f"Bearer {private_api.create_key(f'waiter-b-{time.time_ns()}')}"}
    operator_key = private_api.create_key(f"waiter-op-{time.time_ns()}", ApiKeyRole.OPERATOR)
    operator = {"Authorization": f"Bearer {operator_key}"}
    body = {"zip_file": ("input.zip", make_zip({"input.txt": b"hello"}), "application/zip")}
    submitted = httpx.post(
        strict + PublicRoutes.TASKS, params={"model_human_readable_id": model}, files=body, headers=owner
    )
    assert submitted.status_code == 200, submitted.text
    uid = submitted.json()
    events = strict + PublicRoutes.TASK_EVENTS.format(uid=uid)
    waited = status_url(strict, uid)

    assert httpx.get(waited, params={WAIT_PARAM: 1}, headers=owner, timeout=30).status_code == 200
    assert httpx.get(waited, params={WAIT_PARAM: 1}, headers=operator, timeout=30).status_code == 200
    for refused, code in ((other, 404), ({}, 401)):
        response = httpx.get(waited, params={WAIT_PARAM: 1}, headers=refused, timeout=30)
        assert response.status_code == code
        assert response.json()["detail"]
        response = httpx.get(events, headers=refused, timeout=30)
        assert response.status_code == code
        assert response.json()["detail"]
    unknown = status_url(strict, "x" * 32)
    assert httpx.get(unknown, params={WAIT_PARAM: 1}, headers=owner, timeout=30).status_code == 404

    seen: list[str] = []
    ready = threading.Event()

    def first_event() -> None:
        with httpx.stream("GET", events, headers=owner, timeout=30) as response:
            for line in response.iter_lines():
                seen.append(line)
                ready.set()
                return

    thread = threading.Thread(target=first_event)
    thread.start()
    assert ready.wait(30)
    thread.join(30)
    assert seen == [f"event: {TaskStatus.PENDING.value}"]
