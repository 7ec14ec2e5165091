"""A minimal HTTP/1.1 keep-alive GET client on asyncio streams, for the polling load.

Why not httpx.AsyncClient: with 200 concurrent requests its connection pool costs the load
generator so much CPU that it, not the server, is what gets measured (measured on this machine:
43 req/s against the public API's no-op /health/live with httpx, ~900 req/s with this client).
One connection per simulated client, as 200 real clients would have.
"""

from __future__ import annotations

import asyncio


class HttpConnectionError(Exception):
    """The connection failed or the answer was not HTTP/1.1 we understand."""


class KeepAliveConnection:
    def __init__(self, host: str, port: int, timeout_s: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        """One GET; returns (status, body). Raises HttpConnectionError or TimeoutError."""
        return await asyncio.wait_for(self._get(path), self.timeout_s)

    async def _get(self, path: str) -> tuple[int, bytes]:
        if self._writer is None:
            try:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            except OSError as exc:
                raise HttpConnectionError(f"connect: {exc}") from exc
        assert self._reader is not None
        try:
            self._writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
            head = await self._reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
                elif name == b"transfer-encoding":
                    raise HttpConnectionError("chunked answers are not expected here")
            body = await self._reader.readexactly(length) if length else b""
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
            IndexError,
        ) as exc:
            self.close()
            raise HttpConnectionError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.close()
            raise
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
