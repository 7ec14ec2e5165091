"""Fault injection: whatever dies, every accepted task ends in exactly one terminal state.

Each test counts what went in and what came out right, and fails if anything is lost,
duplicated, or left running. Real RabbitMQ, real Docker (and, where the containers are what is
at stake, Podman) containers, real processes killed.
"""

from __future__ import annotations

import signal
import sqlite3
import time

import docker
import pytest
import requests

from job_consumer.runner import LABEL_MANAGED, LABEL_TASK
from tests.helpers import make_zip, register_model_directly, register_script_model, wait_until, zip_members
from tests.images import FAIL, SLEEP

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@pytest.fixture
def runtime_env(container_runtime) -> dict[str, str]:
    """Makes a platform's consumers run on the test's runtime: the faults that concern the
    containers (killed, stopped, swept) run over Docker and Podman both."""
    return {"IS_CONTAINER_RUNTIME": container_runtime.name}


SLOW_COPY = "sleep {seconds}\ncp -r /input/. /output/\necho done\n"


def submit(platform, model: str, files: dict[str, bytes]) -> str:
    response = requests.post(
        f"{platform.public_url}/api/tasks/",
        params={"model_human_readable_id": model},
        files={"zip_file": ("in.zip", make_zip(files), "application/zip")},
        timeout=60,
    )
    assert response.status_code in (200, 201), response.text
    return response.json()


def status(platform, uid: str) -> dict:
    response = requests.get(f"{platform.public_url}/api/tasks/{uid}/status", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def all_terminal(platform, uids: list[str]) -> dict[str, dict] | None:
    states = {uid: status(platform, uid) for uid in uids}
    return states if all(s["status"] not in ("pending", "running") for s in states.values()) else None


def assert_each_finished_once_with_its_output(platform, expected: dict[str, bytes]) -> None:
    for uid, payload in expected.items():
        response = requests.get(f"{platform.public_url}/api/tasks/{uid}", timeout=60)
        assert response.status_code == 200, f"{uid}: {response.status_code} {response.text}"
        assert zip_members(response.content) == {"payload.txt": payload}


def task_containers(docker_client: docker.DockerClient, uid: str) -> list:
    # sparse: a full listing inspects each container and races with its removal.
    return docker_client.containers.list(
        all=True, sparse=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_TASK}={uid}"]}
    )


def test_sigkilled_consumer_task_runs_again_elsewhere(platform_factory, test_images, engine, runtime_env):
    platform = platform_factory(consumers=2, **runtime_env, IS_LEASE_SECONDS="3", IS_HEARTBEAT_INTERVAL_S="1")
    register_script_model(platform, "slow-copy", SLOW_COPY.format(seconds=3))
    expected = {}
    for index in range(4):
        uid = submit(platform, "slow-copy", {"payload.txt": f"task {index}".encode()})
        expected[uid] = f"task {index}".encode()
    victim_uid = next(iter(expected))
    running = wait_until(
        lambda: status(platform, victim_uid)["status"] == "running" and status(platform, victim_uid),
        60,
        "the first task to run",
    )
    victim = next(
        name
        for name, process in platform.processes.items()
        if name.startswith("consumer") and running["consumer_id"].endswith(name.split("-")[-1])
    )
    platform.processes[victim].send(signal.SIGKILL)
    assert platform.processes[victim].wait(10) == -signal.SIGKILL

    states = wait_until(lambda: all_terminal(platform, list(expected)), 120, "every task to end")
    assert {s["status"] for s in states.values()} == {"finished"}, {
        u: s.get("error") for u, s in states.items()
    }
    assert states[victim_uid]["attempts"] == 2
    assert states[victim_uid]["consumer_id"] != running["consumer_id"]
    assert_each_finished_once_with_its_output(platform, expected)

    # The killed consumer's orphaned container is removed when that consumer comes back.
    platform.processes[victim].start()
    wait_until(lambda: not task_containers(engine, victim_uid), 60, "the orphan container to go")
    print(f"SIGKILL consumer: {len(expected)} tasks in, {len(states)} finished once each")


def test_rabbitmq_restart_during_a_burst_loses_nothing(platform_factory, private_broker, test_images):
    platform = platform_factory(consumers=2, IS_RABBITMQ_URL=private_broker.url, IS_OUTBOX_INTERVAL_S="0.5")
    register_script_model(platform, "copy", SLOW_COPY.format(seconds=0))
    expected = {}

    def burst(count: int, label: str) -> None:
        for index in range(count):
            payload = f"{label} {index}".encode()
            expected[submit(platform, "copy", {"payload.txt": payload})] = payload

    burst(10, "before")
    private_broker.stop_app()
    burst(10, "while down")  # accepted: the database keeps them until the broker is back
    private_broker.start_app()
    burst(10, "after")

    states = wait_until(
        lambda: all_terminal(platform, list(expected)), 240, "every task to end", interval=0.5
    )
    assert {s["status"] for s in states.values()} == {"finished"}, states
    assert_each_finished_once_with_its_output(platform, expected)
    print(f"RabbitMQ restart: {len(expected)} tasks in, {len(states)} finished once each")


def test_rabbitmq_lost_while_a_task_runs_the_task_finishes_and_the_consumer_comes_back(
    platform_factory, private_broker, test_images
):
    platform = platform_factory(
        consumers=1,
        IS_RABBITMQ_URL=private_broker.url,
        IS_OUTBOX_INTERVAL_S="0.5",
        IS_RECONNECT_BACKOFF_MAX_S="2",
    )
    register_script_model(platform, "slow-copy", SLOW_COPY.format(seconds=4))
    first = submit(platform, "slow-copy", {"payload.txt": b"first"})
    wait_until(lambda: status(platform, first)["status"] == "running", 60, "the first task to run")

    # The broker drops every connection while the container runs. The task was acked when it
    # was claimed, so it does not need the broker any more: it must finish, and only once.
    private_broker.stop_app()
    second = submit(platform, "slow-copy", {"payload.txt": b"second"})  # kept by the outbox
    done = wait_until(lambda: all_terminal(platform, [first]), 60, "the first task to end, broker down")
    assert done[first]["status"] == "finished", done
    assert done[first]["attempts"] == 1
    assert status(platform, second)["status"] == "pending"

    # Back: the outbox publishes the second task and the consumer, reconnected, runs it.
    private_broker.start_app()
    states = wait_until(lambda: all_terminal(platform, [first, second]), 120, "the second task to end")
    assert {s["status"] for s in states.values()} == {"finished"}, states
    assert [states[uid]["attempts"] for uid in (first, second)] == [1, 1]
    assert_each_finished_once_with_its_output(platform, {first: b"first", second: b"second"})


def test_private_api_restart_during_a_run(platform_factory, test_images):
    platform = platform_factory(consumers=1)
    register_script_model(platform, "slow-copy", SLOW_COPY.format(seconds=3))
    expected = {}
    for index in range(3):
        payload = f"run {index}".encode()
        expected[submit(platform, "slow-copy", {"payload.txt": payload})] = payload
    wait_until(lambda: status(platform, next(iter(expected)))["status"] == "running", 60, "a task to run")
    platform.restart("private-api")

    states = wait_until(lambda: all_terminal(platform, list(expected)), 120, "every task to end")
    assert {s["status"] for s in states.values()} == {"finished"}, states
    assert_each_finished_once_with_its_output(platform, expected)


def test_private_api_down_for_twice_the_lease_kills_no_running_task(
    platform_factory, test_images, docker_client
):
    """One task ends while the private API is away (its result waits in the consumer), another
    runs on past the outage (its consumer resumes the lease): each finishes once, attempts 1."""
    lease_s = 4
    platform = platform_factory(consumers=2, IS_LEASE_SECONDS=str(lease_s), IS_HEARTBEAT_INTERVAL_S="1")
    register_script_model(platform, "short-copy", SLOW_COPY.format(seconds=3))
    register_script_model(platform, "long-copy", SLOW_COPY.format(seconds=4 * lease_s))
    expected = {
        submit(platform, "short-copy", {"payload.txt": b"ends during the outage"}): b"ends during the outage",
        submit(platform, "long-copy", {"payload.txt": b"outlives the outage"}): b"outlives the outage",
    }
    wait_until(
        lambda: all(status(platform, uid)["status"] == "running" for uid in expected), 60, "both tasks to run"
    )
    private_api = platform.processes["private-api"]
    private_api.stop()
    down_since = time.monotonic()
    # The outage itself is the scenario: the API stays away for two full leases.
    wait_until(lambda: time.monotonic() - down_since >= 2 * lease_s, 3 * lease_s, "two leases to pass")
    private_api.start()
    platform.wait_healthy(private_api, f"{platform.private_url}/health/ready", 60)

    states = wait_until(lambda: all_terminal(platform, list(expected)), 120, "both tasks to end")
    assert {uid: s["status"] for uid, s in states.items()} == dict.fromkeys(expected, "finished"), states
    assert [s["attempts"] for s in states.values()] == [1, 1], states
    assert_each_finished_once_with_its_output(platform, expected)
    for uid in expected:
        wait_until(lambda uid=uid: not task_containers(docker_client, uid), 30, "the containers to go")


def test_hanging_model_hits_its_timeout(platform_factory, test_images, engine, runtime_env):
    platform = platform_factory(consumers=1, **runtime_env)
    register_model_directly(platform, "hang", SLEEP, timeout_s=2)
    uid = submit(platform, "hang", {"a.txt": b"1"})
    # The model sleeps forever: the task ending at all, with an error that names the timeout, is
    # the proof; how soon after submitting depends on the load of the machine, not on the consumer.
    final = wait_until(lambda: all_terminal(platform, [uid]), 120, "the hanging task to be stopped")[uid]
    assert final["status"] == "failed"
    assert "timeout" in final["error"].lower()
    assert requests.get(f"{platform.public_url}/api/tasks/{uid}", timeout=30).status_code == 552
    # The consumer removes containers off the task's critical path, right after it answers.
    wait_until(lambda: not task_containers(engine, uid), 30, "the killed container to be removed")


def test_cancel_pending_never_runs_and_cancel_running_stops_the_container(
    platform_factory, test_images, engine, runtime_env
):
    platform = platform_factory(consumers=0, **runtime_env)
    register_script_model(platform, "marker", "echo ran > /output/ran\n")
    register_model_directly(platform, "hang", SLEEP)

    pending = submit(platform, "marker", {"a.txt": b"1"})
    cancelled = requests.post(f"{platform.public_url}/api/tasks/{pending}/cancel", timeout=30)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"

    platform.start_consumer(0)
    # A task submitted after the cancelled one finishing proves the consumer has drained the queue.
    later = submit(platform, "marker", {"a.txt": b"2"})
    wait_until(lambda: status(platform, later)["status"] == "finished", 60, "the later task to finish")
    never_ran = status(platform, pending)
    assert never_ran["status"] == "cancelled"
    assert never_ran["started_at"] is None and never_ran["attempts"] == 0

    running = submit(platform, "hang", {"a.txt": b"1"})
    wait_until(lambda: task_containers(engine, running), 60, "the hanging container to start")
    assert requests.post(f"{platform.public_url}/api/tasks/{running}/cancel", timeout=30).status_code == 200
    # The container sleeps forever, so only the cancel can stop it; the wait is generous because a
    # loaded 2-core machine stretches the consumer's heartbeat and Docker's stop alike.
    wait_until(lambda: not task_containers(engine, running), 60, "the container to be stopped")
    assert status(platform, running)["status"] == "cancelled"
    assert requests.get(f"{platform.public_url}/api/tasks/{running}", timeout=30).status_code == 552


def test_failing_model_is_not_retried(platform_factory, test_images):
    platform = platform_factory(consumers=1)
    register_model_directly(platform, "failer", FAIL)
    uid = submit(platform, "failer", {"a.txt": b"1"})
    final = wait_until(lambda: all_terminal(platform, [uid]), 60, "the failing task to end")[uid]
    assert final["status"] == "failed"
    assert final["attempts"] == 1
    assert final["exit_code"] == 3


def test_consumer_sigterm_finishes_the_current_task_then_exits(platform_factory, test_images):
    platform = platform_factory(consumers=1)
    register_script_model(platform, "slow-copy", SLOW_COPY.format(seconds=3))
    uid = submit(platform, "slow-copy", {"payload.txt": b"graceful"})
    wait_until(lambda: status(platform, uid)["status"] == "running", 60, "the task to run")
    consumer = platform.processes["consumer-0"]
    consumer.send(signal.SIGTERM)
    assert consumer.wait(60) == 0
    assert status(platform, uid)["status"] == "finished"
    assert_each_finished_once_with_its_output(platform, {uid: b"graceful"})


def test_consumer_second_sigterm_gives_the_task_back(platform_factory, test_images, engine, runtime_env):
    platform = platform_factory(consumers=1, **runtime_env)
    register_script_model(platform, "slow-copy", SLOW_COPY.format(seconds=30))
    uid = submit(platform, "slow-copy", {"payload.txt": b"again"})
    wait_until(lambda: task_containers(engine, uid), 60, "the container to start")
    consumer = platform.processes["consumer-0"]
    consumer.send(signal.SIGTERM)
    # Signals do not queue: the second is only a second once the first has been handled.
    wait_until(lambda: "finishing the current task" in consumer.log_tail(), 10, "the first SIGTERM")
    consumer.send(signal.SIGTERM)
    assert consumer.wait(30) is not None
    assert not task_containers(engine, uid)
    given_back = status(platform, uid)
    assert given_back["status"] == "pending"
    assert given_back["attempts"] == 0


def test_nothing_of_the_platform_is_left_behind(platform_factory, test_images, engine, runtime_env):
    platform = platform_factory(consumers=1, **runtime_env)
    register_script_model(platform, "copy", SLOW_COPY.format(seconds=0))
    register_model_directly(platform, "failer", FAIL)
    uids = [submit(platform, "copy", {"payload.txt": b"x"}), submit(platform, "failer", {"a": b"1"})]
    wait_until(lambda: all_terminal(platform, uids), 60, "both tasks to end")
    platform.stop()
    consumer_ids = {status_row[0] for status_row in _consumer_ids(platform)}
    for consumer_id in consumer_ids:
        leftovers = engine.containers.list(
            all=True, sparse=True, filters={"label": [f"inference-server.consumer={consumer_id}"]}
        )
        assert leftovers == []
    work = platform.data_dir / "work"
    task_dirs = [p for p in work.iterdir() if p.name != "models"] if work.exists() else []
    assert task_dirs == []
    temp_blobs = [p for p in (platform.data_dir / "blobs").rglob("*") if p.is_file() and ".tmp" in p.parts]
    assert temp_blobs == []


def _consumer_ids(platform) -> list[tuple[str]]:
    with sqlite3.connect(platform.data_dir / "inference.db") as db:
        return db.execute("select distinct consumer_id from tasks where consumer_id is not null").fetchall()
