"""The registered consumers: registration, heartbeats, their listing with a state, draining.

A consumer registers at start-up (and again whenever the private API no longer knows it) and
heartbeats while it lives; the row says what it could run and when it was last heard from. The
state is computed when read, never stored, so a consumer that vanished turns `lost` by itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from inference_server.contract import (
    AuditAction,
    ConsumerHeartbeat,
    ConsumerHeartbeatReply,
    ConsumerPublic,
    ConsumerRegistration,
    ConsumerState,
    GpuInfo,
)
from private_api import audit
from private_api.exceptions import NotFound
from private_api.models import Consumer, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisteredConsumer:
    """A consumer as the scheduler sees it: what it declared, and whether it may get tasks."""

    registration: ConsumerRegistration
    state: ConsumerState

    @property
    def live(self) -> bool:
        """Heard from recently and not draining: it may take new tasks."""
        return self.state in (ConsumerState.IDLE, ConsumerState.BUSY)


def consumer_state(consumer: Consumer, *, now: datetime, lost_after_s: float) -> ConsumerState:
    if consumer.last_seen_at < now - timedelta(seconds=lost_after_s):
        return ConsumerState.LOST
    if consumer.draining:
        return ConsumerState.DRAINING
    return ConsumerState.BUSY if consumer.running_tasks else ConsumerState.IDLE


def _public(consumer: Consumer, *, now: datetime, lost_after_s: float) -> ConsumerPublic:
    return ConsumerPublic.model_validate(
        {
            **_registration(consumer).model_dump(),
            "id": consumer.id,
            "state": consumer_state(consumer, now=now, lost_after_s=lost_after_s),
            "draining": consumer.draining,
            "running_tasks": list(consumer.running_tasks),
            "registered_at": consumer.registered_at,
            "last_seen_at": consumer.last_seen_at,
            "gpu_readings": consumer.gpu_readings or [],
        }
    )


def _registration(consumer: Consumer) -> ConsumerRegistration:
    return ConsumerRegistration(
        host=consumer.host,
        runtime=consumer.runtime,
        version=consumer.version,
        gpus=[GpuInfo.model_validate(gpu) for gpu in consumer.gpus],
        cpus=consumer.cpus,
        memory_mb=consumer.memory_mb,
        max_tasks=consumer.max_tasks,
        takes_gpu_tasks=consumer.takes_gpu_tasks,
        takes_cpu_tasks=consumer.takes_cpu_tasks,
    )


def _required(session: Session, consumer_id: str) -> Consumer:
    consumer = session.get(Consumer, consumer_id, populate_existing=True)
    if consumer is None:
        raise NotFound(f"consumer {consumer_id!r} is not registered")
    return consumer


def is_draining(session: Session, consumer_id: str) -> bool:
    """False for a consumer that never registered: it may still claim (older consumers, tools)."""
    draining = session.scalar(select(Consumer.draining).where(Consumer.id == consumer_id))
    return bool(draining)


def register_consumer(
    *, session: Session, consumer_id: str, registration: ConsumerRegistration, lost_after_s: float
) -> ConsumerPublic:
    """Insert or update the consumer's row; an operator's drain survives the consumer's restart."""
    try:
        public = _upsert(session, consumer_id, registration, lost_after_s)
    except IntegrityError:
        # Two first registrations of one id raced and the other inserted first: update its row.
        session.rollback()
        public = _upsert(session, consumer_id, registration, lost_after_s)
    log.info(
        "consumer %s registered from %s (%d GPUs, %g CPUs, %d MiB, up to %d tasks)",
        consumer_id,
        registration.host,
        len(registration.gpus),
        registration.cpus,
        registration.memory_mb,
        registration.max_tasks,
    )
    return public


def _upsert(
    session: Session, consumer_id: str, registration: ConsumerRegistration, lost_after_s: float
) -> ConsumerPublic:
    now = utcnow()
    values = registration.model_dump(mode="json")
    consumer = session.get(Consumer, consumer_id, with_for_update=True, populate_existing=True)
    if consumer is None:
        consumer = Consumer(
            id=consumer_id,
            **values,
            running_tasks=[],
            gpu_readings=[],
            draining=False,
            registered_at=now,
            last_seen_at=now,
        )
        session.add(consumer)
    else:
        for name, value in values.items():
            setattr(consumer, name, value)
        consumer.registered_at = consumer.last_seen_at = now
    session.flush()
    public = _public(consumer, now=now, lost_after_s=lost_after_s)
    session.commit()
    return public


def heartbeat(*, session: Session, consumer_id: str, beat: ConsumerHeartbeat) -> ConsumerHeartbeatReply:
    """Record that the consumer lives and what it runs; tells it whether it is draining."""
    consumer = _required(session, consumer_id)
    consumer.running_tasks = list(beat.running_tasks)
    consumer.gpu_readings = [reading.model_dump(mode="json") for reading in beat.gpu_readings]
    consumer.last_seen_at = utcnow()
    reply = ConsumerHeartbeatReply(draining=consumer.draining)
    session.commit()
    return reply


def list_consumers(*, session: Session, lost_after_s: float) -> list[ConsumerPublic]:
    """Every registered consumer, newest registration first, lost ones included."""
    now = utcnow()
    rows = session.scalars(select(Consumer).order_by(Consumer.registered_at.desc(), Consumer.id))
    return [_public(row, now=now, lost_after_s=lost_after_s) for row in rows]


def registered_consumers(*, session: Session, lost_after_s: float) -> list[RegisteredConsumer]:
    """Every consumer the scheduler weighs, with its state (lost ones are left out)."""
    now = utcnow()
    since = now - timedelta(seconds=lost_after_s)
    rows = session.scalars(select(Consumer).where(Consumer.last_seen_at >= since))
    return [
        RegisteredConsumer(_registration(row), consumer_state(row, now=now, lost_after_s=lost_after_s))
        for row in rows
    ]


def set_draining(
    *,
    session: Session,
    consumer_id: str,
    draining: bool,
    lost_after_s: float,
    actor: audit.AuditActor = audit.PLATFORM,
) -> ConsumerPublic:
    """Drain (take no new task, finish the running ones) or resume a consumer; audited when it
    changes the consumer."""
    consumer = _required(session, consumer_id)
    if consumer.draining != draining:
        action = AuditAction.CONSUMER_DRAINED if draining else AuditAction.CONSUMER_RESUMED
        audit.record(session, actor, action, consumer_id)
    consumer.draining = draining
    session.flush()
    public = _public(consumer, now=utcnow(), lost_after_s=lost_after_s)
    session.commit()
    log.info("consumer %s %s", consumer_id, "draining" if draining else "resumed")
    return public


def forget_lost_consumers(*, session: Session, forget_after_s: float) -> int:
    """Delete the rows of consumers not heard from for `forget_after_s`: hosts long gone."""
    cutoff = utcnow() - timedelta(seconds=forget_after_s)
    result = session.execute(delete(Consumer).where(Consumer.last_seen_at < cutoff))
    session.commit()
    forgotten = int(getattr(result, "rowcount", 0) or 0)
    if forgotten:
        log.info("forgot %d consumers not heard from for %.0f s", forgotten, forget_after_s)
    return forgotten


def count_by_state(*, session: Session, lost_after_s: float) -> dict[ConsumerState, int]:
    counts = dict.fromkeys(ConsumerState, 0)
    for consumer in list_consumers(session=session, lost_after_s=lost_after_s):
        counts[consumer.state] += 1
    return counts
