"""API keys (stored hashed, resolved for the public API) and task ownership in the private API."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from inference_server.contract import (
    ACTING_OWNER_HEADER,
    ACTING_ROLE_HEADER,
    ANONYMOUS_ROLE,
    SERVICE_TOKEN_HEADER,
    ApiKeyRole,
    Principal,
    TaskStatus,
)
from private_api import keys
from private_api.exceptions import Conflict, NotFound, Unprocessable
from private_api.models import ApiKey
from private_api.task_rows import new_task_uid
from tests.private_api.helpers import acting_as, claim, make_zip, register_model, stored_files, task_row

ALICE = acting_as("alice")
BOB = acting_as("bob")
OPERATOR = acting_as("root", ApiKeyRole.OPERATOR)
ANONYMOUS = acting_as(None)


def _session(client: TestClient):
    return client.app.state.session_factory()


def _create(client: TestClient, name: str, role: ApiKeyRole = ApiKeyRole.USER) -> str:
    with _session(client) as session:
        key, info = keys.create_key(session=session, name=name, role=role)
    assert info.name == name and info.role == role
    return key


def _submit(client: TestClient, headers: dict[str, str]) -> str:
    files = {"zip_file": ("input.zip", make_zip(), "application/zip")}
    response = client.post(
        "/tasks", params={"model_human_readable_id": "seg-model"}, files=files, headers=headers
    )
    assert response.status_code == 201, response.text
    return response.json()["uid"]


def _finish(client: TestClient, uid: str) -> None:
    assert claim(client, uid).status_code == 200
    files = {"zip_file": ("out.zip", make_zip({"out.txt": b"result"}), "application/zip")}
    response = client.post(f"/tasks/{uid}/output", files=files, headers={"X-Consumer-Id": "consumer-a"})
    assert response.status_code == 200, response.text


# --- the keys themselves ----------------------------------------------------------------------


def test_a_new_key_is_shown_once_and_only_its_hash_is_stored(client: TestClient) -> None:
    key = _create(client, "alice", ApiKeyRole.OPERATOR)
    match = re.fullmatch(r"isk_([0-9a-f]{8})_([A-Za-z0-9_-]+)", key)
    assert match, key
    assert len(match.group(2)) >= 43  # token_urlsafe(32): 256 random bits, above the 192 asked for
    with _session(client) as session:
        row = session.scalars(select(ApiKey).where(ApiKey.name == "alice")).one()
        stored = [str(getattr(row, column.key)) for column in ApiKey.__table__.columns]
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert row.key_id == match.group(1)
    assert not [value for value in stored if match.group(2) in value]
    with _session(client) as session:
        listed = keys.list_keys(session=session)
    assert [(info.name, info.role, info.key_id) for info in listed] == [
        ("alice", ApiKeyRole.OPERATOR, match.group(1))
    ]
    assert match.group(2) not in listed[0].model_dump_json()


def test_two_keys_never_share_a_secret(client: TestClient) -> None:
    assert _create(client, "one") != _create(client, "two")


def test_resolve_knows_valid_keys_only(client: TestClient) -> None:
    key = _create(client, "alice")
    key_id = key.split("_")[1]
    with _session(client) as session:
        assert keys.resolve_key(session=session, key=key) == Principal(name="alice", role=ApiKeyRole.USER)
        # Right id, wrong secret; malformed; unknown id.
        assert keys.resolve_key(session=session, key=f"isk_{key_id}_{'A' * 43}") is None
        assert keys.resolve_key(session=session, key="alice") is None
        assert keys.resolve_key(session=session, key=key + "x") is None
        assert keys.resolve_key(session=session, key=f"isk_00000000_{key.split('_', 2)[2]}") is None
        used = session.scalars(select(ApiKey.last_used_at).where(ApiKey.name == "alice")).one()
    assert used is not None


def test_revoke_by_name_or_id_and_again(client: TestClient) -> None:
    alice = _create(client, "alice")
    bob = _create(client, "bob")
    with _session(client) as session:
        revoked = keys.revoke_key(session=session, name_or_id="alice")
        assert revoked.revoked
        assert keys.resolve_key(session=session, key=alice) is None
        again = keys.revoke_key(session=session, name_or_id="alice")
        assert again.revoked_at == revoked.revoked_at  # revoking twice changes nothing
        by_id = keys.revoke_key(session=session, name_or_id=bob.split("_")[1])
        assert by_id.name == "bob" and by_id.revoked
        assert keys.resolve_key(session=session, key=bob) is None
        with pytest.raises(NotFound):
            keys.revoke_key(session=session, name_or_id="carol")


def test_names_are_unique_and_plain(client: TestClient) -> None:
    _create(client, "operator")
    with _session(client) as session:
        with pytest.raises(Conflict, match="exists"):
            keys.create_key(session=session, name="operator", role=ApiKeyRole.USER)
        for bad in ("", "has space", "new\nline", "-leading-dash", "x" * 129, "émile"):
            with pytest.raises(Unprocessable):
                keys.create_key(session=session, name=bad, role=ApiKeyRole.USER)
        assert keys.free_key_name(session=session, base="operator") == "operator-2"
        keys.create_key(session=session, name="operator-2", role=ApiKeyRole.USER)
        assert keys.free_key_name(session=session, base="operator") == "operator-3"
        assert keys.free_key_name(session=session, base="alice") == "alice"
        assert len(keys.list_keys(session=session)) == 2


def test_task_uids_carry_at_least_128_random_bits() -> None:
    # The uid is all an anonymous (v1.2) caller needs to read a result: it must not be guessable.
    uids = {new_task_uid() for _ in range(2000)}
    assert len(uids) == 2000
    assert min(len(base64.urlsafe_b64decode(uid + "=" * (-len(uid) % 4))) for uid in uids) >= 16


# --- POST /auth/resolve ------------------------------------------------------------------------


def test_resolve_endpoint(client: TestClient) -> None:
    key = _create(client, "alice", ApiKeyRole.OPERATOR)
    answer = client.post("/auth/resolve", json={"key": key})
    assert answer.status_code == 200
    assert answer.json() == {"name": "alice", "role": "operator"}

    unknown = client.post("/auth/resolve", json={"key": "isk_00000000_" + "a" * 43})
    assert unknown.status_code == 401
    assert unknown.headers["www-authenticate"].startswith("Bearer")
    assert unknown.json()["detail"]

    assert client.post("/auth/resolve", json={}).status_code == 422
    assert client.post("/auth/resolve", json={"key": "k" * 513}).status_code == 422


def test_resolve_endpoint_needs_the_service_token(client: TestClient) -> None:
    key = _create(client, "alice")
    for headers in ({SERVICE_TOKEN_HEADER: "wrong-token-0123456789"}, {SERVICE_TOKEN_HEADER: ""}):
        refused = client.post("/auth/resolve", json={"key": key}, headers=headers)
        assert refused.status_code == 401
        # No Bearer challenge: the public API tells "wrong service token" from "unknown key" by it.
        assert "www-authenticate" not in refused.headers


def test_every_private_route_but_liveness_refuses_callers_without_the_service_token(
    client: TestClient,
) -> None:
    """The private API trusts the X-Acting-* headers only because nothing gets in without the token."""
    operations = [
        (method.upper(), path)
        for path, methods in client.app.openapi()["paths"].items()
        for method in methods
    ]
    assert ("POST", "/auth/resolve") in operations and ("PATCH", "/models/{human_readable_id}") in operations
    for method, path in operations:
        url = path.format(uid="0" * 32, human_readable_id="seg-model", consumer_id="consumer-a")
        for token in ("", "wrong-token-0123456789"):
            response = client.request(method, url, headers={SERVICE_TOKEN_HEADER: token, **OPERATOR})
            expected = 200 if path == "/health/live" else 401
            assert response.status_code == expected, (method, path, response.status_code)


# --- ownership --------------------------------------------------------------------------------


def test_a_task_belongs_to_whoever_submitted_it(client: TestClient) -> None:
    register_model(client)
    assert task_row(client, _submit(client, ALICE)).owner == "alice"
    assert task_row(client, _submit(client, OPERATOR)).owner == "root"
    assert task_row(client, _submit(client, ANONYMOUS)).owner is None
    assert task_row(client, _submit(client, {})).owner is None  # the platform itself


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/tasks/{uid}"),
        ("GET", "/tasks/{uid}/output"),
        ("GET", "/tasks/{uid}/logs"),
        ("GET", "/tasks/{uid}/input"),
        ("POST", "/tasks/{uid}/cancel"),
        ("DELETE", "/tasks/{uid}"),
    ],
)
def test_someone_elses_task_answers_like_an_unknown_one(client: TestClient, method: str, path: str) -> None:
    register_model(client)
    uid = _submit(client, ALICE)
    _finish(client, uid)
    files_before = stored_files(client.app.state.settings)
    unknown_uid = new_task_uid()
    for stranger in (BOB, ANONYMOUS):
        refused = client.request(method, path.format(uid=uid), headers=stranger)
        unknown = client.request(method, path.format(uid=unknown_uid), headers=stranger)
        assert refused.status_code == unknown.status_code == 404
        assert refused.json()["detail"].replace(uid, "UID") == unknown.json()["detail"].replace(
            unknown_uid, "UID"
        )
    # Nothing was changed by the refused requests.
    row = task_row(client, uid)
    assert row.status == TaskStatus.FINISHED
    assert stored_files(client.app.state.settings) == files_before
    for allowed in (ALICE, OPERATOR, {}):
        assert client.get(f"/tasks/{uid}", headers=allowed).status_code == 200
    assert client.request(method, path.format(uid=uid), headers=ALICE).status_code == 200


def test_cancel_and_delete_by_a_stranger_leave_a_pending_task_alone(client: TestClient) -> None:
    register_model(client)
    uid = _submit(client, ALICE)
    assert client.post(f"/tasks/{uid}/cancel", headers=BOB).status_code == 404
    assert client.delete(f"/tasks/{uid}", headers=BOB).status_code == 404
    row = task_row(client, uid)
    assert row.status == TaskStatus.PENDING
    assert row.input_blob_key is not None
    cancelled = client.post(f"/tasks/{uid}/cancel", headers=OPERATOR)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == TaskStatus.CANCELLED


def test_anonymous_tasks_are_visible_to_anonymous_callers_and_operators_only(client: TestClient) -> None:
    register_model(client)
    uid = _submit(client, ANONYMOUS)
    assert client.get(f"/tasks/{uid}", headers=ANONYMOUS).status_code == 200
    assert client.get(f"/tasks/{uid}", headers=OPERATOR).status_code == 200
    assert client.get(f"/tasks/{uid}", headers=ALICE).status_code == 404
    assert client.delete(f"/tasks/{uid}", headers=ALICE).status_code == 404
    deleted = client.delete(f"/tasks/{uid}", headers=ANONYMOUS)
    assert deleted.status_code == 200 and deleted.json()["status"] == TaskStatus.DELETED


def test_listing_shows_own_tasks_all_for_operators_none_for_anonymous(client: TestClient) -> None:
    register_model(client)
    alice_tasks = [_submit(client, ALICE) for _ in range(3)]
    bob_task = _submit(client, BOB)
    anonymous_task = _submit(client, ANONYMOUS)
    client.delete(f"/tasks/{alice_tasks[0]}", headers=ALICE)
    client.post(f"/tasks/{alice_tasks[1]}/cancel", headers=ALICE)

    def listed(headers: dict[str, str], **params: object) -> list[str]:
        response = client.get("/tasks", headers=headers, params=params)
        assert response.status_code == 200, response.text
        return [task["uid"] for task in response.json()]

    assert listed(ALICE) == [alice_tasks[2], alice_tasks[1]]  # newest first, deleted left out
    assert listed(ALICE, status="cancelled") == [alice_tasks[1]]
    assert listed(ALICE, limit=1) == [alice_tasks[2]]
    assert listed(ALICE, limit=1, offset=1) == [alice_tasks[1]]
    assert listed(BOB) == [bob_task]
    assert listed(ANONYMOUS) == []
    everything = [anonymous_task, bob_task, alice_tasks[2], alice_tasks[1]]
    assert listed(OPERATOR) == everything
    assert listed({}) == everything
    assert client.get("/tasks", params={"limit": 0}).status_code == 422
    assert client.get("/tasks", params={"status": "nonsense"}).status_code == 422


@pytest.mark.parametrize(
    "headers",
    [
        {ACTING_ROLE_HEADER: "user"},
        {ACTING_OWNER_HEADER: "alice"},
        {ACTING_OWNER_HEADER: "alice", ACTING_ROLE_HEADER: "superuser"},
        {ACTING_OWNER_HEADER: "alice", ACTING_ROLE_HEADER: ANONYMOUS_ROLE},
    ],
)
def test_inconsistent_acting_headers_are_refused(client: TestClient, headers: dict[str, str]) -> None:
    response = client.get("/tasks", headers=headers)
    assert response.status_code == 422
    assert "X-Acting" in response.json()["detail"]


# --- PATCH /models/{id} ------------------------------------------------------------------------


def test_patch_changes_only_what_is_sent(client: TestClient) -> None:
    register_model(client, memory_mb=512, timeout_s=60)
    changed = client.patch("/models/seg-model", json={"description": "better words", "cpus": 1.5})
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert (body["description"], body["cpus"], body["memory_mb"], body["timeout_s"]) == (
        "better words",
        1.5,
        512,
        60,
    )
    reset = client.patch("/models/seg-model", json={"memory_mb": None, "allow_network": True})
    assert reset.status_code == 200
    assert reset.json()["memory_mb"] is None and reset.json()["allow_network"] is True
    assert client.get("/models/seg-model").json()["description"] == "better words"

    assert client.patch("/models/no-such-model", json={"description": "x"}).status_code == 404
    for bad in ({"container_tag": "other:1"}, {"description": None}, {"memory_mb": 1}, {"cpus": "lots"}):
        assert client.patch("/models/seg-model", json=bad).status_code == 422, bad
    assert client.get("/models/seg-model").json()["description"] == "better words"
