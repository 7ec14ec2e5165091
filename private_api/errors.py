"""Where errors become HTTP answers, always `{"detail": "<text>"}`: the private API's own here, the
ones both APIs answer alike in inference_server.error_responses.

Bad input of any kind is a 4xx with a detail saying what is wrong; only a bug is a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference_server.contract import ActingHeadersError
from inference_server.error_responses import error_response, install_shared_error_handlers
from private_api.exceptions import DomainError

log = logging.getLogger(__name__)


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return error_response(exc.status_code, exc.detail, getattr(exc, "headers", None))


async def _acting_headers_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ActingHeadersError)
    return error_response(422, str(exc))


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable during %s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "the database is unavailable; try again shortly")


def install_error_handlers(app: FastAPI) -> None:
    install_shared_error_handlers(app, service_name="private API")
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(ActingHeadersError, _acting_headers_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_unavailable)
