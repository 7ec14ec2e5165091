"""Sending a huge request body the way an attacker would, and reading the answer however early
the server gives it.

A server that refuses a request before reading its body may answer, and close the connection,
while the client is still sending: an ordinary client then fails on the write and never shows
the answer. This one watches the socket between chunks and stops sending as soon as an answer
is there. The body comes from a generator repeating one block, so the test holds none of it.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

MIB = 1024 * 1024
HUGE = 400 * MIB
BOUNDARY = "hostile-boundary-1234567890"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    # Body bytes the server let the client send before it answered.
    sent: int
    # Seconds from the end of the request headers to the answer.
    seconds: float


def json_body(total: int) -> Iterator[bytes]:
    """A JSON object of `total` bytes (one long description), in 1 MiB chunks."""
    head, tail = b'{"description": "', b'"}'
    yield head
    yield from _filler(total - len(head) - len(tail))
    yield tail


def multipart_body(total: int) -> Iterator[bytes]:
    """A multipart form of `total` bytes with one zip_file part, in 1 MiB chunks."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="zip_file"; filename="in.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    yield head
    yield from _filler(total - len(head) - len(tail))
    yield tail


def _filler(size: int) -> Iterator[bytes]:
    block = b"x" * MIB
    while size > 0:
        yield block[: min(size, MIB)]
        size -= MIB


def send(
    base_url: str,
    method: str,
    path: str,
    body: Iterator[bytes],
    *,
    length: int | None,
    headers: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    send_body: bool = True,
    timeout: float = 60.0,
) -> RawAnswer:
    """One request; `length` None sends the body chunked. With send_body False only the headers
    go out, and the answer must come without a byte of the body."""
    url = urlsplit(base_url)
    assert url.hostname and url.port
    raw = socket.create_connection((url.hostname, url.port), timeout=timeout)
    sock = ssl_context.wrap_socket(raw, server_hostname=url.hostname) if ssl_context else raw
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {url.hostname}:{url.port}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        started = time.monotonic()
        sent = _send_until_answered(sock, body, chunked=length is None, timeout=timeout) if send_body else 0
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        answer_body = response.read()
        return RawAnswer(
            status=response.status,
            headers={name.lower(): value for name, value in response.getheaders()},
            body=answer_body,
            sent=sent,
            seconds=time.monotonic() - started,
        )
    finally:
        sock.close()


def _send_until_answered(sock: socket.socket, body: Iterator[bytes], *, chunked: bool, timeout: float) -> int:
    sent = 0
    for chunk in body:
        frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
        view = memoryview(frame)
        while view:
            # TLS may hold decrypted bytes the kernel no longer reports as readable.
            pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
            readable, writable, _ = select.select([sock], [sock], [], timeout)
            if pending or readable:
                return sent
            if not writable:
                raise TimeoutError(f"the server neither read the body nor answered within {timeout} s")
            try:
                count = sock.send(view[: 64 * 1024])
            except (BrokenPipeError, ConnectionResetError):
                return sent  # refused mid-body; whatever it answered is in the receive buffer
            view = view[count:]
            sent += count
    if chunked:
        sock.sendall(b"0\r\n\r\n")
    return sent
