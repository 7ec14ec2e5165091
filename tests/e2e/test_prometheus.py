"""Debian's real `prometheus` scrapes a running platform's public /metrics with the metrics token,
and answers a query for queue-wait data once a task has run."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from local_platform.launcher import LocalPlatform
from local_platform.ports import free_port
from tests.e2e.test_end_to_end import poll_until_done, submit
from tests.helpers import make_zip, wait_until
from tests.platform_fixtures import register_examples_on

pytestmark = [pytest.mark.docker, pytest.mark.slow]

PROMETHEUS = shutil.which("prometheus")
SCRAPE_INTERVAL_S = 1


def prometheus_config(platform: LocalPlatform, token_file: Path) -> str:
    """A scrape job as an operator would write it: the public API, bearer credentials from a file."""
    target = platform.public_url.removeprefix("http://")
    return f"""\
global:
  scrape_interval: {SCRAPE_INTERVAL_S}s
  evaluation_interval: {SCRAPE_INTERVAL_S}s
scrape_configs:
  - job_name: inference-server
    metrics_path: /metrics
    authorization:
      type: Bearer
      credentials_file: {token_file}
    static_configs:
      - targets: ["{target}"]
"""


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[object]:
    """Starts the real Prometheus on loopback against a platform; stopped afterwards."""
    if PROMETHEUS is None:
        pytest.fail("the prometheus binary is missing: scripts/setup.sh installs Debian's package")
    started: list[subprocess.Popen[bytes]] = []

    def start(platform: LocalPlatform) -> str:
        token_file = tmp_path / "metrics.token"
        token_file.write_text(platform.metrics_token)
        config = tmp_path / "prometheus.yml"
        config.write_text(prometheus_config(platform, token_file))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        started.append(
            subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ready(url), 60, "Prometheus to be ready")
        return url

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def _query(url: str, expression: str) -> list[dict]:
    response = requests.get(f"{url}/api/v1/query", params={"query": expression}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["data"]["result"]


def test_prometheus_scrapes_queue_wait_of_a_task(platform_factory, example_images, prometheus_for) -> None:
    platform = platform_factory(consumers=1)
    register_examples_on(platform)
    prometheus = prometheus_for(platform)

    # The scrape itself works with the token: the target is up (an unauthorised one reads 0).
    wait_until(
        lambda: any(sample["value"][1] == "1" for sample in _query(prometheus, 'up{job="inference-server"}')),
        60,
        "Prometheus to scrape the public API",
    )
    uid = submit(platform.public_url, "passthrough", make_zip({"in.txt": b"hello"}))
    assert poll_until_done(platform.public_url, uid).status_code == 200

    expression = 'inference_task_queue_seconds_count{model="passthrough"}'
    samples = wait_until(lambda: _query(prometheus, expression), 60, f"Prometheus to answer {expression}")
    assert float(samples[0]["value"][1]) >= 1
