"""Debian's real `prometheus` scrapes a running platform's public /metrics with the metrics token,
answers a query for queue-wait data once a task has run, and accepts every query of the Grafana
dashboard (deploy/grafana/inference-server.json), the headline panels with data. One platform
and one Prometheus serve the whole module."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "inference-server.json"
# What Grafana puts in place of its variables before a query reaches Prometheus; fixed here,
# long enough to span several of this module's 1 s scrapes.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


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


@pytest.fixture(scope="module")
def platform(
    tmp_path_factory: pytest.TempPathFactory,
    rabbitmq_url: str,
    module_queue_name: str,
    example_images: list[str],
) -> Iterator[LocalPlatform]:
    started = LocalPlatform(
        data_dir=tmp_path_factory.mktemp("platform"),
        public_port=free_port(),
        consumers=1,
        rabbitmq_url=rabbitmq_url,
        queue_name=module_queue_name,
        # Tasks are submitted without a key, as v1.2 clients do; /metrics still needs the token.
        extra_env={
            "IS_REAPER_INTERVAL_S": "0.5",
            "IS_ANONYMOUS_TASKS": "true",
            "IS_ANONYMOUS_MODELS": "true",
        },
    )
    started.start()
    try:
        register_examples_on(started)
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, platform: LocalPlatform) -> Iterator[str]:
    """The real Prometheus on loopback, scraping `platform`; its URL."""
    if PROMETHEUS is None:
        pytest.fail("the prometheus binary is missing: scripts/setup.sh installs Debian's package")
    folder = tmp_path_factory.mktemp("prometheus")
    token_file = folder / "metrics.token"
    token_file.write_text(platform.metrics_token)
    config = folder / "prometheus.yml"
    config.write_text(prometheus_config(platform, token_file))
    port = free_port()
    with (folder / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ready(url), 60, "Prometheus to be ready")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def _query(url: str, expression: str) -> list[dict[str, Any]]:
    """An instant query's samples; the query must be accepted."""
    response = requests.get(f"{url}/api/v1/query", params={"query": expression}, timeout=10)
    assert response.status_code == 200, f"{expression}: {response.text}"
    body = response.json()
    assert body["status"] == "success", f"{expression}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def _wait_for_target_up(prometheus: str) -> None:
    """The scrape itself works with the token: the target is up (an unauthorised one reads 0)."""
    wait_until(
        lambda: any(sample["value"][1] == "1" for sample in _query(prometheus, 'up{job="inference-server"}')),
        60,
        "Prometheus to scrape the public API",
    )


def _finished_in_prometheus(prometheus: str) -> float:
    samples = _query(prometheus, 'sum(inference_tasks_total{status="finished"})')
    return float(samples[0]["value"][1]) if samples else 0.0


def _run_task_seen_by_prometheus(platform: LocalPlatform, prometheus: str) -> None:
    """One passthrough task to its end, and Prometheus scraped the platform since."""
    before = _finished_in_prometheus(prometheus)
    uid = submit(platform.public_url, "passthrough", make_zip({"in.txt": b"hello"}))
    assert poll_until_done(platform.public_url, uid).status_code == 200
    wait_until(
        lambda: _finished_in_prometheus(prometheus) > before, 60, f"Prometheus to count task {uid} finished"
    )


def test_prometheus_scrapes_queue_wait_of_a_task(platform: LocalPlatform, prometheus: str) -> None:
    _wait_for_target_up(prometheus)
    uid = submit(platform.public_url, "passthrough", make_zip({"in.txt": b"hello"}))
    assert poll_until_done(platform.public_url, uid).status_code == 200

    expression = 'inference_task_queue_seconds_count{model="passthrough"}'
    samples = wait_until(lambda: _query(prometheus, expression), 60, f"Prometheus to answer {expression}")
    assert float(samples[0]["value"][1]) >= 1


def _dashboard_queries() -> dict[str, list[str]]:
    """Each panel's PromQL by panel title, Grafana's variables replaced as Grafana would."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries: dict[str, list[str]] = {}
    for panel in dashboard["panels"]:
        expressions = []
        for target in panel["targets"]:
            expression = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expression = expression.replace(variable, value)
            assert "$" not in expression, f"a Grafana variable this test does not know: {expression}"
            expressions.append(expression)
        queries[panel["title"]] = expressions
    return queries


def test_every_dashboard_query_runs_and_the_headline_panels_have_data(
    platform: LocalPlatform, prometheus: str
) -> None:
    _wait_for_target_up(prometheus)
    # Two tasks with a scrape between them, so the counters and histograms rise within the
    # panels' rate windows (a series' first sample alone gives a rate of nothing).
    _run_task_seen_by_prometheus(platform, prometheus)
    _run_task_seen_by_prometheus(platform, prometheus)

    queries = _dashboard_queries()
    assert queries
    results = {
        title: [_query(prometheus, expression) for expression in expressions]
        for title, expressions in queries.items()
    }

    (queue_depth,) = results["Queue depth"]
    assert {sample["metric"]["queue"] for sample in queue_depth} == {"cpu", "gpu"}

    ended, submitted = results["Throughput: tasks ended per minute"]
    ended_per_minute = {sample["metric"]["status"]: float(sample["value"][1]) for sample in ended}
    assert ended_per_minute.get("finished", 0.0) > 0, ended
    assert submitted and float(submitted[0]["value"][1]) > 0, submitted

    (median_wait,) = results["Median queue wait by model"]
    waits = {sample["metric"]["model"]: float(sample["value"][1]) for sample in median_wait}
    assert "passthrough" in waits, median_wait
    assert math.isfinite(waits["passthrough"]) and waits["passthrough"] >= 0, waits

    (reachable,) = results["Platform metrics reachable"]
    assert [sample["value"][1] for sample in reachable] == ["1"]
