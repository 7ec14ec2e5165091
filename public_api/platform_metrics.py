"""The platform's metrics, as the private API exposes them, served beside the public API's own.

The private API owns the data (it sees every transition and the consumer registry, and computes
its metrics from the database, so every private API process answers alike); the public API is
the one place Prometheus scrapes, so its /metrics appends the private API's exposition to its
own request metrics. Names never collide: the public API's are `public_api_*` and
`inference_platform_metrics_up`, the private API's `inference_*` others.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from inference_server.contract import PrivateRoutes
from public_api.errors import PublicAPIError
from public_api.upstream import PrivateAPI

log = logging.getLogger(__name__)


class PlatformMetricsFetch:
    """Whether the last fetch of the private API's metrics worked, as a gauge of its own: a scrape
    that got only the request metrics is then told apart from a platform with nothing to say."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "inference_platform_metrics_up",
            "1 when the private API's platform metrics were part of this scrape, else 0.",
            registry=registry,
        )

    async def exposition(self, api: PrivateAPI) -> bytes:
        """The private API's metrics text, or nothing when it cannot give them now."""
        try:
            reply = await api.exchange("GET", PrivateRoutes.METRICS)
        except PublicAPIError as exc:
            log.warning("platform metrics unavailable: %s", exc)
            self.up.set(0)
            return b""
        if reply.is_error:
            log.warning(
                "platform metrics refused by the private API: %s %s", reply.status_code, reply.text[:200]
            )
            self.up.set(0)
            return b""
        self.up.set(1)
        return reply.body


async def render(registry: CollectorRegistry, fetch: PlatformMetricsFetch, api: PrivateAPI) -> bytes:
    """The public API's request metrics followed by the platform's (fetched first, so `up` is this
    scrape's)."""
    platform = await fetch.exposition(api)
    return generate_latest(registry) + platform
