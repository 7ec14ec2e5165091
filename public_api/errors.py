"""Every error the public API answers with, and the one place they become JSON responses."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

logger = logging.getLogger(__name__)


class PublicAPIError(Exception):
    """An answer other than success; `detail` is what the caller reads."""

    def __init__(self, status_code: int, detail: Any) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


class UpstreamUnavailableError(PublicAPIError):
    """The private API could not be reached or did not answer: a transport failure, not a verdict."""


class UpstreamHTTPError(PublicAPIError):
    """The private API answered with an error; 4xx verdicts are passed to the caller unchanged."""


class V12Error(PublicAPIError):
    """One of the 551-554 answers InferenceServer v1.2 clients switch on."""


class UploadTooLargeError(PublicAPIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload is larger than the limit of {limit} bytes")


async def _public_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PublicAPIError)
    if exc.status_code >= 500 and not isinstance(exc, V12Error):
        logger.warning("answering %s: %s", exc.status_code, exc.detail)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


async def _client_disconnect(_request: Request, _exc: Exception) -> JSONResponse:
    # Nobody is left to read this; the status only shows up in logs and metrics.
    return JSONResponse({"detail": "client disconnected before the request body was complete"}, 400)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return JSONResponse({"detail": "internal error in the public API"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(PublicAPIError, _public_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _unexpected)
