"""Running the docker CLI and Compose from the deployment tests, and asking the deployed
Prometheus."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import docker
import docker.errors
import httpx

from tests.helpers import wait_until
from tests.traefik.helpers import REPO_ROOT


def run(
    argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 120.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Runs a command, keeping its output for the failure message."""
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


def base_process_env() -> dict[str, str]:
    """Only what the docker CLI needs: IS_* or image variables from the developer's shell must
    not leak into the deployment under test (they would override its own values)."""
    keep = (
        "PATH",
        "HOME",
        "DOCKER_HOST",
        "DOCKER_CONFIG",
        "DOCKER_CONTEXT",
        "DOCKER_CERT_PATH",
        "DOCKER_TLS_VERIFY",
    )
    return {name: os.environ[name] for name in keep if name in os.environ}


def prometheus_query(prometheus_url: str, expression: str) -> list[dict[str, Any]]:
    """The samples of an instant query; [] while Prometheus is not answering yet."""
    try:
        response = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expression}, timeout=10.0)
    except httpx.TransportError:
        return []
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def assert_prometheus_scrapes_the_platform(prometheus_url: str, timeout: float = 120.0) -> None:
    """The deployed Prometheus reads the public API's /metrics with the metrics token (its target
    up; refused, it would read 0) and holds the queue wait of the task that ran before."""

    def target_up() -> bool:
        return any(
            sample["value"][1] == "1"
            for sample in prometheus_query(prometheus_url, 'up{job="inference-server"}')
        )

    wait_until(target_up, timeout, "the compose Prometheus to scrape the public API", 1.0)

    def queue_wait_counted() -> bool:
        samples = prometheus_query(prometheus_url, "sum(inference_task_queue_seconds_count)")
        return bool(samples) and float(samples[0]["value"][1]) > 0

    wait_until(queue_wait_counted, timeout, "inference_task_queue_seconds_count > 0 in Prometheus", 1.0)


def leave_swarm(client: docker.DockerClient, *, had_gwbridge: bool) -> None:
    """Leave the swarm this host's engine joined, and remove what joining created."""
    run(["docker", "swarm", "leave", "--force"], check=False)
    remove_created_gwbridge(client, had_gwbridge=had_gwbridge)


def remove_created_gwbridge(client: docker.DockerClient, *, had_gwbridge: bool) -> None:
    """Remove the docker_gwbridge network a swarm created unless it was there before (it stays
    busy for a moment after the leave)."""
    if had_gwbridge:
        return

    def gwbridge_removed() -> bool:
        try:
            client.networks.get("docker_gwbridge").remove()
        except docker.errors.NotFound:
            return True
        except docker.errors.APIError:
            return False
        return True

    wait_until(gwbridge_removed, 30, "removal of docker_gwbridge", 1.0)
