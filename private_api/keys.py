"""API keys: operators create and revoke them (`inference-server keys`), the public API resolves them.

A key reads `isk_<key id>_<secret>`: the 8-character id finds the row and names the key in
listings; the secret is 256 random bits. Only the SHA-256 of the whole key is stored, and the
key is shown once, when it is created.

Why a plain SHA-256 and not bcrypt/argon2: slow, salted hashes exist to make guessing
low-entropy secrets (passwords) from a stolen hash expensive. A 256-bit random secret cannot be
guessed at any hashing speed, so a fast hash loses nothing, and it lets every request be
checked cheaply.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from inference_server.contract import MAX_PRIORITY, ApiKeyRole, AuditAction, Principal
from private_api import audit
from private_api.exceptions import Conflict, NotFound, Unprocessable
from private_api.models import ApiKey, utcnow

log = logging.getLogger(__name__)

KEY_PREFIX = "isk"
SECRET_BYTES = 32
# The secret is token_urlsafe(32): 43 characters of the URL-safe alphabet, which includes "_",
# so the id is taken from the front and the rest is the secret.
KEY_RE = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{8}})_([A-Za-z0-9_-]{{43,128}})$")
# Names travel in an HTTP header (X-Acting-Owner) and label task owners: keep them plain.
KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$"
KEY_NAME_RE = re.compile(KEY_NAME_PATTERN)
# last_used_at is a hint for operators, not an audit log: writing it on every request would
# turn each read into a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)
_ID_ATTEMPTS = 5
# Webhook bodies of a key's tasks are signed with its webhook secret (webhook_signing.py).
WEBHOOK_SECRET_PREFIX = "whsec_"


class ApiKeyInfo(BaseModel):
    """What `keys list` shows about a key: everything but the key."""

    model_config = ConfigDict(from_attributes=True)

    key_id: str
    name: str
    role: ApiKeyRole
    created_at: datetime
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None
    # None: the role's default (see `submission_limits`).
    max_priority: int | None = None
    max_active_tasks: int | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    """A key's webhook secret: 256 random bits, with a prefix that says what it is."""
    return f"{WEBHOOK_SECRET_PREFIX}{secrets.token_urlsafe(SECRET_BYTES)}"


def _new_key() -> tuple[str, str]:
    key_id = secrets.token_hex(4)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"


def _by_name(session: Session, name: str) -> ApiKey | None:
    return session.scalars(select(ApiKey).where(ApiKey.name == name)).first()


def _check_limits(max_priority: int | None, max_active_tasks: int | None) -> None:
    if max_priority is not None and not 0 <= max_priority <= MAX_PRIORITY:
        raise Unprocessable(f"a maximum priority is 0..{MAX_PRIORITY}, not {max_priority}")
    if max_active_tasks is not None and max_active_tasks < 0:
        raise Unprocessable(f"a maximum of active tasks is 0 (unlimited) or more, not {max_active_tasks}")


def create_key(
    *,
    session: Session,
    name: str,
    role: ApiKeyRole,
    max_priority: int | None = None,
    max_active_tasks: int | None = None,
    actor: audit.AuditActor = audit.PLATFORM,
) -> tuple[str, ApiKeyInfo]:
    """A new key for `name`; returns the key itself (its only appearance) and its description.
    Limits left None take the role's default."""
    _check_limits(max_priority, max_active_tasks)
    if not KEY_NAME_RE.match(name):
        raise Unprocessable(
            f"invalid key name {name!r}: use 1-128 letters, digits and . _ @ + - (starting with a "
            "letter or digit)"
        )
    if _by_name(session, name) is not None:
        raise Conflict(f"a key named {name!r} exists already (names are owner labels and stay unique)")
    for _attempt in range(_ID_ATTEMPTS):
        key_id, key = _new_key()
        row = ApiKey(
            key_id=key_id,
            key_hash=hash_key(key),
            name=name,
            role=role,
            created_at=utcnow(),
            max_priority=max_priority,
            max_active_tasks=max_active_tasks,
            webhook_secret=new_webhook_secret(),
        )
        session.add(row)
        try:
            session.flush()
            info = ApiKeyInfo.model_validate(row)
            details = {"role": role.value, "max_priority": max_priority, "max_active_tasks": max_active_tasks}
            audit.record(session, actor, AuditAction.KEY_CREATED, name, details)
            session.commit()
        except IntegrityError:
            session.rollback()
            if _by_name(session, name) is not None:
                raise Conflict(f"a key named {name!r} exists already") from None
            continue  # the 32-bit id collided with another key's: draw again
        log.info("created %s key %r (id %s)", role, name, key_id)
        return key, info
    raise Conflict("could not find a free key id; try again")


def list_keys(*, session: Session) -> list[ApiKeyInfo]:
    rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))
    return [ApiKeyInfo.model_validate(row) for row in rows]


def _by_name_or_id(session: Session, name_or_id: str) -> ApiKey:
    row = session.scalars(
        select(ApiKey).where(or_(ApiKey.name == name_or_id, ApiKey.key_id == name_or_id))
    ).first()
    if row is None:
        raise NotFound(f"no key is named {name_or_id!r} or has that id")
    return row


_UNSET: Any = object()


def set_limits(
    *,
    session: Session,
    name_or_id: str,
    max_priority: int | None = _UNSET,
    max_active_tasks: int | None = _UNSET,
    actor: audit.AuditActor = audit.PLATFORM,
) -> ApiKeyInfo:
    """Change a key's limits; a limit given as None returns to the role's default, one not given
    stays. Takes effect at the key's next submission."""
    row = _by_name_or_id(session, name_or_id)
    _check_limits(
        None if max_priority is _UNSET else max_priority,
        None if max_active_tasks is _UNSET else max_active_tasks,
    )
    if max_priority is not _UNSET:
        row.max_priority = max_priority
    if max_active_tasks is not _UNSET:
        row.max_active_tasks = max_active_tasks
    info = ApiKeyInfo.model_validate(row)
    changed = {"max_priority": max_priority, "max_active_tasks": max_active_tasks}
    details = {field: value for field, value in changed.items() if value is not _UNSET}
    audit.record(session, actor, AuditAction.KEY_LIMITS_SET, row.name, details)
    session.commit()
    log.info("key %r (id %s): max priority %s, max active tasks %s", row.name, row.key_id,
             row.max_priority, row.max_active_tasks)  # fmt: skip
    return info


@dataclass(frozen=True)
class SubmissionLimits:
    """What one submitter may do: the highest priority, and how many pending plus running
    tasks it may hold (0: no limit)."""

    max_priority: int
    max_active_tasks: int


def submission_limits(
    session: Session, *, name: str | None, is_operator: bool, default_max_priority: int,
    default_max_active_tasks: int,
) -> SubmissionLimits:  # fmt: skip
    """The limits of the key named `name` (None: an anonymous caller, who gets a user's default
    priority and no limit on active tasks, since anonymous callers share no identity to count by).
    A key without its own limits gets its role's: the defaults for users, the top priority and no
    limit for operators."""
    row = None if name is None else _by_name(session, name)
    operator = is_operator or (row is not None and row.role == ApiKeyRole.OPERATOR)
    max_priority = MAX_PRIORITY if operator else default_max_priority
    max_active = 0 if operator or name is None else default_max_active_tasks
    if row is not None and row.max_priority is not None:
        max_priority = row.max_priority
    if row is not None and row.max_active_tasks is not None:
        max_active = row.max_active_tasks
    return SubmissionLimits(max_priority=max_priority, max_active_tasks=max_active)


def webhook_secret(
    *, session: Session, name_or_id: str, rotate: bool = False, actor: audit.AuditActor = audit.PLATFORM
) -> tuple[str, ApiKeyInfo]:
    """The key's webhook secret and its description; with `rotate`, a new secret first, which
    signs every delivery from then on (those already queued included)."""
    row = _by_name_or_id(session, name_or_id)
    if rotate:
        row.webhook_secret = new_webhook_secret()
        audit.record(session, actor, AuditAction.KEY_WEBHOOK_SECRET_ROTATED, row.name)
        log.info("rotated the webhook secret of key %r (id %s)", row.name, row.key_id)
    secret, info = row.webhook_secret, ApiKeyInfo.model_validate(row)
    session.commit()
    return secret, info


def revoke_key(*, session: Session, name_or_id: str, actor: audit.AuditActor = audit.PLATFORM) -> ApiKeyInfo:
    """Revoke the key with this name or id; revoking a revoked key changes nothing."""
    row = _by_name_or_id(session, name_or_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit.record(session, actor, AuditAction.KEY_REVOKED, row.name)
        log.info("revoked key %r (id %s)", row.name, row.key_id)
    info = ApiKeyInfo.model_validate(row)
    session.commit()
    return info


def resolve_key(*, session: Session, key: str) -> Principal | None:
    """Whom a presented key belongs to; None for a malformed, unknown or revoked key."""
    match = KEY_RE.match(key)
    if match is None:
        return None
    row = session.scalars(select(ApiKey).where(ApiKey.key_id == match.group(1))).first()
    if row is None or row.revoked_at is not None:
        return None
    if not secrets.compare_digest(row.key_hash, hash_key(key)):
        return None
    principal = Principal(name=row.name, role=row.role)
    now = utcnow()
    if row.last_used_at is not None and row.last_used_at >= now - LAST_USED_RESOLUTION:
        session.rollback()
        return principal
    try:
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == row.id)
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
    except SQLAlchemyError:
        # A busy database must not turn a valid key away over a bookkeeping hint.
        session.rollback()
        log.warning("could not record the use of key %s", row.key_id, exc_info=True)
    return principal


def free_key_name(*, session: Session, base: str) -> str:
    """`base` if no key has that name yet, else the first free `base-<n>` (n = 2, 3, ...)."""
    taken = set(session.scalars(select(ApiKey.name).where(ApiKey.name.startswith(base, autoescape=True))))
    if base not in taken:
        return base
    number = 2
    while f"{base}-{number}" in taken:
        number += 1
    return f"{base}-{number}"
