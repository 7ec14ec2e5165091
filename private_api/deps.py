"""Request dependencies: the service-token guard and the app-wide objects routes need.

They do no blocking work, so they are coroutines: a plain `def` dependency costs a hop to the
thread pool on every request, which at polling rates is most of a request's cost.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import APIKeyHeader

from inference_server.contract import (
    ACTING_OWNER_HEADER,
    ACTING_ROLE_HEADER,
    ANONYMOUS_ROLE,
    CONSUMER_ID_HEADER,
    SERVICE_TOKEN_HEADER,
    ApiKeyRole,
)
from private_api.blobs import BlobStore
from private_api.config import PrivateSettings
from private_api.db import SessionDep
from private_api.exceptions import Unauthorized, Unprocessable
from private_api.metrics import Metrics
from private_api.queue import TaskPublisher
from private_api.service import Actor

__all__ = [
    "ActorDep",
    "BlobsDep",
    "ConsumerIdDep",
    "MetricsDep",
    "PublisherDep",
    "SessionDep",
    "SettingsDep",
    "require_service_token",
]

_token_header = APIKeyHeader(name=SERVICE_TOKEN_HEADER, auto_error=False, description="IS_SERVICE_TOKEN")


async def require_service_token(
    request: Request, token: Annotated[str | None, Security(_token_header)]
) -> None:
    expected: PrivateSettings = request.app.state.settings
    if token is None:
        raise Unauthorized(f"missing {SERVICE_TOKEN_HEADER} header")
    # Constant-time compare, on bytes so a non-ASCII header cannot raise instead of refusing.
    if not secrets.compare_digest(token.encode(), expected.service_token.get_secret_value().encode()):
        raise Unauthorized(f"wrong {SERVICE_TOKEN_HEADER}")


async def _settings(request: Request) -> PrivateSettings:
    return request.app.state.settings


async def _blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


async def _publisher(request: Request) -> TaskPublisher:
    return request.app.state.publisher


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[PrivateSettings, Depends(_settings)]
BlobsDep = Annotated[BlobStore, Depends(_blobs)]
PublisherDep = Annotated[TaskPublisher, Depends(_publisher)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
ConsumerIdDep = Annotated[
    str,
    Header(alias=CONSUMER_ID_HEADER, min_length=1, max_length=255, description="the calling consumer's id"),
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
    """The identity the public API relays a user request for. Trusted because only holders of
    the service token get this far (every router that uses it requires the token)."""
    if role is None:
        if owner is not None:
            raise Unprocessable(f"{ACTING_OWNER_HEADER} was sent without {ACTING_ROLE_HEADER}")
        return None
    if role == ANONYMOUS_ROLE:
        if owner is not None:
            raise Unprocessable(f"an anonymous request cannot name an owner in {ACTING_OWNER_HEADER}")
        return Actor(name=None)
    try:
        key_role = ApiKeyRole(role)
    except ValueError:
        raise Unprocessable(f"unknown {ACTING_ROLE_HEADER} {role!r}") from None
    if not owner:
        raise Unprocessable(f"{ACTING_ROLE_HEADER} {role} needs {ACTING_OWNER_HEADER}")
    return Actor(name=owner, is_operator=key_role == ApiKeyRole.OPERATOR)


ActorDep = Annotated[Actor | None, Depends(_acting)]
