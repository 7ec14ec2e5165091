"""Containers created ahead of their task (job_consumer/prepared_containers.py), against a real
private API, RabbitMQ and each container engine (Docker and Podman, `container_runtime`)."""

from __future__ import annotations

import contextlib
import secrets
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from inference_server.contract import PrivateRoutes, TaskStatus
from job_consumer.config import ConsumerSettings
from job_consumer.consumer import Consumer
from job_consumer.container_gate import GATE_MOUNT
from job_consumer.container_runtime import ContainerRuntime
from job_consumer.prepared_containers import SLOT_PREFIX, PreparedContainers
from job_consumer.runner import (
    LABEL_CONSUMER,
    LABEL_MANAGED,
    LABEL_PREPARED,
    LABEL_PROCESS,
    LABEL_TASK,
    ModelRunner,
    task_of_container,
    this_process,
)
from job_consumer.workspace import ModelCache, TaskWorkspace
from tests import images
from tests.helpers import wait_until
from tests.job_consumer.helpers import ConsumerThread, generation_command, make_model, unique_tag
from tests.job_consumer.stack import PrivateApiServer, make_zip

pytestmark = pytest.mark.docker

COPY_SCRIPT = b"cp -R /input/. /output/\n"
# What decides a container's isolation; a prepared container's must equal a per-task one's.
ISOLATION_FIELDS = (
    "CapAdd",
    "CapDrop",
    "SecurityOpt",
    "Privileged",
    "ReadonlyRootfs",
    "NetworkMode",
    "Memory",
    "MemorySwap",
    "NanoCpus",
    "PidsLimit",
    "Tmpfs",
    "Ulimits",
    "Devices",
    "DeviceRequests",
    "LogConfig",
)


@pytest.fixture
def consumer_runtime(container_runtime: ContainerRuntime) -> ContainerRuntime:
    return container_runtime


def hrid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def removed_meanwhile(exc: docker.errors.APIError) -> bool:
    """Podman's Docker-compatible API answers a container removed during a lookup (a list
    inspects each container it found) with a 500 "no such container" rather than a 404."""
    return isinstance(exc, docker.errors.NotFound) or "no such container" in str(exc.explanation)


def prepared_of(engine: docker.DockerClient, consumer_id: str) -> list[Any]:
    """The consumer's prepared containers, never started, not yet taken by a task."""
    filters = {"label": [LABEL_PREPARED, f"{LABEL_CONSUMER}={consumer_id}"]}
    for _ in range(10):
        try:
            return engine.containers.list(all=True, filters=filters)
        except docker.errors.APIError as exc:
            # Removed between the list and its inspection: list again.
            if not removed_meanwhile(exc):
                raise
    return engine.containers.list(all=True, filters=filters)


def env_without_hostname(attrs: dict[str, Any]) -> list[str]:
    return sorted(entry for entry in attrs["Config"]["Env"] if not entry.startswith("HOSTNAME="))


def created_at(container: Any) -> datetime:
    # Engines write nanoseconds; fromisoformat takes microseconds at most.
    stamp = container.attrs["Created"].replace("Z", "+00:00")
    head, _, rest = stamp.partition(".")
    fraction, sign, zone = rest.partition("+")
    return datetime.fromisoformat(f"{head}.{fraction[:6]}{sign}{zone}" if rest else stamp)


def recording_prepared_starts(consumer: Consumer) -> list[str]:
    """The ids of the prepared containers the consumer's runner was handed to start."""
    started: list[str] = []
    original = consumer.runner.run

    def run(**kwargs: Any) -> Any:
        if kwargs.get("prepared") is not None:
            started.append(kwargs["prepared"].id)
        return original(**kwargs)

    consumer.runner.run = run  # type: ignore[method-assign]
    return started


def finished(private_api: PrivateApiServer, uid: str) -> bool:
    task = private_api.task(uid)
    assert task.status in (TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.FINISHED), task.error
    return task.status == TaskStatus.FINISHED


def gone(engine: docker.DockerClient, container_id: str) -> bool:
    try:
        engine.containers.get(container_id)
    except docker.errors.APIError as exc:
        if removed_meanwhile(exc):
            return True
        raise
    return False


def slot_folders(consumer: Consumer) -> list[Path]:
    return sorted(consumer.settings.resolved_work_dir.glob(f"{SLOT_PREFIX}*"))


@pytest.mark.parametrize("start_ahead", [True, False], ids=["started-ahead", "created-ahead"])
def test_the_next_task_starts_the_container_prepared_before_it_came_and_a_fresh_one_follows(
    private_api, make_consumer, test_images, engine, start_ahead: bool
):
    model_id = hrid("copy")
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": COPY_SCRIPT}))
    consumer = make_consumer(prepared_start_ahead=start_ahead)
    started = recording_prepared_starts(consumer)
    worker = ConsumerThread(consumer).start()
    consumer_id = consumer.settings.consumer_id

    # The first task of a model this consumer never ran: no prepared container, it runs all the same.
    first = private_api.submit(model_id, {"a.txt": b"first"})
    wait_until(lambda: finished(private_api, first.uid), 60, "the first task")
    assert private_api.output(first.uid) == {"a.txt": b"first"}
    assert consumer.prepared is not None and consumer.prepared.used_ready == 0

    [ready] = wait_until(lambda: prepared_of(engine, consumer_id), 30, "a container prepared after it")
    assert LABEL_TASK not in ready.labels and ready.labels[LABEL_PROCESS] == this_process()
    if start_ahead:
        # Started, and held at its gate: the model has not run, nothing is in its output.
        assert ready.status == "running"
        # The engine shows the container before the consumer has recorded it as ready.
        held = wait_until(
            lambda: consumer.prepared.ready_for(model_id), 30, "the container recorded as ready"
        )
        assert held.gate is not None
        assert list(held.slot.output_dir.iterdir()) == []
        assert ready.logs() == b""
    else:
        assert ready.status == "created"

    second = private_api.submit(model_id, {"b.txt": b"second"})
    wait_until(lambda: finished(private_api, second.uid), 60, "the second task")
    assert private_api.output(second.uid) == {"b.txt": b"second"}
    # The container that ran it is the one prepared before it was submitted.
    assert started == [ready.id]
    assert created_at(ready) < private_api.task(second.uid).created_at
    assert consumer.prepared.used_ready == 1
    # Used once, then removed (in the background, after the answer).
    wait_until(lambda: gone(engine, ready.id), 30, "the used container removed")

    [fresh] = wait_until(lambda: prepared_of(engine, consumer_id), 30, "a fresh container prepared")
    assert fresh.id != ready.id
    assert len(slot_folders(consumer)) == 1

    consumer.request_stop()
    assert worker.join(30) == 2
    # None outlives its consumer: no prepared container (by its labels), no slot folder.
    assert prepared_of(engine, consumer_id) == []
    assert engine.containers.list(all=True, filters={"label": f"{LABEL_CONSUMER}={consumer_id}"}) == []
    assert slot_folders(consumer) == []


def test_a_task_still_runs_when_the_container_started_for_it_died_at_its_gate(
    private_api, make_consumer, test_images, engine
):
    model_id = hrid("copy")
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": COPY_SCRIPT}))
    consumer = make_consumer()
    started = recording_prepared_starts(consumer)
    worker = ConsumerThread(consumer).start()
    first = private_api.submit(model_id, {"a.txt": b"first"})
    wait_until(lambda: finished(private_api, first.uid), 60, "the first task")
    [ready] = wait_until(
        lambda: prepared_of(engine, consumer.settings.consumer_id), 30, "a started container"
    )
    assert ready.status == "running"
    # The engine shows the container before the consumer has recorded it as ready: kill it after.
    wait_until(lambda: consumer.prepared.ready_for(model_id), 30, "the container recorded as ready")

    ready.kill()
    ready.wait(timeout=30)
    second = private_api.submit(model_id, {"b.txt": b"second"})
    wait_until(lambda: finished(private_api, second.uid), 60, "the second task")

    # It was handed the dead container, found nobody at the gate, and ran in one of its own.
    assert started == [ready.id]
    assert private_api.output(second.uid) == {"b.txt": b"second"}
    assert private_api.task(second.uid).attempts == 1
    consumer.request_stop()
    assert worker.join(30) == 2
    assert prepared_of(engine, consumer.settings.consumer_id) == []


def test_a_retagged_image_drops_the_prepared_container_and_the_task_runs_the_new_image(
    private_api, make_consumer, engine, build_image
):
    tag = unique_tag("prepared-retag")
    first_image = build_image(tag, generation_command(1))
    model_id = hrid("retag")
    private_api.register_model(model_id, tag)
    consumer = make_consumer()
    started = recording_prepared_starts(consumer)
    worker = ConsumerThread(consumer).start()

    first = private_api.submit(model_id, {"a.txt": b"a"})
    wait_until(lambda: finished(private_api, first.uid), 60, "the first task")
    [old] = wait_until(lambda: prepared_of(engine, consumer.settings.consumer_id), 30, "a prepared container")
    assert old.image.id == first_image

    second_image = build_image(tag, generation_command(2))
    assert second_image != first_image
    second = private_api.submit(model_id, {"b.txt": b"b"})
    wait_until(lambda: finished(private_api, second.uid), 60, "the task after the rebuild")

    assert private_api.output(second.uid) == {"generation.txt": b"generation 2\n"}
    assert old.id not in started
    wait_until(lambda: gone(engine, old.id), 30, "the old prepared container removed")
    wait_until(
        lambda: [c.image.id for c in prepared_of(engine, consumer.settings.consumer_id)] == [second_image],
        30,
        "one container prepared from the new image",
    )
    consumer.request_stop()
    assert worker.join(30) == 2
    assert prepared_of(engine, consumer.settings.consumer_id) == []


def test_a_changed_model_gets_a_new_prepared_container_and_an_idle_one_goes(
    private_api, make_consumer, test_images, engine
):
    model_id = hrid("changing")
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": COPY_SCRIPT}))
    consumer = make_consumer(prepared_check_interval_s=0.3, prepared_idle_s=4)
    worker = ConsumerThread(consumer).start()
    consumer_id = consumer.settings.consumer_id
    task = private_api.submit(model_id, {"a.txt": b"a"})
    wait_until(lambda: finished(private_api, task.uid), 60, "the task")
    [old] = wait_until(lambda: prepared_of(engine, consumer_id), 30, "a prepared container")

    changed = private_api.http.patch(
        PrivateRoutes.MODEL.format(human_readable_id=model_id), json={"memory_mb": 300}
    )
    assert changed.status_code == 200, changed.text

    def replaced() -> list[Any]:
        now = prepared_of(engine, consumer_id)
        return [c for c in now if c.id != old.id and c.attrs["HostConfig"]["Memory"] == 300 * 1024 * 1024]

    assert len(wait_until(replaced, 30, "a container prepared with the model's new memory limit")) == 1
    wait_until(lambda: gone(engine, old.id), 30, "the old prepared container removed")
    # Unused past IS_PREPARED_IDLE_S: removed, and not prepared again for a model not run since.
    wait_until(lambda: prepared_of(engine, consumer_id) == [], 30, "the idle container removed")
    wait_until(lambda: slot_folders(consumer) == [], 10, "its slot folder removed")
    consumer.request_stop()
    assert worker.join(30) == 1


def test_with_preparing_off_tasks_run_and_nothing_is_prepared(
    private_api, make_consumer, test_images, engine
):
    model_id = hrid("copy")
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": COPY_SCRIPT}))
    uids = [private_api.submit(model_id, {f"{n}.txt": b"x"}).uid for n in range(2)]
    consumer = make_consumer(max_tasks=2, prepare_containers=False)
    started = recording_prepared_starts(consumer)

    assert ConsumerThread(consumer).start().join(60) == 2

    assert consumer.prepared is None
    for uid in uids:
        assert finished(private_api, uid)
    assert started == []
    assert prepared_of(engine, consumer.settings.consumer_id) == []


def test_a_warm_model_gets_a_prepared_container_before_its_first_task(
    private_api, make_consumer, test_images, engine
):
    model_id = hrid("warm")
    model = private_api.register_model(model_id, images.FAIL, warm=True, memory_mb=300)
    assert model.warm
    cold_id = hrid("cold")
    private_api.register_model(cold_id, images.FAIL)
    consumer = make_consumer()
    started = recording_prepared_starts(consumer)
    worker = ConsumerThread(consumer).start()

    [ready] = wait_until(lambda: prepared_of(engine, consumer.settings.consumer_id), 30, "the warm model's")
    assert ready.attrs["HostConfig"]["Memory"] == 300 * 1024 * 1024  # the warm model's limits
    task = private_api.submit(model_id, {"a.txt": b"a"})
    wait_until(lambda: private_api.task(task.uid).status == TaskStatus.FAILED, 60, "the warm model's task")
    assert private_api.task(task.uid).exit_code == 3  # it ran: the model exits 3
    assert started == [ready.id]
    consumer.request_stop()
    worker.join(30)
    assert prepared_of(engine, consumer.settings.consumer_id) == []


def test_a_prepared_container_is_isolated_exactly_like_a_per_task_one(
    runner: ModelRunner, settings: ConsumerSettings, container_runtime: ContainerRuntime, test_images
):
    model = make_model(images.SCRIPT, memory_mb=200, cpus=0.5, pids=32, tmp_mb=16)
    pool = PreparedContainers(
        settings,
        runner=runner,
        models=ModelCache(settings.resolved_work_dir, settings.consumer_id, settings.input_zip_limits),
    )
    per_task = None
    try:
        pool.task_done(model)
        prepared = wait_until(lambda: pool.ready_for(model.human_readable_id), 30, "a prepared container")
        workspace = TaskWorkspace.create(
            settings.resolved_work_dir, "isolationcheck000001", settings.consumer_id
        )
        per_task = runner.docker.containers.create(
            **runner.container_options(
                task_uid="isolationcheck000001",
                model=model,
                input_dir=workspace.input_dir,
                output_dir=workspace.output_dir,
                model_dir=None,
            )
        )
        # Started too, like the prepared one: Podman fills in parts of Env (HOME, TERM) at start.
        per_task.start()
        per_task.wait(timeout=30)
        prepared.container.reload()
        per_task.reload()
        ahead, own = prepared.container.attrs, per_task.attrs
        assert {name: ahead["HostConfig"].get(name) for name in ISOLATION_FIELDS} == {
            name: own["HostConfig"].get(name) for name in ISOLATION_FIELDS
        }
        assert ahead["Config"]["User"] == own["Config"]["User"] == "65534:65534"
        # Started ahead, it runs the image's own command once its gate opens; the gate and its
        # shell are bound read-only.
        assert ahead["Config"]["Entrypoint"] == [f"{GATE_MOUNT}/sh"]
        assert ahead["Config"]["Cmd"][-len(own["Config"]["Cmd"]) :] == own["Config"]["Cmd"]
        [gate_mount] = [mount for mount in ahead["Mounts"] if mount["Destination"] == GATE_MOUNT]
        assert gate_mount["RW"] is False
        assert ahead["HostConfig"]["ReadonlyRootfs"] is True
        assert ahead["HostConfig"]["CapDrop"]
        # Bar HOSTNAME, which Podman sets to each container's own id.
        assert env_without_hostname(ahead) == env_without_hostname(own)
        workspace.remove()
    finally:
        if per_task is not None:
            per_task.remove(force=True)
        pool.close()
    assert pool.ready_for(model.human_readable_id) is None


def test_the_sweep_removes_prepared_containers_of_dead_consumer_processes_only(
    runner: ModelRunner, container_runtime: ContainerRuntime, test_images
):
    engine = container_runtime.client
    host = socket.gethostname()
    made = []
    try:
        for name, process in (
            ("dead", f"{host}:{2**22 + 7}:1"),
            ("live", this_process()),
            ("elsewhere", "other-host:1:1"),
        ):
            made.append(
                engine.containers.create(
                    images.FAIL,
                    name=f"is-prepared-test-{name}-{secrets.token_hex(3)}",
                    labels={
                        LABEL_MANAGED: "true",
                        LABEL_CONSUMER: f"another-consumer-{secrets.token_hex(3)}",
                        LABEL_PREPARED: f"{SLOT_PREFIX}{name}",
                        LABEL_PROCESS: process,
                    },
                    **container_runtime.container_options(),
                )
            )
        removed = runner.remove_leftovers()
        remaining = {
            container.id for container in engine.containers.list(all=True, filters={"label": LABEL_PREPARED})
        }
        assert made[0].id not in remaining
        assert made[1].id in remaining and made[2].id in remaining
        assert removed >= 1
    finally:
        for container in made:
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)


def test_a_containers_task_is_known_by_its_label_or_by_the_name_a_prepared_one_took() -> None:
    uid = "kC89ezVIQpAwH2LuIXUs-THUarrRdajR"
    assert task_of_container({LABEL_TASK: uid, "name": "whatever"}) == uid
    assert task_of_container({"name": ModelRunner.container_name(uid)}) == uid
    assert task_of_container({"name": f"/{ModelRunner.container_name(uid)}"}) == uid
    assert task_of_container({"name": "is-prepared-1a2b3c4d"}) is None
    assert task_of_container({}) is None
