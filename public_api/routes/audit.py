"""The audit trail (operator keys): who changed models, tasks, keys and consumers, and when."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from inference_server.contract import (
    AUDIT_PAGE_DEFAULT,
    AUDIT_PAGE_MAX,
    AuditAction,
    AuditEntry,
    IsoTime,
    PublicRoutes,
)
from public_api import service
from public_api.deps import OperatorKeyDep, PrivateAPIDep, require_operator_key
from public_api.routes._docs import COMMON_RESPONSES, error

router = APIRouter(tags=["audit"], dependencies=[Depends(require_operator_key)], responses=COMMON_RESPONSES)


@router.get(
    PublicRoutes.AUDIT,
    summary="Read the audit trail (operators)",
    description=(
        "Who registered, changed and removed models, cancelled and deleted tasks, created, revoked "
        "and limited keys, rotated webhook secrets, drained and resumed consumers; newest first. "
        "The trail is append-only. Page on with `before_id` set to the last `id` of a page."
    ),
    response_model=list[AuditEntry],
    responses={403: error("The key is valid but not an operator's.")},
)
async def list_audit_entries(
    api: PrivateAPIDep,
    caller: OperatorKeyDep,
    action: Annotated[AuditAction | None, Query(description="Only this action.")] = None,
    actor: Annotated[
        str | None,
        Query(max_length=255, description="Only entries by this key name, `platform` or `operator CLI`."),
    ] = None,
    target: Annotated[
        str | None,
        Query(max_length=255, description="Only entries about this model id, task uid, key or consumer."),
    ] = None,
    since: Annotated[
        IsoTime | None, Query(description="Only entries at or after this time (ISO 8601).")
    ] = None,
    until: Annotated[IsoTime | None, Query(description="Only entries before this time (ISO 8601).")] = None,
    before_id: Annotated[
        int | None, Query(ge=1, description="Only entries older than this id: the next page.")
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=AUDIT_PAGE_MAX, description="At most this many entries.")
    ] = AUDIT_PAGE_DEFAULT,
) -> list[AuditEntry]:
    filters = {
        "action": action,
        "actor": actor,
        "target": target,
        "since": None if since is None else since.isoformat(),
        "until": None if until is None else until.isoformat(),
        "before_id": before_id,
        "limit": limit,
    }
    return await service.list_audit_entries(api, filters, caller=caller)
