"""Every error the public API answers with, and where they become `{"detail": "<text>"}` (the
answers both APIs give alike: inference_server.error_responses)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from inference_server.error_responses import error_response, install_shared_error_handlers

logger = logging.getLogger(__name__)


class PublicAPIError(Exception):
    """An answer other than success; `detail` is what the caller reads."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


class UpstreamUnavailableError(PublicAPIError):
    """The private API could not be reached or did not answer: a transport failure, not a verdict."""


class UpstreamHTTPError(PublicAPIError):
    """The private API answered with an error; 4xx verdicts are passed to the caller unchanged."""


class V12Error(PublicAPIError):
    """One of the 551-554 answers InferenceServer v1.2 clients switch on."""


class UploadTooLargeError(PublicAPIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload is larger than the limit of {limit} bytes")


class TooManyFailuresError(PublicAPIError):
    """The caller's address failed the key check too often; it may try again after `retry_after_s`."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            429,
            "too many requests without a valid API key from this address; "
            f"try again in {retry_after_s} s (IS_UNAUTHENTICATED_RATE_PER_MINUTE)",
            {"Retry-After": str(retry_after_s)},
        )


async def _public_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PublicAPIError)
    if exc.status_code >= 500 and not isinstance(exc, V12Error):
        logger.warning("answering %s: %s", exc.status_code, exc.detail)
    return error_response(exc.status_code, exc.detail, exc.headers)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette's own 405 names only the methods of
    the first route whose path matched, while several routes may share a path (GET and DELETE
    /api/tasks/{uid}); RFC 9110 asks for all of them."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    return error_response(exc.status_code, str(exc.detail), headers or None)


def install_error_handlers(app: FastAPI) -> None:
    install_shared_error_handlers(app, service_name="public API")
    app.add_exception_handler(PublicAPIError, _public_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
