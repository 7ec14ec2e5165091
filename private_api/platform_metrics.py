"""The platform's metrics with the issue's fixed names, computed from the database at each scrape.

Why from the database and not in-process counters: several private API processes each see only
the transitions they made, and a restart would reset their counters; the tasks table holds every
task's whole history (rows are kept, even deleted ones), so counts and histograms read from it
are the same whichever process answers and survive restarts. Each scrape costs a few grouped
queries (one per family), no row is loaded into Python.

- `inference_tasks_total{model,status}`: tasks submitted (`status="submitted"`) and tasks that
  ended `finished`, `failed` or `cancelled`. A task that later expired or was deleted still
  counts under how it ended, so the counter never goes down.
- `inference_task_queue_seconds{model}`: started_at - created_at of every task that started
  (its latest attempt's start, so a retried task's wait includes its earlier attempts).
- `inference_task_run_seconds{model,outcome}`: run_finished_at - run_started_at, the container's
  run as its consumer reported it, by how the task ended (finished, failed, cancelled).
- `inference_queue_depth{queue}`: pending tasks per queue (cpu, gpu), held ones included.
- `inference_consumer_running_tasks{consumer}`, `inference_gpu_memory_used_bytes{consumer,gpu}`,
  `inference_gpu_utilization_ratio{consumer,gpu}`: from consumers' latest heartbeats, live
  consumers only (a lost consumer's readings are stale); GPU figures only where NVML read them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, and_, case, func, literal, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from inference_server.contract import FailureCategory, TaskQueue, TaskStatus
from private_api.models import Consumer, Model, Task, utcnow

log = logging.getLogger(__name__)

TASKS_TOTAL = "inference_tasks"  # exposed as inference_tasks_total (a counter)
QUEUE_SECONDS = "inference_task_queue_seconds"
RUN_SECONDS = "inference_task_run_seconds"
QUEUE_DEPTH = "inference_queue_depth"
RUNNING_TASKS = "inference_consumer_running_tasks"
GPU_MEMORY = "inference_gpu_memory_used_bytes"
GPU_UTILIZATION = "inference_gpu_utilization_ratio"

SUBMITTED = "submitted"
# Queue waits run from milliseconds (an idle platform) to hours (a busy one); runs likewise.
QUEUE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
RUN_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)


def seconds_between(session: Session, start: Any, end: Any) -> ColumnElement[Any]:
    """end - start in seconds, in SQL: SQLite keeps times as text, PostgreSQL as timestamps."""
    if session.get_bind().dialect.name == "sqlite":
        return (func.julianday(end) - func.julianday(start)) * 86400.0
    return func.extract("epoch", end - start)


def ended_as() -> ColumnElement[str | None]:
    """How a task ended, read back even after it expired or was deleted (None: it has not)."""
    return case(
        (Task.failure == FailureCategory.CANCELLED.value, literal(TaskStatus.CANCELLED.value)),
        (Task.failure.is_not(None), literal(TaskStatus.FAILED.value)),
        (Task.status == TaskStatus.CANCELLED, literal(TaskStatus.CANCELLED.value)),
        (Task.status == TaskStatus.FAILED, literal(TaskStatus.FAILED.value)),
        (Task.output_sha256.is_not(None), literal(TaskStatus.FINISHED.value)),
        else_=None,
    )


def _histogram(
    session: Session,
    name: str,
    help_text: str,
    labels: Sequence[str],
    label_columns: Sequence[Any],
    seconds: ColumnElement[Any],
    where: ColumnElement[bool],
    buckets: Sequence[float],
) -> HistogramMetricFamily:
    """One grouped query: per label set, how many values fall at or under each bound, and their sum."""
    bucket_counts = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in buckets]
    statement = (
        select(*label_columns, func.count(), func.coalesce(func.sum(seconds), 0.0), *bucket_counts)
        .select_from(Task)
        .join(Model, Model.id == Task.model_id)
        .where(where)
        .group_by(*label_columns)
    )
    family = HistogramMetricFamily(name, help_text, labels=list(labels))
    width = len(label_columns)
    row: Sequence[Any]
    for row in session.execute(statement):
        values = [str(value) for value in row[:width]]
        count, total = int(row[width]), float(row[width + 1])
        cumulative = [
            (str(float(bound)), int(n or 0)) for bound, n in zip(buckets, row[width + 2 :], strict=True)
        ]
        family.add_metric(values, [*cumulative, ("+Inf", count)], total)
    return family


def _task_families(session: Session) -> Iterator[Metric]:
    totals = CounterMetricFamily(
        TASKS_TOTAL, "Tasks submitted, and tasks ended by how", labels=["model", "status"]
    )
    model = Model.human_readable_id
    for name, count in session.execute(
        select(model, func.count()).select_from(Task).join(Model, Model.id == Task.model_id).group_by(model)
    ):
        totals.add_metric([name, SUBMITTED], count)
    ended = ended_as().label("ended")
    ended_rows = session.execute(
        select(model, ended, func.count())
        .select_from(Task)
        .join(Model, Model.id == Task.model_id)
        .where(Task.finished_at.is_not(None))
        .group_by(model, ended)
    )
    for name, how, count in ended_rows:
        if how is not None:
            totals.add_metric([name, how], count)
    yield totals

    yield _histogram(
        session,
        QUEUE_SECONDS,
        "Seconds from submission to the start of the task's latest attempt",
        ["model"],
        [model],
        seconds_between(session, Task.created_at, Task.started_at),
        Task.started_at.is_not(None),
        QUEUE_BUCKETS,
    )
    outcome = ended_as()
    yield _histogram(
        session,
        RUN_SECONDS,
        "Seconds the model's container ran (its consumer's clock), by how the task ended",
        ["model", "outcome"],
        [model, outcome],
        seconds_between(session, Task.run_started_at, Task.run_finished_at),
        and_(Task.run_finished_at.is_not(None), Task.finished_at.is_not(None), outcome.is_not(None)),
        RUN_BUCKETS,
    )

    depth = GaugeMetricFamily(QUEUE_DEPTH, "Tasks pending, by the queue they wait for", labels=["queue"])
    counts = dict(
        session.execute(
            select(Model.use_gpu, func.count())
            .select_from(Task)
            .join(Model, Model.id == Task.model_id)
            .where(Task.status == TaskStatus.PENDING)
            .group_by(Model.use_gpu)
        ).all()
    )
    depth.add_metric([TaskQueue.GPU.value], counts.get(True, 0))
    depth.add_metric([TaskQueue.CPU.value], counts.get(False, 0))
    yield depth


def _consumer_families(session: Session, lost_after_s: float) -> Iterator[Metric]:
    running = GaugeMetricFamily(RUNNING_TASKS, "Tasks a live consumer runs now", labels=["consumer"])
    memory = GaugeMetricFamily(GPU_MEMORY, "GPU memory in use, as NVML read it", labels=["consumer", "gpu"])
    utilization = GaugeMetricFamily(
        GPU_UTILIZATION, "GPU busy fraction over NVML's last sample period", labels=["consumer", "gpu"]
    )
    live_since = utcnow() - timedelta(seconds=lost_after_s)
    for consumer in session.scalars(select(Consumer).where(Consumer.last_seen_at >= live_since)):
        running.add_metric([consumer.id], len(consumer.running_tasks))
        for reading in consumer.gpu_readings or []:
            gpu = str(reading["index"])
            memory.add_metric([consumer.id, gpu], reading["memory_used_bytes"])
            utilization.add_metric([consumer.id, gpu], reading["utilization_ratio"])
    yield from (running, memory, utilization)


class PlatformMetrics(Collector):
    """Registered on the private API's registry; the public API's /metrics serves it too."""

    def __init__(self, session_factory: sessionmaker[Session], *, lost_after_s: float) -> None:
        self._session_factory = session_factory
        self._lost_after_s = lost_after_s

    def describe(self) -> Iterator[Metric]:
        # Declared up front so registering does not query the database.
        yield CounterMetricFamily(TASKS_TOTAL, "", labels=["model", "status"])
        yield HistogramMetricFamily(QUEUE_SECONDS, "", labels=["model"])
        yield HistogramMetricFamily(RUN_SECONDS, "", labels=["model", "outcome"])
        yield GaugeMetricFamily(QUEUE_DEPTH, "", labels=["queue"])
        yield GaugeMetricFamily(RUNNING_TASKS, "", labels=["consumer"])
        yield GaugeMetricFamily(GPU_MEMORY, "", labels=["consumer", "gpu"])
        yield GaugeMetricFamily(GPU_UTILIZATION, "", labels=["consumer", "gpu"])

    def collect(self) -> Iterator[Metric]:
        try:
            with self._session_factory() as session:
                families = [*_task_families(session), *_consumer_families(session, self._lost_after_s)]
        except SQLAlchemyError:
            log.warning("cannot read the platform's metrics from the database", exc_info=True)
            return
        yield from families
