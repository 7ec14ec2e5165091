"""The one place where errors become HTTP answers, always `{"detail": "<text>"}`.

Bad input of any kind is a 4xx with a detail saying what is wrong; only a bug is a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from inference_server.contract import ActingHeadersError
from private_api.exceptions import DomainError

log = logging.getLogger(__name__)


def _body(status_code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"detail": detail}, headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = [str(part) for part in error.get("loc", ())]
        where = f"{' '.join(location[:1])} {'.'.join(location[1:])}".strip()
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return _body(exc.status_code, exc.detail, getattr(exc, "headers", None))


async def _acting_headers_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ActingHeadersError)
    return _body(422, str(exc))


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _body(422, _validation_detail(exc))


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _body(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _client_disconnect(request: Request, _exc: Exception) -> JSONResponse:
    # Nobody reads this answer; the handler exists so a dropped upload is not logged as a crash.
    log.info("client went away during %s %s", request.method, request.url.path)
    return _body(400, "the client disconnected before the request body was complete")


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable during %s %s: %s", request.method, request.url.path, exc)
    return _body(503, "the database is unavailable; try again shortly")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return _body(500, "internal error in the private API")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(ActingHeadersError, _acting_headers_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(OperationalError, _database_unavailable)
    app.add_exception_handler(Exception, _unexpected)
