"""Where the bench takes its per-task figures from: the task status the platform reports and the
Docker engine's own events, never a line of a consumer's log."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import docker
import pytest

from bench.common import ContainerRuns, container_run_s
from inference_server.contract import TaskPublic
from job_consumer.runner import LABEL_TASK

CREATED = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


def status_json(**fields: Any) -> dict[str, Any]:
    """A task status as the public API answers it."""
    return {
        "uid": "benchtask0000000001",
        "model_human_readable_id": "passthrough",
        "status": "finished",
        "created_at": CREATED.isoformat(),
        "started_at": (CREATED + timedelta(seconds=1)).isoformat(),
        "finished_at": (CREATED + timedelta(seconds=3)).isoformat(),
        **fields,
    }


def test_the_container_run_time_is_the_reported_run_times_difference() -> None:
    status = TaskPublic.model_validate(
        status_json(
            run_started_at="2026-12-01T10:00:01.250000Z",
            # Another zone on the wire is still the same moment.
            run_finished_at="2026-12-01T12:00:02.875000+02:00",
        )
    )
    assert container_run_s(status) == pytest.approx(1.625)


def test_a_task_without_reported_run_times_has_no_container_run_time() -> None:
    assert container_run_s(TaskPublic.model_validate(status_json())) is None


def exit_event(task_uid: str | None) -> dict[str, Any]:
    """A container exit event as the engine streams it: the labels among the actor's attributes."""
    attributes = {"image": "passthrough", "name": "is-task-x"}
    if task_uid is not None:
        attributes[LABEL_TASK] = task_uid
    return {"Type": "container", "Action": "die", "Actor": {"ID": "c0ffee", "Attributes": attributes}}


def test_container_runs_are_counted_per_task_of_ours_only() -> None:
    counter = ContainerRuns(docker_client=None)  # type: ignore[arg-type]  # count() needs no engine
    counter.count(
        [
            exit_event("ours-1"),
            exit_event("ours-2"),
            exit_event("ours-1"),
            exit_event("theirs"),
            exit_event(None),
        ]
    )
    assert counter.per_task(["ours-1", "ours-2", "ours-3"]) == {"ours-1": 2, "ours-2": 1}


@pytest.mark.docker
def test_container_runs_come_from_the_engines_events(
    docker_client: docker.DockerClient, base_image: str
) -> None:
    task_uid = f"benchtest{secrets.token_hex(8)}"
    with ContainerRuns(docker_client) as runs:
        for _ in range(2):
            docker_client.containers.run(base_image, ["true"], labels={LABEL_TASK: task_uid}, remove=True)
    assert runs.per_task([task_uid]) == {task_uid: 2}
