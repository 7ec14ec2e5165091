"""Request dependencies: the service-token guard and the app-wide objects routes need."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import APIKeyHeader

from inference_server.contract import CONSUMER_ID_HEADER, SERVICE_TOKEN_HEADER
from private_api.blobs import BlobStore
from private_api.config import PrivateSettings
from private_api.db import SessionDep
from private_api.exceptions import Unauthorized
from private_api.metrics import Metrics
from private_api.queue import TaskPublisher

__all__ = [
    "BlobsDep",
    "ConsumerIdDep",
    "MetricsDep",
    "PublisherDep",
    "SessionDep",
    "SettingsDep",
    "require_service_token",
]

_token_header = APIKeyHeader(name=SERVICE_TOKEN_HEADER, auto_error=False, description="IS_SERVICE_TOKEN")


def require_service_token(request: Request, token: Annotated[str | None, Security(_token_header)]) -> None:
    expected: PrivateSettings = request.app.state.settings
    if token is None:
        raise Unauthorized(f"missing {SERVICE_TOKEN_HEADER} header")
    # Constant-time compare, on bytes so a non-ASCII header cannot raise instead of refusing.
    if not secrets.compare_digest(token.encode(), expected.service_token.get_secret_value().encode()):
        raise Unauthorized(f"wrong {SERVICE_TOKEN_HEADER}")


def _settings(request: Request) -> PrivateSettings:
    return request.app.state.settings


def _blobs(request: Request) -> BlobStore:
    return request.app.state.blobs


def _publisher(request: Request) -> TaskPublisher:
    return request.app.state.publisher


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[PrivateSettings, Depends(_settings)]
BlobsDep = Annotated[BlobStore, Depends(_blobs)]
PublisherDep = Annotated[TaskPublisher, Depends(_publisher)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
ConsumerIdDep = Annotated[
    str,
    Header(alias=CONSUMER_ID_HEADER, min_length=1, max_length=255, description="the calling consumer's id"),
]
