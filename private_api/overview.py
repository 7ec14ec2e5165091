"""The dashboard's overview (PlatformOverview): what is queued and running, what ended lately,
how long each model's tasks waited and ran, and a history in buckets.

Everything is read from the tasks' own times (created_at, started_at, finished_at), so the
history needs no sampler and every private API process answers alike. Operators (and the
platform itself) see every task; anyone else the figures of their own tasks only, while the
queues and consumers, which all callers share, are counted platform-wide.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlalchemy.orm import Session

from inference_server.contract import (
    OVERVIEW_HOURS_DEFAULT,
    ModelTimings,
    OverviewPoint,
    PlatformOverview,
    TaskQueue,
    TaskStatus,
)
from private_api import consumer_registry
from private_api.access import Actor, owner_conditions
from private_api.models import Model, Task, utcnow
from private_api.platform_metrics import ended_as, seconds_between

HISTORY_BUCKETS = 24
# The medians are computed here over at most this many of the window's newest ended tasks.
TIMINGS_MAX_ROWS = 10_000
LAST_HOUR = timedelta(hours=1)


def bucket_seconds(hours: int) -> int:
    return hours * 3600 // HISTORY_BUCKETS


def _count(condition: ColumnElement[bool]) -> ColumnElement[int]:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _queue_depth(session: Session) -> dict[str, int]:
    by_gpu = dict(
        session.execute(
            select(Model.use_gpu, func.count())
            .select_from(Task)
            .join(Model, Model.id == Task.model_id)
            .where(Task.status == TaskStatus.PENDING)
            .group_by(Model.use_gpu)
        ).all()
    )
    return {TaskQueue.GPU.value: by_gpu.get(True, 0), TaskQueue.CPU.value: by_gpu.get(False, 0)}


def _model_timings(
    session: Session, scope: tuple[ColumnElement[bool], ...], since: datetime, now: datetime
) -> list[ModelTimings]:
    ended = ended_as()
    in_window = (Task.finished_at > since, Task.finished_at <= now, ended.is_not(None), *scope)
    model = Model.human_readable_id
    ended_counts = dict(
        session.execute(
            select(model, func.count())
            .select_from(Task)
            .join(Model, Model.id == Task.model_id)
            .where(*in_window)
            .group_by(model)
        ).all()
    )
    waits: dict[str, list[float]] = defaultdict(list)
    runs: dict[str, list[float]] = defaultdict(list)
    rows = session.execute(
        select(
            model,
            seconds_between(session, Task.created_at, Task.started_at),
            seconds_between(session, Task.run_started_at, Task.run_finished_at),
        )
        .select_from(Task)
        .join(Model, Model.id == Task.model_id)
        .where(*in_window)
        .order_by(Task.finished_at.desc())
        .limit(TIMINGS_MAX_ROWS)
    ).all()
    for name, wait_s, run_s in rows:
        if wait_s is not None:
            waits[name].append(float(wait_s))
        if run_s is not None:
            runs[name].append(float(run_s))
    return [
        ModelTimings(
            model=name,
            tasks_ended=count,
            queue_wait_s_median=_median(waits[name]),
            run_s_median=_median(runs[name]),
        )
        for name, count in sorted(ended_counts.items())
    ]


def _waiting_at(moment: datetime) -> ColumnElement[bool]:
    """A task submitted by `moment` that had neither started nor ended (deleted, cancelled) by then."""
    return and_(
        Task.created_at <= moment,
        or_(Task.started_at.is_(None), Task.started_at > moment),
        or_(Task.finished_at.is_(None), Task.finished_at > moment),
    )


def _history(
    session: Session, scope: tuple[ColumnElement[bool], ...], now: datetime, bucket: timedelta
) -> list[OverviewPoint]:
    """HISTORY_BUCKETS points, the last ending now: the caller's tasks that finished and failed in
    each bucket, and the platform's tasks waiting at each bucket's end."""
    ends = [now - bucket * (HISTORY_BUCKETS - 1 - index) for index in range(HISTORY_BUCKETS)]
    start = ends[0] - bucket
    ended = ended_as()
    outcome_counts = []
    for end in ends:
        in_bucket = and_(Task.finished_at > end - bucket, Task.finished_at <= end)
        outcome_counts.append(_count(and_(in_bucket, ended == TaskStatus.FINISHED.value)))
        outcome_counts.append(_count(and_(in_bucket, ended == TaskStatus.FAILED.value)))
    outcomes = session.execute(select(*outcome_counts).where(Task.finished_at > start, *scope)).one()
    # Only a task still pending or running, or one that ended within the window, can have waited
    # at one of its ends (the first condition, on indexed columns, keeps the scan short).
    depths = session.execute(
        select(*[_count(_waiting_at(end)) for end in ends]).where(
            or_(Task.status.in_([TaskStatus.PENDING, TaskStatus.RUNNING]), Task.finished_at > start),
            or_(Task.started_at.is_(None), Task.started_at > start),
            Task.created_at <= now,
        )
    ).one()
    return [
        OverviewPoint(
            at=end,
            finished=int(outcomes[2 * index]),
            failed=int(outcomes[2 * index + 1]),
            queue_depth=int(depth),
        )
        for index, (end, depth) in enumerate(zip(ends, depths, strict=True))
    ]


def platform_overview(
    *,
    session: Session,
    actor: Actor | None,
    lost_after_s: float,
    hours: int = OVERVIEW_HOURS_DEFAULT,
    now: datetime | None = None,
) -> PlatformOverview:
    """The overview as `actor` may see it (None: the platform itself), over the last `hours`."""
    now = now or utcnow()
    scope = owner_conditions(actor)
    bucket = timedelta(seconds=bucket_seconds(hours))
    active = dict(
        session.execute(
            select(Task.status, func.count())
            .where(Task.status.in_([TaskStatus.PENDING, TaskStatus.RUNNING]), *scope)
            .group_by(Task.status)
        ).all()
    )
    ended = ended_as()
    finished_last_hour, failed_last_hour = session.execute(
        select(_count(ended == TaskStatus.FINISHED.value), _count(ended == TaskStatus.FAILED.value)).where(
            Task.finished_at > now - LAST_HOUR, Task.finished_at <= now, *scope
        )
    ).one()
    consumers = consumer_registry.count_by_state(session=session, lost_after_s=lost_after_s)
    return PlatformOverview(
        scope="all" if actor is None or actor.is_operator else "own",
        generated_at=now,
        queue_depth=_queue_depth(session),
        pending=active.get(TaskStatus.PENDING, 0),
        running=active.get(TaskStatus.RUNNING, 0),
        consumers={state.value: count for state, count in consumers.items()},
        finished_last_hour=int(finished_last_hour),
        failed_last_hour=int(failed_last_hour),
        models=_model_timings(session, scope, now - timedelta(hours=hours), now),
        history=_history(session, scope, now, bucket),
        history_bucket_s=int(bucket.total_seconds()),
    )
