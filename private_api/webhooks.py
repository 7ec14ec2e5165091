"""Webhooks on the task's side: accepting a submission's webhook_url, and enqueueing an event in
the durable outbox (webhook_deliveries) in the transaction of the state change it reports.

Every transition that users are told about calls `enqueue` before its commit: claim (running),
the output upload or a cache hit (finished), a failure that is not retried, the reaper or the
scheduler giving up, an upstream that failed (failed), and cancel (cancelled). Sending is
webhook_delivery.py's business.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from inference_server.contract import WebhookBody, WebhookEvent
from private_api.access import Actor
from private_api.exceptions import Unprocessable
from private_api.models import Task, WebhookDelivery, utcnow
from private_api.task_rows import load_task, task_public
from private_api.webhook_destinations import AllowedHosts, checked_webhook_url


def accepted_webhook_url(url: str | None, *, actor: Actor | None, allowed: AllowedHosts) -> str | None:
    """The webhook_url to store with a new task (None when none was sent), or the reason it is
    refused: webhooks not enabled, an anonymous submission, a URL the platform may not POST to."""
    if url is None or not url.strip():
        return None
    if not allowed.entries:
        raise Unprocessable(
            "webhooks are not enabled: the operator has allowed no destination (IS_WEBHOOK_ALLOWED_HOSTS)"
        )
    if actor is None or actor.name is None:
        raise Unprocessable(
            "webhooks need an API key: each body is signed with the submitting key's webhook secret, "
            "and an anonymous submission has none"
        )
    return checked_webhook_url(url, allowed)


def enqueue(session: Session, task: Task, event: WebhookEvent) -> None:
    """Queue `event` for `task`'s webhook, if it has one, in the caller's transaction: it is sent
    once that commits, and never if it rolls back. `task` is the row as just changed."""
    if task.webhook_url is None:
        return
    # The status as of this change; its `webhook` part would be stale by the time it arrives.
    snapshot = task_public(task).model_copy(update={"webhook": None})
    now = utcnow()
    session.add(
        WebhookDelivery(
            task_id=task.id,
            event=event,
            body=WebhookBody(event=event, task=snapshot).model_dump(mode="json"),
            created_at=now,
            attempts=0,
            next_attempt_at=now,
        )
    )
    session.flush()


def enqueue_for_uid(session: Session, uid: str, event: WebhookEvent) -> None:
    """`enqueue` for a change made by uid alone (the reaper, the scheduler's sweep, chains)."""
    task = load_task(session, uid)
    if task is not None:
        enqueue(session, task, event)
