"""The audit trail: every audited change is recorded with its actor and target, in the change's own
transaction; refused changes leave nothing; filters, paging and who may read it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from inference_server.contract import (
    AUDIT_ACTOR_OPERATOR_CLI,
    AUDIT_ACTOR_PLATFORM,
    SERVICE_TOKEN_HEADER,
    ApiKeyRole,
    AuditAction,
    PrivateRoutes,
)
from private_api import audit, keys
from private_api.config import PrivateSettings
from private_api.models import ApiKey, AuditRecord
from tests.private_api.helpers import acting_as, consumer_body, register_model, submit_ok

ALICE = acting_as("alice")
BOB = acting_as("bob")
OPERATOR = acting_as("olga", ApiKeyRole.OPERATOR)
PUBLIC_API_TOKEN = "public-api-token-0123456789"


@pytest.fixture
def settings(make_settings) -> PrivateSettings:
    return make_settings(public_api_token=PUBLIC_API_TOKEN)


def _entries(client: TestClient, **filters: Any) -> list[dict[str, Any]]:
    response = client.get(PrivateRoutes.AUDIT, params=filters)
    assert response.status_code == 200, response.text
    return response.json()


def _summary(client: TestClient, **filters: Any) -> list[tuple[str, str, str | None, str]]:
    """(action, actor, actor_role, target) of each entry, oldest first."""
    entries = reversed(_entries(client, **filters))
    return [(entry["action"], entry["actor"], entry["actor_role"], entry["target"]) for entry in entries]


def _count(client: TestClient) -> int:
    with client.app.state.session_factory() as session:
        return session.scalar(select(func.count()).select_from(AuditRecord)) or 0


def _register_consumer(client: TestClient, consumer_id: str) -> None:
    response = client.put(f"/consumers/{consumer_id}", json=consumer_body())
    assert response.status_code == 200, response.text


def test_changes_made_through_the_api_are_recorded_with_who_made_them(client: TestClient) -> None:
    created = client.post("/models", params={"human_readable_id": "seg-model", "container_tag": "t:1"},
                          headers=OPERATOR)  # fmt: skip
    assert created.status_code == 201, created.text
    patched = client.patch(
        "/models/seg-model", json={"description": "new", "timeout_s": 60}, headers=OPERATOR
    )
    assert patched.status_code == 200, patched.text
    cancelled = submit_ok(client, headers=ALICE)["uid"]
    assert client.post(f"/tasks/{cancelled}/cancel", headers=ALICE).status_code == 200
    deleted = submit_ok(client, headers=ALICE)["uid"]
    assert client.delete(f"/tasks/{deleted}", headers=OPERATOR).status_code == 200
    _register_consumer(client, "gpu-1")
    assert client.post("/consumers/gpu-1/drain", headers=OPERATOR).status_code == 200
    assert client.delete("/consumers/gpu-1/drain").status_code == 200  # the platform itself
    assert client.delete("/tasks/" + cancelled, headers=ALICE).status_code == 200
    assert client.delete("/models/seg-model", headers=OPERATOR).status_code == 200

    assert _summary(client) == [
        (AuditAction.MODEL_REGISTERED, "olga", "operator", "seg-model"),
        (AuditAction.MODEL_UPDATED, "olga", "operator", "seg-model"),
        (AuditAction.TASK_CANCELLED, "alice", "user", cancelled),
        (AuditAction.TASK_DELETED, "olga", "operator", deleted),
        (AuditAction.CONSUMER_DRAINED, "olga", "operator", "gpu-1"),
        (AuditAction.CONSUMER_RESUMED, AUDIT_ACTOR_PLATFORM, None, "gpu-1"),
        (AuditAction.TASK_DELETED, "alice", "user", cancelled),
        (AuditAction.MODEL_REMOVED, "olga", "operator", "seg-model"),
    ]
    update = _entries(client, action=AuditAction.MODEL_UPDATED)[0]
    assert update["details"] == {"fields": ["description", "timeout_s"], "values": {"timeout_s": 60}}
    assert datetime.fromisoformat(update["at"]).utcoffset() == timedelta(0)


def test_an_anonymous_cancel_is_recorded_as_anonymous(client: TestClient) -> None:
    register_model(client)
    uid = submit_ok(client, headers=acting_as(None))["uid"]
    assert client.post(f"/tasks/{uid}/cancel", headers=acting_as(None)).status_code == 200
    assert _summary(client, action=AuditAction.TASK_CANCELLED) == [
        (AuditAction.TASK_CANCELLED, "anonymous", None, uid)
    ]


def test_refused_and_idle_changes_leave_no_entry(client: TestClient) -> None:
    register_model(client)
    before = _count(client)
    uid = submit_ok(client, headers=ALICE)["uid"]
    # Someone else's task answers like an unknown one, and stays as it was.
    assert client.post(f"/tasks/{uid}/cancel", headers=BOB).status_code == 404
    assert client.delete(f"/tasks/{uid}", headers=BOB).status_code == 404
    # Only operators loosen isolation; a model with a pending task is not removed.
    assert client.patch("/models/seg-model", json={"allow_network": True}, headers=ALICE).status_code == 403
    assert client.delete("/models/seg-model", headers=OPERATOR).status_code == 409
    assert client.post("/models", params={"human_readable_id": "seg-model", "container_tag": "t:1"},
                       headers=OPERATOR).status_code == 409  # fmt: skip
    assert client.post("/consumers/nobody/drain", headers=OPERATOR).status_code == 404
    # Changes that change nothing: a second cancel, resuming a consumer that was never drained.
    assert client.post(f"/tasks/{uid}/cancel", headers=ALICE).status_code == 200
    assert client.post(f"/tasks/{uid}/cancel", headers=ALICE).status_code == 200
    _register_consumer(client, "gpu-1")
    assert client.delete("/consumers/gpu-1/drain", headers=OPERATOR).status_code == 200
    assert _summary(client)[before:] == [(AuditAction.TASK_CANCELLED, "alice", "user", uid)]


def test_key_changes_are_recorded_and_no_secret_appears_in_the_trail(client: TestClient) -> None:
    with client.app.state.session_factory() as session:
        key, _info = keys.create_key(
            session=session, name="carol", role=ApiKeyRole.USER, max_priority=3, actor=audit.OPERATOR_CLI
        )
        old_secret, _ = keys.webhook_secret(session=session, name_or_id="carol")
        new_secret, _ = keys.webhook_secret(
            session=session, name_or_id="carol", rotate=True, actor=audit.OPERATOR_CLI
        )
        keys.set_limits(session=session, name_or_id="carol", max_active_tasks=2, actor=audit.OPERATOR_CLI)
        keys.revoke_key(session=session, name_or_id="carol", actor=audit.OPERATOR_CLI)
        keys.revoke_key(session=session, name_or_id="carol", actor=audit.OPERATOR_CLI)  # changes nothing
        with pytest.raises(Exception, match="exists already"):
            keys.create_key(session=session, name="carol", role=ApiKeyRole.USER, actor=audit.OPERATOR_CLI)
        hashed = session.scalars(select(ApiKey.key_hash).where(ApiKey.name == "carol")).one()

    cli = AUDIT_ACTOR_OPERATOR_CLI
    assert _summary(client) == [
        (AuditAction.KEY_CREATED, cli, None, "carol"),
        (AuditAction.KEY_WEBHOOK_SECRET_ROTATED, cli, None, "carol"),
        (AuditAction.KEY_LIMITS_SET, cli, None, "carol"),
        (AuditAction.KEY_REVOKED, cli, None, "carol"),
    ]
    details = {entry["action"]: entry["details"] for entry in _entries(client)}
    assert details[AuditAction.KEY_CREATED] == {"role": "user", "max_priority": 3, "max_active_tasks": None}
    assert details[AuditAction.KEY_LIMITS_SET] == {"max_active_tasks": 2}
    trail = json.dumps(_entries(client))
    key_id, key_secret = key.removeprefix("isk_").split("_", 1)
    for secret in (key, key_secret, hashed, old_secret, new_secret):
        assert secret not in trail
    assert key_id not in trail


def test_an_entry_is_written_in_the_changes_transaction(client: TestClient) -> None:
    """A change whose commit fails leaves neither the change nor its entry: had the entry been
    committed on its own, it would survive the failed change."""
    with client.app.state.session_factory() as session:
        keys.create_key(session=session, name="dave", role=ApiKeyRole.USER)
    before = _count(client)

    def failing_commit() -> None:
        raise OperationalError("COMMIT", {}, Exception("the database went away"))

    with client.app.state.session_factory() as session:
        session.commit = failing_commit  # type: ignore[method-assign]
        with pytest.raises(OperationalError):
            keys.set_limits(session=session, name_or_id="dave", max_priority=1)
        Session.rollback(session)
    with client.app.state.session_factory() as session:
        assert session.scalars(select(ApiKey.max_priority).where(ApiKey.name == "dave")).one() is None
    assert _count(client) == before


def _write(session: Session, at: datetime, actor: str, action: AuditAction, target: str) -> None:
    session.add(
        AuditRecord(at=at, actor=actor, actor_role=None, action=action.value, target=target, details={})
    )


def test_filters_and_paging_newest_first(client: TestClient) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with client.app.state.session_factory() as session:
        for minute in range(7):
            action = AuditAction.CONSUMER_DRAINED if minute % 2 else AuditAction.KEY_CREATED
            actor = "olga" if minute < 4 else "platform"
            _write(session, start + timedelta(minutes=minute), actor, action, f"t{minute}")
        session.commit()

    newest_first = [entry["target"] for entry in _entries(client)]
    assert newest_first == [f"t{minute}" for minute in reversed(range(7))]
    assert [e["target"] for e in _entries(client, action=AuditAction.CONSUMER_DRAINED)] == ["t5", "t3", "t1"]
    assert [e["target"] for e in _entries(client, actor="olga")] == ["t3", "t2", "t1", "t0"]
    assert [e["target"] for e in _entries(client, target="t4")] == ["t4"]
    window = {
        "since": (start + timedelta(minutes=2)).isoformat(),
        "until": (start + timedelta(minutes=5)).isoformat(),
    }
    assert [e["target"] for e in _entries(client, **window)] == ["t4", "t3", "t2"]
    both = _entries(client, actor="olga", action=AuditAction.KEY_CREATED)
    assert [e["target"] for e in both] == ["t2", "t0"]

    paged: list[str] = []
    before_id: int | None = None
    while True:
        page = _entries(client, limit=3, **({} if before_id is None else {"before_id": before_id}))
        if not page:
            break
        assert len(page) <= 3
        paged += [entry["target"] for entry in page]
        before_id = page[-1]["id"]
    assert paged == newest_first


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 1001}, {"action": "model.exploded"}, {"since": "2026-01-01T00:00:00"},
     {"until": "yesterday"}, {"before_id": 0}],
)  # fmt: skip
def test_bad_filters_are_422(client: TestClient, params: dict[str, Any]) -> None:
    response = client.get(PrivateRoutes.AUDIT, params=params)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


def test_only_operators_read_it_and_nothing_changes_it(client: TestClient) -> None:
    public = TestClient(client.app, headers={SERVICE_TOKEN_HEADER: PUBLIC_API_TOKEN})
    assert public.get(PrivateRoutes.AUDIT, headers=OPERATOR).status_code == 200
    for caller in (ALICE, acting_as(None)):
        refused = public.get(PrivateRoutes.AUDIT, headers=caller)
        assert refused.status_code == 403, refused.text
        assert refused.json()["detail"] == "only operator keys may read the audit trail"
    # Append-only: the trail's path answers reads only.
    assert set(client.app.openapi()["paths"][PrivateRoutes.AUDIT]) == {"get"}
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        assert client.request(method, PrivateRoutes.AUDIT).status_code == 405
