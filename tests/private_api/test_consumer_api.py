"""The consumer's side: claim, heartbeat, output, failure, release, logs."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest

from inference_server.contract import FailureCategory, TaskStatus, broker_priority, error_detail
from private_api import leases
from private_api.blobs import StoredBlob
from private_api.exceptions import Conflict
from tests.private_api.helpers import (
    as_consumer,
    claim,
    make_zip,
    register_model,
    stored_files,
    submit_ok,
    task_row,
)

A = as_consumer("consumer-a")
B = as_consumer("consumer-b")


def upload_output(client, uid, data, headers=A, params=None):
    return client.post(
        f"/tasks/{uid}/output", files={"zip_file": ("output.zip", data)}, headers=headers, params=params
    )


def run_times(started: datetime, seconds: float = 2.5) -> dict[str, str]:
    return {
        "run_started_at": started.isoformat(),
        "run_finished_at": (started + timedelta(seconds=seconds)).isoformat(),
    }


def test_claim_gives_task_and_model_and_starts_a_lease(client, settings):
    register_model(client, zip_bytes=make_zip({"weights.bin": b"w" * 100}), memory_mb=2048)
    uid = submit_ok(client)["uid"]

    response = claim(client, uid)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"]["status"] == TaskStatus.RUNNING
    assert body["task"]["attempts"] == 1
    assert body["task"]["consumer_id"] == "consumer-a"
    assert body["task"]["started_at"] is not None
    assert body["model"]["human_readable_id"] == "seg-model"
    assert body["model"]["memory_mb"] == 2048
    assert body["lease_seconds"] == settings.lease_seconds
    row = task_row(client, uid)
    assert 0 < (row.lease_expires_at - row.started_at).total_seconds() <= settings.lease_seconds + 1


def test_claim_again_by_holder_is_the_same_claim_and_others_get_409(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    first = claim(client, uid).json()

    again = claim(client, uid)
    other = claim(client, uid, consumer="consumer-b")

    assert again.status_code == 200
    assert again.json()["task"]["attempts"] == first["task"]["attempts"] == 1
    assert again.json()["task"]["started_at"] == first["task"]["started_at"]
    assert other.status_code == 409
    assert "consumer-a" in other.json()["detail"]
    assert claim(client, "unknown-unknown-unknown").status_code == 404
    assert client.post(f"/tasks/{uid}/claim").status_code == 422  # no X-Consumer-Id


def race_claims(session_factory, uid: str, contenders: int) -> list[str]:
    """`contenders` threads, each with its own session, claim `uid` at the same instant."""
    barrier = threading.Barrier(contenders)
    outcomes: list[str] = []
    lock = threading.Lock()

    def contend(name: str) -> None:
        with session_factory() as session:
            barrier.wait()
            try:
                leases.claim_task(
                    session=session, uid=uid, consumer_id=name, lease_seconds=60, max_attempts=3
                )
                outcome = f"won:{name}"
            except Conflict:
                outcome = "conflict"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=contend, args=(f"c{i}",)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


def test_concurrent_claims_have_exactly_one_winner(client):
    register_model(client)
    for uid in [submit_ok(client)["uid"] for _ in range(4)]:
        outcomes = race_claims(client.app.state.session_factory, uid, contenders=4)

        # A thread that died on a database error would be missing here, failing the test.
        assert len(outcomes) == 4
        winners = [outcome for outcome in outcomes if outcome.startswith("won:")]
        assert len(winners) == 1, outcomes
        row = task_row(client, uid)
        assert row.status == TaskStatus.RUNNING
        assert row.attempts == 1
        assert winners[0] == f"won:{row.consumer_id}"


def test_heartbeat_extends_lease_and_reports_cancel(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)
    before: datetime = task_row(client, uid).lease_expires_at

    beat = client.post(f"/tasks/{uid}/heartbeat", headers=A)

    assert beat.status_code == 200
    assert beat.json() == {"keep_running": True, "status": "running"}
    assert task_row(client, uid).lease_expires_at > before
    assert client.post(f"/tasks/{uid}/heartbeat", headers=B).status_code == 409

    client.post(f"/tasks/{uid}/cancel")
    stop = client.post(f"/tasks/{uid}/heartbeat", headers=A)
    assert stop.status_code == 200
    assert stop.json() == {"keep_running": False, "status": "cancelled"}


def test_output_is_stored_once(client, settings):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)
    output = make_zip({"seg/mask.nii": b"\x00" * 50_000, "report.txt": b"done"})

    refused_other = upload_output(client, uid, output, headers=B)
    first = upload_output(client, uid, output)
    second = upload_output(client, uid, make_zip({"other.txt": b"late"}))

    assert refused_other.status_code == 409
    assert first.status_code == 200, first.text
    assert first.json()["status"] == TaskStatus.FINISHED
    assert first.json()["output_present"] is True
    assert first.json()["output_sha256"] == hashlib.sha256(output).hexdigest()
    assert first.json()["exit_code"] == 0
    assert second.status_code == 409
    assert len(stored_files(settings)) == 2  # input + the one output, the refused uploads discarded
    download = client.get(f"/tasks/{uid}/output")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/zip"
    assert download.content == output
    assert claim(client, uid).status_code == 409


def test_empty_output_zip_is_accepted_and_a_bad_one_refused(client, settings):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)

    bad = upload_output(client, uid, b"not a zip")
    assert bad.status_code == 400
    assert task_row(client, uid).status == TaskStatus.RUNNING
    empty = upload_output(client, uid, make_zip({}))
    assert empty.status_code == 200, empty.text
    assert empty.json()["status"] == TaskStatus.FINISHED
    assert len(stored_files(settings)) == 2


def test_retryable_failure_retries_until_max_attempts(start_app, make_settings, queue):
    client = start_app(make_settings(max_attempts=2))
    register_model(client)
    uid = submit_ok(client)["uid"]
    assert queue.get()[0] == uid
    failure = {"error": "CUDA error: out of memory", "exit_code": 137, "retryable": True}

    claim(client, uid)
    retried = client.post(f"/tasks/{uid}/fail", json=failure, headers=A)

    assert retried.status_code == 200
    assert retried.json()["status"] == TaskStatus.PENDING
    assert retried.json()["attempts"] == 1
    assert retried.json()["failure"] is None  # it has not failed, it waits for another try
    assert queue.get()[0] == uid  # republished

    assert claim(client, uid, consumer="consumer-b").json()["task"]["attempts"] == 2
    final = client.post(f"/tasks/{uid}/fail", json=failure, headers=B)

    assert final.status_code == 200
    body = final.json()
    assert body["status"] == TaskStatus.FAILED
    assert body["error"] == "CUDA error: out of memory"
    assert body["exit_code"] == 137
    # A failure naming no category (a consumer of an older version) is the platform's side.
    assert body["failure"] == FailureCategory.INFRASTRUCTURE
    assert body["finished_at"] is not None
    assert queue.count() == 0
    assert client.post(f"/tasks/{uid}/fail", json=failure, headers=B).status_code == 409


def test_non_retryable_failure_fails_at_once(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)
    response = client.post(
        f"/tasks/{uid}/fail",
        json={"error": "exit code 3: bad input", "exit_code": 3, "failure": FailureCategory.MODEL_EXIT_CODE},
        headers=A,
    )
    assert response.json()["status"] == TaskStatus.FAILED
    assert response.json()["failure"] == FailureCategory.MODEL_EXIT_CODE
    assert client.get(f"/tasks/{uid}").json()["failure"] == FailureCategory.MODEL_EXIT_CODE
    assert response.json()["attempts"] == 1
    assert client.get(f"/tasks/{uid}/output").status_code == 409
    assert client.post(f"/tasks/{uid}/fail", json={"bad": "body"}, headers=A).status_code == 422


def test_release_returns_task_uncounted_and_republishes(client, queue):
    register_model(client)
    uid = submit_ok(client, priority=3)["uid"]
    queue.get()
    claim(client, uid)

    released = client.post(f"/tasks/{uid}/release", json={"reason": "consumer shutting down"}, headers=A)

    assert released.status_code == 200
    assert released.json()["status"] == TaskStatus.PENDING
    assert released.json()["attempts"] == 0
    assert released.json()["consumer_id"] is None
    body, properties = queue.get()
    assert body == uid
    assert properties.priority == broker_priority(3, retry=True)  # ahead of later tasks at 3
    assert client.post(f"/tasks/{uid}/release", json={"reason": "again"}, headers=A).status_code == 409
    assert claim(client, uid, consumer="consumer-b").json()["task"]["attempts"] == 1


def test_logs_replace_and_only_the_holder_writes(client, settings):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)

    assert client.put(f"/tasks/{uid}/logs", content=b"first\n", headers=A).status_code == 204
    assert client.put(f"/tasks/{uid}/logs", content="second \u2713\n".encode(), headers=A).status_code == 204
    refused = client.put(f"/tasks/{uid}/logs", content=b"intruder", headers=B)

    assert refused.status_code == 409
    assert client.get(f"/tasks/{uid}/logs").text == "second \u2713\n"
    assert len(stored_files(settings)) == 2  # input + the latest log only


def test_oversized_log_keeps_head_and_tail(start_app, make_settings):
    client = start_app(make_settings(max_log_bytes=4096))
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)
    log = b"START\n" + b"x" * 100_000 + b"\nTraceback: the real error\n"

    assert client.put(f"/tasks/{uid}/logs", content=log, headers=A).status_code == 204

    stored = client.get(f"/tasks/{uid}/logs").text
    assert stored.startswith("START\n")
    assert stored.endswith("Traceback: the real error\n")
    assert "bytes of log cut" in stored
    assert len(stored) < 4096 + 100


def test_store_output_failure_leaves_blob_to_caller(client, settings):
    """A refused output is reported as Conflict; the upload route then deletes the blob."""
    register_model(client)
    uid = submit_ok(client)["uid"]
    with client.app.state.session_factory() as session:
        try:
            leases.store_output(
                session=session,
                uid=uid,
                consumer_id="nobody",
                output_blob=StoredBlob(key="outputs/none.zip", sha256="0" * 64, size=0),
            )
        except Conflict as exc:
            assert "pending" in exc.detail
        else:
            raise AssertionError("a pending task accepted an output")
    assert task_row(client, uid).output_blob_key is None


def test_the_run_times_of_a_finished_task_are_stored_and_reported(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)
    assert client.get(f"/tasks/{uid}").json()["run_started_at"] is None
    # Another time zone on the wire is the same moment; it comes back in UTC.
    started = datetime.now(UTC).astimezone(timezone(timedelta(hours=2)))

    finished = upload_output(client, uid, make_zip({"a.txt": b"a"}), params=run_times(started))

    assert finished.status_code == 200, finished.text
    status = client.get(f"/tasks/{uid}").json()
    for body in (finished.json(), status):
        reported_start = datetime.fromisoformat(body["run_started_at"])
        reported_end = datetime.fromisoformat(body["run_finished_at"])
        assert reported_start == started
        assert (reported_end - reported_start).total_seconds() == 2.5
    row = task_row(client, uid)
    assert row.run_started_at == started and row.run_started_at.tzinfo is not None


def test_an_output_without_run_times_is_still_accepted(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)
    finished = upload_output(client, uid, make_zip({}))
    assert finished.status_code == 200, finished.text
    assert finished.json()["run_started_at"] is None
    assert finished.json()["run_finished_at"] is None


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"run_started_at": "2026-12-01T10:00:00", "run_finished_at": "2026-12-01T10:00:01"}, "timezone"),
        ({"run_started_at": "yesterday", "run_finished_at": "2026-12-01T10:00:01Z"}, "run_started_at"),
        ({"run_started_at": "2026-12-01T10:00:01Z"}, "together"),
        ({"run_started_at": "2026-12-01T10:00:01Z", "run_finished_at": "2026-12-01T10:00:00Z"}, "before"),
        (run_times(datetime(1970, 1, 1, tzinfo=UTC)), "before task"),
        (run_times(datetime.now(UTC) + timedelta(days=2)), "in the future"),
    ],
)
def test_impossible_run_times_refuse_the_output(client, settings, params, detail):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)

    refused = upload_output(client, uid, make_zip({"a.txt": b"a"}), params=params)

    assert refused.status_code == 422, refused.text
    assert detail in error_detail(refused.content, fallback="")
    assert task_row(client, uid).status == TaskStatus.RUNNING
    assert len(stored_files(settings)) == 1  # the input only: the refused output was not kept


def test_a_failure_reports_its_run_times_and_one_before_any_run_clears_them(start_app, make_settings):
    client = start_app(make_settings(max_attempts=2))
    register_model(client)
    uid = submit_ok(client)["uid"]
    started = datetime.now(UTC)
    claim(client, uid)

    retried = client.post(
        f"/tasks/{uid}/fail",
        json={"error": "CUDA error", "retryable": True, **run_times(started, seconds=1)},
        headers=A,
    )
    assert retried.status_code == 200, retried.text
    assert datetime.fromisoformat(retried.json()["run_started_at"]) == started
    assert datetime.fromisoformat(retried.json()["run_finished_at"]) == started + timedelta(seconds=1)

    # The second attempt failed before its container ran: no run times, not the first attempt's.
    second = claim(client, uid, consumer="consumer-b").json()["task"]
    # While it runs, its status does not show the first attempt's run either.
    assert second["attempts"] == 2
    assert second["run_started_at"] is None and second["run_finished_at"] is None
    failed = client.post(f"/tasks/{uid}/fail", json={"error": "input gone"}, headers=B)
    assert failed.status_code == 200, failed.text
    assert failed.json()["status"] == TaskStatus.FAILED
    assert failed.json()["run_started_at"] is None and failed.json()["run_finished_at"] is None


@pytest.mark.parametrize(
    ("times", "detail"),
    [
        ({"run_started_at": "2026-12-01T10:00:00", "run_finished_at": "2026-12-01T10:00:01"}, "timezone"),
        ({"run_finished_at": "2026-12-01T10:00:01Z"}, "together"),
        ({"run_started_at": "2026-12-01T10:00:01Z", "run_finished_at": "2026-12-01T10:00:00Z"}, "before"),
        (run_times(datetime.now(UTC) + timedelta(hours=1)), "in the future"),
    ],
)
def test_impossible_run_times_refuse_the_failure(client, times, detail):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)

    refused = client.post(f"/tasks/{uid}/fail", json={"error": "boom", **times}, headers=A)

    assert refused.status_code == 422, refused.text
    assert detail in error_detail(refused.content, fallback="")
    assert task_row(client, uid).status == TaskStatus.RUNNING
