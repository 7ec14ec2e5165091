"""Publishing by what a task needs: the queue of its class with its needs as headers, tasks no
consumer could run held until one registers, fair share between owners, retries ahead of their
level, the reasons a pending task gives, and the timeout for unrunnable tasks."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from inference_server.capacity import TaskNeeds
from inference_server.contract import FailureCategory, TaskQueue, TaskStatus, broker_priority
from private_api import outbox, task_lifecycle
from private_api.models import Task, utcnow
from tests.private_api.helpers import (
    QueueProbe,
    acting_as,
    age_consumer,
    as_consumer,
    claim,
    make_zip,
    register_consumer,
    register_model,
    submit_ok,
    task_row,
)

ALICE = acting_as("alice")
BOB = acting_as("bob")


@pytest.fixture
def gpu_queue(rabbitmq_url: str, queue_name: str) -> Iterator[QueueProbe]:
    probe = QueueProbe(rabbitmq_url, queue_name, TaskQueue.GPU)
    yield probe
    probe.close()


def _status(client: TestClient, uid: str) -> dict:
    response = client.get(f"/tasks/{uid}")
    assert response.status_code == 200, response.text
    return response.json()


def _reason(client: TestClient, uid: str) -> str | None:
    return _status(client, uid)["waiting_reason"]


def _drain_messages(queue: QueueProbe) -> list[str]:
    uids = []
    while queue.count():
        uids.append(queue.get()[0])
    return uids


def test_gpu_memory_is_a_model_limit(client: TestClient) -> None:
    model = register_model(client, "gpu-model", use_gpu=True, gpu_memory_mb=8000)
    assert model["gpu_memory_mb"] == 8000
    changed = client.patch("/models/gpu-model", json={"gpu_memory_mb": 12000})
    assert changed.status_code == 200 and changed.json()["gpu_memory_mb"] == 12000
    assert client.patch("/models/gpu-model", json={"gpu_memory_mb": None}).json()["gpu_memory_mb"] is None
    for bad in (0, -1, "lots"):
        refused = client.patch("/models/gpu-model", json={"gpu_memory_mb": bad})
        assert refused.status_code == 422 and "gpu_memory_mb" in str(refused.json()["detail"])
    assert client.get("/models/gpu-model").json()["gpu_memory_mb"] is None


def test_each_class_goes_to_its_queue_with_its_needs(client: TestClient, queue, gpu_queue) -> None:
    register_model(client, "cpu-model", cpus=2.5, memory_mb=4096)
    register_model(client, "gpu-model", use_gpu=True, gpu_memory_mb=8000, cpus=1)
    register_consumer(client, "gpu-1", gpu_memory_mb=24576)

    cpu_uid = submit_ok(client, "cpu-model", priority=3)["uid"]
    gpu_uid = submit_ok(client, "gpu-model", priority=4)["uid"]

    body, properties = queue.get()
    assert body == cpu_uid
    assert properties.priority == broker_priority(3, retry=False)
    assert properties.delivery_mode == 2
    assert TaskNeeds.from_headers(properties.headers) == TaskNeeds(gpu=False, cpus=2.5, memory_mb=4096)
    body, properties = gpu_queue.get()
    assert body == gpu_uid
    assert properties.priority == broker_priority(4, retry=False)
    assert TaskNeeds.from_headers(properties.headers) == TaskNeeds(gpu=True, gpu_memory_mb=8000, cpus=1.0)
    assert queue.count() == gpu_queue.count() == 0


def test_a_gpu_task_waits_unpublished_until_a_gpu_consumer_registers(client: TestClient, gpu_queue) -> None:
    register_model(client, "gpu-model", use_gpu=True)
    register_consumer(client, "cpu-only")

    uid = submit_ok(client, "gpu-model")["uid"]
    assert task_row(client, uid).published_at is None
    assert gpu_queue.count() == 0
    assert _reason(client, uid) == "needs a GPU; no GPU consumer is registered"

    register_consumer(client, "gpu-1", gpu_memory_mb=24576)  # the outbox runs at once
    assert gpu_queue.get()[0] == uid
    assert task_row(client, uid).published_at is not None
    assert _reason(client, uid) == "waiting for a consumer with room"


def test_a_task_larger_than_every_gpu_says_so_and_goes_once_one_fits(client: TestClient, gpu_queue) -> None:
    register_model(client, "big-model", use_gpu=True, gpu_memory_mb=30000)
    register_consumer(client, "gpu-1", gpu_memory_mb=24576)
    register_consumer(client, "gpu-2", gpu_memory_mb=16384)

    uid = submit_ok(client, "big-model")["uid"]
    assert _reason(client, uid) == "needs 30000 MiB of GPU memory; the largest GPU has 24576 MiB"
    assert gpu_queue.count() == 0

    register_consumer(client, "gpu-3", gpu_memory_mb=81920)
    assert gpu_queue.get()[0] == uid


def test_cpu_and_memory_needs_beyond_every_consumer(client: TestClient, queue) -> None:
    register_model(client, "many-cores", cpus=64)
    register_model(client, "much-memory", memory_mb=65536)
    register_consumer(client, "cpu-1", cpus=8, memory_mb=32768)

    cores = submit_ok(client, "many-cores")["uid"]
    memory = submit_ok(client, "much-memory")["uid"]
    assert _reason(client, cores) == "needs 64 CPUs; the largest consumer has 8"
    assert _reason(client, memory) == "needs 65536 MiB of memory; the largest consumer has 32768 MiB"
    assert queue.count() == 0


def test_draining_and_lost_consumers_run_nothing_new(client: TestClient, gpu_queue) -> None:
    register_model(client, "gpu-model", use_gpu=True)
    register_consumer(client, "gpu-1", gpu_memory_mb=24576)
    client.post("/consumers/gpu-1/drain")

    uid = submit_ok(client, "gpu-model")["uid"]
    assert _reason(client, uid) == "all consumers that could run it are draining"
    assert gpu_queue.count() == 0

    assert client.delete("/consumers/gpu-1/drain").status_code == 200
    assert gpu_queue.get()[0] == uid

    age_consumer(client, "gpu-1", 60)
    later = submit_ok(client, "gpu-model")["uid"]
    assert _reason(client, later) == "needs a GPU; no GPU consumer is registered"
    assert task_row(client, later).published_at is None


def test_a_cpu_task_is_published_while_no_consumer_is_registered(client: TestClient, queue) -> None:
    register_model(client)
    first = submit_ok(client)["uid"]
    second = submit_ok(client)["uid"]
    assert _drain_messages(queue) == [first, second]
    assert _reason(client, first) == "no consumer is registered"

    register_consumer(client, "cpu-1")
    assert _reason(client, first) == "waiting for a consumer with room"
    assert _reason(client, second) == "queued behind 1 task"
    assert claim(client, first).status_code == 200
    assert _reason(client, first) is None  # running
    assert _reason(client, second) == "waiting for a consumer with room"


def test_owners_take_turns(client: TestClient, queue) -> None:
    """Alice submits 5, then Bob 1: Bob's is in the broker right after Alice's first 2."""
    register_model(client)
    alice = [submit_ok(client, headers=ALICE)["uid"] for _ in range(5)]
    bob = submit_ok(client, headers=BOB)["uid"]

    assert _drain_messages(queue) == [alice[0], alice[1], bob]
    assert [task_row(client, uid).published_at is None for uid in alice] == [False, False, True, True, True]
    assert _reason(client, alice[2]) == "waiting for its turn: its owner already has 2 tasks queued"
    listed = {task["uid"]: task["waiting_reason"] for task in client.get("/tasks").json()}
    assert listed[alice[2]] == "waiting for its turn: its owner already has 2 tasks queued"
    assert listed[alice[1]] == "no consumer is registered"

    # A claim frees a turn: Alice's next task goes out at once, not at the outbox's next round.
    assert claim(client, alice[0]).status_code == 200
    assert queue.get()[0] == alice[2]
    assert task_row(client, alice[3]).published_at is None
    # A higher priority is a turn of its own.
    urgent = submit_ok(client, headers=ALICE, priority=3)["uid"]
    assert queue.get()[0] == urgent
    assert queue.count() == 0


def test_fair_share_off(start_app, make_settings, queue) -> None:
    client = start_app(make_settings(fair_share_queued_per_owner=0))
    register_model(client)
    alice = [submit_ok(client, headers=ALICE)["uid"] for _ in range(4)]
    assert _drain_messages(queue) == alice


def test_the_outbox_reaches_every_owner_past_one_owners_backlog(client: TestClient, queue) -> None:
    register_model(client)
    app = client.app
    app.state.maintenance.stop()  # this test runs the outbox itself
    blobs = app.state.blobs
    with app.state.session_factory() as session:

        def create(owner: str, priority: int = 0) -> str:
            blob = blobs.save([make_zip()], "inputs", suffix=".zip")
            return task_lifecycle.create_task(
                session=session,
                model_human_readable_id="seg-model",
                priority=priority,
                input_blob=blob,
                owner=owner,
            ).uid

        alice = [create("alice") for _ in range(6)]
        bob = create("bob")
        carol_urgent = create("carol", priority=4)
        # A batch of four would be Alice's first four under one ORDER BY; per owner it reaches all.
        published = outbox.publish_unpublished(
            session=session, publisher=app.state.publisher, policy=app.state.scheduling, limit=4
        )
    assert published == 4
    assert _drain_messages(queue) == [carol_urgent, alice[0], alice[1], bob]


def test_a_retry_goes_ahead_of_its_level_and_past_the_owners_cap(client: TestClient, queue) -> None:
    register_model(client)
    first = submit_ok(client, headers=ALICE, priority=2)["uid"]
    assert queue.get()[0] == first
    assert claim(client, first).status_code == 200
    later = [submit_ok(client, headers=ALICE, priority=2)["uid"] for _ in range(3)]
    assert _drain_messages(queue) == later[:2]

    released = client.post(
        f"/tasks/{first}/release", json={"reason": "shutting down"}, headers=as_consumer("consumer-a")
    )
    assert released.status_code == 200, released.text
    body, properties = queue.get()
    assert body == first
    assert properties.priority == broker_priority(2, retry=True) > broker_priority(2, retry=False)
    assert task_row(client, later[2]).published_at is None  # still Alice's turn to wait


def test_unrunnable_tasks_fail_after_the_timeout(start_app, make_settings, gpu_queue) -> None:
    client = start_app(make_settings(unrunnable_timeout_s=600))
    client.app.state.maintenance.stop()  # this test runs the sweep itself
    register_model(client, "gpu-model", use_gpu=True)
    register_model(client)
    old_gpu = submit_ok(client, "gpu-model")["uid"]
    new_gpu = submit_ok(client, "gpu-model")["uid"]
    old_cpu = submit_ok(client)["uid"]
    with client.app.state.session_factory() as session:
        session.execute(
            update(Task)
            .where(Task.uid.in_([old_gpu, old_cpu]))
            .values(created_at=utcnow() - timedelta(minutes=11))
        )
        session.commit()

    assert client.app.state.maintenance.sweep_once() == 1
    failed = _status(client, old_gpu)
    assert failed["status"] == TaskStatus.FAILED
    assert failed["error"] == "needs a GPU; no GPU consumer is registered"
    assert failed["failure"] == FailureCategory.UNSCHEDULABLE
    assert failed["waiting_reason"] is None and failed["attempts"] == 0
    assert _status(client, new_gpu)["status"] == TaskStatus.PENDING  # not waited long enough
    assert _status(client, old_cpu)["status"] == TaskStatus.PENDING  # runnable: only slow
    assert gpu_queue.count() == 0
