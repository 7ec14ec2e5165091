"""The private API's background thread: the outbox, the lease reaper, retention, and the
scheduler's sweeps (unrunnable tasks past IS_UNRUNNABLE_TIMEOUT_S, consumers gone for a day).

One daemon thread, stopped through an Event by the app's lifespan. It also keeps the
publisher's idle RabbitMQ connection alive (pika's BlockingConnection only answers broker
heartbeats when someone calls into it).

Leases are only as good as the private API's view of time: while this process or its database
was away, no consumer could renew a lease, so every lease looks expired when it comes back.
The reaper therefore waits one grace period (a full lease) after start-up and after each
database outage before it takes a task from anyone, and consumers renew meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from private_api import chains, consumer_registry, dashboard_sessions, leases, outbox, scheduling
from private_api.blobs import BlobStore
from private_api.queue import TaskPublisher
from private_api.retention import expire_old_tasks
from private_api.scheduling import SchedulingPolicy

log = logging.getLogger(__name__)

KEEP_ALIVE_S = 5.0


class MaintenanceLoop:
    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        publisher: TaskPublisher,
        max_attempts: int,
        reaper_interval_s: float,
        outbox_interval_s: float,
        republish_after_s: float | None = None,
        blobs: BlobStore | None = None,
        retention: timedelta | None = None,
        retention_interval_s: float = 600.0,
        lease_grace_s: float = 0.0,
        policy: SchedulingPolicy | None = None,
        unrunnable_timeout_s: float = 0.0,
        consumer_forget_after_s: float = 24 * 3600.0,
    ) -> None:
        self._session_factory = session_factory
        self._publisher = publisher
        self._max_attempts = max_attempts
        self._reaper_interval_s = reaper_interval_s
        self._outbox_interval_s = outbox_interval_s
        self._republish_after_s = republish_after_s
        self._blobs = blobs
        self._retention = retention
        self._retention_interval_s = retention_interval_s
        self._lease_grace_s = lease_grace_s
        self._policy = policy if policy is not None else SchedulingPolicy()
        self._unrunnable_timeout_s = unrunnable_timeout_s
        self._consumer_forget_after_s = consumer_forget_after_s
        self._reap_after = 0.0  # start() begins the first grace period
        self._database_was_down = False
        self._stop = threading.Event()
        # Set to wake the loop early: on stop, and when the outbox should run now.
        self._wake = threading.Event()
        self._publish_requested = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("maintenance loop already started")
        self._start_grace("start-up")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="private-api-maintenance", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("maintenance thread did not stop within %.0fs", timeout_s)
            self._thread = None

    @property
    def leases_enforced(self) -> bool:
        """False during the grace period: an expired lease may still be renewed by its holder and
        is neither reaped nor taken over by another consumer's claim."""
        return time.monotonic() >= self._reap_after and not self._database_was_down

    def _start_grace(self, why: str) -> None:
        self._reap_after = time.monotonic() + self._lease_grace_s
        if self._lease_grace_s > 0:
            log.info(
                "leases not enforced for %.0f s after %s: consumers renew first", self._lease_grace_s, why
            )

    def reap_once(self) -> int:
        try:
            with self._session_factory() as session:
                if self._database_was_down:
                    # The first round that reaches the database again only starts the grace.
                    session.execute(select(1))
                    self._database_was_down = False
                    self._start_grace("a database outage")
                    return 0
                if not self.leases_enforced:
                    return 0
                return leases.reap_expired_leases(
                    session=session,
                    publisher=self._publisher,
                    max_attempts=self._max_attempts,
                    policy=self._policy,
                )
        except SQLAlchemyError:
            self._database_was_down = True
            raise

    def publish_once(self) -> int:
        with self._session_factory() as session:
            # Tasks still waiting on an upstream that ended (a crash before its settle, or a
            # change made where none is called) get its output, or end, and so may go out now.
            chains.settle_stranded(session=session, publisher=self._publisher, policy=self._policy)
            return outbox.publish_unpublished(
                session=session,
                publisher=self._publisher,
                policy=self._policy,
                republish_after_s=self._republish_after_s,
            )

    def publish_soon(self) -> None:
        """Run the outbox now rather than at its next round: a consumer registered or resumed, so
        tasks held for want of one may go out."""
        self._publish_requested = True
        self._wake.set()

    def sweep_once(self) -> int:
        """The scheduler's sweeps: unrunnable tasks past their timeout fail; long-lost consumers go;
        expired dashboard sessions are deleted."""
        with self._session_factory() as session:
            failed = 0
            if self._unrunnable_timeout_s:
                failed = scheduling.fail_unrunnable(
                    session=session, policy=self._policy, timeout_s=self._unrunnable_timeout_s
                )
            forgotten = consumer_registry.forget_lost_consumers(
                session=session, forget_after_s=self._consumer_forget_after_s
            )
            ended_sessions = dashboard_sessions.prune_expired(session=session)
            return failed + forgotten + ended_sessions

    def expire_once(self) -> int:
        if self._blobs is None or not self._retention:
            return 0
        with self._session_factory() as session:
            return expire_old_tasks(session=session, blobs=self._blobs, max_age=self._retention)

    def _guarded(self, step: Callable[[], int]) -> None:
        # One failed round (database briefly away) must not end the loop; it is logged and retried.
        try:
            step()
        except Exception:
            log.exception("maintenance step %s failed; retrying next round", step.__name__)

    def _run(self) -> None:
        next_reap = next_outbox = next_expiry = time.monotonic()
        while not self._stop.is_set():
            self._guarded(self._keep_alive)
            now = time.monotonic()
            if now >= next_reap:
                self._guarded(self.reap_once)
                next_reap = time.monotonic() + self._reaper_interval_s
            if now >= next_outbox or self._publish_requested:
                self._publish_requested = False
                self._guarded(self.publish_once)
                self._guarded(self.sweep_once)
                next_outbox = time.monotonic() + self._outbox_interval_s
            if now >= next_expiry:
                self._guarded(self.expire_once)
                next_expiry = time.monotonic() + self._retention_interval_s
            # Wake at least every few seconds: the broker connection needs its heartbeats answered.
            wake_at = min(next_reap, next_outbox, next_expiry, time.monotonic() + KEEP_ALIVE_S)
            self._wake.wait(max(0.01, wake_at - time.monotonic()))
            self._wake.clear()

    def _keep_alive(self) -> int:
        self._publisher.keep_alive()
        return 0
