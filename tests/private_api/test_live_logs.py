"""A running task's live log and progress, as its consumer ships them (PUT /tasks/{uid}/logs)."""

from __future__ import annotations

from inference_server.contract import TaskStatus
from tests.private_api.helpers import as_consumer, claim, register_model, stored_files, submit_ok

A = as_consumer("consumer-a")
B = as_consumer("consumer-b")


def ship(client, uid, text: bytes, headers=A, **progress):
    return client.put(f"/tasks/{uid}/logs", content=text, headers=headers, params=progress)


def test_a_running_tasks_log_and_progress_are_readable_while_it_runs(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)

    assert (
        ship(
            client,
            uid,
            b"step 1\nINFERENCE_PROGRESS 0.42 resampling\n",
            progress=0.42,
            progress_message="resampling",
        ).status_code
        == 204
    )

    task = client.get(f"/tasks/{uid}").json()
    assert task["status"] == TaskStatus.RUNNING
    assert (task["progress"], task["progress_message"]) == (0.42, "resampling")
    assert client.get(f"/tasks/{uid}/logs").text.startswith("step 1\n")


def test_a_retried_shipment_changes_nothing(client, settings):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)
    text = b"line 1\nline 2\n"

    for _ in range(3):
        assert ship(client, uid, text, progress=0.5).status_code == 204

    assert client.get(f"/tasks/{uid}/logs").content == text
    assert client.get(f"/tasks/{uid}").json()["progress"] == 0.5
    assert len(stored_files(settings)) == 2  # the input and one log, not one per shipment


def test_a_shipment_without_progress_keeps_the_last_one(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)
    ship(client, uid, b"a\n", progress=0.25, progress_message="quarter")

    assert ship(client, uid, b"a\nb\n").status_code == 204

    task = client.get(f"/tasks/{uid}").json()
    assert (task["progress"], task["progress_message"]) == (0.25, "quarter")


def test_a_consumer_not_holding_the_task_is_refused(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)
    ship(client, uid, b"mine\n", progress=0.1)

    refused = ship(client, uid, b"intruder\n", headers=B, progress=0.9)

    assert refused.status_code == 409
    assert client.get(f"/tasks/{uid}/logs").text == "mine\n"
    assert client.get(f"/tasks/{uid}").json()["progress"] == 0.1


def test_progress_outside_0_to_1_is_refused(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)

    assert ship(client, uid, b"x\n", progress=1.5).status_code == 422
    assert client.get(f"/tasks/{uid}").json()["progress"] is None


def test_a_new_attempt_starts_without_the_last_ones_progress(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)
    ship(client, uid, b"x\n", progress=0.8)
    released = client.post(f"/tasks/{uid}/release", json={"reason": "draining"}, headers=A)
    assert released.status_code == 200

    assert claim(client, uid, "consumer-b").status_code == 200

    assert client.get(f"/tasks/{uid}").json()["progress"] is None
