"""Request dependencies: the service-token guard (which service may call which route) and the
app-wide objects routes need.

They are coroutines: a plain `def` dependency costs a hop to the thread pool on every request,
which at polling rates is most of a request's cost. The one query among them (a consumer's hold
on a task) takes that hop itself, and only for the consumer's token.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import APIKeyHeader
from starlette.concurrency import run_in_threadpool

from inference_server.contract import (
    ACTING_OWNER_HEADER,
    ACTING_ROLE_HEADER,
    ANONYMOUS_ROLE,
    CONSUMER_ID_HEADER,
    CONSUMER_ID_PATTERN,
    SERVICE_TOKEN_HEADER,
    ApiKeyRole,
    PrivateRoutes,
    decode_acting_headers,
)
from inference_server.serving import app_state
from private_api.access import Actor
from private_api.blobs import BlobStore
from private_api.config import PrivateSettings
from private_api.db import SessionDep
from private_api.exceptions import ActorForbidden, Forbidden, Unauthorized, Unprocessable
from private_api.leases import require_holder
from private_api.maintenance import MaintenanceLoop
from private_api.metrics import Metrics
from private_api.queue import TaskPublisher
from private_api.scheduling import SchedulingPolicy
from private_api.uploads import ZipUploads

__all__ = [
    "ROUTE_GRANTS",
    "ActorDep",
    "BlobsDep",
    "ConsumerIdDep",
    "MaintenanceDep",
    "MetricsDep",
    "PublisherDep",
    "SchedulingDep",
    "ServiceRole",
    "ServiceRoleDep",
    "SessionDep",
    "SettingsDep",
    "ZipUploadsDep",
    "require_audit_reader",
    "require_operator_actor",
    "require_service_token",
    "require_task_holder",
]

_token_header = APIKeyHeader(
    name=SERVICE_TOKEN_HEADER,
    auto_error=False,
    description="IS_SERVICE_TOKEN (full access), IS_PUBLIC_API_TOKEN or IS_CONSUMER_TOKEN",
)


class ServiceRole(StrEnum):
    """Who a service token belongs to; it decides which routes the token opens."""

    ADMIN = "admin"  # IS_SERVICE_TOKEN: the platform itself, operators' tools and tests
    PUBLIC_API = "public-api"  # IS_PUBLIC_API_TOKEN
    CONSUMER = "consumer"  # IS_CONSUMER_TOKEN


_PUBLIC_API = frozenset({ServiceRole.PUBLIC_API})
_CONSUMER = frozenset({ServiceRole.CONSUMER})

# The roles besides admin that may call each route, in one table so the whole policy reads in one
# place. A route missing here is admin-only: a new route stays closed to the services until it
# is granted on purpose (tests/private_api/test_tokens.py fails until its rule is written down).
# The public API gets what it relays for users; a consumer only what running a task needs, and
# only on tasks it holds (the service layer checks X-Consumer-Id; require_task_holder for input).
ROUTE_GRANTS: Mapping[tuple[str, str], frozenset[ServiceRole]] = {
    ("GET", PrivateRoutes.HEALTH_READY): _PUBLIC_API,
    # The public API serves the platform's metrics at its /metrics (to operators and Prometheus).
    ("GET", PrivateRoutes.METRICS): _PUBLIC_API,
    ("POST", PrivateRoutes.AUTH_RESOLVE): _PUBLIC_API,
    # Consumers read the list for the models marked warm (a container created ahead for each).
    ("GET", PrivateRoutes.MODELS): _PUBLIC_API | _CONSUMER,
    ("POST", PrivateRoutes.MODELS): _PUBLIC_API,
    ("GET", PrivateRoutes.MODEL): _PUBLIC_API,
    ("PATCH", PrivateRoutes.MODEL): _PUBLIC_API,
    ("DELETE", PrivateRoutes.MODEL): _PUBLIC_API,
    # Model zips are the operators' weights, not patients' data, and a consumer fetches one per
    # model it runs; they are not tied to one task.
    ("GET", PrivateRoutes.MODEL_ZIP): _CONSUMER,
    ("GET", PrivateRoutes.TASKS): _PUBLIC_API,
    ("POST", PrivateRoutes.TASKS): _PUBLIC_API,
    ("GET", PrivateRoutes.TASK): _PUBLIC_API,
    ("DELETE", PrivateRoutes.TASK): _PUBLIC_API,
    ("POST", PrivateRoutes.TASK_CANCEL): _PUBLIC_API,
    # The public API's task watcher: states only, for uids its callers were allowed to read.
    ("POST", PrivateRoutes.TASKS_WAIT): _PUBLIC_API,
    ("GET", PrivateRoutes.TASK_OUTPUT): _PUBLIC_API,
    ("GET", PrivateRoutes.TASK_LOGS): _PUBLIC_API,
    ("GET", PrivateRoutes.TASK_INPUT): _CONSUMER,
    # A chained task's /model: an upstream's output, so patients' data like an input.
    ("GET", PrivateRoutes.TASK_MODEL_FROM): _CONSUMER,
    ("POST", PrivateRoutes.TASK_CLAIM): _CONSUMER,
    ("POST", PrivateRoutes.TASK_HEARTBEAT): _CONSUMER,
    ("POST", PrivateRoutes.TASK_OUTPUT): _CONSUMER,
    ("PUT", PrivateRoutes.TASK_LOGS): _CONSUMER,
    ("POST", PrivateRoutes.TASK_FAIL): _CONSUMER,
    ("POST", PrivateRoutes.TASK_RELEASE): _CONSUMER,
    # Only the holder of the task (result_cache checks X-Consumer-Id): a hit finishes it.
    ("POST", PrivateRoutes.TASK_CACHE_LOOKUP): _CONSUMER,
    ("PUT", PrivateRoutes.CONSUMER): _CONSUMER,
    ("POST", PrivateRoutes.CONSUMER_HEARTBEAT): _CONSUMER,
    # For operator keys only (require_operator_actor): the consumers' hosts are the operators'.
    ("GET", PrivateRoutes.CONSUMERS): _PUBLIC_API,
    ("POST", PrivateRoutes.CONSUMER_DRAIN): _PUBLIC_API,
    ("DELETE", PrivateRoutes.CONSUMER_DRAIN): _PUBLIC_API,
    # For operator keys only (require_audit_reader): who did what, across every user.
    ("GET", PrivateRoutes.AUDIT): _PUBLIC_API,
    # The dashboard's logins, kept here so every public API replica sees a logout or revocation.
    ("POST", PrivateRoutes.SESSIONS): _PUBLIC_API,
    ("POST", PrivateRoutes.SESSION_RESOLVE): _PUBLIC_API,
    ("POST", PrivateRoutes.SESSION_END): _PUBLIC_API,
    # Scoped by the acting caller: a user's task figures count their own tasks only.
    ("GET", PrivateRoutes.OVERVIEW): _PUBLIC_API,
}


def _role_of(token: str, settings: PrivateSettings) -> ServiceRole | None:
    presented = token.encode()  # bytes: a non-ASCII header cannot raise instead of refusing
    candidates = (
        (ServiceRole.ADMIN, settings.service_token),
        (ServiceRole.PUBLIC_API, settings.public_api_token),
        (ServiceRole.CONSUMER, settings.consumer_token),
    )
    found = None
    # Every configured token is compared, each in constant time, so the time taken does not
    # tell which role (if any) a guess came close to.
    for role, secret in candidates:
        if secret is not None and secrets.compare_digest(presented, secret.get_secret_value().encode()):
            found = role
    return found


async def require_service_token(
    request: Request, token: Annotated[str | None, Security(_token_header)]
) -> ServiceRole:
    """401 for a missing or unknown token, 403 for a known one whose role lacks this route."""
    settings: PrivateSettings = request.app.state.settings
    if token is None:
        raise Unauthorized(f"missing {SERVICE_TOKEN_HEADER} header")
    role = _role_of(token, settings)
    if role is None:
        raise Unauthorized(f"wrong {SERVICE_TOKEN_HEADER}")
    if role == ServiceRole.ADMIN:
        return role
    # The matched route's template ("/tasks/{uid}"), as ROUTE_GRANTS names it; without one the
    # concrete path matches no rule, so nothing is granted.
    route = request.scope.get("route")
    path = getattr(route, "path", request.url.path)
    if role not in ROUTE_GRANTS.get((request.method, path), frozenset()):
        raise Forbidden(f"the {role} service token may not call {request.method} {path}")
    return role


ServiceRoleDep = Annotated[ServiceRole, Depends(require_service_token)]


SettingsDep = Annotated[PrivateSettings, Depends(app_state("settings"))]
BlobsDep = Annotated[BlobStore, Depends(app_state("blobs"))]
PublisherDep = Annotated[TaskPublisher, Depends(app_state("publisher"))]
MetricsDep = Annotated[Metrics, Depends(app_state("metrics"))]
SchedulingDep = Annotated[SchedulingPolicy, Depends(app_state("scheduling"))]
MaintenanceDep = Annotated[MaintenanceLoop, Depends(app_state("maintenance"))]


async def _zip_uploads(request: Request, blobs: BlobsDep, settings: SettingsDep) -> ZipUploads:
    # Routes close their session before receiving, so no connection is held while a body streams in.
    return ZipUploads(request, blobs, settings.max_upload_bytes)


ZipUploadsDep = Annotated[ZipUploads, Depends(_zip_uploads)]
ConsumerIdDep = Annotated[
    str,
    Header(alias=CONSUMER_ID_HEADER, pattern=CONSUMER_ID_PATTERN, description="the calling consumer's id"),
]


async def _acting(
    owner: Annotated[
        str | None,
        Header(alias=ACTING_OWNER_HEADER, max_length=255, description="the key name the request acts for"),
    ] = None,
    role: Annotated[
        str | None,
        Header(
            alias=ACTING_ROLE_HEADER,
            description=f"{', '.join(ApiKeyRole)} or {ANONYMOUS_ROLE}; absent: the platform itself",
        ),
    ] = None,
) -> Actor | None:
    """The identity the public API relays a user request for. Trusted because only the public
    API's and the full-access tokens get this far: every router that uses it requires a token,
    and the consumer's is granted none of these routes but its holder-checked input download.
    (Declared as headers so /docs shows them; inconsistent ones raise ActingHeadersError, a 422.)"""
    sent = {ACTING_OWNER_HEADER: owner, ACTING_ROLE_HEADER: role}
    acting = decode_acting_headers({name: value for name, value in sent.items() if value is not None})
    return None if acting is None else Actor.acting_for(acting.principal)


ActorDep = Annotated[Actor | None, Depends(_acting)]


async def require_task_holder(
    uid: str,
    role: ServiceRoleDep,
    session: SessionDep,
    consumer_id: Annotated[
        str | None,
        Header(
            alias=CONSUMER_ID_HEADER, pattern=CONSUMER_ID_PATTERN, description="the calling consumer's id"
        ),
    ] = None,
) -> None:
    """A consumer reads a task's data only while it holds the task: the inputs are patients'
    data and the consumer token is shared by every consumer host. Other roles pass."""
    if role != ServiceRole.CONSUMER:
        return
    if not consumer_id:
        raise Unprocessable(f"the consumer token needs {CONSUMER_ID_HEADER} on this route")
    await run_in_threadpool(require_holder, session=session, uid=uid, consumer_id=consumer_id)


async def require_operator_actor(actor: ActorDep) -> None:
    """Only for an operator key when a request is relayed for one; the platform itself (no acting
    headers) always passes."""
    if actor is not None and not actor.is_operator:
        raise ActorForbidden("only operator keys may see and drain consumers")


async def require_audit_reader(actor: ActorDep) -> None:
    """The audit trail is for operator keys when relayed for one (it names every user's
    actions); the platform itself (no acting headers) always passes."""
    if actor is not None and not actor.is_operator:
        raise ActorForbidden("only operator keys may read the audit trail")
