"""`python -m job_consumer` as a real process: configuration errors and SIGTERM handling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from inference_server.contract import PrivateRoutes, TaskStatus
from job_consumer.runner import LABEL_TASK
from tests import images
from tests.container_runtimes import podman_service_pids
from tests.helpers import wait_until
from tests.job_consumer.stack import CONSUMER_TOKEN, consumers_on

REPO_ROOT = Path(__file__).resolve().parents[2]


def start_consumer(env_overrides: dict[str, str], *args: str, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IS_")}
    env.update(env_overrides)
    log_file = open(log_path, "wb")  # noqa: SIM115 - handed to the child, closed by the OS at exit
    return subprocess.Popen(
        [sys.executable, "-m", "job_consumer", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture
def consumer_env(private_api, rabbitmq_url, queue_name, tmp_path) -> dict[str, str]:
    return {
        "IS_PRIVATE_API_URL": private_api.url,
        "IS_SERVICE_TOKEN": CONSUMER_TOKEN,
        "IS_RABBITMQ_URL": rabbitmq_url,
        "IS_QUEUE_NAME": queue_name,
        "IS_WORK_DIR": str(tmp_path / "work"),
        "IS_HEARTBEAT_INTERVAL_S": "0.5",
        "IS_STOP_GRACE_S": "1",
        "IS_DEFAULT_MEMORY_MB": "256",
        "IS_DEFAULT_CPUS": "1",
    }


def test_help_and_missing_token(tmp_path):
    help_run = subprocess.run(
        [sys.executable, "-m", "job_consumer", "--help"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert help_run.returncode == 0
    assert "--max-tasks" in help_run.stdout and "--gpu" in help_run.stdout
    assert "--simulate-gpu-memory-mb" in help_run.stdout
    assert "--runtime {docker,podman}" in help_run.stdout

    env = {k: v for k, v in os.environ.items() if not k.startswith("IS_")}
    no_token = subprocess.run(
        [sys.executable, "-m", "job_consumer"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert no_token.returncode == 2
    # The same one line as the APIs print, naming the variable.
    assert "job_consumer: invalid settings: IS_SERVICE_TOKEN: Field required" in no_token.stderr
    assert "Traceback" not in no_token.stderr


def test_sigterm_while_idle_exits_cleanly(consumer_env, rabbitmq_url, cpu_queue, tmp_path, test_session_id):
    log_path = tmp_path / "consumer.log"
    process = start_consumer(consumer_env, "--consumer-id", f"{test_session_id}-idle", log_path=log_path)
    try:
        wait_until(lambda: consumers_on(rabbitmq_url, cpu_queue) == 1, 20, "the consumer to subscribe")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0, log_path.read_text()
    finally:
        process.kill()
    assert consumers_on(rabbitmq_url, cpu_queue) == 0
    assert "stopped after 0 task(s)" in log_path.read_text()


@pytest.mark.docker
def test_second_sigterm_stops_the_container_and_releases_the_task(
    consumer_env, private_api, test_images, docker_client, rabbitmq_url, queue_name, tmp_path, test_session_id
):
    private_api.register_model("sigterm-sleep", images.SLEEP)
    task = private_api.submit("sigterm-sleep", {"x.txt": b"x"})
    log_path = tmp_path / "consumer.log"
    consumer_id = f"{test_session_id}-sigterm"
    process = start_consumer(consumer_env, "--consumer-id", consumer_id, log_path=log_path)
    try:
        wait_until(
            lambda: docker_client.containers.list(sparse=True, filters={"label": f"{LABEL_TASK}={task.uid}"}),
            30,
            "the model container to run",
        )
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: "finishing the current tasks" in log_path.read_text(), 10, "the first SIGTERM")
        assert private_api.task(task.uid).status == TaskStatus.RUNNING
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, log_path.read_text()
    finally:
        process.kill()

    released = private_api.task(task.uid)
    assert released.status == TaskStatus.PENDING, log_path.read_text()
    assert released.attempts == 0
    assert (
        docker_client.containers.list(all=True, sparse=True, filters={"label": f"{LABEL_TASK}={task.uid}"})
        == []
    )
    assert not (tmp_path / "work" / task.uid).exists()
    assert "released back to the queue" in log_path.read_text()


@pytest.mark.docker
def test_runtime_podman_registers_as_podman_and_stops_its_own_podman_service_at_exit(
    consumer_env, private_api, rabbitmq_url, cpu_queue, test_session_id
):
    # A work dir short enough for the service's socket to live in it.
    with tempfile.TemporaryDirectory(prefix="isw", dir="/tmp") as work_dir:
        consumer_id = f"{test_session_id}-podman"
        env = consumer_env | {
            "IS_WORK_DIR": work_dir,
            # No Docker engine is needed: one this consumer would reach is not there.
            "DOCKER_HOST": "unix:///nonexistent/docker.sock",
        }
        log_path = Path(work_dir) / "consumer.log"
        process = start_consumer(env, "--runtime", "podman", "--consumer-id", consumer_id, log_path=log_path)
        try:
            wait_until(lambda: consumers_on(rabbitmq_url, cpu_queue) == 1, 30, "the consumer to subscribe")
            # Its own socket, in its work dir.
            [socket_path] = Path(work_dir).glob("podman-*/api.sock")
            socket_url = f"unix://{socket_path}"
            listed = private_api.http.get(PrivateRoutes.CONSUMERS).json()
            assert [entry["runtime"] for entry in listed if entry["id"] == consumer_id] == ["podman"]
            [service] = podman_service_pids(socket_url)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0, log_path.read_text()
        finally:
            process.kill()
        assert not Path(f"/proc/{service}").exists()
        assert podman_service_pids(socket_url) == []
        assert not socket_path.parent.exists()
