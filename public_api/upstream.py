"""The public API's one way to the private API: pooled clients and their error translation.

Transport failures (nothing answered) and upstream HTTP errors (the private API said no) are kept
apart: the first become 502/503/504 here, the second keep their status and detail so a user sees
exactly why the private API refused a request.

Two clients, two pools. Small JSON calls (status polls, lists, key checks) go through aiohttp,
behind a gate of `private_api_concurrency` slots: profiled under 200 polling clients, httpx's
connection pool bookkeeping was most of the public API's CPU, and polls queued inside it ended in
pool timeouts; aiohttp's C parser and a plain semaphore cost a fraction of that. Streamed bodies
(uploads, downloads) go through httpx, in a pool of their own, so a hundred slow downloads never
make a status poll wait for a connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import aiohttp
import httpx

from inference_server.contract import ACTOR_REFUSED_HEADER, SERVICE_TOKEN_HEADER, error_detail
from public_api.config import PublicSettings
from public_api.errors import UpstreamHTTPError, UpstreamUnavailableError


@dataclass(frozen=True)
class Reply:
    """A whole private API answer: status, headers (case-insensitive mapping) and body."""

    status_code: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def is_error(self) -> bool:
        return self.status_code >= 400

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class SmallRequestOptions(TypedDict, total=False):
    """The optional parts of a small request, as PrivateAPI.exchange takes them."""

    params: Mapping[str, Any] | None
    json: Any
    headers: Mapping[str, str] | None


def upstream_error(reply: Reply) -> UpstreamHTTPError:
    """The error to answer with for a non-2xx private API answer."""
    status = reply.status_code
    detail = error_detail(reply.body, fallback=f"HTTP {status}")
    if status == 403 and reply.headers.get(ACTOR_REFUSED_HEADER):
        return UpstreamHTTPError(403, detail)
    if status in (401, 403):
        # The caller did nothing wrong: this service's own token was refused.
        return UpstreamHTTPError(502, "the private API refused the public API's service token")
    if status == 503:
        return UpstreamHTTPError(503, f"private API unavailable: {detail}")
    if status >= 500:
        return UpstreamHTTPError(502, f"private API error ({status}): {detail}")
    if status == 429 and reply.headers.get("Retry-After"):
        # A limit of the caller's key (active tasks): when to try again is for the caller.
        return UpstreamHTTPError(status, detail, {"Retry-After": reply.headers["Retry-After"]})
    return UpstreamHTTPError(status, detail)


def checked(reply: Reply) -> Reply:
    """The reply itself when it is a 2xx; otherwise the error to answer with is raised."""
    if reply.is_error:
        raise upstream_error(reply)
    return reply


def _json_of(reply: Reply) -> Any:
    try:
        return reply.json()
    except ValueError as exc:
        raise UpstreamHTTPError(502, "private API answered with a body that is not JSON") from exc


def _query(params: Mapping[str, Any] | None) -> dict[str, str] | None:
    if params is None:
        return None
    # Enum members (str subclasses) go out as their value, like every other client sends them.
    return {name: value.value if hasattr(value, "value") else str(value) for name, value in params.items()}


class PrivateAPI:
    def __init__(self, settings: PublicSettings) -> None:
        """Needs a running event loop (aiohttp binds its session to it): build it in the lifespan."""
        self._base_url = settings.private_api_url.rstrip("/")
        token = {SERVICE_TOKEN_HEADER: settings.service_token.get_secret_value()}
        connect = settings.private_api_connect_timeout_s
        concurrency = settings.private_api_concurrency
        self._queue_timeout_s = connect
        self._slots = asyncio.Semaphore(concurrency)
        self._small = aiohttp.ClientSession(
            headers=token,
            # One connection per slot, all kept alive: reconnecting per request costs both sides.
            connector=aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=connect, sock_read=settings.private_api_read_timeout_s
            ),
            auto_decompress=False,
            raise_for_status=False,
        )
        self._streams = httpx.AsyncClient(
            base_url=self._base_url,
            headers=token,
            timeout=httpx.Timeout(
                connect=connect,
                read=settings.private_api_read_timeout_s,
                write=settings.private_api_read_timeout_s,
                pool=connect,
            ),
            limits=httpx.Limits(
                max_connections=settings.private_api_max_connections,
                max_keepalive_connections=min(20, settings.private_api_max_connections),
            ),
            # Relayed bodies are zips; decoding is never wanted and redirects are never expected.
            follow_redirects=False,
        )
        self._upload_timeout = httpx.Timeout(
            connect=connect,
            read=settings.private_api_upload_timeout_s,
            write=settings.private_api_read_timeout_s,
            pool=connect,
        )

    async def aclose(self) -> None:
        try:
            await self._small.close()
        finally:
            await self._streams.aclose()

    # --- small calls -------------------------------------------------------------------------

    async def exchange(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """A small request and its whole answer, whatever the status; only transport failures raise."""
        try:
            async with asyncio.timeout(self._queue_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise UpstreamUnavailableError(
                503, f"the public API is busy: no slot to the private API within {self._queue_timeout_s} s"
            ) from None
        try:
            async with self._small.request(
                method, self._base_url + path, params=_query(params), json=json, headers=headers
            ) as response:
                return Reply(response.status, response.headers, await response.read())
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnavailableError(503, f"private API unreachable: {exc}") from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamUnavailableError(503, f"private API unreachable: connect timeout ({exc})") from exc
        except TimeoutError as exc:
            raise UpstreamUnavailableError(504, "private API did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailableError(502, f"private API connection failed: {exc!r}") from exc
        finally:
            self._slots.release()

    async def call(self, method: str, path: str, **options: Unpack[SmallRequestOptions]) -> Any:
        """A small request (`options` as for `exchange`) whose JSON answer is returned; any non-2xx raises."""
        return _json_of(checked(await self.exchange(method, path, **options)))

    # --- streamed bodies ---------------------------------------------------------------------

    async def _send_stream(self, request: httpx.Request, *, stream: bool) -> httpx.Response:
        try:
            return await self._streams.send(request, stream=stream)
        except httpx.PoolTimeout as exc:
            raise UpstreamUnavailableError(
                503, "the public API is busy: every connection for transfers to the private API is in use"
            ) from exc
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise UpstreamUnavailableError(503, f"private API unreachable: {exc!r}") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamUnavailableError(504, f"private API did not answer in time: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailableError(502, f"private API connection failed: {exc!r}") from exc

    @staticmethod
    async def _whole(response: httpx.Response) -> Reply:
        try:
            body = await response.aread()
        except httpx.TransportError as exc:
            raise UpstreamUnavailableError(502, f"private API connection failed: {exc!r}") from exc
        finally:
            await response.aclose()
        return Reply(response.status_code, response.headers, body)

    async def open_stream(
        self, method: str, path: str, *, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """A 2xx response whose body is still unread; the caller must close it."""
        request = self._streams.build_request(method, path, headers=headers)
        response = await self._send_stream(request, stream=True)
        if response.is_error:
            raise upstream_error(await self._whole(response))
        return response

    async def upload(
        self,
        path: str,
        *,
        params: Mapping[str, Any],
        body: AsyncIterable[bytes] | None,
        headers: Mapping[str, str],
    ) -> Any:
        """Send a request body chunk by chunk as it arrives; the JSON answer is returned."""
        request = self._streams.build_request(
            "POST", path, params=params, content=body, headers=headers, timeout=self._upload_timeout
        )
        return _json_of(checked(await self._whole(await self._send_stream(request, stream=True))))
