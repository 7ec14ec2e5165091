"""Task list filters of the private GET /tasks: model, owner (within what the caller may see) and
the start of a uid; and each task's owner in the answer."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from inference_server.contract import (
    TASK_FILTER_MODEL,
    TASK_FILTER_OWNER,
    TASK_FILTER_UID,
    TASK_UID_SEARCH_MIN_CHARS,
    ApiKeyRole,
    PrivateRoutes,
    TaskStatus,
)
from private_api.models import Task
from tests.private_api.helpers import acting_as, register_model, submit_ok

ALICE = acting_as("alice")
BOB = acting_as("bob")
OPERATOR = acting_as("root", ApiKeyRole.OPERATOR)


@pytest.fixture
def tasks(client: TestClient) -> dict[str, str]:
    """Four tasks: alice's on both models, bob's, an anonymous one; by name, their uids."""
    register_model(client, "seg-model")
    register_model(client, "other-model")
    return {
        "alice_seg": submit_ok(client, "seg-model", headers=ALICE)["uid"],
        "alice_other": submit_ok(client, "other-model", headers=ALICE)["uid"],
        "bob_seg": submit_ok(client, "seg-model", headers=BOB)["uid"],
        "anonymous_seg": submit_ok(client, "seg-model", headers=acting_as(None))["uid"],
    }


def _listed(client: TestClient, headers: dict[str, str], **params: Any) -> list[str]:
    response = client.get(PrivateRoutes.TASKS, headers=headers, params=params)
    assert response.status_code == 200, response.text
    return [task["uid"] for task in response.json()]


def test_every_task_names_its_owner(client: TestClient, tasks: dict[str, str]) -> None:
    listed = client.get(PrivateRoutes.TASKS, headers=OPERATOR).json()
    assert {task["uid"]: task["owner"] for task in listed} == {
        tasks["alice_seg"]: "alice",
        tasks["alice_other"]: "alice",
        tasks["bob_seg"]: "bob",
        tasks["anonymous_seg"]: None,
    }
    assert client.get(f"/tasks/{tasks['bob_seg']}", headers=BOB).json()["owner"] == "bob"


def test_model_filter(client: TestClient, tasks: dict[str, str]) -> None:
    assert _listed(client, OPERATOR, **{TASK_FILTER_MODEL: "other-model"}) == [tasks["alice_other"]]
    assert _listed(client, ALICE, **{TASK_FILTER_MODEL: "seg-model"}) == [tasks["alice_seg"]]
    assert _listed(client, OPERATOR, **{TASK_FILTER_MODEL: "no-such-model"}) == []


def test_owner_filter_for_operators(client: TestClient, tasks: dict[str, str]) -> None:
    assert _listed(client, OPERATOR, **{TASK_FILTER_OWNER: "alice"}) == [
        tasks["alice_other"],
        tasks["alice_seg"],
    ]
    assert _listed(client, OPERATOR, **{TASK_FILTER_OWNER: "bob", TASK_FILTER_MODEL: "seg-model"}) == [
        tasks["bob_seg"]
    ]
    assert _listed(client, OPERATOR, **{TASK_FILTER_OWNER: "nobody"}) == []


def test_a_user_never_lists_someone_elses_tasks(client: TestClient, tasks: dict[str, str]) -> None:
    assert _listed(client, ALICE, **{TASK_FILTER_OWNER: "bob"}) == []
    assert _listed(client, ALICE, **{TASK_FILTER_OWNER: "alice"}) == [
        tasks["alice_other"],
        tasks["alice_seg"],
    ]
    assert _listed(client, BOB, **{TASK_FILTER_UID: tasks["alice_seg"]}) == []
    # Anonymous callers still list nothing, filters or not.
    assert _listed(client, acting_as(None), **{TASK_FILTER_UID: tasks["anonymous_seg"]}) == []


def test_uid_prefix_filter(client: TestClient, tasks: dict[str, str]) -> None:
    uid = tasks["bob_seg"]
    prefix = uid[:TASK_UID_SEARCH_MIN_CHARS]
    shortest = _listed(client, OPERATOR, **{TASK_FILTER_UID: prefix})
    # Another random uid may share the first characters: every one listed does, bob's among them.
    assert uid in shortest and all(other.startswith(prefix) for other in shortest)
    assert _listed(client, OPERATOR, **{TASK_FILTER_UID: uid}) == [uid]
    assert _listed(client, BOB, **{TASK_FILTER_UID: uid[:10]}) == [uid]
    # The start, not any part.
    assert _listed(client, OPERATOR, **{TASK_FILTER_UID: uid[1:]}) == []


def test_like_wildcards_in_a_uid_match_only_themselves(client: TestClient, tasks: dict[str, str]) -> None:
    # Unescaped, "____" and "%%%%" would match every uid.
    for wildcards in ("_" * TASK_UID_SEARCH_MIN_CHARS, "%" * TASK_UID_SEARCH_MIN_CHARS, "%_%_"):
        assert _listed(client, OPERATOR, **{TASK_FILTER_UID: wildcards}) == []
    # A uid that really starts with an underscore is found (uids may hold "_" and "-").
    with client.app.state.session_factory() as session:
        session.execute(
            update(Task).where(Task.uid == tasks["bob_seg"]).values(uid="____" + tasks["bob_seg"][4:])
        )
        session.commit()
    assert _listed(client, OPERATOR, **{TASK_FILTER_UID: "____"}) == ["____" + tasks["bob_seg"][4:]]


def test_filters_combine_with_status(client: TestClient, tasks: dict[str, str]) -> None:
    with client.app.state.session_factory() as session:
        session.execute(
            update(Task).where(Task.uid == tasks["alice_seg"]).values(status=TaskStatus.CANCELLED)
        )
        session.commit()
    assert _listed(client, OPERATOR, status="cancelled", **{TASK_FILTER_MODEL: "seg-model"}) == [
        tasks["alice_seg"]
    ]
    assert _listed(client, OPERATOR, status="pending", **{TASK_FILTER_OWNER: "alice"}) == [
        tasks["alice_other"]
    ]


@pytest.mark.parametrize(
    "params",
    [
        {TASK_FILTER_UID: "a" * (TASK_UID_SEARCH_MIN_CHARS - 1)},
        {TASK_FILTER_UID: ""},
        {TASK_FILTER_UID: "a" * 65},
        {TASK_FILTER_OWNER: "o" * 256},
        {TASK_FILTER_MODEL: "m" * 129},
    ],
)
def test_bad_filters_are_422_with_a_detail(
    client: TestClient, tasks: dict[str, str], params: dict[str, str]
) -> None:
    response = client.get(PrivateRoutes.TASKS, headers=OPERATOR, params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]
