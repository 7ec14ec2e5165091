"""The consumer loop against a real private API (in-process), real RabbitMQ and each real
container engine (Docker and Podman, `container_runtime`)."""

from __future__ import annotations

import logging
import os
import secrets
from datetime import timedelta
from pathlib import Path

import pika
import pytest

from inference_server.contract import FailureCategory, PrivateRoutes, TaskPublic, TaskStatus
from job_consumer.consumer import Consumer, ConsumerConfigError
from job_consumer.container_runtime import ContainerRuntime
from job_consumer.runner import LABEL_CONSUMER, LABEL_MANAGED, LABEL_TASK, TASK_CONTAINER_PREFIX
from job_consumer.workspace import MODELS_DIR, OWNER_FILE, TEMP_PREFIX
from tests import images
from tests.helpers import wait_until
from tests.job_consumer.helpers import ConsumerThread
from tests.job_consumer.stack import consumers_on, make_zip, publish_uid, queue_depth

pytestmark = pytest.mark.docker


@pytest.fixture
def consumer_runtime(container_runtime: ContainerRuntime) -> ContainerRuntime:
    """Every consumer of this module runs over both runtimes."""
    return container_runtime


COPY_SCRIPT = b'cp -R /input/. /output/ && echo "copied $(find /output -type f | wc -l) file(s)"\n'
# Waits until the test drops /output/go (the test sees the host side of /output), then finishes.
GATED_SCRIPT = (
    b"echo waiting; while [ ! -f /output/go ]; do sleep 0.1; done\n"
    b"rm /output/go; echo done > /output/result.txt; echo finished\n"
)


def hrid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def running_container(engine, uid: str):
    found = task_containers(engine, uid, status="running")
    return found[0] if found else None


def task_containers(engine, uid: str, **filters: str) -> list:
    """The task's containers: labelled with its uid, or prepared ahead and named for it when
    it took them (labels are fixed at create)."""
    labelled = engine.containers.list(
        all=True, sparse=True, filters={"label": f"{LABEL_TASK}={uid}", **filters}
    )
    named = engine.containers.list(
        all=True, sparse=True, filters={"name": f"{TASK_CONTAINER_PREFIX}{uid}-", **filters}
    )
    return list({container.id: container for container in [*labelled, *named]}.values())


def let_gated_model_end(consumer, uid: str) -> None:
    """Drop `go` into the /output of the task's running container, which GATED_SCRIPT waits for:
    its task folder's, or the slot's of a container started ahead (container_gate)."""
    engine = consumer.runner.docker
    container = wait_until(lambda: running_container(engine, uid), 30, f"task {uid}'s running container")
    container.reload()
    [output] = [mount["Source"] for mount in container.attrs["Mounts"] if mount["Destination"] == "/output"]
    (Path(output) / "go").write_text("go")


def task_folders(work_dir: Path, uid: str) -> list[Path]:
    """The task's work folders: one per attempt, <uid>-a<attempt>-<random>."""
    return sorted(work_dir.glob(f"{uid}-a*")) if work_dir.is_dir() else []


def test_runs_a_task_uploads_output_and_logs_and_acks(
    private_api, make_consumer, test_images, rabbitmq_url, cpu_queue, container_runtime, engine
):
    model_id = hrid("copy")
    model = private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": COPY_SCRIPT}))
    files = {"a.txt": b"alpha", "deep/er/b.bin": os.urandom(5000)}
    task = private_api.submit(model_id, files)
    consumer = make_consumer(max_tasks=1)

    ran = ConsumerThread(consumer).start().join(60)

    assert ran == 1
    done = private_api.task(task.uid)
    assert done.status == TaskStatus.FINISHED, done.error
    assert done.attempts == 1
    assert done.consumer_id == consumer.settings.consumer_id
    assert private_api.output(task.uid) == files
    # The platform knows which engine ran it.
    listed = private_api.http.get(PrivateRoutes.CONSUMERS).json()
    assert [entry["runtime"] for entry in listed if entry["id"] == done.consumer_id] == [
        container_runtime.name
    ]
    logs = private_api.logs(task.uid)
    assert "copied 2 file(s)" in logs
    assert "[inference-server] exit code 0" in logs
    # The consumer closed its connection: an unacked message would be back on the queue now.
    assert queue_depth(rabbitmq_url, cpu_queue) == 0
    work_dir = consumer.settings.resolved_work_dir
    assert task_folders(work_dir, task.uid) == []
    assert (work_dir / MODELS_DIR / model.model_zip_sha256 / "run.sh").read_bytes() == COPY_SCRIPT
    assert task_containers(engine, task.uid) == []


def assert_run_times_within_the_attempt(task: TaskPublic) -> None:
    """The container ran after the claim and before the verdict was stored, by a shared clock."""
    assert task.run_started_at is not None and task.run_finished_at is not None
    assert task.started_at is not None and task.finished_at is not None
    assert task.started_at <= task.run_started_at <= task.run_finished_at <= task.finished_at


def test_a_run_reports_when_its_container_started_and_ended(private_api, make_consumer, test_images):
    model_id = hrid("copy")
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": b"sleep 0.3\n"}))
    task = private_api.submit(model_id, {"a.txt": b"a"})

    assert ConsumerThread(make_consumer(max_tasks=1)).start().join(60) == 1

    done = private_api.task(task.uid)
    assert done.status == TaskStatus.FINISHED, done.error
    assert_run_times_within_the_attempt(done)
    assert done.run_finished_at - done.run_started_at >= timedelta(seconds=0.3)


def test_model_zip_is_unpacked_once_and_reused(private_api, make_consumer, test_images):
    model_id = hrid("copy")
    model = private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": COPY_SCRIPT}))
    first = private_api.submit(model_id, {"one.txt": b"1"})
    second = private_api.submit(model_id, {"two.txt": b"2"})
    consumer = make_consumer(max_tasks=2)
    downloads: list[str] = []
    original = consumer.api.download_model_zip

    def counting_download(human_readable_id, dest):
        downloads.append(human_readable_id)
        return original(human_readable_id, dest)

    consumer.api.download_model_zip = counting_download

    assert ConsumerThread(consumer).start().join(60) == 2
    assert private_api.task(first.uid).status == TaskStatus.FINISHED
    assert private_api.output(second.uid) == {"two.txt": b"2"}
    assert downloads == [model_id]
    cached = consumer.settings.resolved_work_dir / MODELS_DIR / model.model_zip_sha256
    assert oct(cached.stat().st_mode & 0o777) == oct(0o755)


def test_failing_model_fails_the_task_with_exit_code_and_log_tail(private_api, make_consumer, test_images):
    model_id = hrid("fail")
    private_api.register_model(model_id, images.FAIL)
    task = private_api.submit(model_id, {"x.txt": b"x"})

    assert ConsumerThread(make_consumer(max_tasks=1)).start().join(60) == 1

    failed = private_api.task(task.uid)
    assert failed.status == TaskStatus.FAILED
    assert failed.exit_code == 3
    assert "exited with code 3" in failed.error
    assert "fatal: synthetic failure" in failed.error
    assert "working on it" in private_api.logs(task.uid)
    assert_run_times_within_the_attempt(failed)


def test_timeout_fails_the_task_as_timeout(private_api, make_consumer, test_images):
    model_id = hrid("sleep")
    private_api.register_model(model_id, images.SLEEP, timeout_s=1)
    task = private_api.submit(model_id, {"x.txt": b"x"})

    assert ConsumerThread(make_consumer(max_tasks=1)).start().join(60) == 1

    failed = private_api.task(task.uid)
    assert failed.status == TaskStatus.FAILED
    assert failed.error.startswith("timeout")
    assert "killed after the 1 s timeout" in private_api.logs(task.uid)


def test_out_of_memory_fails_the_task_as_out_of_memory(private_api, make_consumer, test_images):
    model_id = hrid("oom")
    private_api.register_model(model_id, images.OOM, memory_mb=32)
    task = private_api.submit(model_id, {"x.txt": b"x"})

    assert ConsumerThread(make_consumer(max_tasks=1)).start().join(60) == 1

    failed = private_api.task(task.uid)
    assert failed.status == TaskStatus.FAILED
    assert failed.error.startswith("out of memory")
    assert "32 MB" in failed.error
    assert failed.exit_code == 137


def test_output_over_the_limit_fails_the_task_and_nothing_is_uploaded(
    private_api, make_consumer, test_images
):
    model_id = hrid("big")
    script = b"head -c 2097152 /dev/zero > /output/big.bin\n"
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": script}))
    task = private_api.submit(model_id, {"x.txt": b"x"})

    # Written in one go and exited 0: caught by the check before zipping.
    assert ConsumerThread(make_consumer(max_tasks=1, max_output_bytes=1024 * 1024)).start().join(60) == 1

    failed = private_api.task(task.uid)
    assert failed.status == TaskStatus.FAILED
    assert failed.error.startswith("output too large")
    assert "1048576 bytes" in failed.error
    assert failed.attempts == 1
    assert not failed.output_present


def test_missing_image_fails_that_task_and_the_consumer_goes_on(private_api, make_consumer, test_images):
    broken_id, good_id = hrid("broken"), hrid("copy")
    private_api.register_model(broken_id, "inference-server/not-built-anywhere:1")
    private_api.register_model(good_id, images.SCRIPT, model_zip=make_zip({"run.sh": COPY_SCRIPT}))
    broken = private_api.submit(broken_id, {"x.txt": b"x"})
    good = private_api.submit(good_id, {"y.txt": b"y"})

    assert ConsumerThread(make_consumer(max_tasks=2)).start().join(60) == 2

    failed = private_api.task(broken.uid)
    assert failed.status == TaskStatus.FAILED
    assert "inference-server/not-built-anywhere:1" in failed.error
    assert "is not on this engine" in failed.error
    assert failed.failure == FailureCategory.IMAGE_MISSING
    assert failed.attempts == 1  # a missing image is not retried
    assert failed.run_started_at is None and failed.run_finished_at is None  # no container ran
    assert private_api.task(good.uid).status == TaskStatus.FINISHED


def test_a_task_that_cannot_be_claimed_is_acked_and_skipped(
    private_api, make_consumer, test_images, rabbitmq_url, cpu_queue
):
    model_id = hrid("copy")
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": COPY_SCRIPT}))
    cancelled = private_api.submit(model_id, {"x.txt": b"x"})
    private_api.cancel(cancelled.uid)  # its message stays queued; claiming it answers 409
    runnable = private_api.submit(model_id, {"y.txt": b"y"})

    assert ConsumerThread(make_consumer(max_tasks=1)).start().join(60) == 1

    skipped = private_api.task(cancelled.uid)
    assert skipped.status == TaskStatus.CANCELLED
    assert skipped.attempts == 0
    assert private_api.task(runnable.uid).status == TaskStatus.FINISHED
    assert queue_depth(rabbitmq_url, cpu_queue) == 0


def test_cancel_through_the_api_stops_the_container(private_api, make_consumer, test_images, engine):
    model_id = hrid("sleep")
    private_api.register_model(model_id, images.SLEEP)
    task = private_api.submit(model_id, {"x.txt": b"x"})
    worker = ConsumerThread(make_consumer(max_tasks=1)).start()
    wait_until(lambda: running_container(engine, task.uid), 30, "the model container to run")

    private_api.cancel(task.uid)
    # The model sleeps forever: only the cancel ends it. Heartbeat (0.5 s) + poll (1 s) + stop grace
    # (1 s) is the usual time; the wait allows for a loaded machine.
    wait_until(lambda: not task_containers(engine, task.uid), 60, "the container to be removed")

    assert worker.join(30) == 1
    assert private_api.task(task.uid).status == TaskStatus.CANCELLED
    assert "stopped (cancelled)" in private_api.logs(task.uid)


def test_first_stop_request_finishes_the_current_task(private_api, make_consumer, test_images, engine):
    model_id = hrid("gated")
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": GATED_SCRIPT}))
    task = private_api.submit(model_id, {"x.txt": b"x"})
    consumer = make_consumer()
    worker = ConsumerThread(consumer).start()
    wait_until(lambda: running_container(engine, task.uid), 30, "the model container to run")

    consumer.request_stop(now=False)
    let_gated_model_end(consumer, task.uid)

    assert worker.join(30) == 1
    finished = private_api.task(task.uid)
    assert finished.status == TaskStatus.FINISHED, finished.error
    assert private_api.output(task.uid) == {"result.txt": b"done\n"}


def test_second_stop_request_stops_the_container_and_releases_the_task(
    private_api, make_consumer, test_images, engine, rabbitmq_url, cpu_queue
):
    model_id = hrid("sleep")
    private_api.register_model(model_id, images.SLEEP)
    task = private_api.submit(model_id, {"x.txt": b"x"})
    waiting = private_api.submit(model_id, {"y.txt": b"y"})
    consumer = make_consumer()
    worker = ConsumerThread(consumer).start()
    wait_until(lambda: running_container(engine, task.uid), 30, "the model container to run")

    # While a task runs the consumer holds no message and does not consume: the second task
    # stays ready for any other consumer.
    assert consumer.current_task_uids == {task.uid}
    assert queue_depth(rabbitmq_url, cpu_queue) == 1
    assert consumers_on(rabbitmq_url, cpu_queue) == 0

    consumer.request_stop(now=False)
    consumer.request_stop(now=True)
    # The model sleeps forever, so the consumer returning at all means it stopped the container.
    assert worker.join(60) == 1

    released = private_api.task(task.uid)
    assert released.status == TaskStatus.PENDING
    assert released.attempts == 0  # a release does not use up an attempt
    assert private_api.task(waiting.uid).status == TaskStatus.PENDING
    assert task_containers(engine, task.uid) == []
    # The released task was republished next to the one that waited.
    wait_until(lambda: queue_depth(rabbitmq_url, cpu_queue) == 2, 10, "both tasks back on the queue")


def test_unreachable_private_api_requeues_the_message(
    make_settings, rabbitmq_url, queue_name, cpu_queue, container_runtime, caplog
):
    uid = f"unreachable{secrets.token_hex(8)}"
    publish_uid(rabbitmq_url, cpu_queue, uid)
    settings = make_settings(
        private_api_url="http://127.0.0.1:9",  # nothing listens on the discard port
        rabbitmq_url=rabbitmq_url,
        queue_name=queue_name,
        reconnect_backoff_max_s=1,
    )
    consumer = Consumer(settings, runtime=container_runtime)
    caplog.set_level(logging.WARNING, logger="job_consumer")
    worker = ConsumerThread(consumer).start()

    wait_until(
        lambda: sum(f"task {uid}: private API unavailable" in r.getMessage() for r in caplog.records) >= 2,
        30,
        "two claim attempts against the unreachable API",
    )
    consumer.request_stop()
    assert worker.join(15) == 0
    assert queue_depth(rabbitmq_url, cpu_queue) == 1


def test_start_up_removes_this_consumers_leftovers_only(
    make_settings, container_runtime, engine, test_images, tmp_path
):
    settings = make_settings()
    work_dir = settings.resolved_work_dir
    mine = work_dir / "leftoverworkdir00001"
    theirs = work_dir / "leftoverworkdir00002"
    temp = work_dir / MODELS_DIR / f"{TEMP_PREFIX}crashed"
    for folder, owner in (
        (mine, settings.consumer_id),
        (theirs, "someone-else"),
        (temp, settings.consumer_id),
    ):
        (folder / "output").mkdir(parents=True)
        (folder / OWNER_FILE).write_text(owner)
    labels = {LABEL_MANAGED: "true", LABEL_CONSUMER: settings.consumer_id, LABEL_TASK: "leftoverworkdir00001"}
    engine.containers.create(images.SLEEP, labels=labels, network_mode="none")
    try:
        consumer = Consumer(settings, runtime=container_runtime)
        consumer.request_stop()  # run() cleans up first, then sees the stop and returns
        assert consumer.run() == 0

        assert not task_containers(engine, "leftoverworkdir00001")
        assert not mine.exists()
        assert not temp.exists()
        assert theirs.exists()
    finally:
        for leftover in task_containers(engine, "leftoverworkdir00001"):
            leftover.remove(force=True)


def test_a_queue_declared_with_other_arguments_stops_the_consumer_with_a_clear_error(
    make_settings, rabbitmq_url, queue_name, cpu_queue, container_runtime
):
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        connection.channel().queue_declare(cpu_queue, durable=True, arguments={"x-max-priority": 3})
    finally:
        connection.close()
    consumer = Consumer(
        make_settings(rabbitmq_url=rabbitmq_url, queue_name=queue_name, private_api_url="http://127.0.0.1:9"),
        runtime=container_runtime,
    )

    with pytest.raises(ConsumerConfigError, match=f"cannot declare queue '{cpu_queue}'"):
        consumer.run()
