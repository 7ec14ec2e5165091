"""Which tasks a consumer takes and how many at once, against a real private API, RabbitMQ and
Docker: queues by kind, packing on a simulated GPU, exclusive models, holding, handing back,
draining.

The models here wait until the test drops /output/go into their task folder (the host side of
/output), so the test decides when each one ends; overlap is proven from the run times the
consumer reports, not from sleeps.
"""

from __future__ import annotations

import logging
import secrets
import threading

import pika
import pika.exceptions
import pytest

from inference_server.capacity import TaskNeeds
from inference_server.contract import PrivateRoutes, TaskPublic, TaskStatus
from job_consumer.consumer import Consumer
from job_consumer.workspace import OWNER_FILE
from tests import images
from tests.helpers import wait_until
from tests.job_consumer.helpers import ConsumerThread
from tests.job_consumer.stack import consumers_on, make_zip, publish_uid, queue_depth
from tests.job_consumer.test_consumer import (
    GATED_SCRIPT,
    hrid,
    let_gated_model_end,
    running_container,
    task_folders,
)

pytestmark = pytest.mark.docker


def register_gated(private_api, prefix: str, **limits) -> str:
    model_id = hrid(prefix)
    private_api.register_model(
        model_id, images.SCRIPT, model_zip=make_zip({"run.sh": GATED_SCRIPT}), **limits
    )
    return model_id


def open_gate(consumer: Consumer, uid: str) -> None:
    let_gated_model_end(consumer, uid)


def running_uids(docker_client, uids: list[str]) -> set[str]:
    return {uid for uid in uids if running_container(docker_client, uid)}


def finished(private_api, uid: str) -> TaskPublic | None:
    task = private_api.task(uid)
    assert task.status in (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.FINISHED), task.error
    return task if task.status == TaskStatus.FINISHED else None


def subscriptions(rabbitmq_url: str, queue_name: str) -> tuple[int, int]:
    """(GPU queue, CPU queue) subscriptions."""
    return (
        consumers_on(rabbitmq_url, f"{queue_name}.gpu"),
        consumers_on(rabbitmq_url, f"{queue_name}.cpu"),
    )


@pytest.mark.parametrize(
    ("kind", "overrides", "expected"),
    [
        ("cpu", {}, (0, 1)),
        ("gpu", {"simulate_gpu_memory_mb": 24576}, (1, 0)),
        ("gpu-and-cpu", {"simulate_gpu_memory_mb": 24576, "take_cpu_tasks": True}, (1, 1)),
    ],
)
def test_each_consumer_serves_the_queues_of_its_kind(
    make_consumer, rabbitmq_url, queue_name, kind, overrides, expected
):
    consumer = make_consumer(**overrides)
    worker = ConsumerThread(consumer).start()
    wait_until(lambda: subscriptions(rabbitmq_url, queue_name) == expected, 20, f"the {kind} subscriptions")
    consumer.request_stop()
    assert worker.join(20) == 0
    assert subscriptions(rabbitmq_url, queue_name) == (0, 0)


def test_a_cpu_consumer_leaves_gpu_tasks_alone_and_runs_the_cpu_task_after_them(
    private_api, make_consumer, test_images, rabbitmq_url, gpu_queue, cpu_queue
):
    gpu_model = register_gated(private_api, "gpu", use_gpu=True)
    cpu_model = hrid("cpu")
    private_api.register_model(cpu_model, images.SCRIPT, model_zip=make_zip({"run.sh": b"echo cpu\n"}))
    gpu_task = private_api.submit(gpu_model, {"x.txt": b"x"})
    # No GPU consumer is registered, so the private API may hold the GPU task back; on the GPU
    # queue it must stay all the same, as in a fleet whose GPU consumer went away.
    publish_uid(rabbitmq_url, gpu_queue, gpu_task.uid, headers=TaskNeeds(gpu=True).to_headers())
    cpu_task = private_api.submit(cpu_model, {"y.txt": b"y"})

    assert ConsumerThread(make_consumer(max_tasks=1)).start().join(60) == 1

    assert private_api.task(cpu_task.uid).status == TaskStatus.FINISHED
    assert private_api.task(gpu_task.uid).status == TaskStatus.PENDING
    assert queue_depth(rabbitmq_url, gpu_queue) >= 1


def test_three_8000_mib_tasks_share_a_24576_mib_gpu_while_a_fourth_waits(
    private_api, make_consumer, test_images, docker_client, rabbitmq_url, gpu_queue
):
    model_id = register_gated(private_api, "packed", use_gpu=True, gpu_memory_mb=8000)
    consumer = make_consumer(simulate_gpu_memory_mb=24576)
    worker = ConsumerThread(consumer).start()
    uids = [private_api.submit(model_id, {f"{n}.txt": b"n"}).uid for n in range(4)]
    first_three, fourth = uids[:3], uids[3]

    wait_until(lambda: running_uids(docker_client, uids) == set(first_three), 60, "three running containers")
    # The fourth was delivered and is held, unacked, with the subscriptions paused: nothing else
    # comes to this consumer, and it keeps its place.
    wait_until(lambda: consumers_on(rabbitmq_url, gpu_queue) == 0, 10, "the subscription paused")
    assert queue_depth(rabbitmq_url, gpu_queue) == 0
    assert private_api.task(fourth).status == TaskStatus.PENDING
    assert consumer.current_task_uids == set(first_three)

    open_gate(consumer, first_three[0])
    wait_until(lambda: running_container(docker_client, fourth), 60, "the fourth task to run")
    for uid in [*first_three[1:], fourth]:
        open_gate(consumer, uid)
    done = {uid: wait_until(lambda uid=uid: finished(private_api, uid), 60, f"task {uid}") for uid in uids}

    consumer.request_stop()
    assert worker.join(30) == 4
    starts = [done[uid].run_started_at for uid in first_three]
    ends = [done[uid].run_finished_at for uid in first_three]
    assert max(starts) < min(ends), "the three ran at the same time"
    assert done[fourth].run_started_at >= done[first_three[0]].run_finished_at, "the fourth waited for room"


def test_a_model_declaring_nothing_runs_alone_and_nothing_overtakes_it(
    private_api, make_consumer, test_images, docker_client, rabbitmq_url, cpu_queue
):
    small = register_gated(private_api, "small", cpus=0.5)
    whole = register_gated(private_api, "whole")  # declares nothing: takes the consumer whole
    consumer = make_consumer()
    worker = ConsumerThread(consumer).start()
    first = private_api.submit(small, {"a.txt": b"a"}).uid
    wait_until(lambda: running_container(docker_client, first), 60, "the first small task to run")
    exclusive = private_api.submit(whole, {"b.txt": b"b"}).uid
    later = private_api.submit(small, {"c.txt": b"c"}).uid
    uids = [first, exclusive, later]

    # The exclusive task waits for the small one; the later small one, which would fit, waits
    # behind it on the queue (FIFO holds on this consumer).
    wait_until(lambda: consumers_on(rabbitmq_url, cpu_queue) == 0, 20, "the exclusive task held")
    assert queue_depth(rabbitmq_url, cpu_queue) == 1
    assert running_uids(docker_client, uids) == {first}

    open_gate(consumer, first)
    wait_until(lambda: running_container(docker_client, exclusive), 60, "the exclusive task to run")
    assert running_uids(docker_client, uids) == {exclusive}
    assert consumers_on(rabbitmq_url, cpu_queue) == 0  # no room while it runs: nothing taken
    open_gate(consumer, exclusive)
    wait_until(lambda: running_container(docker_client, later), 60, "the later task to run")
    open_gate(consumer, later)
    done = {uid: wait_until(lambda uid=uid: finished(private_api, uid), 60, f"task {uid}") for uid in uids}

    consumer.request_stop()
    assert worker.join(30) == 3
    assert done[first].run_finished_at <= done[exclusive].run_started_at
    assert done[exclusive].run_finished_at <= done[later].run_started_at


def test_a_held_task_goes_back_to_the_queue_after_the_hold_limit(
    private_api, make_consumer, test_images, docker_client, rabbitmq_url, gpu_queue
):
    model_id = register_gated(private_api, "big", use_gpu=True, gpu_memory_mb=8000)
    consumer = make_consumer(simulate_gpu_memory_mb=10000, hold_limit_s=1)
    worker = ConsumerThread(consumer).start()
    running = private_api.submit(model_id, {"a.txt": b"a"}).uid
    wait_until(lambda: running_container(docker_client, running), 60, "the first task to run")
    waiting = private_api.submit(model_id, {"b.txt": b"b"}).uid

    # Held for a second, then handed back for any consumer with room; none is taken meanwhile.
    wait_until(lambda: queue_depth(rabbitmq_url, gpu_queue) == 1, 20, "the held task back on the queue")
    assert consumers_on(rabbitmq_url, gpu_queue) == 0
    assert private_api.task(waiting).status == TaskStatus.PENDING

    open_gate(consumer, running)
    wait_until(
        lambda: running_container(docker_client, waiting), 60, "the waiting task to run once room is made"
    )
    open_gate(consumer, waiting)
    wait_until(lambda: finished(private_api, waiting), 60, "the second task to finish")
    consumer.request_stop()
    assert worker.join(30) == 2


def test_a_gpu_task_held_for_room_does_not_delay_a_cpu_task_on_a_consumer_taking_both(
    private_api, make_consumer, test_images, docker_client, rabbitmq_url, gpu_queue, cpu_queue
):
    gpu_model = register_gated(private_api, "gpuheld", use_gpu=True, gpu_memory_mb=8000)
    cpu_model = register_gated(private_api, "cpuside", cpus=0.5)
    consumer = make_consumer(simulate_gpu_memory_mb=10000, take_cpu_tasks=True, hold_limit_s=600)
    worker = ConsumerThread(consumer).start()
    first = private_api.submit(gpu_model, {"a.txt": b"a"}).uid
    wait_until(lambda: running_container(docker_client, first), 60, "the first GPU task to run")
    held = private_api.submit(gpu_model, {"b.txt": b"b"}).uid
    # Only the GPU queue pauses for the held task; the CPU queue is still served.
    wait_until(lambda: consumers_on(rabbitmq_url, gpu_queue) == 0, 20, "the GPU task held")
    assert consumers_on(rabbitmq_url, cpu_queue) == 1
    cpu_task = private_api.submit(cpu_model, {"c.txt": b"c"}).uid

    wait_until(lambda: running_container(docker_client, cpu_task), 60, "the CPU task to run beside")
    assert private_api.task(held).status == TaskStatus.PENDING
    for uid in (cpu_task, first):
        open_gate(consumer, uid)
    wait_until(lambda: running_container(docker_client, held), 60, "the held GPU task to run")
    open_gate(consumer, held)
    for uid in (first, held, cpu_task):
        wait_until(lambda uid=uid: finished(private_api, uid), 60, f"task {uid}")
    consumer.request_stop()
    assert worker.join(30) == 3


def test_a_task_this_consumer_can_never_run_is_handed_back_and_its_queue_paused(
    make_consumer, rabbitmq_url, gpu_queue, caplog
):
    # The private API publishes no such task while no consumer can run it; in a mixed fleet a
    # bigger GPU's consumer may have registered. Never claimed, so the uid needs no task.
    uid = f"toobig{secrets.token_hex(8)}"
    needs = TaskNeeds(gpu=True, gpu_memory_mb=30000)
    publish_uid(rabbitmq_url, gpu_queue, uid, headers=needs.to_headers())
    caplog.set_level(logging.WARNING, logger="job_consumer")
    consumer = make_consumer(simulate_gpu_memory_mb=24576, unfit_queue_pause_s=120)
    worker = ConsumerThread(consumer).start()

    wait_until(lambda: f"task {uid} needs 30000 MiB" in caplog.text, 20, "the warning")
    assert "the GPU has 24576 MiB" in caplog.text
    wait_until(lambda: consumers_on(rabbitmq_url, gpu_queue) == 0, 10, "the GPU queue paused")
    assert queue_depth(rabbitmq_url, gpu_queue) == 1  # back on the queue, for a bigger GPU

    consumer.request_stop()
    assert worker.join(20) == 0


def drain(private_api, consumer_id: str, on: bool) -> None:
    path = PrivateRoutes.CONSUMER_DRAIN.format(consumer_id=consumer_id)
    response = private_api.http.post(path) if on else private_api.http.delete(path)
    assert response.status_code == 200, response.text


def test_draining_finishes_the_running_task_takes_no_new_one_and_resumes(
    private_api, make_consumer, test_images, docker_client, rabbitmq_url, cpu_queue
):
    model_id = register_gated(private_api, "drained", cpus=0.5)
    consumer = make_consumer()
    consumer_id = consumer.settings.consumer_id
    worker = ConsumerThread(consumer).start()
    running = private_api.submit(model_id, {"a.txt": b"a"}).uid
    wait_until(lambda: running_container(docker_client, running), 60, "the task to run")

    drain(private_api, consumer_id, on=True)
    wait_until(lambda: consumer.draining, 10, "the consumer to hear it drains")
    wait_until(lambda: consumers_on(rabbitmq_url, cpu_queue) == 0, 10, "its subscriptions cancelled")
    waiting = private_api.submit(model_id, {"b.txt": b"b"}).uid
    open_gate(consumer, running)
    wait_until(lambda: finished(private_api, running), 60, "the running task to finish")
    assert private_api.task(waiting).status == TaskStatus.PENDING
    assert queue_depth(rabbitmq_url, cpu_queue) == 1
    assert consumers_on(rabbitmq_url, cpu_queue) == 0

    drain(private_api, consumer_id, on=False)
    wait_until(
        lambda: running_container(docker_client, waiting), 60, "the waiting task to run after the drain"
    )
    open_gate(consumer, waiting)
    wait_until(lambda: finished(private_api, waiting), 60, "the second task to finish")
    consumer.request_stop()
    assert worker.join(30) == 2


def test_stop_now_hands_back_every_running_task(
    private_api, make_consumer, test_images, docker_client, rabbitmq_url, gpu_queue
):
    model_id = register_gated(private_api, "stopped", use_gpu=True, gpu_memory_mb=1000)
    consumer = make_consumer(simulate_gpu_memory_mb=24576)
    worker = ConsumerThread(consumer).start()
    uids = [private_api.submit(model_id, {f"{n}.txt": b"n"}).uid for n in range(3)]
    wait_until(lambda: running_uids(docker_client, uids) == set(uids), 60, "three running containers")

    consumer.request_stop(now=True)

    assert worker.join(60) == 3
    for uid in uids:
        released = private_api.task(uid)
        assert released.status == TaskStatus.PENDING
        assert released.attempts == 0
        assert not task_folders(consumer.settings.resolved_work_dir, uid)
    assert running_uids(docker_client, uids) == set()
    wait_until(lambda: queue_depth(rabbitmq_url, gpu_queue) == 3, 20, "all three back on the GPU queue")


def test_the_sweep_beside_running_tasks_keeps_theirs_and_removes_leftovers(
    private_api, make_consumer, test_images, docker_client
):
    model_id = register_gated(private_api, "swept", use_gpu=True, gpu_memory_mb=1000)
    # Sweeps every half second, so several run while the tasks do.
    consumer = make_consumer(simulate_gpu_memory_mb=24576, cleanup_interval_s=0.5)
    work_dir = consumer.settings.resolved_work_dir
    worker = ConsumerThread(consumer).start()
    uids = [private_api.submit(model_id, {f"{n}.txt": b"n"}).uid for n in range(2)]
    wait_until(lambda: running_uids(docker_client, uids) == set(uids), 60, "two running containers")
    leftover = work_dir / "crashedtask000000001-a1-00000000"
    (leftover / "output").mkdir(parents=True)
    (leftover / OWNER_FILE).write_text(consumer.settings.consumer_id)

    wait_until(lambda: not leftover.exists(), 20, "the sweep to remove the crash leftover")
    assert running_uids(docker_client, uids) == set(uids)
    assert all(task_folders(work_dir, uid) for uid in uids)
    for uid in uids:
        open_gate(consumer, uid)
    for uid in uids:
        wait_until(lambda uid=uid: finished(private_api, uid), 60, f"task {uid}")
    consumer.request_stop()
    assert worker.join(30) == 2


def test_a_lost_broker_connection_leaves_the_running_tasks_running_and_comes_back(
    private_api, make_consumer, test_images, docker_client, rabbitmq_url, gpu_queue, caplog
):
    model_id = register_gated(private_api, "reconnect", use_gpu=True, gpu_memory_mb=1000)
    consumer = make_consumer(simulate_gpu_memory_mb=24576)
    lose, lost = threading.Event(), threading.Event()
    real_wait = consumer._wait

    def wait_losing_the_connection_once(seconds: float) -> None:
        if lose.is_set() and not lost.is_set():
            lost.set()
            raise pika.exceptions.StreamLostError("connection lost (test)")
        real_wait(seconds)

    consumer._wait = wait_losing_the_connection_once
    caplog.set_level(logging.WARNING, logger="job_consumer")
    worker = ConsumerThread(consumer).start()
    uids = [private_api.submit(model_id, {f"{n}.txt": b"n"}).uid for n in range(2)]
    wait_until(lambda: running_uids(docker_client, uids) == set(uids), 60, "two running containers")

    lose.set()
    wait_until(lost.is_set, 10, "the connection to be lost")
    assert "RabbitMQ connection lost" in caplog.text
    # Reconnected while both still run, and takes a third task beside them.
    third = private_api.submit(model_id, {"c.txt": b"c"}).uid
    wait_until(lambda: running_container(docker_client, third), 60, "a third task after reconnecting")
    assert running_uids(docker_client, uids) == set(uids)
    for uid in [*uids, third]:
        open_gate(consumer, uid)
    for uid in [*uids, third]:
        done = wait_until(lambda uid=uid: finished(private_api, uid), 60, f"task {uid}")
        assert done.attempts == 1  # their leases were kept up throughout
    consumer.request_stop()
    assert worker.join(30) == 3
    assert consumers_on(rabbitmq_url, gpu_queue) == 0
