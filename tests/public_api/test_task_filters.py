"""Task list filters through the public API (GET /api/tasks/?model=&owner=&uid=): relayed to the
private API, a user's list always their own, a too short uid a 422."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from inference_server.contract import (
    TASK_FILTER_MODEL,
    TASK_FILTER_OWNER,
    TASK_FILTER_UID,
    TASK_UID_SEARCH_MIN_CHARS,
    ApiKeyRole,
    PublicRoutes,
)
from tests.helpers import make_zip
from tests.public_api.stack import PrivateStack, register_model, shared_http, start_public_api


@pytest.fixture(scope="module")
def base(private_api: PrivateStack) -> Iterator[str]:
    server = start_public_api(private_api.url, anonymous_tasks=False, anonymous_models=False)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def names() -> dict[str, str]:
    suffix = secrets.token_hex(3)
    return {"operator": f"operator-{suffix}", "alice": f"alice-{suffix}", "bob": f"bob-{suffix}"}


@pytest.fixture(scope="module")
def keys(private_api: PrivateStack, names: dict[str, str]) -> dict[str, dict[str, str]]:
    roles = {"operator": ApiKeyRole.OPERATOR, "alice": ApiKeyRole.USER, "bob": ApiKeyRole.USER}
    return {
        who: {"Authorization": f"Bearer {private_api.create_key(names[who], roles[who])}"} for who in names
    }


@pytest.fixture(scope="module")
def models(base: str, keys: dict[str, dict[str, str]]) -> tuple[str, str]:
    return register_model(base, headers=keys["operator"]), register_model(base, headers=keys["operator"])


@pytest.fixture(scope="module")
def tasks(base: str, keys: dict[str, dict[str, str]], models: tuple[str, str]) -> dict[str, str]:
    first, second = models
    uids = {}
    for name, who, model in [
        ("alice_first", "alice", first),
        ("alice_second", "alice", second),
        ("bob_first", "bob", first),
    ]:
        response = shared_http().post(
            base + PublicRoutes.TASKS,
            params={"model_human_readable_id": model},
            files={"zip_file": ("input.zip", make_zip({"input.txt": b"hello"}), "application/zip")},
            headers=keys[who],
        )
        assert response.status_code == 200, response.text
        uids[name] = response.json()
    return uids


def _list(base: str, headers: dict[str, str], **params: Any) -> httpx.Response:
    return shared_http().get(base + PublicRoutes.TASKS, headers=headers, params=params)


def _uids(base: str, headers: dict[str, str], **params: Any) -> list[str]:
    response = _list(base, headers, **params)
    assert response.status_code == 200, response.text
    return [task["uid"] for task in response.json()]


def test_model_filter(
    base: str, keys: dict[str, dict[str, str]], models: tuple[str, str], tasks: dict[str, str]
) -> None:
    first, second = models
    assert _uids(base, keys["operator"], **{TASK_FILTER_MODEL: first}) == [
        tasks["bob_first"],
        tasks["alice_first"],
    ]
    assert _uids(base, keys["alice"], **{TASK_FILTER_MODEL: first}) == [tasks["alice_first"]]
    assert _uids(base, keys["bob"], **{TASK_FILTER_MODEL: second}) == []


def test_owner_filter(
    base: str, keys: dict[str, dict[str, str]], names: dict[str, str], tasks: dict[str, str]
) -> None:
    listed = _list(base, keys["operator"], **{TASK_FILTER_OWNER: names["alice"]}).json()
    assert [(task["uid"], task["owner"]) for task in listed] == [
        (tasks["alice_second"], names["alice"]),
        (tasks["alice_first"], names["alice"]),
    ]
    # A user naming someone else gets nothing of theirs.
    assert _uids(base, keys["bob"], **{TASK_FILTER_OWNER: names["alice"]}) == []
    assert _uids(base, keys["bob"], **{TASK_FILTER_OWNER: names["bob"]}) == [tasks["bob_first"]]


def test_uid_filter(base: str, keys: dict[str, dict[str, str]], tasks: dict[str, str]) -> None:
    uid = tasks["alice_second"]
    assert _uids(base, keys["operator"], **{TASK_FILTER_UID: uid}) == [uid]
    assert _uids(base, keys["alice"], **{TASK_FILTER_UID: uid[:8]}) == [uid]
    assert _uids(base, keys["bob"], **{TASK_FILTER_UID: uid}) == []
    assert _uids(base, keys["operator"], **{TASK_FILTER_UID: "%%%%"}) == []


@pytest.mark.parametrize(
    "params",
    [
        {TASK_FILTER_UID: "a" * (TASK_UID_SEARCH_MIN_CHARS - 1)},
        {TASK_FILTER_UID: "a" * 65},
        {TASK_FILTER_OWNER: "o" * 256},
    ],
)
def test_bad_filters_are_422_with_a_detail(
    base: str, keys: dict[str, dict[str, str]], params: dict[str, str]
) -> None:
    response = _list(base, keys["operator"], **params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]
