"""A budget of failed key checks per client address, so a flood of keyless or wrong-key requests
from one place ends in cheap 429s instead of keeping the API (and key lookups) busy.

Only failures spend the budget: a valid key is never slowed down, whichever address it comes
from. The table of addresses is bounded; IPv6 clients are counted per /64, the block one
subscriber usually holds, so walking through its addresses does not buy a fresh budget each time.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable

from fastapi import Request

IPV6_PREFIX = 64


def client_address(request: Request) -> str:
    """The caller's address as uvicorn reports it: the peer, or, where the peer is a trusted proxy
    (forwarded_allow_ips), the client its X-Forwarded-For names."""
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host or "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network((address, IPV6_PREFIX), strict=False))
    return str(address)


class FailureBudget:
    """A token bucket per address: `per_minute` failures at once, refilled at `per_minute` a minute."""

    def __init__(
        self,
        per_minute: int,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._capacity = float(per_minute)
        self._refill_per_s = per_minute / 60.0
        self._max_clients = max_clients
        self._clock = clock
        # address -> (tokens left, when counted); insertion order is last-touched order.
        self._buckets: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def spend(self, client: str) -> float | None:
        """Count one failure: None while within budget, else the seconds until the next is allowed."""
        now = self._clock()
        tokens = self._level(client, now)
        if tokens >= 1:
            self._store(client, tokens - 1, now)
            return None
        self._store(client, tokens, now)
        return (1 - tokens) / self._refill_per_s

    def _level(self, client: str, now: float) -> float:
        entry = self._buckets.get(client)
        if entry is None:
            return self._capacity
        tokens, counted_at = entry
        return min(self._capacity, tokens + (now - counted_at) * self._refill_per_s)

    def _store(self, client: str, tokens: float, now: float) -> None:
        self._buckets.pop(client, None)
        if len(self._buckets) >= self._max_clients:
            self._make_room(now)
        self._buckets[client] = (tokens, now)

    def _make_room(self, now: float) -> None:
        # A full bucket is the same as no entry: those go first.
        for client in [c for c in self._buckets if self._level(c, now) >= self._capacity]:
            del self._buckets[client]
        if len(self._buckets) < self._max_clients:
            return
        # Still full (many addresses failing at once): forget the least recently seen tenth, so the
        # next new addresses do not each pay for a sweep of the whole table.
        for client in list(self._buckets)[: max(1, self._max_clients // 10)]:
            del self._buckets[client]


def retry_after_s(wait_s: float) -> int:
    return max(1, math.ceil(wait_s))
