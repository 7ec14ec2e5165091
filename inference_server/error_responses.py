"""The error answers both APIs give alike; every error body of either is `{"detail": "<text>"}`."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

log = logging.getLogger(__name__)


def error_response(status_code: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"detail": detail}, headers=headers)


def validation_detail(exc: RequestValidationError) -> str:
    """One line naming each problem, e.g. `query priority: Input should be less than or equal to 9`."""
    parts = []
    for problem in exc.errors():
        location = [str(part) for part in problem.get("loc", ())]
        where = f"{' '.join(location[:1])} {'.'.join(location[1:])}".strip()
        message = problem.get("msg", "invalid")
        parts.append(f"{where}: {message}" if where else str(message))
    return "; ".join(parts) or "invalid request"


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, validation_detail(exc))


async def _client_disconnect(request: Request, _exc: Exception) -> JSONResponse:
    # Nobody reads this answer; the handler exists so a dropped upload is not logged as a crash.
    log.info("client went away during %s %s", request.method, request.url.path)
    return error_response(400, "the client disconnected before the request body was complete")


def install_shared_error_handlers(app: FastAPI, *, service_name: str) -> None:
    """A 422 naming each problem for malformed parameters, a 400 for a client gone mid-body, and
    a logged 500 for anything unexpected (a bug): `service_name` says which API failed."""

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error in the {service_name}")

    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, unexpected)
