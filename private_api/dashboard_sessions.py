"""Dashboard sessions: a person logs in to the dashboard with an API key once, and the public API
keeps only a session token in a cookie.

Sessions live here, in the database, so that logging out or revoking the key ends a session on
every public API replica at once. The token is drawn by `secrets` and stored only as its SHA-256,
like API keys; each session has its own CSRF token, which the dashboard's actions must echo.
Expired rows are deleted by the maintenance loop (`prune_expired`).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from inference_server.contract import DashboardSession, DashboardSessionCreated, Principal
from private_api import keys
from private_api.models import ApiKey, DashboardSessionRecord, utcnow

# 32 random bytes, URL-safe: 43 characters, well within DASHBOARD_TOKEN_MAX_LENGTH.
TOKEN_BYTES = 32
CSRF_TOKEN_BYTES = 32


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(*, session: Session, key: str, lifetime: timedelta) -> DashboardSessionCreated | None:
    """A new session for the owner of `key`, resolved exactly as POST /auth/resolve resolves it;
    None for a malformed, unknown or revoked key."""
    principal = keys.resolve_key(session=session, key=key)
    if principal is None:
        return None
    key_row = session.scalars(select(ApiKey).where(ApiKey.name == principal.name)).one()
    token = secrets.token_urlsafe(TOKEN_BYTES)
    now = utcnow()
    record = DashboardSessionRecord(
        token_sha256=token_sha256(token),
        api_key_id=key_row.id,
        csrf_token=secrets.token_urlsafe(CSRF_TOKEN_BYTES),
        created_at=now,
        expires_at=now + lifetime,
    )
    session.add(record)
    session.commit()
    return DashboardSessionCreated(
        principal=principal, csrf_token=record.csrf_token, expires_at=record.expires_at, token=token
    )


def resolve(*, session: Session, token: str) -> DashboardSession | None:
    """Whom the session `token` acts for; None when it is unknown, ended or expired, or its key
    was revoked since the login."""
    record = session.scalars(
        select(DashboardSessionRecord).where(DashboardSessionRecord.token_sha256 == token_sha256(token))
    ).first()
    if record is None or record.expires_at <= utcnow() or record.api_key.revoked_at is not None:
        return None
    key_row = record.api_key
    return DashboardSession(
        principal=Principal(name=key_row.name, role=key_row.role),
        csrf_token=record.csrf_token,
        expires_at=record.expires_at,
    )


def end(*, session: Session, token: str) -> None:
    """Logs the session out; an unknown or already ended one is no error (logout is idempotent)."""
    session.execute(
        delete(DashboardSessionRecord).where(DashboardSessionRecord.token_sha256 == token_sha256(token))
    )
    session.commit()


def prune_expired(*, session: Session) -> int:
    """Deletes the sessions past their expiry; how many."""
    result = session.execute(
        delete(DashboardSessionRecord).where(DashboardSessionRecord.expires_at <= utcnow())
    )
    session.commit()
    return int(getattr(result, "rowcount", 0) or 0)
