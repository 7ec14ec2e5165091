"""A v1.2 task end to end through a platform whose consumers run models on Podman, with no Docker
engine reachable by them: their DOCKER_HOST points at a socket that does not exist.

The images are built by Docker (as everywhere in the tests) and copied into Podman's store; the
consumers never talk to Docker. That the model really ran under Podman is shown three ways: the
consumer registered with runtime "podman", Podman's event log holds the task's container, and
Docker's holds nothing labelled with the task.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from inference_server.contract import PublicRoutes
from job_consumer.runner import LABEL_TASK
from local_platform.examples import copy_images_to_podman, register_model
from local_platform.launcher import LocalPlatform
from local_platform.ports import free_port
from models_examples.catalog import get_example
from tests.helpers import make_zip, wait_until, zip_members

pytestmark = [pytest.mark.docker, pytest.mark.slow]

NO_DOCKER_ENGINE = "unix:///nonexistent/docker.sock"


def podman(*args: str) -> str:
    completed = subprocess.run(["podman", *args], capture_output=True, timeout=300, check=False)
    assert completed.returncode == 0, f"podman {' '.join(args)}: {completed.stderr.decode(errors='replace')}"
    return completed.stdout.decode()


@pytest.fixture(scope="session")
def passthrough_in_podman(example_images: list[str], docker_client: docker.DockerClient) -> str:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: scripts/setup.sh installs it")
    tag = get_example("passthrough").container_tag
    copy_images_to_podman(docker_client, [tag])
    return tag


@pytest.fixture
def podman_platform(tmp_path: Path, rabbitmq_url: str, queue_name: str) -> Iterator[LocalPlatform]:
    platform = LocalPlatform(
        data_dir=tmp_path / "platform",
        public_port=free_port(),
        consumers=1,
        rabbitmq_url=rabbitmq_url,
        queue_name=queue_name,
        create_operator_key=True,  # to list the consumers and see their runtime
        container_runtime="podman",
        extra_env={"IS_ANONYMOUS_TASKS": "true", "IS_ANONYMOUS_MODELS": "true"},
        consumer_extra_env={"DOCKER_HOST": NO_DOCKER_ENGINE},
    )
    try:
        platform.start()
        yield platform
    finally:
        platform.stop()


def registered_consumers(platform: LocalPlatform) -> list[dict[str, Any]]:
    key = platform.operator_key_file.read_text().strip()
    response = requests.get(
        f"{platform.public_url}{PublicRoutes.CONSUMERS}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    listed: list[dict[str, Any]] = response.json()
    return listed


def podman_events_of(task_uid: str, since: float) -> list[str]:
    """The lifecycle events Podman recorded for the task's container(s): create, start, died..."""
    printed = podman(
        "events",
        "--stream=false",
        "--since",
        str(int(since)),
        "--filter",
        f"label={LABEL_TASK}={task_uid}",
        "--format",
        "{{.Status}}",
    )
    return printed.split()


def docker_events_of(docker_client: docker.DockerClient, task_uid: str, since: float) -> list[dict[str, Any]]:
    events = docker_client.events(
        since=datetime.fromtimestamp(since, tz=UTC),
        until=datetime.now(tz=UTC),
        filters={"label": f"{LABEL_TASK}={task_uid}"},
        decode=True,
    )
    return list(events)


def test_a_v12_task_runs_on_podman_with_no_docker_engine_reachable(
    podman_platform: LocalPlatform, passthrough_in_podman: str, docker_client: docker.DockerClient
) -> None:
    platform = podman_platform
    for spec in platform.consumer_specs():
        assert platform.consumer_env(spec)["DOCKER_HOST"] == NO_DOCKER_ENGINE
    register_model(platform.private_url, platform.service_token, get_example("passthrough"))
    consumers = wait_until(lambda: registered_consumers(platform), 60, "the consumer to register")
    assert [consumer["runtime"] for consumer in consumers] == ["podman"]

    # Whole seconds: both event logs are asked from this time on.
    submitted_at = time.time() - 1
    files = {"scans/patient 01/image.dat": b"\x00\x01 image bytes", "notes.txt": b"hello podman\n"}
    response = requests.post(
        f"{platform.public_url}/api/tasks/",
        params={"model_human_readable_id": "passthrough"},
        files={"zip_file": ("input.zip", make_zip(files), "application/zip")},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    uid = json.loads(response.content)
    assert isinstance(uid, str)

    seen: list[int] = []

    def answer() -> list[requests.Response]:
        # A list, because a Response with an error code is itself falsy.
        polled = requests.get(f"{platform.public_url}/api/tasks/{uid}", timeout=60)
        seen.append(polled.status_code)
        return [] if polled.status_code == 551 else [polled]

    (result,) = wait_until(answer, 180, f"task {uid} to leave pending")
    assert set(seen[:-1]) <= {551}, f"unexpected codes while pending: {seen}"
    consumer_log = platform.processes["consumer-0"].log_tail()
    assert result.status_code == 200, (result.status_code, result.text, consumer_log)
    assert zip_members(result.content) == files

    podman_events = podman_events_of(uid, submitted_at)
    docker_events = docker_events_of(docker_client, uid, submitted_at)
    print(f"task {uid} on Podman: events {podman_events}; Docker events for it: {docker_events}")
    assert {"create", "start", "died"} <= set(podman_events), podman_events
    assert docker_events == []
