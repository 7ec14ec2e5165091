"""The broker really orders by priority: with the only consumer busy, a high-priority task
submitted after several low ones is the next to run (real RabbitMQ, real consumer, real containers)."""

from __future__ import annotations

from datetime import datetime

import pytest
import requests

from inference_server.contract import MAX_PRIORITY
from tests.helpers import make_zip, register_script_model, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow]

BUSY_S = 6


def test_a_later_high_priority_task_runs_before_earlier_low_ones(platform_factory, test_images) -> None:
    platform = platform_factory(consumers=1, create_operator_key=True)
    # An operator key: operators may use the top priority (anonymous and user keys stop at 5).
    headers = {"Authorization": f"Bearer {platform.operator_key_file.read_text().strip()}"}
    register_script_model(platform, "sleepy", 'sleep "$(cat /input/seconds.txt)"\necho ok > /output/ok.txt\n')

    def submit(seconds: int, priority: int) -> str:
        response = requests.post(
            f"{platform.public_url}/api/tasks/",
            params={"model_human_readable_id": "sleepy", "priority": priority},
            files={
                "zip_file": ("in.zip", make_zip({"seconds.txt": str(seconds).encode()}), "application/zip")
            },
            headers=headers,
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return str(response.json())

    def task(uid: str) -> dict:
        response = requests.get(f"{platform.public_url}/api/tasks/{uid}/status", headers=headers, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    busy = submit(BUSY_S, 0)
    wait_until(lambda: task(busy)["status"] == "running", 120, "the busy task to run")
    # The consumer takes one message at a time (prefetch 1): these wait in the broker's queue.
    low = [submit(0, 1) for _ in range(4)]
    high = submit(0, MAX_PRIORITY)
    assert task(busy)["status"] == "running", "the busy task ended before the queue was filled"

    uids = [busy, *low, high]

    def all_finished() -> dict[str, dict] | None:
        states = {uid: task(uid) for uid in uids}
        return states if all(state["status"] == "finished" for state in states.values()) else None

    states = wait_until(all_finished, 180, "every task to finish")
    started = {uid: datetime.fromisoformat(states[uid]["started_at"]) for uid in uids}
    order = sorted(uids, key=started.__getitem__)
    assert order[0] == busy
    assert order[1] == high, f"ran in the order busy, {[('high' if u == high else 'low') for u in order[1:]]}"
    assert order[2:] == low  # equal priorities keep their order
