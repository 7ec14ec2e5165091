"""Moving bodies between the caller and the private API chunk by chunk, never whole.

Uploads: the caller's raw request body (the multipart form, unparsed) is handed to httpx as an
async iterator, so each chunk leaves for the private API as it arrives. Downloads: the private
API's response is opened in stream mode and its raw chunks are written to the caller.
Back-pressure on both sockets keeps memory bounded however large the zip.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import Request
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from public_api.errors import PublicAPIError, UploadTooLargeError

logger = logging.getLogger(__name__)

_RELAYED_RESPONSE_HEADERS = ("content-length", "content-disposition", "content-encoding")


@dataclass(frozen=True)
class UploadBody:
    """The caller's request body, ready to forward: headers to send and the chunks, if any."""

    headers: dict[str, str]
    chunks: AsyncIterator[bytes] | None


def upload_body(request: Request, limit: int) -> UploadBody:
    """Check the declared size up front and count the real one while it streams."""
    headers: dict[str, str] = {}
    content_type = request.headers.get("content-type")
    if content_type:
        headers["content-type"] = content_type
    declared = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise PublicAPIError(400, "Content-Length is not a number") from None
        if length < 0:
            raise PublicAPIError(400, "Content-Length is negative")
        if length > limit:
            raise UploadTooLargeError(limit)
        if length == 0:
            return UploadBody(headers, None)
        # Passing the length on keeps the upstream request un-chunked, as the caller sent it.
        headers["content-length"] = str(length)
    elif not chunked:
        return UploadBody(headers, None)
    return UploadBody(headers, _counted(request, limit))


async def _counted(request: Request, limit: int) -> AsyncIterator[bytes]:
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            # Raising here aborts the upstream request half-way; the private API then drops it.
            raise UploadTooLargeError(limit)
        if chunk:
            yield chunk


def stream_back(
    upstream: httpx.Response,
    *,
    media_type: str,
    filename: str | None = None,
) -> StreamingResponse:
    """Answer with the body of an open private API response; it is closed however the stream ends."""

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.TransportError as exc:
            # Headers are already sent, so the only honest signal left is a cut connection.
            logger.warning("private API stream broke off: %r", exc)
            raise
        finally:
            await upstream.aclose()

    headers: dict[str, Any] = {
        name: upstream.headers[name] for name in _RELAYED_RESPONSE_HEADERS if name in upstream.headers
    }
    if filename is not None:
        headers["content-disposition"] = f'attachment; filename="{filename}"'
    return StreamingResponse(
        chunks(),
        media_type=media_type,
        headers=headers,
        # Runs when the caller disconnects early too, where the generator's finally may not.
        background=BackgroundTask(upstream.aclose),
    )
