"""The schema comes only from the Alembic migrations, identically on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text

from inference_server.contract import ApiKeyRole
from private_api.db import downgrade_database, make_engine, make_session_factory, upgrade_database
from private_api.keys import create_key, list_keys
from private_api.main import create_app
from private_api.models import Base


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> str:
    """Truly fresh, empty databases: unlike the other tests, not the shared migrated one."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")


def test_upgrade_creates_the_schema_the_models_describe(database_url):
    upgrade_database(database_url)
    upgrade_database(database_url)  # a second start finds nothing to do

    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            inspector = inspect(connection)
            assert {"models", "tasks", "alembic_version"} <= set(inspector.get_table_names())
            indexes = {index["name"]: index["column_names"] for index in inspector.get_indexes("tasks")}
            assert indexes["ix_tasks_status"] == ["status"]
            assert indexes["ix_tasks_status_lease_expires_at"] == ["status", "lease_expires_at"]
            columns = {column["name"] for column in inspector.get_columns("tasks")}
            assert {"uid", "owner", "published_at", "lease_expires_at", "log_blob_key"} <= columns
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_downgrade_and_upgrade_again(database_url):
    upgrade_database(database_url)
    downgrade_database(database_url, "base")
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            assert not {"models", "tasks"} & set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    upgrade_database(database_url)


def test_app_refuses_to_start_on_an_unmigrated_database(make_settings):
    app = create_app(make_settings())
    with pytest.raises(RuntimeError, match="upgrade_database"), TestClient(app):
        pass


def test_0005_adds_key_limits_that_existing_keys_leave_to_their_role(database_url):
    upgrade_database(database_url)
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            create_key(session=session, name="limited", role=ApiKeyRole.USER, max_priority=3)
        downgrade_database(database_url, "0004")
        with engine.connect() as connection:
            columns = {column["name"] for column in inspect(connection).get_columns("api_keys")}
            assert not {"max_priority", "max_active_tasks"} & columns
        upgrade_database(database_url)
        with make_session_factory(engine)() as session:
            info = list_keys(session=session)[0]
        assert (info.name, info.max_priority, info.max_active_tasks) == ("limited", None, None)
    finally:
        engine.dispose()


def test_0008_gives_every_existing_key_a_webhook_secret_of_its_own(database_url):
    upgrade_database(database_url, "0007")
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            for number in (1, 2):
                connection.execute(
                    text(
                        "INSERT INTO api_keys (key_id, key_hash, name, role, created_at) "
                        "VALUES (:key_id, :key_hash, :name, 'user', CURRENT_TIMESTAMP)"
                    ),
                    {"key_id": f"0000000{number}", "key_hash": "0" * 64, "name": f"old-{number}"},
                )
        upgrade_database(database_url)
        with engine.connect() as connection:
            secrets = connection.execute(text("SELECT webhook_secret FROM api_keys")).scalars().all()
        assert len(secrets) == 2 and len(set(secrets)) == 2
        assert all(secret.startswith("whsec_") and len(secret) > 40 for secret in secrets)
    finally:
        engine.dispose()
