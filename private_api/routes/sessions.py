"""Dashboard sessions, for the public API's dashboard: log in with a key, resolve a session's
token on each page, log out. Tokens travel in bodies only, so no access log records one."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from inference_server.contract import (
    DashboardLogin,
    DashboardSession,
    DashboardSessionCreated,
    DashboardSessionToken,
    ErrorBody,
    PrivateRoutes,
)
from private_api import dashboard_sessions
from private_api.deps import SessionDep, SettingsDep, require_service_token
from private_api.routes.auth import UNKNOWN_KEY_HEADERS

router = APIRouter(tags=["dashboard sessions"], dependencies=[Depends(require_service_token)])


def _refused(detail: str) -> JSONResponse:
    # The Bearer challenge tells this 401 apart from a refused service token (auth.py).
    return JSONResponse(status_code=401, content={"detail": detail}, headers=UNKNOWN_KEY_HEADERS)


@router.post(
    PrivateRoutes.SESSIONS,
    status_code=201,
    response_model=DashboardSessionCreated,
    responses={401: {"model": ErrorBody, "description": "Unknown, revoked or malformed key."}},
)
def create_session(
    body: DashboardLogin, session: SessionDep, settings: SettingsDep
) -> DashboardSessionCreated | JSONResponse:
    created = dashboard_sessions.create(
        session=session, key=body.key, lifetime=timedelta(hours=settings.dashboard_session_hours)
    )
    return _refused("unknown or revoked API key") if created is None else created


@router.post(
    PrivateRoutes.SESSION_RESOLVE,
    response_model=DashboardSession,
    responses={
        401: {"model": ErrorBody, "description": "Unknown, ended or expired session, or key revoked."}
    },
)
def resolve_session(body: DashboardSessionToken, session: SessionDep) -> DashboardSession | JSONResponse:
    resolved = dashboard_sessions.resolve(session=session, token=body.token)
    return _refused("the session is unknown, ended or expired") if resolved is None else resolved


@router.post(PrivateRoutes.SESSION_END, status_code=204, response_class=Response)
def end_session(body: DashboardSessionToken, session: SessionDep) -> Response:
    dashboard_sessions.end(session=session, token=body.token)
    return Response(status_code=204)
