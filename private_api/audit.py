"""The audit trail: who registered, changed and removed models, cancelled and deleted tasks,
created, revoked and limited keys, rotated webhook secrets, drained and resumed consumers.

`record` adds an entry to the caller's session without committing, so the entry commits or
rolls back with the change it records: a refused or failed change leaves none. Entries are
append-only: this module inserts and reads, and nothing in the platform updates or deletes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from inference_server.contract import (
    AUDIT_ACTOR_ANONYMOUS,
    AUDIT_ACTOR_OPERATOR_CLI,
    AUDIT_ACTOR_PLATFORM,
    AUDIT_PAGE_DEFAULT,
    ApiKeyRole,
    AuditAction,
    AuditEntry,
)
from private_api.access import Actor
from private_api.models import AuditRecord, utcnow


@dataclass(frozen=True)
class AuditActor:
    """Who an entry says acted: a key's name and role, or a label with no role."""

    name: str
    role: ApiKeyRole | None = None

    @classmethod
    def of(cls, actor: Actor | None) -> AuditActor:
        """The audit actor of a service call: None is the platform itself (the full-access
        token); an actor without a name an anonymous caller."""
        if actor is None:
            return cls(AUDIT_ACTOR_PLATFORM)
        if actor.name is None:
            return cls(AUDIT_ACTOR_ANONYMOUS)
        return cls(actor.name, ApiKeyRole.OPERATOR if actor.is_operator else ApiKeyRole.USER)


PLATFORM = AuditActor(AUDIT_ACTOR_PLATFORM)
OPERATOR_CLI = AuditActor(AUDIT_ACTOR_OPERATOR_CLI)


def record(
    session: Session,
    actor: AuditActor,
    action: AuditAction,
    target: str,
    details: dict[str, Any] | None = None,
) -> None:
    """Add an entry to `session`'s transaction; the caller's commit writes it with its change.
    `details` must be JSON and must never hold a key or a secret."""
    session.add(
        AuditRecord(
            at=utcnow(),
            actor=actor.name,
            actor_role=actor.role,
            action=action.value,
            target=target,
            details=details or {},
        )
    )


def list_entries(
    *,
    session: Session,
    action: AuditAction | None = None,
    actor: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before_id: int | None = None,
    limit: int = AUDIT_PAGE_DEFAULT,
) -> list[AuditEntry]:
    """Entries matching every filter given, newest first. `before_id` pages on: pass the last
    id of the previous page (ids grow with time, so they order as `at` does and never tie)."""
    statement = select(AuditRecord)
    if action is not None:
        statement = statement.where(AuditRecord.action == action.value)
    if actor is not None:
        statement = statement.where(AuditRecord.actor == actor)
    if target is not None:
        statement = statement.where(AuditRecord.target == target)
    if since is not None:
        statement = statement.where(AuditRecord.at >= since)
    if until is not None:
        statement = statement.where(AuditRecord.at < until)
    if before_id is not None:
        statement = statement.where(AuditRecord.id < before_id)
    rows = session.scalars(statement.order_by(AuditRecord.id.desc()).limit(limit))
    return [AuditEntry.model_validate(row) for row in rows]
