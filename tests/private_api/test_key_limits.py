"""A key's limits on submissions: the highest priority it may ask for, and how many pending plus
running tasks it may hold. Refused submissions store nothing."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from inference_server.contract import (
    MAX_PRIORITY,
    ApiKeyRole,
)
from private_api import keys, task_lifecycle
from private_api.access import Actor
from private_api.blobs import StoredBlob
from private_api.exceptions import TooManyActiveTasks
from tests.private_api.helpers import acting_as, claim, make_zip, register_model, row_counts, stored_files

ALICE = acting_as("alice")
ROOT = acting_as("root", ApiKeyRole.OPERATOR)
ANONYMOUS = acting_as(None)


def _keys(client: TestClient, **limits: int | None) -> None:
    with client.app.state.session_factory() as session:
        keys.create_key(session=session, name="alice", role=ApiKeyRole.USER, **limits)
        keys.create_key(session=session, name="root", role=ApiKeyRole.OPERATOR)


def _post(client: TestClient, headers: dict[str, str], priority: int = 0) -> Response:
    files = {"zip_file": ("input.zip", make_zip(), "application/zip")}
    params = {"model_human_readable_id": "seg-model", "priority": priority}
    return client.post("/tasks", params=params, files=files, headers=headers)


def _refused_storing_nothing(
    client: TestClient, headers: dict[str, str], priority: int, status: int
) -> Response:
    before = (row_counts(client), stored_files(client.app.state.settings))
    response = _post(client, headers, priority)
    assert response.status_code == status, response.text
    assert (row_counts(client), stored_files(client.app.state.settings)) == before
    return response


def test_user_keys_default_below_the_top_and_operators_may_use_it(client: TestClient) -> None:
    register_model(client)
    _keys(client)
    assert client.app.state.settings.default_max_priority == 5
    assert _post(client, ALICE, 5).status_code == 201
    refused = _refused_storing_nothing(client, ALICE, 6, 403)
    assert refused.json()["detail"] == (
        "priority 6 is above the maximum priority of key 'alice' (5); an operator may raise it "
        "(inference-server keys set NAME --max-priority N)"
    )
    assert _post(client, ROOT, MAX_PRIORITY).status_code == 201
    # Anonymous submissions (IS_ANONYMOUS_TASKS) get a user's default.
    assert _post(client, ANONYMOUS, 5).status_code == 201
    assert "anonymous submissions (5)" in _refused_storing_nothing(client, ANONYMOUS, 6, 403).json()["detail"]


def test_a_keys_own_maximum_priority_replaces_the_default(client: TestClient) -> None:
    register_model(client)
    _keys(client, max_priority=2)
    assert _post(client, ALICE, 2).status_code == 201
    _refused_storing_nothing(client, ALICE, 3, 403)
    with client.app.state.session_factory() as session:
        keys.set_limits(session=session, name_or_id="alice", max_priority=MAX_PRIORITY)
    assert _post(client, ALICE, MAX_PRIORITY).status_code == 201
    with client.app.state.session_factory() as session:
        keys.set_limits(session=session, name_or_id="alice", max_priority=None)  # back to the default
    _refused_storing_nothing(client, ALICE, 6, 403)


def test_active_task_limit_answers_429_until_a_task_ends(start_app, make_settings) -> None:
    client = start_app(make_settings(default_max_active_tasks=2))
    register_model(client)
    _keys(client)
    first, second = (_post(client, ALICE).json()["uid"] for _ in range(2))
    refused = _refused_storing_nothing(client, ALICE, 0, 429)
    assert refused.headers["Retry-After"] == str(task_lifecycle.ACTIVE_LIMIT_RETRY_AFTER_S)
    assert refused.json()["detail"].startswith("key 'alice' has 2 pending or running tasks, its limit")
    assert _post(client, ROOT).status_code == 201  # operators: no limit unless given one

    assert claim(client, first).status_code == 200  # running still counts
    _refused_storing_nothing(client, ALICE, 0, 429)
    assert client.post(f"/tasks/{second}/cancel", headers=ALICE).status_code == 200
    third = _post(client, ALICE)
    assert third.status_code == 201
    _refused_storing_nothing(client, ALICE, 0, 429)

    # The key's own limit replaces the default; 0 is none.
    with client.app.state.session_factory() as session:
        keys.set_limits(session=session, name_or_id="alice", max_active_tasks=0)
    assert _post(client, ALICE).status_code == 201


def test_the_limit_is_checked_again_in_the_insert(start_app, make_settings) -> None:
    """What the route's early check cannot see (a submission committed while this one uploaded)
    the insert's own check refuses."""
    client = start_app(make_settings(default_max_active_tasks=1))
    register_model(client)
    _keys(client)
    assert _post(client, ALICE).status_code == 201
    settings = client.app.state.settings
    with client.app.state.session_factory() as session, pytest.raises(TooManyActiveTasks):
        task_lifecycle.create_task(
            session=session,
            model_human_readable_id="seg-model",
            priority=0,
            input_blob=StoredBlob(key="inputs/none", sha256="0" * 64, size=0),
            owner="alice",
            actor=Actor(name="alice"),
            settings=settings,
        )
    assert row_counts(client)[1] == 1


def test_concurrent_inserts_of_one_key_never_pass_the_limit(
    start_app, make_settings, database_url, monkeypatch: pytest.MonkeyPatch
) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite runs one writer at a time anyway; the row lock is PostgreSQL's")
    client = start_app(make_settings(default_max_active_tasks=3))
    register_model(client)
    _keys(client)
    settings = client.app.state.settings
    # Widen the window between the count and the commit, so unserialized inserts would all pass.
    model_lookup = task_lifecycle.required_model

    def slow_model_lookup(*args: object) -> object:
        time.sleep(0.2)
        return model_lookup(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(task_lifecycle, "required_model", slow_model_lookup)

    def insert(n: int) -> bool:
        with client.app.state.session_factory() as session:
            try:
                task_lifecycle.create_task(
                    session=session,
                    model_human_readable_id="seg-model",
                    priority=0,
                    input_blob=StoredBlob(key=f"inputs/none-{n}", sha256="0" * 64, size=0),
                    owner="alice",
                    actor=Actor(name="alice"),
                    settings=settings,
                )
            except TooManyActiveTasks:
                return False
            return True

    with ThreadPoolExecutor(max_workers=12) as pool:
        accepted = sum(pool.map(insert, range(24)))
    assert accepted == 3
    assert row_counts(client)[1] == 3
