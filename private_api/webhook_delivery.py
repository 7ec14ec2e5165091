"""Sending webhooks: a thread of the private API that POSTs the due rows of the durable outbox
(webhook_deliveries, filled by webhooks.enqueue) and retries them with exponential backoff.

Delivery is at least once. A row is claimed before it is sent, by a conditional UPDATE that
counts the attempt and moves `next_attempt_at` past the time a POST may take, so several private
API processes never send the same attempt; a process that dies mid-send leaves the row to be
sent again once that time has passed. A 2xx answer delivers; anything else (another status, a
redirect, which is not followed, a refused connection, a timeout) is retried until
IS_WEBHOOK_RETRY_FOR_S after the event, then given up. A task's events go out in order: one waits
while an earlier event of its task is still pending.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import httpx
from sqlalchemy import CursorResult, exists, func, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from inference_server.contract import WEBHOOK_EVENT_HEADER
from inference_server.webhook_signing import signature_headers
from private_api.config import PrivateSettings
from private_api.models import ApiKey, Task, WebhookDelivery, utcnow

log = logging.getLogger(__name__)

# Rows claimed per round; the sender goes again at once while rounds come back full.
BATCH_SIZE = 50
# POSTs in flight at once: one slow receiver must not hold up everyone else's.
SEND_THREADS = 8
# How long past the POST's own timeout a claimed attempt stays claimed before another process
# may take it (its sender is presumed dead).
CLAIM_MARGIN_S = 30.0
ANSWER_MAX_LENGTH = 255
USER_AGENT = "InferenceServer-Webhook/1"


@dataclass(frozen=True)
class DeliveryPolicy:
    """How deliveries are retried and how long one POST may take (IS_WEBHOOK_* settings)."""

    retry_for: timedelta
    first_retry_s: float
    max_retry_s: float
    timeout_s: float

    @classmethod
    def of(cls, settings: PrivateSettings) -> DeliveryPolicy:
        return cls(
            retry_for=timedelta(seconds=settings.webhook_retry_for_s),
            first_retry_s=settings.webhook_first_retry_s,
            max_retry_s=settings.webhook_max_retry_s,
            timeout_s=settings.webhook_timeout_s,
        )

    def retry_delay_s(self, attempts: int) -> float:
        """After `attempts` failed attempts: first_retry_s, doubling, capped; drawn from the upper
        quarter below it (like inference_server.backoff), so receivers that were down together
        are not all called again in the same second."""
        doublings = min(max(attempts - 1, 0), 40)
        nominal: float = min(self.max_retry_s, self.first_retry_s * 2.0**doublings)
        return nominal * random.uniform(0.75, 1.0)

    @property
    def claim_hold(self) -> timedelta:
        return timedelta(seconds=self.timeout_s + CLAIM_MARGIN_S)


@dataclass(frozen=True)
class ClaimedAttempt:
    """One attempt this process won: what to send, where, and how to sign it."""

    id: int
    attempt: int
    created_at: datetime
    event: str
    body: bytes
    url: str | None
    secret: str | None


def _rowcount(result: Any) -> int:
    # An UPDATE's result is a CursorResult, with its rowcount; Session.execute is typed as Result.
    return cast(CursorResult[Any], result).rowcount


def due_deliveries(session: Session, now: datetime, limit: int = BATCH_SIZE) -> list[tuple[int, int]]:
    """(id, attempts) of deliveries due now whose task has no earlier event still pending."""
    earlier = aliased(WebhookDelivery)
    earlier_pending = exists().where(
        earlier.task_id == WebhookDelivery.task_id,
        earlier.id < WebhookDelivery.id,
        earlier.delivered_at.is_(None),
        earlier.given_up_at.is_(None),
    )
    rows = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.attempts)
        .where(WebhookDelivery.next_attempt_at <= now, ~earlier_pending)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
    ).all()
    return [(row.id, row.attempts) for row in rows]


def pending_count(session: Session) -> int:
    """Deliveries neither delivered nor given up (those have no next attempt): for /metrics."""
    count = session.scalar(
        select(func.count()).select_from(WebhookDelivery).where(WebhookDelivery.next_attempt_at.is_not(None))
    )
    return int(count or 0)


def claim_attempt(
    session: Session, delivery_id: int, seen_attempts: int, policy: DeliveryPolicy
) -> ClaimedAttempt | None:
    """Take the next attempt of a due delivery, or None when another process took it first (it
    counted an attempt since we looked) or it is no longer due."""
    now = utcnow()
    won = _rowcount(
        session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.attempts == seen_attempts,
                WebhookDelivery.next_attempt_at <= now,
            )
            .values(
                attempts=WebhookDelivery.attempts + 1,
                last_attempt_at=now,
                next_attempt_at=now + policy.claim_hold,
            )
            .execution_options(synchronize_session=False)
        )
    )
    if won != 1:
        session.rollback()
        return None
    row = session.execute(
        select(WebhookDelivery, Task.webhook_url, ApiKey.webhook_secret)
        .join(Task, Task.id == WebhookDelivery.task_id)
        .outerjoin(ApiKey, ApiKey.name == Task.owner)
        .where(WebhookDelivery.id == delivery_id)
    ).one()
    delivery: WebhookDelivery = row[0]
    claimed = ClaimedAttempt(
        id=delivery.id,
        attempt=delivery.attempts,
        created_at=delivery.created_at,
        event=str(delivery.event),
        body=json.dumps(delivery.body, separators=(",", ":")).encode(),
        url=row.webhook_url,
        secret=row.webhook_secret,
    )
    session.commit()
    return claimed


def record_answer(
    session: Session, claimed: ClaimedAttempt, *, delivered: bool, answer: str, policy: DeliveryPolicy
) -> str:
    """Write how the attempt ended: delivered, due again after a backoff, or given up once the
    retry window has passed. Returns which, for the log."""
    now = utcnow()
    values: dict[str, Any] = {"last_answer": answer[:ANSWER_MAX_LENGTH]}
    deadline = claimed.created_at + policy.retry_for
    if delivered:
        outcome = "delivered"
        values |= {"delivered_at": now, "next_attempt_at": None}
    elif now >= deadline or claimed.url is None or claimed.secret is None:
        outcome = "given up"
        values |= {"given_up_at": now, "next_attempt_at": None}
    else:
        # The last retry falls on the deadline itself, so the window is used to its end.
        next_at = min(now + timedelta(seconds=policy.retry_delay_s(claimed.attempt)), deadline)
        outcome = f"retried at {next_at.isoformat()}"
        values["next_attempt_at"] = next_at
    # Only over our own attempt: had the claim lapsed and another process taken the next
    # attempt, its answer is the one that counts.
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == claimed.id, WebhookDelivery.attempts == claimed.attempt)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return outcome


def post(client: httpx.Client, claimed: ClaimedAttempt) -> tuple[bool, str]:
    """POST one signed body; (delivered, the answer in words). Never raises for the receiver's
    failures. The answer's body is not read: only its status counts."""
    if claimed.url is None or claimed.secret is None:
        return False, "not sent: the task has no webhook URL or its key no webhook secret"
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        WEBHOOK_EVENT_HEADER: claimed.event,
        **signature_headers(claimed.secret, claimed.body),
    }
    try:
        with client.stream("POST", claimed.url, content=claimed.body, headers=headers) as response:
            answer = f"{response.status_code} {response.reason_phrase}".strip()
            if response.is_redirect:
                answer += " (redirects are not followed)"
            return response.is_success, answer
    except httpx.TimeoutException:
        return False, "timed out"
    except httpx.ConnectError as exc:
        return False, f"connection failed: {exc}"
    except httpx.HTTPError as exc:
        return False, f"{type(exc).__name__}: {exc}"


class WebhookSender:
    """The private API's webhook thread: started and stopped by the app's lifespan."""

    def __init__(
        self, *, session_factory: sessionmaker[Session], policy: DeliveryPolicy, interval_s: float
    ) -> None:
        self._session_factory = session_factory
        self._policy = policy
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: httpx.Client | None = None
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("webhook sender already started")
        self._stop.clear()
        # No proxy from the environment (the allow-list is about where the POST really goes),
        # no redirect followed (a redirect could lead anywhere, past the allow-list).
        self._client = httpx.Client(
            timeout=httpx.Timeout(self._policy.timeout_s, connect=min(5.0, self._policy.timeout_s)),
            follow_redirects=False,
            trust_env=False,
        )
        self._pool = ThreadPoolExecutor(SEND_THREADS, thread_name_prefix="webhook-send")
        self._thread = threading.Thread(target=self._run, name="private-api-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the POSTs in flight end (each bounded by IS_WEBHOOK_TIMEOUT_S)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("webhook thread did not stop within %.0fs", timeout_s)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def deliver_once(self) -> int:
        """Claim the due deliveries and send them; how many were attempted."""
        assert self._client is not None and self._pool is not None, "start() first"
        with self._session_factory() as session:
            due = due_deliveries(session, utcnow())
            session.rollback()
            claimed = [
                attempt
                for delivery_id, attempts in due
                if (attempt := claim_attempt(session, delivery_id, attempts, self._policy)) is not None
            ]
        list(self._pool.map(self._send, claimed))
        return len(claimed)

    def _send(self, claimed: ClaimedAttempt) -> None:
        assert self._client is not None
        delivered, answer = post(self._client, claimed)
        try:
            with self._session_factory() as session:
                outcome = record_answer(
                    session, claimed, delivered=delivered, answer=answer, policy=self._policy
                )
        except Exception:
            # The claim lapses and the attempt is made again: at least once, never lost.
            log.exception("could not record webhook delivery %d's answer (%s)", claimed.id, answer)
            return
        level = logging.INFO if delivered else logging.WARNING
        log.log(level, "webhook %s of delivery %d, attempt %d: %s; %s",
                claimed.event, claimed.id, claimed.attempt, answer, outcome)  # fmt: skip

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                full = self.deliver_once() >= BATCH_SIZE
            except Exception:
                # One failed round (database briefly away) must not end the loop.
                log.exception("webhook round failed; retrying next round")
                full = False
            if not full:
                self._stop.wait(self._interval_s)
