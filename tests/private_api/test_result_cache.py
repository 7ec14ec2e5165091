"""The result cache, server side: the consumer's lookup after its claim, the key's parts, a hit
finishing the task from a finished task's shared output, and sharing surviving deletes and
retention of either task."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from inference_server.contract import PrivateRoutes, TaskStatus, TaskSubmitFields
from private_api import result_cache
from private_api.models import Task, utcnow
from private_api.retention import expire_old_tasks
from tests.private_api.helpers import (
    acting_as,
    as_consumer,
    claim,
    make_zip,
    register_model,
    stored_files,
    task_row,
)

A = as_consumer("consumer-a")
B = as_consumer("consumer-b")
IMAGE = "sha256:" + "1" * 64
REBUILT_IMAGE = "sha256:" + "2" * 64
INPUT = make_zip({"scan.nii": b"voxels" * 100})
OUTPUT = make_zip({"mask.nii": b"\x01" * 5000})


@pytest.fixture
def cacheable(client) -> dict[str, Any]:
    return register_model(client, zip_bytes=make_zip({"weights.bin": b"w" * 64}), cacheable=True)


def submit(
    client,
    *,
    data: bytes = INPUT,
    params: dict[str, Any] | None = None,
    model: str = "seg-model",
    owner: str | None = "alice",
    **query: Any,
) -> str:
    """A task submitted for key `owner` (None: an anonymous caller)."""
    form = {TaskSubmitFields.PARAMS: json.dumps(params)} if params is not None else {}
    response = client.post(
        PrivateRoutes.TASKS,
        params={"model_human_readable_id": model, **query},
        headers=acting_as(owner),
        data=form,
        files={"zip_file": ("input.zip", data, "application/zip")},
    )
    assert response.status_code == 201, response.text
    return response.json()["uid"]


def lookup(client, uid: str, image_id: str = IMAGE, headers: dict[str, str] = A):
    return client.post(f"/tasks/{uid}/cache-lookup", json={"image_id": image_id}, headers=headers)


def claimed_lookup(client, uid: str, image_id: str = IMAGE) -> dict[str, Any]:
    assert claim(client, uid).status_code == 200
    response = lookup(client, uid, image_id)
    assert response.status_code == 200, response.text
    return response.json()


def run_to_the_end(client, *, image_id: str = IMAGE, **submission: Any) -> str:
    """A task that misses, runs and finishes with OUTPUT: the cache's original."""
    uid = submit(client, **submission)
    assert claimed_lookup(client, uid, image_id) == {"hit": False, "cached_from": None}
    response = client.post(f"/tasks/{uid}/output", files={"zip_file": ("o.zip", OUTPUT)}, headers=A)
    assert response.status_code == 200, response.text
    return uid


def metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def age(client, uid: str, days: float) -> None:
    with client.app.state.session_factory() as session:
        session.execute(
            update(Task).where(Task.uid == uid).values(finished_at=utcnow() - timedelta(days=days))
        )
        session.commit()


def expire(client, days: float = 30) -> int:
    with client.app.state.session_factory() as session:
        return expire_old_tasks(session=session, blobs=client.app.state.blobs, max_age=timedelta(days=days))


def test_a_hit_finishes_the_task_with_the_shared_output(client, settings, cacheable):
    original = run_to_the_end(client, params={"threshold": 0.5})
    files_before = len(stored_files(settings))

    uid = submit(client, params={"threshold": 0.5})
    answer = claimed_lookup(client, uid)

    assert answer == {"hit": True, "cached_from": original}
    status = client.get(f"/tasks/{uid}").json()
    assert status["status"] == TaskStatus.FINISHED
    assert status["cached_from"] == original
    assert status["exit_code"] == 0
    assert status["output_present"] is True
    assert status["started_at"] is not None and status["finished_at"] is not None
    assert status["run_started_at"] is None  # no container ran
    hit, first = task_row(client, uid), task_row(client, original)
    assert hit.output_blob_key == first.output_blob_key  # shared, not copied
    assert hit.output_sha256 == first.output_sha256
    assert hit.cache_key == first.cache_key
    assert hit.lease_expires_at is None
    assert client.get(f"/tasks/{uid}/output").content == OUTPUT
    assert (
        f"answered from the result cache: the output of task {original}"
        in client.get(f"/tasks/{uid}/logs").text
    )
    # The new task's input and its small log; no second output.
    assert len(stored_files(settings)) == files_before + 2
    assert metric(client, "inference_cache_hits_total") == 1
    assert metric(client, "inference_cache_misses_total") == 1
    # Finished: the consumer's late writes are refused like after any other finish.
    assert client.post(f"/tasks/{uid}/heartbeat", headers=A).json()["keep_running"] is False


@pytest.mark.parametrize(
    ("submission", "image_id"),
    [
        ({}, REBUILT_IMAGE),  # the same tag rebuilt: another image ID
        ({"params": {"threshold": 0.7}}, IMAGE),
        ({"data": make_zip({"scan.nii": b"other voxels"})}, IMAGE),
        ({"params": {"threshold": 0.5}, "cache": "false"}, IMAGE),
    ],
    ids=["other image id", "other params", "other input", "cache=false"],
)
def test_a_task_differing_in_one_part_misses_and_runs(client, cacheable, submission, image_id):
    original = run_to_the_end(client, params={"threshold": 0.5})
    submission = {"params": {"threshold": 0.5}} | submission

    uid = submit(client, **submission)
    answer = claimed_lookup(client, uid, image_id)

    assert answer == {"hit": False, "cached_from": None}
    row = task_row(client, uid)
    assert row.status == TaskStatus.RUNNING and row.consumer_id == "consumer-a"
    assert row.cached_from is None and row.output_blob_key is None
    assert row.cache_key is not None  # kept, to answer later tasks once this one finishes
    if submission.get("cache") == "false":
        assert row.cache_key == task_row(client, original).cache_key
    else:
        assert row.cache_key != task_row(client, original).cache_key


def test_a_task_that_missed_and_finished_answers_the_next(client, cacheable):
    first = run_to_the_end(client, image_id=REBUILT_IMAGE)
    second = run_to_the_end(client, image_id=IMAGE)  # missed: another image
    later = submit(client)
    assert claimed_lookup(client, later, IMAGE) == {"hit": True, "cached_from": second}
    again = submit(client)
    assert claimed_lookup(client, again, REBUILT_IMAGE) == {"hit": True, "cached_from": first}


def test_params_in_another_order_or_spacing_hit(client, cacheable):
    original = run_to_the_end(client, params={"a": 1, "b": [1, 2]})
    uid = submit(client, params={"b": [1, 2], "a": 1})
    assert claimed_lookup(client, uid) == {"hit": True, "cached_from": original}


def test_a_model_that_is_not_cacheable_never_hits(client):
    register_model(client)
    run_to_the_end(client)
    uid = submit(client)
    assert claimed_lookup(client, uid) == {"hit": False, "cached_from": None}
    assert task_row(client, uid).cache_key is None


def test_cacheable_can_be_switched_on_later(client):
    register_model(client)
    assert client.patch("/models/seg-model", json={"cacheable": True}).json()["cacheable"] is True
    original = run_to_the_end(client)
    uid = submit(client)
    assert claimed_lookup(client, uid) == {"hit": True, "cached_from": original}


def test_only_the_consumer_holding_the_task_may_ask(client, cacheable):
    run_to_the_end(client)
    uid = submit(client)

    pending = lookup(client, uid)
    assert pending.status_code == 409
    assert claim(client, uid).status_code == 200
    other = lookup(client, uid, headers=B)
    assert other.status_code == 409
    assert "does not hold" in other.json()["detail"]
    unknown = lookup(client, "no-such-task")
    assert unknown.status_code == 404
    assert task_row(client, uid).status == TaskStatus.RUNNING
    assert task_row(client, uid).cache_key is None


def test_the_holder_asking_again_after_a_hit_gets_the_same_answer(client, cacheable):
    original = run_to_the_end(client)
    uid = submit(client)
    assert claimed_lookup(client, uid)["hit"] is True
    again = lookup(client, uid)
    assert again.status_code == 200, again.text
    assert again.json() == {"hit": True, "cached_from": original}
    assert lookup(client, uid, headers=B).status_code == 409  # still only for its holder


def test_an_original_whose_output_file_is_gone_is_a_miss(client, cacheable):
    original = run_to_the_end(client)
    client.app.state.blobs.delete(task_row(client, original).output_blob_key)
    uid = submit(client)
    assert claimed_lookup(client, uid) == {"hit": False, "cached_from": None}
    assert task_row(client, uid).status == TaskStatus.RUNNING


def test_deleting_the_original_keeps_the_hit_output_and_the_last_holder_frees_it(client, settings, cacheable):
    original = run_to_the_end(client)
    uid = submit(client)
    assert claimed_lookup(client, uid)["hit"] is True
    shared = task_row(client, uid).output_blob_key

    assert client.delete(f"/tasks/{original}").status_code == 200
    assert client.get(f"/tasks/{uid}/output").content == OUTPUT
    assert settings.blob_dir / shared in stored_files(settings)

    assert client.delete(f"/tasks/{uid}").status_code == 200
    assert settings.blob_dir / shared not in stored_files(settings)


def test_deleting_the_hit_keeps_the_original_output(client, cacheable):
    original = run_to_the_end(client)
    uid = submit(client)
    assert claimed_lookup(client, uid)["hit"] is True

    assert client.delete(f"/tasks/{uid}").status_code == 200
    assert client.get(f"/tasks/{original}/output").content == OUTPUT
    # Still the original for later tasks.
    later = submit(client)
    assert claimed_lookup(client, later) == {"hit": True, "cached_from": original}


def test_a_deleted_original_no_longer_answers(client, cacheable):
    original = run_to_the_end(client)
    assert client.delete(f"/tasks/{original}").status_code == 200
    uid = submit(client)
    assert claimed_lookup(client, uid) == {"hit": False, "cached_from": None}


def test_retention_counts_sharing(client, settings, cacheable):
    original = run_to_the_end(client)
    uid = submit(client)
    assert claimed_lookup(client, uid)["hit"] is True
    shared = task_row(client, uid).output_blob_key

    age(client, original, 31)
    assert expire(client) == 1
    assert task_row(client, original).status == TaskStatus.EXPIRED
    assert client.get(f"/tasks/{uid}/output").content == OUTPUT

    age(client, uid, 31)
    assert expire(client) == 1
    assert settings.blob_dir / shared not in stored_files(settings)


def test_expiring_the_hit_keeps_the_original_output(client, cacheable):
    original = run_to_the_end(client)
    uid = submit(client)
    assert claimed_lookup(client, uid)["hit"] is True

    age(client, uid, 31)
    assert expire(client) == 1
    assert client.get(f"/tasks/{original}/output").content == OUTPUT


def test_a_hit_whose_output_was_released_meanwhile_is_undone_and_runs(
    client, settings, cacheable, monkeypatch
):
    """A delete of the original that cleared its keys just before the hit's commit may delete the
    file: the hit sees no other holder after its commit, goes back to running and misses."""
    original = run_to_the_end(client)
    uid = submit(client)
    assert claim(client, uid).status_code == 200
    lease = task_row(client, uid).lease_expires_at
    files_before = stored_files(settings)
    monkeypatch.setattr(result_cache, "_held_by_another", lambda *_args: False)

    answer = lookup(client, uid)

    assert answer.json() == {"hit": False, "cached_from": None}
    row = task_row(client, uid)
    assert row.status == TaskStatus.RUNNING and row.consumer_id == "consumer-a"
    assert row.lease_expires_at == lease
    assert row.output_blob_key is None and row.cached_from is None and row.log_blob_key is None
    assert stored_files(settings) == files_before  # the hit's log went again
    assert client.get(f"/tasks/{original}/output").content == OUTPUT
    # It runs and finishes like any miss.
    response = client.post(f"/tasks/{uid}/output", files={"zip_file": ("o.zip", OUTPUT)}, headers=A)
    assert response.status_code == 200, response.text


def test_a_task_waiting_on_a_hit_gets_its_output(client, cacheable):
    run_to_the_end(client)
    uid = submit(client)
    dependent = client.post(
        PrivateRoutes.TASKS,
        params={"model_human_readable_id": "seg-model"},
        data={TaskSubmitFields.INPUT_FROM: uid},
        files={"unused": ("", b"")},
    )
    assert dependent.status_code == 201, dependent.text
    assert task_row(client, dependent.json()["uid"]).input_blob_key is None  # waits

    assert claimed_lookup(client, uid)["hit"] is True

    waiting = task_row(client, dependent.json()["uid"])
    assert waiting.input_blob_key == task_row(client, uid).output_blob_key


def test_deleting_the_original_model_keeps_the_output_a_hit_of_another_model_shares(client, settings):
    weights = make_zip({"weights.bin": b"w" * 64})
    register_model(client, "seg-model", zip_bytes=weights, cacheable=True)
    register_model(client, "seg-model-copy", zip_bytes=weights, cacheable=True)
    original = run_to_the_end(client)
    uid = submit(client, model="seg-model-copy")
    assert claimed_lookup(client, uid) == {"hit": True, "cached_from": original}
    shared = task_row(client, uid).output_blob_key

    assert client.delete("/models/seg-model").status_code == 200
    assert client.get(f"/tasks/{uid}/output").content == OUTPUT
    assert settings.blob_dir / shared in stored_files(settings)


def test_only_the_owners_own_results_answer_by_default(client, cacheable) -> None:
    original = run_to_the_end(client, owner="alice")
    # Another key's identical task must not learn that alice submitted this very input.
    bob = submit(client, owner="bob")
    assert claimed_lookup(client, bob) == {"hit": False, "cached_from": None}
    alice_again = submit(client, owner="alice")
    assert claimed_lookup(client, alice_again) == {"hit": True, "cached_from": original}


def test_anonymous_tasks_never_hit_by_default(client, cacheable) -> None:
    run_to_the_end(client, owner=None)
    anonymous = submit(client, owner=None)
    assert claimed_lookup(client, anonymous) == {"hit": False, "cached_from": None}


def test_one_cache_for_everyone_when_the_lab_turns_it_on(start_app, make_settings) -> None:
    client = start_app(make_settings(cache_across_owners=True))
    register_model(client, zip_bytes=make_zip({"weights.bin": b"w" * 64}), cacheable=True)
    original = run_to_the_end(client, owner="alice")
    answered = {original}
    for owner in ("bob", None):
        uid = submit(client, owner=owner)
        answer = claimed_lookup(client, uid)
        # Answered from alice's task, or from bob's hit on it: the same shared output.
        assert answer["hit"] is True and answer["cached_from"] in answered
        answered.add(uid)
