"""`python -m private_api` as the launcher runs it: a real uvicorn in its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inference_server.contract import SERVICE_TOKEN_HEADER
from local_platform.ports import free_port
from private_api.__main__ import main as private_api_main
from tests.helpers import wait_until
from tests.private_api.conftest import SERVICE_TOKEN
from tests.private_api.helpers import make_zip

REPO_ROOT = Path(__file__).resolve().parents[2]


def service_env(**values: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("IS_")}
    # Run from elsewhere to prove nothing depends on the working directory, imports included.
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(values)
    return env


@pytest.fixture
def server(tmp_path, rabbitmq_url, queue_name) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    port = free_port()
    data_dir = tmp_path / "data"
    env = service_env(
        IS_DATABASE_URL=f"sqlite:///{data_dir / 'inference.db'}",
        IS_DATA_DIR=str(data_dir),
        IS_RABBITMQ_URL=rabbitmq_url,
        IS_QUEUE_NAME=queue_name,
        IS_SERVICE_TOKEN=SERVICE_TOKEN,
        IS_MAX_UPLOAD_BYTES=str(8 * 1024 * 1024),
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "private_api",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "info",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def live() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"private_api exited: {process.stdout.read().decode()}")
        try:
            return httpx.get(f"{base}/health/live", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(live, timeout=30, what="private_api to answer /health/live")
        yield base, process, data_dir
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(15)


def test_module_entry_point_migrates_serves_and_stops_cleanly(server):
    base, process, data_dir = server
    headers = {SERVICE_TOKEN_HEADER: SERVICE_TOKEN}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        assert http.get("/health/ready").json()["status"] == "ok"
        assert http.get("/models").json() == []
        created = http.post("/models", params={"human_readable_id": "m1", "container_tag": "img:1"})
        assert created.status_code == 201, created.text

        # A 6 MB input sent in 64 kB pieces, as a proxy relays it: streamed straight to disk.
        data = make_zip({"big.bin": os.urandom(6 * 1024 * 1024)})
        boundary = "b0undary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="zip_file"; filename="in.zip"\r\n\r\n'
        ).encode()
        body = head + data + f"\r\n--{boundary}--\r\n".encode()
        submitted = http.post(
            "/tasks",
            params={"model_human_readable_id": "m1"},
            content=(body[i : i + 65536] for i in range(0, len(body), 65536)),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        assert submitted.status_code == 201, submitted.text
        uid = submitted.json()["uid"]
        assert http.get(f"/tasks/{uid}/input").content == data

        too_big = http.post(
            "/tasks",
            params={"model_human_readable_id": "m1"},
            files={"zip_file": ("in.zip", make_zip({"x": os.urandom(10 * 1024 * 1024)}))},
        )
        assert too_big.status_code == 413
    assert (data_dir / "inference.db").is_file()

    process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully (lifespan included), then re-raises SIGTERM as its exit status.
    assert process.wait(15) in (0, -signal.SIGTERM)
    output = process.stdout.read().decode()
    assert "Application shutdown complete" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(("token", "problem"), [(None, "Field required"), ("short", "at least 16")])
def test_refuses_to_start_without_a_good_service_token(token, problem, tmp_path, monkeypatch, capsys):
    for key in [key for key in os.environ if key.startswith("IS_")]:
        monkeypatch.delenv(key)
    if token is not None:
        monkeypatch.setenv("IS_SERVICE_TOKEN", token)
    monkeypatch.setenv("IS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IS_DATABASE_URL", f"sqlite:///{tmp_path / 'data' / 'db.sqlite'}")

    assert private_api_main(["--port", str(free_port())]) == 2

    stderr = capsys.readouterr().err
    assert "IS_SERVICE_TOKEN" in stderr
    assert problem in stderr
    assert not (tmp_path / "data").exists()  # refused before touching anything
