"""The scheduling decisions, in one place: whether a pending task goes to the broker now, and why
a pending task is still waiting.

A task is published to the queue of its class (CPU or GPU) unless
- no live consumer could ever run it (a GPU task with no GPU consumer, or needs larger than every
  consumer of its class has): it waits unpublished, so no consumer bounces it, until a consumer
  that fits registers or resumes; or
- it is a fresh task (not a retry) and its owner already has `fair_share_queued_per_owner` tasks
  queued in that class at or above its priority: owners take turns, and a user with a thousand
  tasks holds back nobody's single one.
A CPU task while no consumer is registered at all is published: the broker keeps it until one
comes (a platform whose consumers do not register yet keeps working).

The submit path, the outbox and the claim path (the next held task of the owner whose task was
just taken) all ask `verdict`, so they never disagree.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from inference_server.capacity import Capacity, TaskNeeds
from inference_server.contract import ConsumerState, FailureCategory, TaskStatus, WebhookEvent
from private_api import upstreams, webhooks
from private_api.config import PrivateSettings
from private_api.consumer_registry import RegisteredConsumer, registered_consumers
from private_api.models import Model, Task, utcnow
from private_api.task_rows import BATCH_SIZE, update_task

log = logging.getLogger(__name__)

NO_GPU_CONSUMER = "needs a GPU; no GPU consumer is registered"
NO_CONSUMER = "no consumer is registered"
ALL_DRAINING = "all consumers that could run it are draining"
WAITING_FOR_ROOM = "waiting for a consumer with room"
NOT_YET_QUEUED = "waiting to be put on the queue"


@dataclass(frozen=True)
class SchedulingPolicy:
    consumer_lost_after_s: float = 30.0
    # 0: no cap.
    fair_share_queued_per_owner: int = 2

    @classmethod
    def of(cls, settings: PrivateSettings) -> SchedulingPolicy:
        return cls(
            consumer_lost_after_s=settings.consumer_lost_after_s,
            fair_share_queued_per_owner=settings.fair_share_queued_per_owner,
        )


@dataclass(frozen=True)
class Candidate:
    """A pending task as the scheduler weighs it."""

    id: int
    uid: str
    priority: int
    # Claimed before and taken back (lease expired, released, retryable failure): it goes ahead
    # of the fresh tasks of its priority, which were submitted after it (broker_priority).
    retry: bool
    owner: str | None
    created_at: datetime
    published_at: datetime | None
    needs: TaskNeeds
    # The upstream task whose output it still lacks (input_from, model_from): held until then.
    waiting_for: str | None = None

    @classmethod
    def of_row(cls, row: Any) -> Candidate:
        return cls(
            id=row.id,
            uid=row.uid,
            priority=row.priority,
            retry=row.started_at is not None,
            owner=row.owner,
            created_at=row.created_at,
            published_at=row.published_at,
            needs=TaskNeeds.of_model(row),
            waiting_for=upstreams.waiting_for_row(row),
        )


def candidates() -> Select[*tuple[Any, ...]]:
    """The query for Candidate rows of pending tasks; callers add their conditions and order."""
    return (
        select(
            Task.id,
            Task.uid,
            Task.priority,
            Task.started_at,
            Task.owner,
            Task.created_at,
            Task.published_at,
            Task.input_from,
            Task.input_blob_key,
            Task.model_from,
            Task.model_from_blob_key,
            Model.use_gpu,
            Model.gpu_memory_mb,
            Model.cpus,
            Model.memory_mb,
        )
        .join(Model, Task.model_id == Model.id)
        .where(Task.status == TaskStatus.PENDING)
    )


def candidate_of_task(task: Task) -> Candidate:
    """The candidate for a loaded task row (its model is loaded with it)."""
    return Candidate(
        id=task.id,
        uid=task.uid,
        priority=task.priority,
        retry=task.started_at is not None,
        owner=task.owner,
        created_at=task.created_at,
        published_at=task.published_at,
        needs=TaskNeeds.of_model(task.model),
        waiting_for=upstreams.waiting_for_row(task),
    )


def load_candidate(session: Session, task_id: int) -> Candidate | None:
    row = session.execute(candidates().where(Task.id == task_id)).first()
    return None if row is None else Candidate.of_row(row)


@dataclass(frozen=True)
class Fleet:
    """The registered consumers that are not lost: what could run a task, now or after a drain."""

    consumers: list[RegisteredConsumer]

    @classmethod
    def load(cls, session: Session, policy: SchedulingPolicy) -> Fleet:
        return cls(registered_consumers(session=session, lost_after_s=policy.consumer_lost_after_s))

    def _capacities(self, *, live: bool) -> list[Capacity]:
        return [Capacity.of_registration(c.registration) for c in self.consumers if c.live == live]

    def _draining_could_run(self, needs: TaskNeeds) -> bool:
        return any(
            Capacity.of_registration(consumer.registration).never_fits(needs) is None
            for consumer in self.consumers
            if consumer.state == ConsumerState.DRAINING
        )

    def unrunnable_reason(self, needs: TaskNeeds) -> str | None:
        """Why no live consumer could ever run the task; None when one could, or when none is
        registered for a CPU task (the broker keeps it until one comes)."""
        of_class = [capacity for capacity in self._capacities(live=True) if capacity.takes(needs)]
        if not of_class:
            if not needs.gpu:
                return None
            return ALL_DRAINING if self._draining_could_run(needs) else NO_GPU_CONSUMER
        if all(capacity.never_fits(needs) is not None for capacity in of_class):
            if self._draining_could_run(needs):
                return ALL_DRAINING
            return _largest_short_of(needs, of_class)
        return None

    def idle_reason(self, needs: TaskNeeds) -> str | None:
        """Why a runnable task finds no consumer at all: none live takes its class."""
        if any(capacity.takes(needs) for capacity in self._capacities(live=True)):
            return None
        return ALL_DRAINING if self._draining_could_run(needs) else NO_CONSUMER


def _largest_short_of(needs: TaskNeeds, capacities: list[Capacity]) -> str:
    """The need that even the largest consumer of the task's class lacks, in words."""
    if needs.gpu and needs.gpu_memory_mb is not None:
        largest_gpu = max(capacity.gpu_memory_mb for capacity in capacities)
        if needs.gpu_memory_mb > largest_gpu:
            return f"needs {needs.gpu_memory_mb} MiB of GPU memory; the largest GPU has {largest_gpu} MiB"
    if needs.cpus is not None:
        most_cpus = max(capacity.cpus for capacity in capacities)
        if needs.cpus > most_cpus:
            return f"needs {needs.cpus:g} CPUs; the largest consumer has {most_cpus:g}"
    if needs.memory_mb is not None:
        most_memory = max(capacity.memory_mb for capacity in capacities)
        if needs.memory_mb > most_memory:
            return f"needs {needs.memory_mb} MiB of memory; the largest consumer has {most_memory} MiB"
    # Each need fits some consumer, but no consumer has them all.
    return f"no registered consumer could run it: one {capacities[0].never_fits(needs)}"


def _same_queue(needs: TaskNeeds) -> Any:
    return Model.use_gpu.is_(True) if needs.gpu else Model.use_gpu.is_(False)


def _queued() -> tuple[Any, ...]:
    return (Task.status == TaskStatus.PENDING, Task.published_at.is_not(None))


def queued_of_owner(session: Session, candidate: Candidate) -> int:
    """The owner's tasks in the broker, in the candidate's queue, at or above its priority."""
    owner = Task.owner.is_(None) if candidate.owner is None else Task.owner == candidate.owner
    count = session.scalar(
        select(func.count())
        .select_from(Task)
        .join(Model, Task.model_id == Model.id)
        .where(*_queued(), owner, Task.priority >= candidate.priority, _same_queue(candidate.needs))
    )
    return int(count or 0)


def queued_ahead(session: Session, candidate: Candidate) -> int:
    """Tasks in the broker that a consumer of the candidate's queue takes before it."""
    count = session.scalar(
        select(func.count())
        .select_from(Task)
        .join(Model, Task.model_id == Model.id)
        .where(
            *_queued(),
            _same_queue(candidate.needs),
            Task.id != candidate.id,
            or_(
                Task.priority > candidate.priority,
                and_(Task.priority == candidate.priority, Task.created_at < candidate.created_at),
            ),
        )
    )
    return int(count or 0)


def fair_share_reason(queued: int) -> str:
    return f"waiting for its turn: its owner already has {queued} tasks queued"


def _fair_share_hold(session: Session, policy: SchedulingPolicy, candidate: Candidate) -> str | None:
    cap = policy.fair_share_queued_per_owner
    # A retry had its turn already: held behind its owner's later tasks it would lose its place
    # in the FIFO of its priority, which broker_priority(retry=True) keeps.
    if not cap or candidate.retry:
        return None
    queued = queued_of_owner(session, candidate)
    return fair_share_reason(queued) if queued >= cap else None


def verdict(session: Session, fleet: Fleet, policy: SchedulingPolicy, candidate: Candidate) -> str | None:
    """None when the task goes to the broker now; otherwise why it waits unpublished."""
    return (
        _upstream_hold(session, candidate)
        or fleet.unrunnable_reason(candidate.needs)
        or _fair_share_hold(session, policy, candidate)
    )


def _upstream_hold(session: Session, candidate: Candidate) -> str | None:
    """A chained task waits for its upstream's output before anything else is weighed."""
    if candidate.waiting_for is None:
        return None
    status = session.scalar(select(Task.status).where(Task.uid == candidate.waiting_for))
    return upstreams.waiting_reason(candidate.waiting_for, status)


def waiting_reason(session: Session, fleet: Fleet, policy: SchedulingPolicy, candidate: Candidate) -> str:
    """Why a pending task is not running yet, in words (a few indexed queries at most)."""
    upstream = _upstream_hold(session, candidate)
    if upstream is not None:
        return upstream
    unrunnable = fleet.unrunnable_reason(candidate.needs)
    if unrunnable is not None:
        return unrunnable
    if candidate.published_at is None:
        return _fair_share_hold(session, policy, candidate) or NOT_YET_QUEUED
    idle = fleet.idle_reason(candidate.needs)
    if idle is not None:
        return idle
    ahead = queued_ahead(session, candidate)
    if not ahead:
        return WAITING_FOR_ROOM
    return f"queued behind {ahead} task{'s' if ahead > 1 else ''}"


def pending_task_waiting_reason(session: Session, policy: SchedulingPolicy, task: Task) -> str | None:
    """waiting_reason for a task row; None unless it is pending."""
    if task.status != TaskStatus.PENDING:
        return None
    return waiting_reason(session, Fleet.load(session, policy), policy, candidate_of_task(task))


def waiting_reasons(session: Session, policy: SchedulingPolicy, tasks: list[Task]) -> dict[str, str]:
    """waiting_reason of each pending task among `tasks` (a listing): the consumers are read
    once, then at most one count per pending task."""
    pending = [task for task in tasks if task.status == TaskStatus.PENDING]
    if not pending:
        return {}
    fleet = Fleet.load(session, policy)
    return {task.uid: waiting_reason(session, fleet, policy, candidate_of_task(task)) for task in pending}


def fail_unrunnable(
    *, session: Session, policy: SchedulingPolicy, timeout_s: float, limit: int = BATCH_SIZE
) -> int:
    """Fail pending unpublished tasks that no live consumer could run and that have waited
    longer than `timeout_s` since they last became pending (created, or taken back from a
    consumer); the error says why. Not retried: only a consumer that fits would help."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    rows = session.execute(
        candidates()
        .where(Task.published_at.is_(None), func.coalesce(Task.started_at, Task.created_at) < cutoff)
        .order_by(Task.id)
        .limit(limit)
    ).all()
    fleet = Fleet.load(session, policy) if rows else Fleet([])
    session.rollback()
    failed = 0
    for row in rows:
        reason = fleet.unrunnable_reason(TaskNeeds.of_model(row))
        if reason is None:
            continue
        if update_task(
            session,
            Task.id == row.id,
            Task.status == TaskStatus.PENDING,
            Task.published_at.is_(None),
            status=TaskStatus.FAILED,
            error=reason,
            failure=FailureCategory.UNSCHEDULABLE,
            finished_at=utcnow(),
        ):
            failed += 1
            log.warning("task %s failed: waited %g s and %s", row.uid, timeout_s, reason)
            webhooks.enqueue_for_uid(session, row.uid, WebhookEvent.FAILED)
        session.commit()
    return failed
