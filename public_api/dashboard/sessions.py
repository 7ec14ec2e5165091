"""Dashboard sessions on the public API's side: the cookie, a short cache of resolved sessions,
and the CSRF check every action passes.

The private API alone knows sessions (stored hashed). Like KeyResolver, this process remembers an
answer for a few seconds, keyed by the token's SHA-256 so no token is kept in the clear; a
logout here forgets it at once, elsewhere within the cache's lifetime.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from datetime import UTC, datetime

from fastapi import Request
from starlette.responses import Response

from inference_server.contract import (
    DASHBOARD_CSRF_FIELD,
    DASHBOARD_CSRF_HEADER,
    DASHBOARD_SESSION_COOKIE,
    DASHBOARD_TOKEN_MAX_LENGTH,
    DashboardSession,
    PublicRoutes,
)
from public_api import service
from public_api.errors import PublicAPIError
from public_api.upstream import PrivateAPI

NO_SESSION_DETAIL = "log in to the dashboard first (the session is missing, ended or expired)"
CSRF_DETAIL = (
    f"the request lacks this session's CSRF token (form field {DASHBOARD_CSRF_FIELD} or header "
    f"{DASHBOARD_CSRF_HEADER}); reload the page and try again"
)


class NoSessionError(PublicAPIError):
    """The request carries no live session: pages send the browser to the login page."""

    def __init__(self) -> None:
        super().__init__(401, NO_SESSION_DETAIL)


class DashboardSessionCache:
    """Resolved sessions (and refusals) for `ttl_s` seconds, at most `max_entries` of them."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._entries: dict[str, tuple[float, DashboardSession | None]] = {}

    async def resolve(self, api: PrivateAPI, token: str) -> DashboardSession | None:
        digest = _digest(token)
        now = time.monotonic()
        cached = self._entries.get(digest)
        if cached is not None and cached[0] > now:
            session = cached[1]
        else:
            session = await service.resolve_dashboard_session(api, token)
            if self._ttl_s > 0:
                self._remember(digest, now + self._ttl_s, session)
        # A cached session still ends on time.
        if session is not None and session.expires_at <= datetime.now(UTC):
            return None
        return session

    def forget(self, token: str) -> None:
        self._entries.pop(_digest(token), None)

    def _remember(self, digest: str, until: float, session: DashboardSession | None) -> None:
        if len(self._entries) >= self._max_entries:
            now = time.monotonic()
            for stale in [name for name, (expiry, _) in self._entries.items() if expiry <= now]:
                del self._entries[stale]
            while len(self._entries) >= self._max_entries:
                del self._entries[next(iter(self._entries))]
        self._entries[digest] = (until, session)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def session_token(request: Request) -> str | None:
    """The cookie's token when it could be one; anything else is no session at all."""
    token = request.cookies.get(DASHBOARD_SESSION_COOKIE)
    if not token or len(token) > DASHBOARD_TOKEN_MAX_LENGTH or not token.isascii() or not token.isprintable():
        return None
    return token


async def current_session(request: Request) -> DashboardSession:
    """The request's live session, or NoSessionError."""
    token = session_token(request)
    if token is None:
        raise NoSessionError()
    cache: DashboardSessionCache = request.app.state.dashboard_sessions
    session = await cache.resolve(request.app.state.private_api, token)
    if session is None:
        raise NoSessionError()
    return session


def check_csrf(request: Request, session: DashboardSession, form_value: str | None) -> None:
    """Refuses (403) an action that does not echo the session's CSRF token, compared in constant time."""
    presented = request.headers.get(DASHBOARD_CSRF_HEADER) or form_value or ""
    if not hmac.compare_digest(presented.encode(), session.csrf_token.encode()):
        raise PublicAPIError(403, CSRF_DETAIL)


def set_session_cookie(request: Request, response: Response, token: str, expires_at: datetime) -> None:
    # Secure when the browser came over HTTPS: behind Traefik uvicorn takes the scheme from
    # X-Forwarded-Proto, trusted from IS_FORWARDED_ALLOW_IPS only.
    response.set_cookie(
        DASHBOARD_SESSION_COOKIE,
        token,
        max_age=max(1, int((expires_at - datetime.now(UTC)).total_seconds())),
        path=PublicRoutes.DASHBOARD,
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )


def clear_session_cookie(request: Request, response: Response) -> None:
    response.delete_cookie(
        DASHBOARD_SESSION_COOKIE,
        path=PublicRoutes.DASHBOARD,
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
