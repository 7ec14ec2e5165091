"""Serving an API app with uvicorn, the same way for both APIs, and the request guards and
dependencies they share."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.telemetry import TelemetryConfig
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_JSON_BYTES = 1024 * 1024

# Both apps' `FastAPI(telemetry=...)`. The platform's figures are its Prometheus metrics; FastAPI's
# own OpenTelemetry hooks, unused, looked the global providers up in the environment on every
# request (5 % of the public API's CPU under a crowd of long polls).
NO_OPENTELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


class BodyLimitSettings(BaseSettings):
    """IS_MAX_JSON_BYTES, read by both APIs: no JSON body either of them takes comes near 1 MiB."""

    model_config = SettingsConfigDict(env_prefix="IS_", extra="ignore")

    max_json_bytes: int = Field(default=DEFAULT_MAX_JSON_BYTES, ge=1024)


class JsonBodyTooLargeError(HTTPException):
    """A 413; an HTTPException so that FastAPI, which re-raises those while it reads a declared
    body parameter, lets it reach the app's error handlers instead of turning it into a 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the JSON body is larger than the limit of {limit} bytes (IS_MAX_JSON_BYTES)")


def is_json_request(headers: Headers) -> bool:
    """Whether the body would be parsed whole as JSON. FastAPI parses a body without any
    Content-Type as JSON too, so that counts; multipart forms, zips and logs are streamed."""
    content_type = headers.get("content-type")
    if content_type is None:
        return True
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


class JsonBodyLimit:
    """Refuses a JSON request body over `max_bytes` with a 413, holding at most the limit.

    Nothing is checked before the app asks for the body: a caller who is refused first (no key)
    gets that answer, and no byte of the body is read for it. When the app does ask, a declared
    Content-Length over the limit is refused before any byte is received, and a chunked body is
    counted as it arrives.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_json_request(Headers(scope=scope)):
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        limit = self.max_bytes
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            # A malformed Content-Length never gets here: the HTTP server refuses it.
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise JsonBodyTooLargeError(limit)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise JsonBodyTooLargeError(limit)
            return message

        await self.app(scope, limited_receive, send)


def install_json_body_limit(app: FastAPI, max_bytes: int | None = None) -> None:
    """The one line each API's create_app calls; the limit defaults to IS_MAX_JSON_BYTES."""
    app.add_middleware(JsonBodyLimit, max_bytes=max_bytes or BodyLimitSettings().max_json_bytes)


def app_state(name: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency that hands a route `app.state.<name>`, one of the objects create_app builds
    once. A coroutine: a plain `def` dependency costs a thread-pool hop on every request."""

    async def from_app_state(request: Request) -> Any:
        return getattr(request.app.state, name)

    return from_app_state


def serve(
    app: FastAPI, *, host: str, port: int, log_level: str, forwarded_allow_ips: str | None = None
) -> None:
    """`forwarded_allow_ips`: the proxies (addresses or networks, comma-separated) whose
    X-Forwarded-For names the client; None keeps uvicorn's default (FORWARDED_ALLOW_IPS, else
    127.0.0.1). Whatever else connects is the client itself, whatever header it sends."""
    # Everything built so far (the app, its routes and schemas) lives as long as the process:
    # frozen, the collector stops walking it on every full collection, which under polling load
    # showed up as latency spikes.
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # One log line per poll costs more CPU than answering the poll; errors are still logged.
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=forwarded_allow_ips,
    )
