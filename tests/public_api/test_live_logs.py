"""A running task's log and progress through the public API, and following the log to its end."""

from __future__ import annotations

import threading

import httpx

from inference_server.contract import PrivateRoutes, PublicRoutes, TaskStatus
from tests.helpers import wait_until
from tests.public_api.stack import ConsumerDriver, make_zip, submit


def ship(consumer: ConsumerDriver, uid: str, text: str, **progress: object) -> None:
    """As a consumer's live log shipping does: the whole text so far, with the latest progress."""
    response = consumer.http.put(
        PrivateRoutes.TASK_LOGS.format(uid=uid),
        content=text.encode(),
        headers={"content-type": "text/plain"},
        params=progress,
    )
    assert response.status_code == 204, response.text


class Follower:
    """GET .../logs?follow=true on a thread of its own, collecting what arrives."""

    def __init__(self, public_url: str, uid: str) -> None:
        self.url = public_url + PublicRoutes.TASK_LOGS.format(uid=uid)
        self.received = ""
        self.status_code: int | None = None
        self.ended = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        try:
            with httpx.stream("GET", self.url, params={"follow": "true"}, timeout=60) as response:
                self.status_code = response.status_code
                for text in response.iter_text():
                    self.received += text
        finally:
            self.ended.set()


def test_a_running_tasks_log_and_progress_are_public_before_it_ends(
    http: httpx.Client, public_url: str, model_id: str, consumer: ConsumerDriver
) -> None:
    uid = submit(public_url, model_id)
    consumer.claim(uid)

    ship(
        consumer, uid, "line 1\nINFERENCE_PROGRESS 0.25 loading\n", progress=0.25, progress_message="loading"
    )

    status = http.get(public_url + PublicRoutes.TASK_STATUS.format(uid=uid)).json()
    assert status["status"] == TaskStatus.RUNNING
    assert (status["progress"], status["progress_message"]) == (0.25, "loading")
    log = http.get(public_url + PublicRoutes.TASK_LOGS.format(uid=uid))
    assert log.text == "line 1\nINFERENCE_PROGRESS 0.25 loading\n"


def test_following_streams_the_log_as_it_grows_and_ends_with_the_task(
    public_url: str, model_id: str, consumer: ConsumerDriver
) -> None:
    uid = submit(public_url, model_id)
    consumer.claim(uid)
    ship(consumer, uid, "line 1\n")
    follower = Follower(public_url, uid)

    wait_until(lambda: follower.received == "line 1\n", 15, "the first line through the follower")
    ship(consumer, uid, "line 1\nline 2\n")
    wait_until(lambda: follower.received == "line 1\nline 2\n", 15, "the second line through the follower")
    assert not follower.ended.is_set()

    ship(consumer, uid, "line 1\nline 2\nline 3\n[inference-server] exit code 0\n")
    consumer.finish(uid, make_zip({"o": b"o"}))

    assert follower.ended.wait(15), "the follower did not end with the task"
    assert follower.status_code == 200
    assert follower.received == "line 1\nline 2\nline 3\n[inference-server] exit code 0\n"


def test_a_final_log_that_is_not_the_live_one_grown_follows_whole(
    public_url: str, model_id: str, consumer: ConsumerDriver
) -> None:
    uid = submit(public_url, model_id)
    consumer.claim(uid)
    ship(consumer, uid, "head of a long log\n")
    follower = Follower(public_url, uid)
    wait_until(lambda: follower.received == "head of a long log\n", 15, "the live log through the follower")

    ship(consumer, uid, "[inference-server] log truncated\ntail\n")
    consumer.finish(uid, make_zip({"o": b"o"}))

    assert follower.ended.wait(15)
    assert follower.received.endswith("which follows whole\n[inference-server] log truncated\ntail\n")


def test_following_an_ended_task_gives_its_log_and_ends(
    public_url: str, model_id: str, consumer: ConsumerDriver
) -> None:
    uid = submit(public_url, model_id)
    consumer.run_to_finish(uid, make_zip({"o": b"o"}), logs="all of it\n")

    follower = Follower(public_url, uid)

    assert follower.ended.wait(15)
    assert follower.received == "all of it\n"


def test_following_an_unknown_task_is_404(http: httpx.Client, public_url: str) -> None:
    response = http.get(public_url + PublicRoutes.TASK_LOGS.format(uid="f" * 32), params={"follow": "true"})
    assert response.status_code == 404
