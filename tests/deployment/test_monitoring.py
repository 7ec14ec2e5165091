"""The monitoring files: the Grafana dashboard uses only the metric names the platform promises,
and the `monitoring` profile's Prometheus configuration is valid and scrapes with the token."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "inference-server.json"
PROMETHEUS_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"

# The names README promises (the table, the request metrics and the fetch's own gauge).
PROMISED = {
    "inference_tasks_total",
    "inference_task_queue_seconds_bucket",
    "inference_task_run_seconds_bucket",
    "inference_queue_depth",
    "inference_consumers",
    "inference_consumer_running_tasks",
    "inference_gpu_memory_used_bytes",
    "inference_gpu_utilization_ratio",
    "inference_platform_metrics_up",
    "public_api_requests_total",
}


def test_the_dashboard_uses_only_promised_metric_names() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"\b(?:inference|public_api)_[a-z_]+", expr)}
    assert used, "no metric found in the dashboard"
    assert used <= PROMISED, used - PROMISED
    # The headline figures are all on it.
    assert {
        "inference_task_queue_seconds_bucket",
        "inference_queue_depth",
        "inference_gpu_memory_used_bytes",
    } <= used


def test_the_prometheus_configuration_is_valid_and_uses_the_metrics_token(tmp_path: Path) -> None:
    text = PROMETHEUS_CONFIG.read_text()
    assert "public_api:8000" in text and "credentials_file: /run/secrets/metrics_token" in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: scripts/setup.sh installs Debian's prometheus package")
    # promtool checks that the credentials file exists: point it at one here.
    token = tmp_path / "metrics_token"
    token.write_text("a-metrics-token-for-the-check")
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("/run/secrets/metrics_token", str(token)))
    checked = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
