"""The monitoring files: the Grafana dashboard uses only the metric names the platform promises
and the provisioned data source; the `monitoring` profile's Prometheus configuration is valid and
scrapes with the token; the `monitoring` and `grafana` profiles render as designed. (The
compose deployment test starts the `monitoring` profile for real; tests/e2e/test_prometheus.py
runs every panel's query against a real Prometheus.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deployment.helpers import base_process_env, run

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yaml"
GRAFANA = REPO_ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "inference-server.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "inference-server.yaml"
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


def provisioned_datasource() -> dict[str, Any]:
    datasources: list[dict[str, Any]] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert len(datasources) == 1, datasources
    return datasources[0]


def test_every_panel_queries_the_provisioned_datasource() -> None:
    datasource = provisioned_datasource()
    assert datasource["type"] == "prometheus"
    # The compose service's name and port, reached over the network both are on.
    assert datasource["url"] == "http://prometheus:9090"
    expected = {"type": "prometheus", "uid": datasource["uid"]}
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"] == expected, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]


def _render(compose: list[str], env_file: Path, *profiles: str) -> dict[str, Any]:
    options = [option for profile in profiles for option in ("--profile", profile)]
    rendered = run(
        [
            *compose,
            "-f",
            str(COMPOSE_FILE),
            "--env-file",
            str(env_file),
            *options,
            "config",
            "--format",
            "json",
        ],
        env=base_process_env(),
    )
    config: dict[str, Any] = json.loads(rendered.stdout)
    return config


@pytest.mark.docker
@pytest.mark.slow
def test_compose_monitoring_profiles_are_wired_as_designed(
    compose: list[str], deployment_settings: dict[str, str], tmp_path: Path
) -> None:
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in deployment_settings.items()))

    # `monitoring` alone is what starts where Grafana's image cannot be had: no Grafana in it.
    monitoring = _render(compose, env_file, "monitoring")["services"]
    assert "prometheus" in monitoring and "grafana" not in monitoring
    # `grafana` alone brings the Prometheus it reads.
    assert {"prometheus", "grafana"} <= set(_render(compose, env_file, "grafana")["services"])

    config = _render(compose, env_file, "monitoring", "grafana")
    services = config["services"]
    grafana, prometheus = services["grafana"], services["prometheus"]
    # Only Traefik is open to all; the monitoring UIs listen on IS_MONITORING_BIND_ADDRESS
    # (loopback unless set).
    published = {
        name: {(port["host_ip"], port["published"]) for port in service["ports"]}
        for name, service in services.items()
        if service.get("ports")
    }
    assert set(published) == {"traefik", "prometheus", "grafana"}
    assert published["grafana"] == {("127.0.0.1", deployment_settings["IS_GRAFANA_PORT"])}
    assert published["prometheus"] == {("127.0.0.1", deployment_settings["IS_PROMETHEUS_PORT"])}
    assert set(grafana["networks"]) == set(prometheus["networks"]) == {"front"}
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in ("prometheus", "grafana"):
        assert services[name]["restart"] == "unless-stopped", name
        assert "healthcheck" in services[name], name

    # Provisioning, read-only: the data source and the dashboard provider, and the dashboard
    # itself where that provider looks.
    mounts = {mount["target"]: mount for mount in grafana["volumes"]}
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning["read_only"] is True
    assert Path(provisioning["source"]) == GRAFANA / "provisioning"
    provider_path = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]["options"]["path"]
    dashboard_mount = mounts[f"{provider_path}/{DASHBOARD.name}"]
    assert dashboard_mount["read_only"] is True
    assert Path(dashboard_mount["source"]) == DASHBOARD

    # The admin password is a secret, never in the environment; nobody gets in without it.
    environment = grafana["environment"]
    assert [secret["source"] for secret in grafana["secrets"]] == ["grafana_admin_password"]
    assert config["secrets"]["grafana_admin_password"]["environment"] == "GRAFANA_ADMIN_PASSWORD"
    assert environment["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert deployment_settings["GRAFANA_ADMIN_PASSWORD"] not in json.dumps(grafana)
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert environment["GF_USERS_ALLOW_SIGN_UP"] == "false"
    # Offline: Grafana fetches nothing from the internet by itself.
    for setting in (
        "GF_ANALYTICS_CHECK_FOR_UPDATES",
        "GF_ANALYTICS_REPORTING_ENABLED",
        "GF_NEWS_NEWS_FEED_ENABLED",
    ):
        assert environment[setting] == "false", setting
