"""A real private API and public API on free local ports, for the public API and client tests.

The private API runs exactly as in production (its own create_app, a migrated SQLite database, a
real RabbitMQ queue) inside a uvicorn thread; nothing consumes the queue, so tests move tasks
along by calling the private API's consumer endpoints with the service token, as a consumer would.
"""

from __future__ import annotations

import functools
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from inference_client.client import multipart_file_body
from inference_server.contract import (
    CONSUMER_ID_HEADER,
    SERVICE_TOKEN_HEADER,
    ApiKeyRole,
    PrivateRoutes,
    PublicRoutes,
    TaskClaim,
    TaskFailure,
    TaskPublic,
)
from local_platform.ports import free_port
from private_api.config import PrivateSettings
from private_api.db import make_engine, make_session_factory, upgrade_database
from private_api.keys import create_key
from private_api.main import create_app as create_private_app
from public_api.config import PublicSettings
from public_api.main import create_app as create_public_app
from tests.helpers import ServerThread, make_zip, register_model_public, zip_members  # noqa: F401 - re-exported

SERVICE_TOKEN = f"public-api-tests-{secrets.token_hex(12)}"
BASE_IMAGE_TAG = "inference-server/base:bookworm"


@functools.cache
def shared_http() -> httpx.Client:
    """One client for all test requests: building an httpx client loads the CA bundle (~0.1 s)."""
    return httpx.Client(timeout=120)


@dataclass
class PrivateStack:
    url: str
    data_dir: Path

    @property
    def database_url(self) -> str:
        return database_url_in(self.data_dir)

    def create_key(self, name: str, role: ApiKeyRole = ApiKeyRole.USER) -> str:
        """A new API key in this stack's database, made as `inference-server keys create` does."""
        engine = make_engine(self.database_url)
        try:
            with make_session_factory(engine)() as session:
                key, _info = create_key(session=session, name=name, role=role)
        finally:
            engine.dispose()
        return key


def database_url_in(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'inference.db'}"


def unique_id(prefix: str = "model") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


class ConsumerDriver:
    """Calls the private API's consumer endpoints directly, standing in for a job consumer."""

    def __init__(self, private_url: str, consumer_id: str = "test-consumer") -> None:
        self.http = httpx.Client(
            base_url=private_url,
            headers={SERVICE_TOKEN_HEADER: SERVICE_TOKEN, CONSUMER_ID_HEADER: consumer_id},
            timeout=120,
            verify=False,  # plain HTTP; skipping the CA bundle saves ~0.1 s per client
        )

    def close(self) -> None:
        self.http.close()

    def claim(self, uid: str) -> TaskClaim:
        response = self.http.post(PrivateRoutes.TASK_CLAIM.format(uid=uid))
        assert response.status_code == 200, response.text
        return TaskClaim.model_validate(response.json())

    def put_logs(self, uid: str, text: str) -> None:
        response = self.http.put(
            PrivateRoutes.TASK_LOGS.format(uid=uid),
            content=text.encode(),
            headers={"content-type": "text/plain"},
        )
        assert response.status_code < 300, response.text

    def finish(self, uid: str, output: bytes | Path) -> TaskPublic:
        if isinstance(output, Path):
            headers, body = multipart_file_body(output, field="zip_file", on_chunk=lambda _n: None)
            response = self.http.post(
                PrivateRoutes.TASK_OUTPUT.format(uid=uid), headers=headers, content=body
            )
        else:
            files = {"zip_file": ("output.zip", output, "application/zip")}
            response = self.http.post(PrivateRoutes.TASK_OUTPUT.format(uid=uid), files=files)
        assert response.status_code == 200, response.text
        return TaskPublic.model_validate(response.json())

    def fail(self, uid: str, error: str, exit_code: int | None = 1) -> TaskPublic:
        failure = TaskFailure(error=error, exit_code=exit_code, retryable=False)
        response = self.http.post(PrivateRoutes.TASK_FAIL.format(uid=uid), json=failure.model_dump())
        assert response.status_code == 200, response.text
        return TaskPublic.model_validate(response.json())

    def run_to_finish(self, uid: str, output: bytes | Path, logs: str = "") -> TaskPublic:
        self.claim(uid)
        if logs:
            self.put_logs(uid, logs)
        return self.finish(uid, output)


def register_model(
    public_url: str, human_readable_id: str | None = None, headers: dict[str, str] | None = None
) -> str:
    """A model of the base image, through the public API at `public_url`; returns its id."""
    human_readable_id = human_readable_id or unique_id()
    register_model_public(
        shared_http(), human_readable_id, BASE_IMAGE_TAG, base_url=public_url, headers=headers
    )
    return human_readable_id


def submit(public_url: str, model_id: str, files: dict[str, bytes] | None = None, **params: object) -> str:
    body = make_zip(files or {"input.txt": b"hello"})
    response = shared_http().post(
        public_url + PublicRoutes.TASKS,
        params={"model_human_readable_id": model_id, **params},
        files={"zip_file": ("input.zip", body, "application/zip")},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


def start_private_api(data_dir: Path, rabbitmq_url: str, queue_name: str) -> ServerThread:
    database_url = database_url_in(data_dir)
    upgrade_database(database_url)
    settings = PrivateSettings(
        database_url=database_url,
        data_dir=data_dir,
        rabbitmq_url=rabbitmq_url,
        queue_name=queue_name,
        service_token=SERVICE_TOKEN,
    )
    return ServerThread(create_private_app(settings), name="private-api").start()


# The relay, streaming and client tests are about moving requests and bodies, not about who may:
# their public APIs let callers without a key in, as IS_ANONYMOUS_TASKS and IS_ANONYMOUS_MODELS
# would in a deployment. test_permissions.py checks access with the switches off and on.
ANONYMOUS_ALLOWED = {"anonymous_tasks": True, "anonymous_models": True}
# Every test client comes from 127.0.0.1, and the permission and fuzz tests refuse far more than
# a minute's budget of keyless requests on purpose; test_hostile_requests.py sets a small one.
# What Prometheus presents to read /metrics in these tests (IS_METRICS_TOKEN).
METRICS_TOKEN = "metrics-token-for-tests-0123456789"
METRICS_HEADERS = {"Authorization": f"Bearer {METRICS_TOKEN}"}
TEST_DEFAULTS = {
    **ANONYMOUS_ALLOWED,
    "unauthenticated_rate_per_minute": 1_000_000,
    "metrics_token": METRICS_TOKEN,
}


def start_public_api(private_url: str, **overrides: object) -> ServerThread:
    values = {**TEST_DEFAULTS, **overrides}
    settings = PublicSettings(private_api_url=private_url, service_token=SERVICE_TOKEN, **values)
    return ServerThread(
        create_public_app(settings), name="public-api", forwarded_allow_ips=settings.forwarded_allow_ips
    ).start()


@dataclass
class PublicProcess:
    """`python -m public_api` as its own process, as deployed: its memory can be read from /proc."""

    popen: subprocess.Popen
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def memory_kib(self) -> dict[str, int]:
        """VmHWM (peak resident memory) and VmRSS (now) of the process, in KiB."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                fields[name] = int(value.split()[0])
        return fields

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)


def start_public_api_process(private_url: str, log_dir: Path, **env: str) -> PublicProcess:
    port = free_port()
    log_path = log_dir / "public-api.log"
    environment = {
        **os.environ,
        "IS_PRIVATE_API_URL": private_url,
        "IS_SERVICE_TOKEN": SERVICE_TOKEN,
        "IS_ANONYMOUS_TASKS": "false",
        "IS_ANONYMOUS_MODELS": "false",
        **env,
    }
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "public_api", "--host", "127.0.0.1", "--port", str(port)],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    process = PublicProcess(popen=popen, url=f"http://127.0.0.1:{port}", log_path=log_path)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(process.url + PublicRoutes.HEALTH_LIVE, timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if popen.poll() is not None or time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(
                f"the public API did not start: {log_path.read_text(errors='replace')[-3000:]}"
            )
        time.sleep(0.1)


# -- fixtures (imported by the conftest of each test package that needs the stack) ------------


@pytest.fixture(scope="module")
def private_api(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq_url: str, module_queue_name: str
) -> Iterator[PrivateStack]:
    data_dir = tmp_path_factory.mktemp("private-data")
    server = start_private_api(data_dir, rabbitmq_url, module_queue_name)
    try:
        yield PrivateStack(url=server.url, data_dir=data_dir)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def public_url(private_api: PrivateStack) -> Iterator[str]:
    server = start_public_api(private_api.url)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def http() -> httpx.Client:
    return shared_http()


@pytest.fixture
def consumer(private_api: PrivateStack) -> Iterator[ConsumerDriver]:
    driver = ConsumerDriver(private_api.url, consumer_id=f"test-consumer-{secrets.token_hex(3)}")
    try:
        yield driver
    finally:
        driver.close()


@pytest.fixture(scope="module")
def model_id(public_url: str) -> str:
    return register_model(public_url)
