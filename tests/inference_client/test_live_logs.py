"""Following a running task's log (client.follow_logs, `infer logs -f`) and its progress while
`wait` (`infer submit --wait`) waits."""

from __future__ import annotations

import threading

import pytest

from inference_client.cli import main
from inference_client.client import InferenceClient
from inference_server.contract import PrivateRoutes, TaskPublic, TaskStatus
from tests.helpers import make_zip, wait_until
from tests.public_api.stack import ConsumerDriver, submit


def ship(consumer: ConsumerDriver, uid: str, text: str, **progress: object) -> None:
    response = consumer.http.put(
        PrivateRoutes.TASK_LOGS.format(uid=uid), content=text.encode(), params=progress
    )
    assert response.status_code == 204, response.text


def test_follow_logs_yields_the_log_while_it_runs_and_ends_with_the_task(
    public_url: str, model_id: str, consumer: ConsumerDriver
) -> None:
    uid = submit(public_url, model_id)
    consumer.claim(uid)
    ship(consumer, uid, "line 1\n")
    received: list[str] = []

    def follow() -> None:
        with InferenceClient(public_url) as client:
            received.extend(client.follow_logs(uid))

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    wait_until(lambda: "".join(received) == "line 1\n", 15, "the first line while the task runs")
    assert follower.is_alive()

    ship(consumer, uid, "line 1\nline 2\n")
    consumer.finish(uid, make_zip({"o": b"o"}))
    follower.join(15)

    assert not follower.is_alive()
    assert "".join(received) == "line 1\nline 2\n"


def test_infer_logs_follow_prints_until_the_task_ends(
    public_url: str, model_id: str, consumer: ConsumerDriver, capsys: pytest.CaptureFixture[str]
) -> None:
    uid = submit(public_url, model_id)
    consumer.claim(uid)
    ship(consumer, uid, "first\n")
    codes: list[int] = []
    command = threading.Thread(target=lambda: codes.append(main(["--url", public_url, "logs", "-f", uid])))
    command.start()
    printed = ""

    def has_printed(text: str) -> bool:
        nonlocal printed
        printed += capsys.readouterr().out
        return text in printed

    wait_until(lambda: has_printed("first\n"), 15, "`infer logs -f` to print the first line")
    assert command.is_alive()
    ship(consumer, uid, "first\nsecond\n")
    consumer.finish(uid, make_zip({"o": b"o"}))
    command.join(15)

    assert codes == [0]
    has_printed("")
    assert printed == "first\nsecond\n"


def test_wait_reports_each_new_progress(public_url: str, model_id: str, consumer: ConsumerDriver) -> None:
    uid = submit(public_url, model_id)
    seen: list[tuple[TaskStatus, float | None, str | None]] = []

    def report(task: TaskPublic) -> None:
        seen.append((task.status, task.progress, task.progress_message))

    with InferenceClient(public_url) as client:
        waiter = threading.Thread(target=lambda: client.wait(uid, poll_interval=0.1, on_change=report))
        waiter.start()
        consumer.claim(uid)
        ship(consumer, uid, "a\n", progress=0.25, progress_message="loading")
        wait_until(lambda: (TaskStatus.RUNNING, 0.25, "loading") in seen, 15, "progress 0.25 reported")
        ship(consumer, uid, "a\nb\n", progress=0.75, progress_message="writing")
        wait_until(lambda: (TaskStatus.RUNNING, 0.75, "writing") in seen, 15, "progress 0.75 reported")
        consumer.finish(uid, make_zip({"o": b"o"}))
        waiter.join(15)

    assert seen[-1][0] == TaskStatus.FINISHED
    assert seen.count((TaskStatus.RUNNING, 0.25, "loading")) == 1
