"""Getting committed pending tasks onto the queue exactly once, and the outbox that retries.

The database is the source of truth: a task is committed first and published after, so a broker
outage never loses an accepted task; whatever did not reach the queue the outbox sends later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from inference_server.contract import TaskStatus
from private_api import upstreams
from private_api.models import Model, Task, utcnow
from private_api.queue import TaskPublisher
from private_api.scheduling import Candidate, Fleet, SchedulingPolicy, candidates, load_candidate, verdict
from private_api.task_rows import BATCH_SIZE, update_task

log = logging.getLogger(__name__)


class Publish(StrEnum):
    DONE = "done"
    SKIPPED = "skipped"  # someone else is publishing it, or it is no longer pending
    FAILED = "failed"  # broker (or database) unavailable: left to the outbox loop
    HELD = "held"  # the scheduler keeps it back (no consumer could run it, or not its turn)


def publish(
    session: Session,
    publisher: TaskPublisher,
    candidate: Candidate,
) -> Publish:
    """Put a committed pending task on the queue, once, even with the outbox racing a request.

    published_at is claimed by a conditional UPDATE *before* publishing, so of two publishers
    only the winner sends; a failed publish hands the claim back for the outbox. (A crash
    between claim and publish leaves the task marked but unsent; the outbox's republish
    safety net picks it up after `republish_after_s`.) Whether it should go now at all is
    scheduling.verdict's call, made by the caller.
    """
    if publisher.backing_off:
        return Publish.FAILED  # spare the database a claim we would hand back at once
    previous = candidate.published_at
    claimed_at = utcnow()
    try:
        claimed = update_task(
            session,
            Task.id == candidate.id,
            Task.status == TaskStatus.PENDING,
            Task.published_at.is_(None) if previous is None else Task.published_at == previous,
            published_at=claimed_at,
        )
        session.commit()
    except SQLAlchemyError:
        session.rollback()
        log.warning("could not mark task %s for publishing; the outbox retries", candidate.uid, exc_info=True)
        return Publish.FAILED
    if not claimed:
        return Publish.SKIPPED
    if publisher.publish(
        candidate.uid, needs=candidate.needs, priority=candidate.priority, retry=candidate.retry
    ):
        return Publish.DONE
    try:
        update_task(session, Task.id == candidate.id, Task.published_at == claimed_at, published_at=previous)
        session.commit()
    except SQLAlchemyError:
        session.rollback()
        log.warning(
            "task %s stays marked though unpublished; republished later", candidate.uid, exc_info=True
        )
    return Publish.FAILED


def dispatch(session: Session, publisher: TaskPublisher, policy: SchedulingPolicy, task_id: int) -> Publish:
    """Publish one pending, unpublished task if the scheduler lets it go now (submit, retry);
    a held task is left to the outbox or to the claim that frees its owner's turn."""
    try:
        candidate = load_candidate(session, task_id)
        if candidate is None or candidate.published_at is not None:
            session.rollback()
            return Publish.SKIPPED
        held = verdict(session, Fleet.load(session, policy), policy, candidate)
        session.rollback()  # end the reads; publishing may wait on the broker
    except SQLAlchemyError:
        session.rollback()
        log.warning("could not weigh task %s for publishing; the outbox retries", task_id, exc_info=True)
        return Publish.FAILED
    if held is not None:
        log.info("task %s held back: %s", candidate.uid, held)
        return Publish.HELD
    return publish(session, publisher, candidate)


@dataclass(frozen=True)
class Lane:
    """One owner's tasks of one queue class: what fair share counts, and a claim frees a turn in."""

    owner: str | None
    gpu: bool

    def conditions(self) -> tuple[Any, ...]:
        owner = Task.owner.is_(None) if self.owner is None else Task.owner == self.owner
        return owner, Model.use_gpu.is_(self.gpu)


def _waiting_candidates(
    session: Session, policy: SchedulingPolicy, limit: int, lane: Lane | None
) -> list[Candidate]:
    """Unpublished pending tasks, at most what one owner may have queued from each lane, in the
    order they go out: priority first, then oldest first."""
    per_lane = policy.fair_share_queued_per_owner or limit
    # Tasks still waiting for an upstream's output are left out here, not only held by the
    # verdict: a lane's head full of them would hide its owner's ready tasks behind them.
    unpublished = candidates().where(Task.published_at.is_(None), upstreams.has_its_upstream_outputs())
    if lane is not None:
        lanes = [lane]
    else:
        # Each lane's head separately: one owner's thousand held tasks must not fill the batch
        # and hide another owner's single task behind them.
        groups = session.execute(
            unpublished.with_only_columns(Task.owner, Model.use_gpu).group_by(Task.owner, Model.use_gpu)
        ).all()
        lanes = [Lane(owner=group.owner, gpu=bool(group.use_gpu)) for group in groups[:limit]]
    found: list[Candidate] = []
    for each in lanes:
        rows = session.execute(
            unpublished.where(*each.conditions())
            .order_by(Task.priority.desc(), Task.created_at, Task.id)
            .limit(per_lane)
        ).all()
        found.extend(Candidate.of_row(row) for row in rows)
    found.sort(key=lambda candidate: (-candidate.priority, candidate.created_at, candidate.id))
    return found[:limit]


def publish_waiting(
    *,
    session: Session,
    publisher: TaskPublisher,
    policy: SchedulingPolicy,
    lane: Lane | None = None,
    limit: int = BATCH_SIZE,
) -> int:
    """Publish the unpublished pending tasks the scheduler lets go now, in queue order, from every
    lane or from `lane` only (after a claim freed a turn in it). Returns how many went out."""
    try:
        found = _waiting_candidates(session, policy, limit, lane)
        fleet = Fleet.load(session, policy) if found else Fleet([])
    finally:
        session.rollback()
    published = 0
    for candidate in found:
        held = verdict(session, fleet, policy, candidate)
        session.rollback()
        if held is not None:
            continue
        outcome = publish(session, publisher, candidate)
        if outcome == Publish.FAILED:
            break  # broker still away: the next round tries again
        if outcome == Publish.DONE:
            published += 1
    return published


def free_turn_after_claim(
    *, session: Session, publisher: TaskPublisher, policy: SchedulingPolicy, uid: str, lane: Lane
) -> int:
    """A claimed task (`uid`, of `lane`, known from the claim: no query for it) left the broker,
    so its owner has a turn free in its lane: publish the owner's next held task now rather than
    at the outbox's next round. Never raises for broker or database trouble (the outbox catches up)."""
    if not policy.fair_share_queued_per_owner:
        return 0  # nothing is held for fair share
    try:
        return publish_waiting(session=session, publisher=publisher, policy=policy, lane=lane)
    except SQLAlchemyError:
        session.rollback()
        log.warning("could not publish the next task after claiming %s; the outbox will", uid, exc_info=True)
        return 0


def publish_unpublished(
    *,
    session: Session,
    publisher: TaskPublisher,
    policy: SchedulingPolicy | None = None,
    republish_after_s: float | None = None,
    limit: int = BATCH_SIZE,
) -> int:
    """The outbox: publish pending tasks that never reached the queue (broker down at submit or
    requeue, or held back by the scheduler until now); returns how many were published.

    With `republish_after_s`, pending tasks published longer ago than that are published again:
    a safety net for messages lost with the broker's data or a deleted queue, which would
    otherwise strand their tasks. The duplicate this makes when nothing was lost is harmless;
    it loses the atomic claim and the consumer skips it.
    """
    policy = policy if policy is not None else SchedulingPolicy()
    published = publish_waiting(session=session, publisher=publisher, policy=policy, limit=limit)
    if republish_after_s is not None and not publisher.backing_off:
        stale = session.execute(
            candidates()
            .where(Task.published_at < utcnow() - timedelta(seconds=republish_after_s))
            .order_by(Task.priority.desc(), Task.id)
            .limit(limit)
        ).all()
        session.rollback()
        for row in stale:
            outcome = publish(session, publisher, Candidate.of_row(row))
            if outcome == Publish.FAILED:
                break
            if outcome == Publish.DONE:
                published += 1
    if published:
        log.info("outbox published %d waiting tasks", published)
    return published
