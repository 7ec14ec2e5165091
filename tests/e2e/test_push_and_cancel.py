"""Pushed, not polled, through the whole platform: a running task's cancel reaches its container
within 2 s (consumers' heartbeats set far apart, so only the push can do it), and the event
stream follows a real task from its start to its end."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from inference_server.contract import PublicRoutes, TaskStatus
from tests.e2e.test_end_to_end import status_of, submit
from tests.helpers import make_zip, register_script_model, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow]

# Prints the moment SIGTERM arrives (the host's clock: containers share the kernel's), then exits.
TRAPS_SIGTERM = (
    "trap 'echo \"SIGTERM at $(date +%s.%N)\"; exit 143' TERM\n"
    "echo started\n"
    "while true; do sleep 0.05; done\n"
)
SIGTERM_LINE = re.compile(r"SIGTERM at (\d+\.\d+)")
PUSH_DEADLINE_S = 2.0


def test_a_running_tasks_cancel_reaches_its_container_within_two_seconds(platform_factory, test_images):
    platform = platform_factory(consumers=1, IS_HEARTBEAT_INTERVAL_S="30")
    register_script_model(platform, "traps-sigterm", TRAPS_SIGTERM)
    uid = submit(platform.public_url, "traps-sigterm", make_zip({"x.txt": b"x"}))
    logs_url = platform.public_url + PublicRoutes.TASK_LOGS.format(uid=uid)
    wait_until(lambda: "started" in httpx.get(logs_url, timeout=30).text, 60, "the model running")

    cancelled_at = time.time()
    response = httpx.post(platform.public_url + PublicRoutes.TASK_CANCEL.format(uid=uid), timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == TaskStatus.CANCELLED

    # The consumer uploads the final log once the container has stopped.
    line = wait_until(
        lambda: SIGTERM_LINE.search(httpx.get(logs_url, timeout=30).text), 30, "the SIGTERM line"
    )
    seen_after_s = float(line.group(1)) - cancelled_at
    assert 0 <= seen_after_s < PUSH_DEADLINE_S, (
        f"the container saw SIGTERM {seen_after_s:.2f} s after the cancel"
    )
    assert status_of(platform.public_url, uid)["status"] == TaskStatus.CANCELLED


def test_the_event_stream_follows_a_real_task_to_its_end(platform_factory, test_images):
    platform = platform_factory(consumers=1)
    register_script_model(platform, "short", "echo working; sleep 1; echo done > /output/result.txt\n")
    uid = submit(platform.public_url, "short", make_zip({"x.txt": b"x"}))
    events: list[tuple[str, dict]] = []
    started = time.monotonic()
    with httpx.stream(
        "GET", platform.public_url + PublicRoutes.TASK_EVENTS.format(uid=uid), timeout=120
    ) as r:
        assert r.status_code == 200
        name = None
        for line in r.iter_lines():
            assert time.monotonic() - started < 120, f"the stream did not end: {events}"
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((str(name), json.loads(line.removeprefix("data: "))))
    statuses = [name for name, _ in events]
    assert statuses[-1] == TaskStatus.FINISHED
    assert TaskStatus.RUNNING in statuses
    assert statuses.index(TaskStatus.RUNNING) < statuses.index(TaskStatus.FINISHED)
    assert set(statuses) <= {TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.FINISHED}
    assert all(task["uid"] == uid and task["status"] == name for name, task in events)
