"""Fixtures for the private API: a migrated database (SQLite and PostgreSQL), the real RabbitMQ
on a queue of its own, and the app running in-process behind Starlette's TestClient."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from inference_server.contract import SERVICE_TOKEN_HEADER
from private_api.config import PrivateSettings
from private_api.db import make_engine, upgrade_database
from private_api.main import create_app
from tests.conftest import POSTGRES_ADMIN_DSN
from tests.private_api.helpers import QueueProbe

SERVICE_TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="session")
def migrated_postgres_url() -> Iterator[str]:
    """One PostgreSQL database per test session, migrated once; tests empty it (see below).

    Creating, migrating and dropping a database for each test costs more than the test itself.
    """
    name = f"is_test_private_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        upgrade_database(url)
        yield url
    finally:
        with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> str:
    """Each test once on a fresh SQLite file and once on the session's PostgreSQL database,
    emptied first (test_migrations.py uses truly fresh databases instead)."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    url = request.getfixturevalue("migrated_postgres_url")
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "TRUNCATE webhook_deliveries, tasks, models, dashboard_sessions, api_keys, consumers,"
                    " audit_entries RESTART IDENTITY"
                )
            )
    finally:
        engine.dispose()
    return url


@pytest.fixture
def make_settings(
    database_url: str, rabbitmq_url: str, queue_name: str, tmp_path
) -> Callable[..., PrivateSettings]:
    def make(**overrides) -> PrivateSettings:
        values = {
            "database_url": database_url,
            "data_dir": tmp_path / "data",
            "rabbitmq_url": rabbitmq_url,
            "queue_name": queue_name,
            "service_token": SERVICE_TOKEN,
            # Background loops idle unless a test asks for them, so message counts are exact.
            "reaper_interval_s": 3600,
            "outbox_interval_s": 3600,
        }
        values.update(overrides)
        return PrivateSettings(**values)

    return make


@pytest.fixture
def settings(make_settings) -> PrivateSettings:
    return make_settings()


@pytest.fixture
def start_app() -> Iterator[Callable[[PrivateSettings], TestClient]]:
    """Start (lifespan included) an app for given settings; all are stopped after the test."""
    with ExitStack() as stack:
        migrated: set[str] = set()

        def start(settings: PrivateSettings) -> TestClient:
            if settings.database_url not in migrated:
                upgrade_database(settings.database_url)
                migrated.add(settings.database_url)
            client = TestClient(create_app(settings), headers={SERVICE_TOKEN_HEADER: SERVICE_TOKEN})
            return stack.enter_context(client)

        yield start


@pytest.fixture
def client(start_app, settings) -> TestClient:
    return start_app(settings)


@pytest.fixture
def queue(rabbitmq_url: str, queue_name: str) -> Iterator[QueueProbe]:
    probe = QueueProbe(rabbitmq_url, queue_name)
    yield probe
    probe.close()
