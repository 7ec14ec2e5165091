"""Live logs for real: a model printing a line a second, read through the public API while it
runs (its progress too), and followed to its end."""

from __future__ import annotations

import pytest
import requests

from tests.e2e.test_end_to_end import status_of, submit
from tests.helpers import make_zip, register_script_model, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow]

LINES = 10
TICKING = (
    f"i=1; while [ $i -le {LINES} ]; do echo line $i; echo INFERENCE_PROGRESS $((i * 10))% tick $i; "
    "sleep 1; i=$((i+1)); done\n"
)


def test_a_running_models_lines_are_public_while_it_runs_and_following_ends_with_it(
    platform_factory, test_images
):
    platform = platform_factory(consumers=1)
    register_script_model(platform, "ticking", TICKING)
    uid = submit(platform.public_url, "ticking", make_zip({"x.txt": b"x"}))
    logs_url = f"{platform.public_url}/api/tasks/{uid}/logs"

    wait_until(lambda: "line 2\n" in requests.get(logs_url, timeout=30).text, 60, "the first lines")
    status = status_of(platform.public_url, uid)
    assert status["status"] == "running"
    assert status["progress"] is not None and 0.2 <= status["progress"] < 1
    assert status["progress_message"].startswith("tick ")

    with requests.get(logs_url, params={"follow": "true"}, stream=True, timeout=60) as followed:
        assert followed.status_code == 200
        text = "".join(followed.iter_content(chunk_size=None, decode_unicode=True))

    assert status_of(platform.public_url, uid)["status"] == "finished"
    assert all(f"line {i}\n" in text for i in range(1, LINES + 1))
    assert text.startswith("line 1\n")
