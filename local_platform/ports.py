"""Finding a free local TCP port, for services started on one machine and for the tests."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free right now on 127.0.0.1; the caller binds it soon, before another process may."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
