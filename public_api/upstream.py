"""The public API's one way to the private API: a pooled httpx client and its error translation.

Transport failures (nothing answered) and upstream HTTP errors (the private API said no) are kept
apart: the first become 502/503/504 here, the second keep their status and detail so a user sees
exactly why the private API refused a request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, Mapping
from typing import Any

import httpx

from inference_server.contract import SERVICE_TOKEN_HEADER
from public_api.config import PublicSettings
from public_api.errors import UpstreamHTTPError, UpstreamUnavailableError


def _detail_of(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        text = " ".join(response.text.split())
        return text[:2000] or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    # Every error body of this API has a text detail, whatever shape the upstream one had.
    return detail if isinstance(detail, str) else json.dumps(detail)


def upstream_error(response: httpx.Response) -> UpstreamHTTPError:
    """The error to answer with for a non-2xx private API response whose body was read."""
    status = response.status_code
    detail = _detail_of(response)
    if status in (401, 403):
        # The caller did nothing wrong: this service's own token was refused.
        return UpstreamHTTPError(502, "the private API refused the public API's service token")
    if status == 503:
        return UpstreamHTTPError(503, f"private API unavailable: {detail}")
    if status >= 500:
        return UpstreamHTTPError(502, f"private API error ({status}): {detail}")
    return UpstreamHTTPError(status, detail)


def _json_of(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise UpstreamHTTPError(502, "private API answered with a body that is not JSON") from exc


class PrivateAPI:
    def __init__(self, client: httpx.AsyncClient, upload_timeout: httpx.Timeout) -> None:
        self._client = client
        self._upload_timeout = upload_timeout

    @classmethod
    def from_settings(cls, settings: PublicSettings) -> PrivateAPI:
        connect = settings.private_api_connect_timeout_s
        timeout = httpx.Timeout(
            connect=connect,
            read=settings.private_api_read_timeout_s,
            write=settings.private_api_read_timeout_s,
            pool=connect,
        )
        upload_timeout = httpx.Timeout(
            connect=connect,
            read=settings.private_api_upload_timeout_s,
            write=settings.private_api_read_timeout_s,
            pool=connect,
        )
        client = httpx.AsyncClient(
            base_url=settings.private_api_url.rstrip("/"),
            headers={SERVICE_TOKEN_HEADER: settings.service_token.get_secret_value()},
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=settings.private_api_max_connections,
                max_keepalive_connections=min(20, settings.private_api_max_connections),
            ),
            # Relayed bodies are zips; decoding is never wanted and redirects are never expected.
            follow_redirects=False,
        )
        return cls(client, upload_timeout)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        """Send without judging the status; only transport failures raise."""
        try:
            return await self._client.send(request, stream=stream)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise UpstreamUnavailableError(503, f"private API unreachable: {exc!r}") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamUnavailableError(504, f"private API did not answer in time: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise UpstreamUnavailableError(502, f"private API connection failed: {exc!r}") from exc

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """A small request whose JSON answer is returned; any non-2xx raises."""
        request = self._client.build_request(method, path, params=params, json=json, headers=headers)
        response = await self.send(request)
        if response.is_error:
            raise upstream_error(response)
        return _json_of(response)

    async def open_stream(
        self, method: str, path: str, *, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """A 2xx response whose body is still unread; the caller must close it."""
        response = await self.send(self._client.build_request(method, path, headers=headers), stream=True)
        if response.is_error:
            try:
                await response.aread()
            finally:
                await response.aclose()
            raise upstream_error(response)
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
        request = self._client.build_request(
            "POST", path, params=params, content=body, headers=headers, timeout=self._upload_timeout
        )
        response = await self.send(request)
        if response.is_error:
            raise upstream_error(response)
        return _json_of(response)

    async def get_unchecked(self, path: str) -> httpx.Response:
        """A GET whose status the caller judges itself (health probes)."""
        return await self.send(self._client.build_request("GET", path))

    async def post_unchecked(self, path: str, *, json: Any) -> httpx.Response:
        """A small POST whose status the caller judges itself (key resolution)."""
        return await self.send(self._client.build_request("POST", path, json=json))
