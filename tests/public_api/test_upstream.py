"""PrivateAPI's two pools against a real (small, slow) HTTP server on a socket.

The server is a stand-in for the private API that answers each request after a delay the
request names, so a slot of the small-call gate can be held on purpose.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from public_api.config import PublicSettings
from public_api.errors import UpstreamUnavailableError
from public_api.upstream import PrivateAPI


class SlowServer:
    """Answers GET /<name>/<seconds> with {"path": ...} after that many seconds; counts how many
    requests it holds at once."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most_in_flight = 0
        self.arrived: asyncio.Queue[str] = asyncio.Queue()
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                self.arrived.put_nowait(path)
                await asyncio.sleep(float(path.rsplit("/", 1)[1]))
                self.in_flight -= 1
                body = json.dumps({"path": path}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def _api(port: int, concurrency: int) -> PrivateAPI:
    return PrivateAPI(
        PublicSettings(
            private_api_url=f"http://127.0.0.1:{port}",
            service_token="upstream-test-" + "x" * 16,
            private_api_concurrency=concurrency,
            private_api_connect_timeout_s=0.3,
        )
    )


def test_small_calls_wait_for_a_slot_then_answer_busy_while_streams_pass():
    async def scenario() -> None:
        server = SlowServer()
        api = _api(await server.start(), concurrency=1)
        try:
            holder = asyncio.create_task(api.call("GET", "/hold/1.0"))
            assert await server.arrived.get() == "/hold/1.0"
            # The only slot is taken for a second: a second small call gives up after the
            # connect timeout with a 503 that says why, instead of piling up.
            with pytest.raises(UpstreamUnavailableError) as busy:
                await api.call("GET", "/queued/0")
            assert busy.value.status_code == 503
            assert "busy" in busy.value.detail
            # Streams have a pool of their own: the held slot does not block them.
            response = await api.open_stream("GET", "/stream/0")
            try:
                assert json.loads(await response.aread()) == {"path": "/stream/0"}
            finally:
                await response.aclose()
            assert await holder == {"path": "/hold/1.0"}
            # The slot is free again.
            assert await api.call("GET", "/after/0") == {"path": "/after/0"}
        finally:
            await api.aclose()
            await server.stop()

    asyncio.run(scenario())


def test_calls_within_the_gate_run_concurrently_and_no_more():
    async def scenario() -> None:
        server = SlowServer()
        api = _api(await server.start(), concurrency=3)
        try:
            answers = await asyncio.gather(*(api.call("GET", f"/n{i}/0.2") for i in range(6)))
            assert [answer["path"] for answer in answers] == [f"/n{i}/0.2" for i in range(6)]
            # Three slots: the server held three requests at once, never more.
            assert server.most_in_flight == 3
        finally:
            await api.aclose()
            await server.stop()

    asyncio.run(scenario())


def test_unreachable_private_api_is_a_503():
    async def scenario() -> None:
        server = SlowServer()
        port = await server.start()
        await server.stop()
        api = _api(port, concurrency=2)
        try:
            with pytest.raises(UpstreamUnavailableError) as unreachable:
                await api.call("GET", "/x/0")
            assert unreachable.value.status_code == 503
            assert "unreachable" in unreachable.value.detail
        finally:
            await api.aclose()

    asyncio.run(scenario())
