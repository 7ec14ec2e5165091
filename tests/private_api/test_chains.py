"""Chained tasks: input_from and model_from at submission, waiting unpublished for the upstream,
its output handed over (shared, not copied) when it finishes, and failure, cancellation and
deletion passed on to what waits on it. The consumer's side is played through its routes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import select, update

from inference_server.contract import (
    SERVICE_TOKEN_HEADER,
    ApiKeyRole,
    FailureCategory,
    TaskStatus,
    WebhookEvent,
)
from private_api import chains, leases
from private_api.config import PrivateSettings
from private_api.models import Task, WebhookDelivery, utcnow
from private_api.retention import expire_old_tasks
from tests.private_api.helpers import (
    QueueProbe,
    acting_as,
    as_consumer,
    claim,
    make_zip,
    register_model,
    row_counts,
    stored_files,
    submit_ok,
    task_row,
)

CONSUMER_TOKEN = "consumer-token-0123456789abcdef"
ALICE = acting_as("alice")
BOB = acting_as("bob")
ANONYMOUS = acting_as(None)
HOLDER = as_consumer("consumer-a")


@pytest.fixture
def settings(make_settings: Callable[..., PrivateSettings]) -> PrivateSettings:
    return make_settings(consumer_token=CONSUMER_TOKEN)


def submit_chained(
    client: TestClient,
    *,
    input_from: str | None = None,
    model_from: str | None = None,
    zip_bytes: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """POST /tasks with the chain's form fields (and a zip only when given)."""
    files: dict[str, Any] = {}
    if input_from is not None:
        files["input_from"] = (None, input_from)
    if model_from is not None:
        files["model_from"] = (None, model_from)
    if zip_bytes is not None:
        files["zip_file"] = ("input.zip", zip_bytes, "application/zip")
    return client.post(
        "/tasks", params={"model_human_readable_id": "seg-model"}, files=files, headers=headers
    )


def chained_ok(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = submit_chained(client, **fields)
    assert response.status_code == 201, response.text
    return response.json()


def finish(client: TestClient, uid: str, output: bytes) -> None:
    """The consumer's side of a run that succeeds: claim, then upload the output."""
    assert claim(client, uid).status_code == 200
    uploaded = client.post(f"/tasks/{uid}/output", files={"zip_file": ("output.zip", output)}, headers=HOLDER)
    assert uploaded.status_code == 200, uploaded.text


def fail(client: TestClient, uid: str) -> None:
    assert claim(client, uid).status_code == 200
    failed = client.post(f"/tasks/{uid}/fail", json={"error": "exit code 3", "exit_code": 3}, headers=HOLDER)
    assert failed.status_code == 200 and failed.json()["status"] == TaskStatus.FAILED, failed.text


def status(client: TestClient, uid: str) -> dict[str, Any]:
    response = client.get(f"/tasks/{uid}")
    assert response.status_code == 200, response.text
    return response.json()


def published(queue: QueueProbe) -> list[str]:
    uids = []
    while queue.count():
        uids.append(queue.get()[0])
    return uids


def input_bytes(client: TestClient, uid: str) -> bytes:
    """What the consumer holding `uid` downloads as its input (it claims it first)."""
    assert claim(client, uid).status_code == 200
    response = client.get(f"/tasks/{uid}/input", headers=HOLDER)
    assert response.status_code == 200, response.text
    return response.content


def test_a_zip_and_input_from_at_once_or_neither_are_refused_and_nothing_is_stored(
    client: TestClient, settings: PrivateSettings
) -> None:
    register_model(client)
    upstream = submit_ok(client)["uid"]
    before = (row_counts(client), stored_files(settings))

    both = submit_chained(client, input_from=upstream, zip_bytes=make_zip())
    assert both.status_code == 422 and "not both" in both.json()["detail"]
    neither = submit_chained(client, model_from=upstream)
    assert neither.status_code == 422 and "zip_file" in neither.json()["detail"]

    assert (row_counts(client), stored_files(settings)) == before


def test_an_unknown_foreign_or_ended_upstream_is_refused_and_nothing_is_stored(
    client: TestClient, settings: PrivateSettings
) -> None:
    register_model(client)
    alices = submit_ok(client, headers=ALICE)["uid"]
    anonymous = submit_ok(client, headers=ANONYMOUS)["uid"]
    failed = submit_ok(client, headers=BOB)["uid"]
    fail(client, failed)
    cancelled = submit_ok(client, headers=BOB)["uid"]
    assert client.post(f"/tasks/{cancelled}/cancel").status_code == 200
    before = (row_counts(client), stored_files(settings))

    unknown_uid = "no-such-task-0123456789"
    unknown = submit_chained(client, input_from=unknown_uid, headers=BOB)
    assert unknown.status_code == 404 and f"input_from: task {unknown_uid}" in unknown.json()["detail"]
    malformed = submit_chained(client, input_from="x" * 5000, headers=BOB)
    assert malformed.status_code == 422 and "is not a task uid" in malformed.json()["detail"]
    assert len(malformed.json()["detail"]) < 200
    # Someone else's task answers exactly like an unknown one; anonymous callers reach only
    # anonymous tasks, and keys never reach anonymous ones.
    for upstream, caller in ((alices, BOB), (alices, ANONYMOUS), (anonymous, BOB)):
        foreign = submit_chained(client, input_from=upstream, headers=caller)
        assert foreign.status_code == 404, foreign.text
        assert "unknown" in foreign.json()["detail"]
    foreign_model = submit_chained(client, model_from=alices, zip_bytes=make_zip(), headers=BOB)
    assert foreign_model.status_code == 404 and "model_from" in foreign_model.json()["detail"]
    for upstream, how in ((failed, "failed"), (cancelled, "was cancelled")):
        ended = submit_chained(client, input_from=upstream, headers=BOB)
        assert ended.status_code == 409 and how in ended.json()["detail"], ended.text

    assert (row_counts(client), stored_files(settings)) == before
    # What the rules allow: one's own task, an anonymous caller's anonymous task, an operator any.
    assert submit_chained(client, input_from=alices, headers=ALICE).status_code == 201
    assert submit_chained(client, input_from=anonymous, headers=ANONYMOUS).status_code == 201
    operator = acting_as("root", role=ApiKeyRole.OPERATOR)
    assert submit_chained(client, input_from=alices, headers=operator).status_code == 201


def test_a_dependent_waits_unpublished_then_gets_the_upstream_output_shared_not_copied(
    client: TestClient, queue: QueueProbe, settings: PrivateSettings
) -> None:
    register_model(client)
    upstream = submit_ok(client)["uid"]
    assert published(queue) == [upstream]

    dependent = chained_ok(client, input_from=upstream)
    assert dependent["input_from"] == upstream and dependent["model_from"] is None
    uid = dependent["uid"]
    assert status(client, uid)["waiting_reason"] == f"waiting for upstream {upstream} (pending)"
    assert claim(client, upstream).status_code == 200
    assert status(client, uid)["waiting_reason"] == f"waiting for upstream {upstream} (running)"
    client.app.state.maintenance.publish_once()  # the outbox leaves it alone too
    assert published(queue) == []

    output = make_zip({"mask.nii": b"mask" * 50})
    uploaded = client.post(
        f"/tasks/{upstream}/output", files={"zip_file": ("output.zip", output)}, headers=HOLDER
    )
    assert uploaded.status_code == 200, uploaded.text

    # Published by the upload itself, not at the outbox's next round.
    assert published(queue) == [uid]
    upstream_row, dependent_row = task_row(client, upstream), task_row(client, uid)
    assert dependent_row.input_blob_key == upstream_row.output_blob_key
    assert dependent_row.input_sha256 == upstream_row.output_sha256
    assert input_bytes(client, uid) == output
    assert len([path for path in stored_files(settings) if path.read_bytes() == output]) == 1

    # Deleting the upstream keeps the input its dependent already got.
    assert client.delete(f"/tasks/{upstream}").status_code == 200
    assert client.get(f"/tasks/{uid}/input", headers=HOLDER).content == output
    # And deleting the dependent then lets the last holder's file go.
    assert client.delete(f"/tasks/{uid}").status_code == 200
    assert not [path for path in stored_files(settings) if path.read_bytes() == output]


def test_an_upstream_finished_already_gives_its_output_at_once(client: TestClient, queue: QueueProbe) -> None:
    register_model(client)
    upstream = submit_ok(client)["uid"]
    output = make_zip({"weights.bin": b"trained" * 10})
    finish(client, upstream, output)
    assert published(queue) == [upstream]

    uid = chained_ok(client, input_from=upstream, model_from=upstream)["uid"]

    assert published(queue) == [uid]
    assert status(client, uid)["waiting_reason"] != f"waiting for upstream {upstream} (finished)"
    assert input_bytes(client, uid) == output
    model = client.get(f"/tasks/{uid}/model-from", headers=HOLDER)
    assert model.status_code == 200 and model.content == output


def test_model_from_is_served_to_the_holder_and_only_for_a_task_that_has_one(client: TestClient) -> None:
    register_model(client)
    trained = submit_ok(client)["uid"]
    uid = chained_ok(client, model_from=trained, zip_bytes=make_zip())["uid"]
    assert status(client, uid)["model_from"] == trained
    assert task_row(client, uid).input_blob_key is not None  # its own zip is its input

    weights = make_zip({"weights.bin": b"w" * 64})
    finish(client, trained, weights)
    consumers = TestClient(client.app, headers={SERVICE_TOKEN_HEADER: CONSUMER_TOKEN})
    assert consumers.get(f"/tasks/{uid}/model-from", headers=HOLDER).status_code == 409  # unclaimed
    assert claim(client, uid).status_code == 200
    assert consumers.get(f"/tasks/{uid}/model-from", headers=as_consumer("consumer-b")).status_code == 409
    served = consumers.get(f"/tasks/{uid}/model-from", headers=HOLDER)
    assert served.status_code == 200 and served.content == weights

    plain = submit_ok(client)["uid"]
    assert claim(client, plain).status_code == 200
    missing = client.get(f"/tasks/{plain}/model-from", headers=HOLDER)
    assert missing.status_code == 404 and "no model_from" in missing.json()["detail"]


def _chain_of_three(client: TestClient) -> tuple[str, str, str]:
    first = submit_ok(client)["uid"]
    second = chained_ok(client, input_from=first)["uid"]
    third = chained_ok(client, model_from=second, zip_bytes=make_zip())["uid"]
    return first, second, third


def test_a_failure_is_passed_on_through_the_whole_chain(client: TestClient) -> None:
    register_model(client)
    first, second, third = _chain_of_three(client)
    unrelated = submit_ok(client)["uid"]

    fail(client, first)

    assert status(client, second)["status"] == TaskStatus.FAILED
    assert status(client, second)["error"] == f"upstream {first} failed"
    assert status(client, third)["status"] == TaskStatus.FAILED
    assert status(client, third)["error"] == f"upstream {second} failed"
    assert status(client, first)["failure"] == FailureCategory.INFRASTRUCTURE
    assert (
        status(client, second)["failure"]
        == status(client, third)["failure"]
        == FailureCategory.UPSTREAM_FAILED
    )
    assert status(client, unrelated)["status"] == TaskStatus.PENDING


def test_a_retryable_failure_is_not_passed_on(client: TestClient) -> None:
    register_model(client)
    first, second, _third = _chain_of_three(client)
    assert claim(client, first).status_code == 200
    retry = {"error": "out of GPU memory", "retryable": True}
    assert (
        client.post(f"/tasks/{first}/fail", json=retry, headers=HOLDER).json()["status"] == TaskStatus.PENDING
    )
    assert status(client, second)["status"] == TaskStatus.PENDING


def test_cancelling_cancels_what_waits_on_it_transitively(client: TestClient) -> None:
    register_model(client)
    first, second, third = _chain_of_three(client)

    assert client.post(f"/tasks/{first}/cancel").json()["status"] == TaskStatus.CANCELLED

    assert (status(client, second)["status"], status(client, second)["error"]) == (
        TaskStatus.CANCELLED,
        f"upstream {first} was cancelled",
    )
    assert (status(client, third)["status"], status(client, third)["error"]) == (
        TaskStatus.CANCELLED,
        f"upstream {second} was cancelled",
    )
    assert status(client, third)["failure"] == FailureCategory.CANCELLED


def test_deleting_a_waited_on_task_fails_what_waits_on_it(client: TestClient) -> None:
    register_model(client)
    first, second, third = _chain_of_three(client)

    assert client.delete(f"/tasks/{first}").status_code == 200

    assert status(client, second)["error"] == f"upstream {first} was deleted"
    assert status(client, third)["error"] == f"upstream {second} failed"
    assert status(client, third)["status"] == TaskStatus.FAILED


def test_a_diamond_runs_each_task_once_its_upstreams_finished(client: TestClient, queue: QueueProbe) -> None:
    """top -> left, right -> bottom (input from left, /model from right), submitted at once."""
    register_model(client)
    top = submit_ok(client)["uid"]
    left = chained_ok(client, input_from=top)["uid"]
    right = chained_ok(client, input_from=top)["uid"]
    bottom = chained_ok(client, input_from=left, model_from=right)["uid"]
    assert published(queue) == [top]

    finish(client, top, make_zip({"top": b"1"}))
    assert sorted(published(queue)) == sorted([left, right])
    assert status(client, bottom)["waiting_reason"] == f"waiting for upstream {left} (pending)"

    left_output = make_zip({"left": b"2"})
    finish(client, left, left_output)
    assert published(queue) == []
    assert status(client, bottom)["waiting_reason"] == f"waiting for upstream {right} (pending)"

    right_output = make_zip({"right": b"3"})
    finish(client, right, right_output)
    assert published(queue) == [bottom]
    assert input_bytes(client, bottom) == left_output
    assert client.get(f"/tasks/{bottom}/model-from", headers=HOLDER).content == right_output


def test_the_maintenance_loop_settles_an_upstream_whose_settle_never_ran(
    client: TestClient, queue: QueueProbe
) -> None:
    """As after a crash between an upstream's output commit and the hand-over."""
    register_model(client)
    upstream = submit_ok(client)["uid"]
    uid = chained_ok(client, input_from=upstream)["uid"]
    assert published(queue) == [upstream]
    with client.app.state.session_factory() as session:
        session.execute(
            update(Task)
            .where(Task.uid == upstream)
            .values(
                status=TaskStatus.FINISHED,
                output_blob_key=task_row(client, upstream).input_blob_key,
                output_sha256=task_row(client, upstream).input_sha256,
                finished_at=utcnow(),
            )
        )
        session.commit()
        assert chains.settle_stranded(session=session) == 1

    assert task_row(client, uid).input_blob_key == task_row(client, upstream).output_blob_key
    client.app.state.maintenance.publish_once()
    assert published(queue) == [uid]


def test_a_dependent_ended_by_its_upstream_tells_its_webhook(client: TestClient) -> None:
    register_model(client)
    first, second, third = _chain_of_three(client)
    with client.app.state.session_factory() as session:
        session.execute(
            update(Task).where(Task.uid.in_((second, third))).values(webhook_url="http://127.0.0.1:9/hook")
        )
        session.commit()

    assert client.post(f"/tasks/{first}/cancel").status_code == 200

    with client.app.state.session_factory() as session:
        events = session.execute(
            select(Task.uid, WebhookDelivery.event).join(Task, WebhookDelivery.task_id == Task.id)
        ).all()
    assert sorted(events) == sorted([(second, WebhookEvent.CANCELLED), (third, WebhookEvent.CANCELLED)])


def test_an_expired_upstream_is_refused_and_its_output_stays_while_a_dependent_holds_it(
    client: TestClient, settings: PrivateSettings
) -> None:
    register_model(client)
    kept, gone = submit_ok(client)["uid"], submit_ok(client)["uid"]
    kept_output, gone_output = make_zip({"kept": b"k" * 40}), make_zip({"gone": b"g" * 40})
    finish(client, kept, kept_output)
    finish(client, gone, gone_output)
    dependent = chained_ok(client, input_from=kept)["uid"]

    with client.app.state.session_factory() as session:
        # Both ended "long ago"; the dependent, still pending, is not retention's.
        session.execute(
            update(Task).where(Task.uid.in_((kept, gone))).values(finished_at=utcnow() - timedelta(days=60))
        )
        session.commit()
        assert (
            expire_old_tasks(session=session, blobs=client.app.state.blobs, max_age=timedelta(days=30)) == 2
        )

    refused = submit_chained(client, input_from=gone)
    assert refused.status_code == 409 and "expired" in refused.json()["detail"]
    files = [path.read_bytes() for path in stored_files(settings)]
    assert gone_output not in files
    assert kept_output in files  # the dependent's input
    assert input_bytes(client, dependent) == kept_output


def test_the_reaper_giving_a_task_up_fails_what_waits_on_it(client: TestClient) -> None:
    register_model(client)
    first, second, third = _chain_of_three(client)
    assert claim(client, first).status_code == 200
    with client.app.state.session_factory() as session:
        # Its consumer vanished on the last attempt: the lease lapsed ten seconds ago.
        session.execute(
            update(Task).where(Task.uid == first).values(lease_expires_at=utcnow() - timedelta(seconds=10))
        )
        session.commit()
        assert (
            leases.reap_expired_leases(session=session, publisher=client.app.state.publisher, max_attempts=1)
            == 1
        )

    assert status(client, first)["status"] == TaskStatus.FAILED
    assert status(client, second)["error"] == f"upstream {first} failed"
    assert status(client, third)["error"] == f"upstream {second} failed"
