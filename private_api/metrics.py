"""Prometheus metrics of the private API: tasks by status (read at scrape time) and submissions."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from private_api import health

log = logging.getLogger(__name__)

TASKS_METRIC = "inference_tasks"
TASKS_HELP = "Tasks in the database, by status"


class _TaskCounts(Collector):
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
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


class Metrics:
    """One registry per app, so several apps in one process (tests) do not collide."""

    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.submissions = Counter(
            "inference_task_submissions",
            "Tasks accepted by POST /tasks, by model",
            labelnames=["model"],
            registry=self.registry,
        )
        self.registry.register(_TaskCounts(session_factory))

    def render(self) -> bytes:
        return generate_latest(self.registry)
