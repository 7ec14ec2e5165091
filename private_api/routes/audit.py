"""The audit trail, read only: no route changes or removes an entry."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from inference_server.contract import (
    AUDIT_PAGE_DEFAULT,
    AUDIT_PAGE_MAX,
    AuditAction,
    AuditEntry,
    IsoTime,
    PrivateRoutes,
)
from private_api import audit
from private_api.deps import SessionDep, require_audit_reader, require_service_token

router = APIRouter(
    tags=["audit"], dependencies=[Depends(require_service_token), Depends(require_audit_reader)]
)


@router.get(PrivateRoutes.AUDIT, response_model=list[AuditEntry])
def list_audit_entries(
    session: SessionDep,
    action: AuditAction | None = None,
    actor: Annotated[str | None, Query(max_length=255)] = None,
    target: Annotated[str | None, Query(max_length=255)] = None,
    since: IsoTime | None = None,
    until: IsoTime | None = None,
    before_id: Annotated[int | None, Query(ge=1)] = None,
    limit: Annotated[int, Query(ge=1, le=AUDIT_PAGE_MAX)] = AUDIT_PAGE_DEFAULT,
) -> list[AuditEntry]:
    return audit.list_entries(
        session=session,
        action=action,
        actor=actor,
        target=target,
        since=since,
        until=until,
        before_id=before_id,
        limit=limit,
    )
