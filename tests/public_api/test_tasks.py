"""The v1.2 task routes and their 551-554 codes, plus status, logs and cancel, over a real private API."""

from __future__ import annotations

import json

import httpx
import pytest

from inference_server.contract import TASK_UID_RE, PublicRoutes, TaskPublic, TaskStatus, V12Code
from tests.public_api.stack import ConsumerDriver, PrivateStack, make_zip, shared_http, submit, zip_members


def _task(public_url: str, uid: str) -> TaskPublic:
    response = shared_http().get(public_url + PublicRoutes.TASK_STATUS.format(uid=uid))
    assert response.status_code == 200, response.text
    return TaskPublic.model_validate(response.json())


def test_submit_answers_200_with_the_uid_as_a_json_string(
    http: httpx.Client, public_url: str, model_id: str
) -> None:
    response = http.post(
        public_url + PublicRoutes.TASKS,
        params={"model_human_readable_id": model_id},
        files={"zip_file": ("input.zip", make_zip({"a.txt": b"a"}), "application/zip")},
    )
    assert response.status_code == 200
    uid = json.loads(response.content)  # exactly what a v1.2 client does
    assert isinstance(uid, str) and TASK_UID_RE.match(uid)
    task = _task(public_url, uid)
    assert task.status == TaskStatus.PENDING
    assert task.model_human_readable_id == model_id


def test_submit_passes_priority_on(http: httpx.Client, public_url: str, model_id: str) -> None:
    # Anonymous submissions may ask for up to IS_DEFAULT_MAX_PRIORITY (5), like user keys.
    uid = submit(public_url, model_id, priority=5)
    assert _task(public_url, uid).priority == 5
    for priority, status in ((6, 403), (10, 422)):
        response = http.post(
            public_url + PublicRoutes.TASKS,
            params={"model_human_readable_id": model_id, "priority": priority},
            files={"zip_file": ("input.zip", make_zip({"a.txt": b"a"}), "application/zip")},
        )
        assert response.status_code == status, response.text


def test_poll_pending_task_answers_551(http: httpx.Client, public_url: str, model_id: str) -> None:
    uid = submit(public_url, model_id)
    response = http.get(public_url + PublicRoutes.TASK.format(uid=uid))
    assert response.status_code == V12Code.PENDING == 551
    assert "pending" in response.json()["detail"]


def test_poll_running_task_answers_551(
    http: httpx.Client, public_url: str, model_id: str, consumer: ConsumerDriver
) -> None:
    uid = submit(public_url, model_id)
    consumer.claim(uid)
    response = http.get(public_url + PublicRoutes.TASK.format(uid=uid))
    assert response.status_code == 551
    assert "running" in response.json()["detail"]


def test_poll_finished_task_streams_the_output_zip(
    http: httpx.Client, public_url: str, model_id: str, consumer: ConsumerDriver
) -> None:
    uid = submit(public_url, model_id)
    output = make_zip({"result/mask.txt": b"segmentation", "summary.json": b"{}"})
    consumer.run_to_finish(uid, output)
    response = http.get(public_url + PublicRoutes.TASK.format(uid=uid))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    assert uid in response.headers["content-disposition"]
    assert zip_members(response.content) == {"result/mask.txt": b"segmentation", "summary.json": b"{}"}


def test_poll_failed_task_answers_552_with_the_error(
    http: httpx.Client, public_url: str, model_id: str, consumer: ConsumerDriver
) -> None:
    uid = submit(public_url, model_id)
    consumer.claim(uid)
    consumer.fail(uid, "model exited with code 3: bad input", exit_code=3)
    response = http.get(public_url + PublicRoutes.TASK.format(uid=uid))
    assert response.status_code == V12Code.FAILED == 552
    assert "bad input" in response.json()["detail"]


def test_poll_cancelled_task_answers_552(http: httpx.Client, public_url: str, model_id: str) -> None:
    uid = submit(public_url, model_id)
    response = http.post(public_url + PublicRoutes.TASK_CANCEL.format(uid=uid))
    assert response.status_code == 200
    assert TaskPublic.model_validate(response.json()).status == TaskStatus.CANCELLED
    assert http.get(public_url + PublicRoutes.TASK.format(uid=uid)).status_code == 552


def test_poll_finished_task_without_output_answers_553(
    http: httpx.Client, public_url: str, model_id: str, consumer: ConsumerDriver, private_api: PrivateStack
) -> None:
    uid = submit(public_url, model_id)
    outputs = private_api.data_dir / "blobs" / "outputs"
    before = set(outputs.rglob("*"))
    finished = consumer.run_to_finish(uid, make_zip({"out.txt": b"gone soon"}))
    # Blob keys are opaque: the file this task added is its output.
    ours = [path for path in set(outputs.rglob("*")) - before if path.is_file()]
    assert len(ours) == 1, ours
    ours[0].unlink()
    assert finished.status == TaskStatus.FINISHED
    response = http.get(public_url + PublicRoutes.TASK.format(uid=uid))
    assert response.status_code == V12Code.OUTPUT_MISSING == 553
    assert "missing" in response.json()["detail"]


def test_unknown_task_answers_554_on_poll_and_delete(http: httpx.Client, public_url: str) -> None:
    uid = "0123456789abcdef0123456789abcdef"
    poll = http.get(public_url + PublicRoutes.TASK.format(uid=uid))
    assert poll.status_code == V12Code.NOT_FOUND == 554
    assert uid in poll.json()["detail"]
    delete = http.delete(public_url + PublicRoutes.TASK.format(uid=uid))
    assert delete.status_code == 554
    assert http.get(public_url + PublicRoutes.TASK_STATUS.format(uid=uid)).status_code == 404


def test_delete_answers_the_task_then_it_is_gone(
    http: httpx.Client, public_url: str, model_id: str, consumer: ConsumerDriver
) -> None:
    uid = submit(public_url, model_id)
    consumer.run_to_finish(uid, make_zip({"out.txt": b"x"}))
    response = http.delete(public_url + PublicRoutes.TASK.format(uid=uid))
    assert response.status_code == 200
    deleted = TaskPublic.model_validate(response.json())
    assert deleted.uid == uid
    assert deleted.status == TaskStatus.DELETED
    assert http.get(public_url + PublicRoutes.TASK.format(uid=uid)).status_code == 554
    assert http.get(public_url + PublicRoutes.TASK_STATUS.format(uid=uid)).status_code == 404


def test_logs_are_relayed_as_text(
    http: httpx.Client, public_url: str, model_id: str, consumer: ConsumerDriver
) -> None:
    uid = submit(public_url, model_id)
    empty = http.get(public_url + PublicRoutes.TASK_LOGS.format(uid=uid))
    assert empty.status_code == 200
    assert empty.text == ""
    consumer.run_to_finish(uid, make_zip({"o": b"o"}), logs="step 1\nstep 2 ✓\n")
    response = http.get(public_url + PublicRoutes.TASK_LOGS.format(uid=uid))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "step 1\nstep 2 ✓\n"
    unknown = http.get(public_url + PublicRoutes.TASK_LOGS.format(uid="f" * 32))
    assert unknown.status_code == 404
    assert unknown.json()["detail"]


def test_cancel_of_a_finished_task_leaves_it_finished(
    http: httpx.Client, public_url: str, model_id: str, consumer: ConsumerDriver
) -> None:
    uid = submit(public_url, model_id)
    consumer.run_to_finish(uid, make_zip({"o": b"o"}))
    response = http.post(public_url + PublicRoutes.TASK_CANCEL.format(uid=uid))
    assert response.status_code == 200
    assert response.json()["status"] == TaskStatus.FINISHED


@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("GET", PublicRoutes.TASK),
        ("DELETE", PublicRoutes.TASK),
        ("GET", PublicRoutes.TASK_STATUS),
        ("GET", PublicRoutes.TASK_LOGS),
        ("POST", PublicRoutes.TASK_CANCEL),
    ],
)
@pytest.mark.parametrize("uid", ["short", "x" * 65, "has space in it!!", "..%2F..%2Fmodels"])
def test_malformed_uid_is_a_4xx_with_detail(
    http: httpx.Client, public_url: str, method: str, route: str, uid: str
) -> None:
    response = http.request(method, public_url + route.format(uid=uid))
    assert 400 <= response.status_code < 500, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail  # one error shape everywhere: {"detail": "<text>"}


def test_consumer_routes_are_not_exposed(http: httpx.Client, public_url: str, model_id: str) -> None:
    uid = submit(public_url, model_id)
    for method, path in [
        ("POST", f"/api/tasks/{uid}/claim"),
        ("POST", f"/api/tasks/{uid}/heartbeat"),
        ("POST", f"/api/tasks/{uid}/output"),
        ("POST", f"/api/tasks/{uid}/fail"),
        ("POST", f"/api/tasks/{uid}/release"),
        ("GET", f"/api/tasks/{uid}/input"),
        ("PUT", f"/api/tasks/{uid}/logs"),
        ("GET", f"/tasks/{uid}"),
        ("GET", f"/tasks/{uid}/input"),
    ]:
        response = http.request(method, public_url + path)
        assert response.status_code in (404, 405), (method, path, response.status_code)
    assert _task(public_url, uid).status == TaskStatus.PENDING


def test_routes_without_trailing_slash_answer_directly(
    http: httpx.Client, public_url: str, model_id: str
) -> None:
    # A redirect would make a client send its upload twice; these answer without one.
    response = http.post(
        public_url + PublicRoutes.TASKS.rstrip("/"),
        params={"model_human_readable_id": model_id},
        files={"zip_file": ("input.zip", make_zip({"a.txt": b"a"}), "application/zip")},
    )
    assert response.status_code == 200
    assert TASK_UID_RE.match(response.json())
    models = http.get(public_url + PublicRoutes.MODELS.rstrip("/"))
    assert models.status_code == 200
    assert model_id in {model["human_readable_id"] for model in models.json()}
