"""Who is calling: the API key a request presents, resolved by the private API and kept briefly.

Keys arrive as `Authorization: Bearer <key>` or, from later versions of the original client, as
`X-Token: <key>`. The private API alone knows the keys (stored hashed); this process remembers
each answer for at most `ttl_s` seconds, keyed by the SHA-256 of the key so no key is kept in
memory in the clear, which also bounds how long a revoked key keeps working.
"""

from __future__ import annotations

import hashlib
import time

from fastapi import Request
from pydantic import ValidationError

from inference_server.contract import API_KEY_HEADER, API_KEY_MAX_LENGTH, Principal, PrivateRoutes
from public_api.errors import PublicAPIError, UpstreamHTTPError
from public_api.upstream import PrivateAPI, upstream_error

MISSING_KEY_DETAIL = "an API key is required: send Authorization: Bearer <key>"
INVALID_KEY_DETAIL = "the API key is unknown or was revoked"
# RFC 6750: a bare challenge when no credentials came, invalid_token when they were refused.
MISSING_KEY_HEADERS = {"WWW-Authenticate": "Bearer"}
INVALID_KEY_HEADERS = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


def missing_key() -> PublicAPIError:
    return PublicAPIError(401, MISSING_KEY_DETAIL, MISSING_KEY_HEADERS)


def invalid_key(detail: str = INVALID_KEY_DETAIL) -> PublicAPIError:
    return PublicAPIError(401, detail, INVALID_KEY_HEADERS)


def presented_key(request: Request) -> str | None:
    """The key the request carries, None when it carries none; a malformed attempt is a 401."""
    authorization = request.headers.get("authorization")
    if authorization is not None:
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise invalid_key("unsupported Authorization scheme: send Authorization: Bearer <key>")
        key = credentials.strip()
    else:
        token = request.headers.get(API_KEY_HEADER)
        if token is None:
            return None
        key = token.strip()
    # An empty or oversized key, or one with characters no key has, cannot be valid: refuse
    # it here rather than spend a private API call on it.
    if not key or len(key) > API_KEY_MAX_LENGTH or not key.isascii() or not key.isprintable():
        raise invalid_key()
    return key


class KeyResolver:
    """Asks the private API whom a key belongs to; answers (refusals too) are kept for `ttl_s`."""

    def __init__(self, api: PrivateAPI, ttl_s: float, max_entries: int = 10_000) -> None:
        self._api = api
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def resolve(self, key: str) -> Principal | None:
        """The key's owner, or None for an unknown or revoked key."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        principal = await self._ask(key)
        if self._ttl_s > 0:
            self._remember(digest, now + self._ttl_s, principal)
        return principal

    def forget_all(self) -> None:
        self._cache.clear()

    async def _ask(self, key: str) -> Principal | None:
        response = await self._api.exchange("POST", PrivateRoutes.AUTH_RESOLVE, json={"key": key})
        if response.status_code == 200:
            try:
                return Principal.model_validate(response.json())
            except (ValueError, ValidationError) as exc:
                raise UpstreamHTTPError(502, f"private API answered a key lookup with {exc}") from exc
        # The private API marks "no such key" with a Bearer challenge; a 401 without one means it
        # refused this service's own token, which upstream_error reports as such.
        if response.status_code == 401 and response.headers.get("www-authenticate", "").startswith("Bearer"):
            return None
        raise upstream_error(response)

    def _remember(self, digest: str, expires_at: float, principal: Principal | None) -> None:
        if len(self._cache) >= self._max_entries:
            now = time.monotonic()
            for stale in [name for name, (until, _) in self._cache.items() if until <= now]:
                del self._cache[stale]
            # Still full (a flood of distinct keys): drop the oldest entries, never grow.
            while len(self._cache) >= self._max_entries:
                del self._cache[next(iter(self._cache))]
        self._cache[digest] = (expires_at, principal)
