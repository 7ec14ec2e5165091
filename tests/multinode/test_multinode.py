"""docker-stack.yaml across several engines: the host's engine as manager, two dind workers
with a simulated GPU each. Tasks go in through Traefik over HTTPS; the counts in and out of
each scenario are printed (pytest -s shows them)."""

from __future__ import annotations

import io
import time
import zipfile
from typing import Any

import httpx
import pytest

from inference_server.contract import ZIP_MEDIA_TYPE, PublicRoutes
from tests.deployment.helpers import run
from tests.helpers import register_model_public, wait_until
from tests.multinode.conftest import NAP_LONG, NAP_SHORT, MultiNodeStack, wait_for_consumers

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1200)]

ENDED = {"finished", "failed", "cancelled", "expired", "deleted"}


def submit(client: httpx.Client, human_readable_id: str, count: int) -> list[str]:
    uids = []
    for index in range(count):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("input.txt", f"task {index}\n")
        response = client.post(
            PublicRoutes.TASKS,
            params={"model_human_readable_id": human_readable_id},
            files={"zip_file": ("input.zip", buffer.getvalue(), ZIP_MEDIA_TYPE)},
        )
        assert response.status_code in (200, 201), response.text
        uids.append(response.json())
    return uids


def statuses(client: httpx.Client, uids: list[str]) -> dict[str, dict[str, Any]]:
    result = {}
    for uid in uids:
        response = client.get(PublicRoutes.TASK_STATUS.format(uid=uid))
        assert response.status_code == 200, response.text
        result[uid] = response.json()
    return result


def wait_ended(client: httpx.Client, uids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    def all_ended() -> dict[str, dict[str, Any]]:
        tasks = statuses(client, uids)
        return tasks if all(task["status"] in ENDED for task in tasks.values()) else {}

    return wait_until(all_ended, timeout, f"{len(uids)} tasks to end", 2.0)


def report(scenario: str, submitted: list[str], tasks: dict[str, dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in tasks.values():
        counts[task["status"]] = counts.get(task["status"], 0) + 1
    by_consumer: dict[str, int] = {}
    for task in tasks.values():
        by_consumer[str(task.get("consumer_id"))] = by_consumer.get(str(task.get("consumer_id")), 0) + 1
    attempts = sorted(task["attempts"] for task in tasks.values())
    print(
        f"[{scenario}] in: {len(submitted)}; out: {counts}; by consumer: {by_consumer}; attempts: {attempts}"
    )
    return counts


def worker_has_pulled(stack: MultiNodeStack, worker_name: str, tag: str) -> bool:
    """The worker's engine holds the model's image, and it came from the stack's registry."""
    result = stack.swarm.worker(worker_name).docker(
        "image", "inspect", "--format", "{{json .RepoDigests}}", tag, check=False
    )
    return result.returncode == 0 and f"{stack.registry}/{tag.rsplit(':', 1)[0]}@" in result.stdout


def worker_name(stack: MultiNodeStack, consumer_id: str | None) -> str:
    return next(
        worker.name for worker in stack.swarm.workers if stack.consumer_id(worker.name) == consumer_id
    )


def test_tasks_run_on_both_workers_with_images_pulled_from_the_registry(
    multinode_stack: MultiNodeStack,
) -> None:
    stack = multinode_stack
    workers = [worker.name for worker in stack.swarm.workers]
    # Fresh engines: nothing loaded by hand, the model image is not there before the first task.
    for name in workers:
        assert not worker_has_pulled(stack, name, NAP_SHORT)
    # No consumer on the manager: its engine is not a GPU node.
    consumers = run(
        [
            "docker",
            "service",
            "ps",
            f"{stack.name}_consumer_gpu0",
            "--filter",
            "desired-state=running",
            "--format",
            "{{.Node}}",
        ]
    ).stdout.split()
    assert sorted(consumers) == sorted(workers)
    with stack.client() as client:
        uids = submit(client, stack.models[NAP_SHORT], 8)
        tasks = wait_ended(client, uids, 300)
    counts = report("both workers", uids, tasks)
    assert counts == {"finished": len(uids)}
    assert {worker_name(stack, task["consumer_id"]) for task in tasks.values()} == set(workers)
    for name in workers:
        assert worker_has_pulled(stack, name, NAP_SHORT), name


def test_an_unknown_image_fails_as_image_missing_without_retries(multinode_stack: MultiNodeStack) -> None:
    stack = multinode_stack
    with stack.client() as client:
        register_model_public(client, "never-pushed", "inference-server/test-never-pushed:1")
        uids = submit(client, "never-pushed", 1)
        tasks = wait_ended(client, uids, 120)
    report("unknown image", uids, tasks)
    task = tasks[uids[0]]
    assert task["status"] == "failed"
    assert task["failure"] == "image_missing"
    assert task["attempts"] == 1
    assert "not in the registry" in task["error"], task["error"]


def test_a_worker_killed_mid_task_its_tasks_run_again_on_the_other(multinode_stack: MultiNodeStack) -> None:
    stack = multinode_stack
    victim, survivor = stack.swarm.workers
    with stack.client() as client:
        uids = submit(client, stack.models[NAP_LONG], 4)

        def running_on_both() -> dict[str, dict[str, Any]]:
            # A model declaring no resources runs alone: one task at a time on each worker.
            tasks = statuses(client, uids)
            running = {task["consumer_id"] for task in tasks.values() if task["status"] == "running"}
            both = {stack.consumer_id(victim.name), stack.consumer_id(survivor.name)}
            return tasks if running == both else {}

        before = wait_until(running_on_both, 180, "tasks running on both workers", 0.5)
        on_victim = [
            uid
            for uid, task in before.items()
            if task["status"] == "running" and task["consumer_id"] == stack.consumer_id(victim.name)
        ]
        victim.kill()
        killed_at = time.monotonic()
        tasks = wait_ended(client, uids, 300)
        print(
            f"[worker killed] all ended {time.monotonic() - killed_at:.0f}s after the kill; "
            f"on the victim: {on_victim}"
        )
        counts = report("worker killed", uids, tasks)
        assert counts == {"finished": len(uids)}
        for uid in on_victim:
            # Run again once, on the survivor: a second attempt, and no third.
            assert tasks[uid]["consumer_id"] == stack.consumer_id(survivor.name), tasks[uid]
            assert tasks[uid]["attempts"] == 2, tasks[uid]
        assert on_victim
        for uid in set(uids) - set(on_victim):
            assert tasks[uid]["attempts"] == 1, tasks[uid]

        # The worker comes back: its engine restarts, rejoins, and its consumer takes work again.
        victim.start()
        wait_until(
            lambda: stack.swarm.node_state(victim) == "ready", 120, f"node {victim.name} ready again", 1.0
        )
        wait_for_consumers(stack, [victim.name], 240)
        again = submit(client, stack.models[NAP_SHORT], 6)
        tasks = wait_ended(client, again, 300)
    counts = report("worker back", again, tasks)
    assert counts == {"finished": len(again)}
    assert stack.consumer_id(victim.name) in {task["consumer_id"] for task in tasks.values()}


def test_a_rolling_update_of_the_consumers_loses_no_task(multinode_stack: MultiNodeStack) -> None:
    stack = multinode_stack
    service = f"{stack.name}_consumer_gpu0"
    wait_for_consumers(stack, [worker.name for worker in stack.swarm.workers], 240)
    tasks_before = set(
        run(["docker", "service", "ps", service, "--filter", "desired-state=running", "-q"]).stdout.split()
    )
    with stack.client() as client:
        uids = submit(client, stack.models[NAP_LONG], 6)

        def some_running() -> bool:
            running = [task for task in statuses(client, uids).values() if task["status"] == "running"]
            return len(running) >= 2

        wait_until(some_running, 180, "tasks in flight", 1.0)
        # stop-first, one node at a time: each old consumer finishes its tasks (SIGTERM), exits,
        # and its successor starts; queued tasks wait or go to the other node meanwhile.
        run(["docker", "service", "update", "--force", "--detach=true", service])

        def update_completed() -> bool:
            inspected = run(
                ["docker", "service", "inspect", service, "--format", "{{json .UpdateStatus}}"]
            ).stdout
            return '"State":"completed"' in inspected.replace(" ", "")

        wait_until(update_completed, 420, f"the rolling update of {service}", 2.0)
        tasks = wait_ended(client, uids, 300)
    counts = report("rolling update", uids, tasks)
    assert counts == {"finished": len(uids)}
    assert all(task["attempts"] <= 2 for task in tasks.values())
    tasks_after = set(
        run(["docker", "service", "ps", service, "--filter", "desired-state=running", "-q"]).stdout.split()
    )
    assert tasks_after and not tasks_after & tasks_before, "the consumers were not replaced"
