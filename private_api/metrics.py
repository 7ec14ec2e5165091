"""Prometheus metrics of the private API: tasks by status and consumers by state (both read at
scrape time), and submissions."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from inference_server.contract import ConsumerState
from private_api import consumer_registry, health, webhook_delivery
from private_api.platform_metrics import PlatformMetrics

log = logging.getLogger(__name__)

# Not `inference_tasks`: that name is the platform's counter (inference_tasks_total).
TASKS_METRIC = "inference_tasks_in_status"
TASKS_HELP = "Tasks in the database, by their status now"
CONSUMERS_METRIC = "inference_consumers"
CONSUMERS_HELP = "Registered consumers, by state"


class _TaskCounts(Collector):
    def __init__(self, session_factory: sessionmaker[Session], *, lost_after_s: float = 30.0) -> None:
        self._session_factory = session_factory

    def describe(self) -> Iterator[Metric]:
        # Declared up front so registering does not query the database.
        yield GaugeMetricFamily(TASKS_METRIC, TASKS_HELP, labels=["status"])

    def collect(self) -> Iterator[Metric]:
        try:
            with self._session_factory() as session:
                counts = health.task_counts(session=session)
        except SQLAlchemyError:
            log.warning("cannot count tasks for /metrics", exc_info=True)
            return
        family = GaugeMetricFamily(TASKS_METRIC, TASKS_HELP, labels=["status"])
        for status, count in counts.items():
            family.add_metric([status.value], count)
        yield family


class _ConsumerCounts(Collector):
    def __init__(self, session_factory: sessionmaker[Session], lost_after_s: float) -> None:
        self._session_factory = session_factory
        self._lost_after_s = lost_after_s

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(CONSUMERS_METRIC, CONSUMERS_HELP, labels=["state"])

    def collect(self) -> Iterator[Metric]:
        try:
            with self._session_factory() as session:
                counts = consumer_registry.count_by_state(session=session, lost_after_s=self._lost_after_s)
        except SQLAlchemyError:
            log.warning("cannot count consumers for /metrics", exc_info=True)
            return
        family = GaugeMetricFamily(CONSUMERS_METRIC, CONSUMERS_HELP, labels=["state"])
        for state in ConsumerState:
            family.add_metric([state.value], counts[state])
        yield family


WEBHOOKS_METRIC = "inference_webhook_deliveries_pending"
WEBHOOKS_HELP = "Webhook events not yet delivered nor given up (a receiver down shows here)"


class _PendingWebhooks(Collector):
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self._session_factory = session_factory

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(WEBHOOKS_METRIC, WEBHOOKS_HELP)

    def collect(self) -> Iterator[Metric]:
        try:
            with self._session_factory() as session:
                pending = webhook_delivery.pending_count(session)
        except SQLAlchemyError:
            log.warning("cannot count webhook deliveries for /metrics", exc_info=True)
            return
        yield GaugeMetricFamily(WEBHOOKS_METRIC, WEBHOOKS_HELP, value=pending)


class Metrics:
    """One registry per app, so several apps in one process (tests) do not collide."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, session_factory: sessionmaker[Session], *, lost_after_s: float = 30.0) -> None:
        self.registry = CollectorRegistry()
        self.submissions = Counter(
            "inference_task_submissions",
            "Tasks accepted by POST /tasks, by model",
            labelnames=["model"],
            registry=self.registry,
        )
        # A cache hit is a result no container produced: counted apart from the runs.
        self.cache_hits = Counter(
            "inference_cache_hits",
            "Tasks answered from the result cache (an earlier task's output, no container)",
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "inference_cache_misses",
            "Cache lookups of cacheable models' tasks that found nothing (or were sent cache=false)",
            registry=self.registry,
        )
        self.registry.register(_TaskCounts(session_factory))
        self.registry.register(_ConsumerCounts(session_factory, lost_after_s))
        self.registry.register(_PendingWebhooks(session_factory))
        self.registry.register(PlatformMetrics(session_factory, lost_after_s=lost_after_s))

    def render(self) -> bytes:
        return generate_latest(self.registry)
