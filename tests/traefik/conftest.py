"""The real Traefik binary, with the project's own configuration, in front of the real platform
(private API, public API and one consumer as local processes, via the lead's LocalPlatform)."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inference_server.contract import ApiKeyRole
from local_platform.launcher import LocalPlatform
from local_platform.ports import free_port
from private_api.db import make_engine, make_session_factory
from private_api.keys import create_key
from tests.helpers import wait_until
from tests.traefik.helpers import (
    FrontDoor,
    answers,
    make_cert,
    render_static_config,
    traefik_binary,
)

TRAEFIK_DIR = Path(__file__).resolve().parents[2] / "traefik"


@pytest.fixture(scope="module")
def platform(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq_url: str, module_queue_name: str
) -> Iterator[LocalPlatform]:
    running = LocalPlatform(
        data_dir=tmp_path_factory.mktemp("platform"),
        public_port=free_port(),
        consumers=1,
        rabbitmq_url=rabbitmq_url,
        queue_name=module_queue_name,
        # Production access rules (no anonymous callers); the tests use the operator key.
        create_operator_key=True,
    )
    running.start(timeout=90)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert("inference.test", tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def front_door(
    tmp_path_factory: pytest.TempPathFactory, platform: LocalPlatform, tls_cert: tuple[Path, Path]
) -> Iterator[FrontDoor]:
    """Traefik on high free ports instead of 80/443, routing to the platform's public API."""
    workdir = tmp_path_factory.mktemp("traefik")
    cert, key = tls_cert
    web_port, websecure_port, ping_port = free_port(), free_port(), free_port()
    static = render_static_config(
        workdir / "traefik.yml",
        web=f"127.0.0.1:{web_port}",
        websecure=f"127.0.0.1:{websecure_port}",
        ping=f"127.0.0.1:{ping_port}",
        dynamic_file=TRAEFIK_DIR / "dynamic.yml",
    )
    # Traefik spools buffered bodies to Go's temporary directory: a folder of its own here, so
    # the tests can see what it writes.
    spool_dir = workdir / "spool"
    spool_dir.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TMPDIR": str(spool_dir),
        "IS_PROXY_UPSTREAM_URL": platform.public_url,
        "IS_PROXY_CERT_FILE": str(cert),
        "IS_PROXY_KEY_FILE": str(key),
    }
    log_path = workdir / "traefik.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(traefik_binary()), f"--configFile={static}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    door = FrontDoor(
        https_url=f"https://127.0.0.1:{websecure_port}",
        http_url=f"http://127.0.0.1:{web_port}",
        ca_file=cert,
        api_key=platform.operator_key_file.read_text().strip(),
        spool_dir=spool_dir,
    )
    try:
        with httpx.Client(timeout=2.0) as ping:
            wait_until(answers(ping, f"http://127.0.0.1:{ping_port}/ping"), 30, "Traefik's ping")
        # The file provider loads the routers just after start-up: wait until one answers.
        with door.client(timeout=2.0) as client:
            wait_until(answers(client, "/health/live"), 30, "the route to the public API")
        yield door
    except BaseException:
        print(log_path.read_text(errors="replace")[-5000:])
        raise
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def user_key(platform: LocalPlatform) -> str:
    """A user (not operator) key in the platform's database."""
    engine = make_engine(platform.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            key, _info = create_key(
                session=session, name=f"traefik-user-{secrets.token_hex(3)}", role=ApiKeyRole.USER
            )
    finally:
        engine.dispose()
    return key
