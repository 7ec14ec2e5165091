"""GET /api/audit: operator keys read who did what through the public API, with filters and
paging; user keys are refused (403) and callers without a key too (401), whatever the anonymous
switches say."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from inference_server.contract import ApiKeyRole, AuditAction, AuditEntry, PublicRoutes
from tests.helpers import make_zip
from tests.public_api.stack import PrivateStack, register_model, shared_http, start_public_api


@pytest.fixture(scope="module")
def urls(private_api: PrivateStack) -> Iterator[dict[str, str]]:
    """A public API with the anonymous switches off and one with both on."""
    strict = start_public_api(private_api.url, anonymous_tasks=False, anonymous_models=False)
    open_ = start_public_api(private_api.url, anonymous_tasks=True, anonymous_models=True)
    try:
        yield {"strict": strict.url, "open": open_.url}
    finally:
        strict.stop()
        open_.stop()


@pytest.fixture(scope="module")
def names() -> dict[str, str]:
    suffix = secrets.token_hex(3)
    return {"operator": f"operator-{suffix}", "user": f"user-{suffix}"}


@pytest.fixture(scope="module")
def keys(private_api: PrivateStack, names: dict[str, str]) -> dict[str, dict[str, str]]:
    operator = private_api.create_key(names["operator"], ApiKeyRole.OPERATOR)
    user = private_api.create_key(names["user"])
    return {
        "operator": {"Authorization": f"Bearer {operator}"},
        "user": {"Authorization": f"Bearer {user}"},
        "anonymous": {},
    }


def _audit(base: str, headers: dict[str, str], **params: Any) -> httpx.Response:
    return shared_http().get(base + PublicRoutes.AUDIT, params=params, headers=headers)


def _entries(base: str, headers: dict[str, str], **params: Any) -> list[AuditEntry]:
    response = _audit(base, headers, **params)
    assert response.status_code == 200, response.text
    return [AuditEntry.model_validate(entry) for entry in response.json()]


def _submit(base: str, model_id: str, headers: dict[str, str]) -> str:
    files = {"zip_file": ("input.zip", make_zip({"input.txt": b"hello"}), "application/zip")}
    response = shared_http().post(
        base + PublicRoutes.TASKS, params={"model_human_readable_id": model_id}, files=files, headers=headers
    )
    assert response.status_code == 200, response.text
    return str(response.json())


def test_changes_through_the_public_api_are_read_back_by_operators(
    urls: dict[str, str], keys: dict[str, dict[str, str]], names: dict[str, str]
) -> None:
    base, operator, user = urls["strict"], keys["operator"], keys["user"]
    model_id = register_model(base, headers=operator)
    uid = _submit(base, model_id, user)
    cancelled = shared_http().post(base + PublicRoutes.TASK_CANCEL.format(uid=uid), headers=user)
    assert cancelled.status_code == 200, cancelled.text
    deleted = shared_http().delete(base + PublicRoutes.TASK.format(uid=uid), headers=operator)
    assert deleted.status_code == 200, deleted.text

    mine = [entry for entry in _entries(base, operator) if entry.target in (model_id, uid)]
    assert [(entry.action, entry.actor, entry.actor_role, entry.target) for entry in mine] == [
        (AuditAction.TASK_DELETED, names["operator"], ApiKeyRole.OPERATOR, uid),
        (AuditAction.TASK_CANCELLED, names["user"], ApiKeyRole.USER, uid),
        (AuditAction.MODEL_REGISTERED, names["operator"], ApiKeyRole.OPERATOR, model_id),
    ]
    # The filters reach the private API.
    by_user = _entries(base, operator, actor=names["user"])
    assert [(entry.action, entry.target) for entry in by_user] == [(AuditAction.TASK_CANCELLED, uid)]
    assert [entry.target for entry in _entries(base, operator, target=uid, action="task.deleted")] == [uid]
    first, second = _entries(base, operator, limit=2)
    assert first.id > second.id
    assert _entries(base, operator, before_id=first.id, limit=1) == [second]
    since = _entries(base, operator, since=mine[0].at.isoformat(), target=uid)
    assert [entry.action for entry in since] == [AuditAction.TASK_DELETED]
    assert _audit(base, operator, limit=1001).status_code == 422
    assert _audit(base, operator, action="task.exploded").status_code == 422


@pytest.mark.parametrize("switches", ["strict", "open"])
@pytest.mark.parametrize(("who", "status"), [("user", 403), ("anonymous", 401)])
def test_others_are_refused(
    urls: dict[str, str], keys: dict[str, dict[str, str]], switches: str, who: str, status: int
) -> None:
    answer = _audit(urls[switches], keys[who])
    assert answer.status_code == status, answer.text
    assert isinstance(answer.json()["detail"], str)
    if status == 403:
        assert "audit trail" in answer.json()["detail"]
