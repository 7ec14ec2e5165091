"""Webhooks: accepting a webhook_url, the durable outbox, signed delivery with retries, giving up.

A real HTTP receiver on 127.0.0.1 (http.server in a thread) answers as each test scripts it; the
private API runs in-process with its webhook thread polling every few tens of milliseconds.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from inference_server.contract import (
    SERVICE_TOKEN_HEADER,
    WEBHOOK_EVENT_HEADER,
    TaskSubmitFields,
    WebhookEvent,
)
from inference_server.webhook_signing import verify
from private_api import keys, leases
from private_api.config import PrivateSettings
from private_api.db import upgrade_database
from private_api.main import create_app
from private_api.models import Task, WebhookDelivery, utcnow
from private_api.webhook_delivery import DeliveryPolicy, claim_attempt, due_deliveries
from tests.helpers import wait_until
from tests.private_api.conftest import SERVICE_TOKEN
from tests.private_api.helpers import (
    acting_as,
    as_consumer,
    claim,
    make_zip,
    register_model,
    row_counts,
    stored_files,
)

ALICE = acting_as("alice")


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def event(self) -> str:
        return self.headers[WEBHOOK_EVENT_HEADER]


class Receiver:
    """A webhook receiver on loopback: answers each POST with the next scripted status (then
    `default`), and keeps every request it got."""

    def __init__(self) -> None:
        self.script: list[int] = []
        self.default = 200
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    status = receiver.script.pop(0) if receiver.script else receiver.default
                    receiver.received.append(Received(dict(self.headers.items()), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def accepted(self) -> list[Received]:
        with self._lock:
            return [request for request in self.received if 200 <= request.status < 300]

    def all(self) -> list[Received]:
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    served = Receiver()
    yield served
    served.close()


@pytest.fixture
def webhook_settings(make_settings) -> Callable[..., PrivateSettings]:
    def make(**overrides: Any) -> PrivateSettings:
        values: dict[str, Any] = {
            "webhook_allowed_hosts": "127.0.0.1",
            "webhook_interval_s": 0.05,
            "webhook_first_retry_s": 0.05,
            "webhook_max_retry_s": 0.2,
            "webhook_timeout_s": 5,
        }
        return make_settings(**(values | overrides))

    return make


def _secret(client: TestClient, name: str = "alice") -> str:
    with client.app.state.session_factory() as session:
        try:
            secret, _info = keys.webhook_secret(session=session, name_or_id=name)
        except Exception:
            keys.create_key(session=session, name=name, role=keys.ApiKeyRole.USER)
            secret, _info = keys.webhook_secret(session=session, name_or_id=name)
        return secret


def _submit(client: TestClient, webhook_url: str, headers: dict[str, str] = ALICE) -> Any:
    return client.post(
        "/tasks",
        params={"model_human_readable_id": "seg-model"},
        files={"zip_file": ("input.zip", make_zip(), "application/zip")},
        data={TaskSubmitFields.WEBHOOK_URL: webhook_url},
        headers=headers,
    )


def _submit_ok(client: TestClient, webhook_url: str) -> dict[str, Any]:
    response = _submit(client, webhook_url)
    assert response.status_code == 201, response.text
    return response.json()


def _status(client: TestClient, uid: str) -> dict[str, Any]:
    response = client.get(f"/tasks/{uid}", headers=ALICE)
    assert response.status_code == 200, response.text
    return response.json()


def _upload_output(client: TestClient, uid: str) -> None:
    response = client.post(
        f"/tasks/{uid}/output",
        files={"zip_file": ("output.zip", make_zip({"mask.nii": b"\x01" * 100}))},
        headers=as_consumer("consumer-a"),
    )
    assert response.status_code == 200, response.text


def _pending_metric(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("inference_webhook_deliveries_pending "):
            return float(line.split()[1])
    raise AssertionError("inference_webhook_deliveries_pending not in /metrics")


def _claim_ok(client: TestClient, uid: str) -> None:
    response = claim(client, uid)
    assert response.status_code == 200, response.text


def test_a_refused_first_delivery_is_retried_and_every_body_is_signed(
    start_app, webhook_settings, receiver: Receiver
) -> None:
    client = start_app(webhook_settings())
    secret = _secret(client)
    register_model(client)
    receiver.script = [503]
    task = _submit_ok(client, receiver.url)
    assert task["webhook"] == {
        "url": receiver.url, "attempts": 0, "delivered": 0, "pending": 0,
        "last_answer": None, "last_attempt_at": None,
    }  # fmt: skip

    _claim_ok(client, task["uid"])
    delivered = wait_until(receiver.accepted, what="the running event, delivered on its second attempt")

    first, second = receiver.all()
    assert (first.status, second.status) == (503, 200)
    assert first.body == second.body  # the same event, sent again
    for request in (first, second):
        assert verify(secret, request.headers, request.body)
        assert not verify("whsec_someone-else", request.headers, request.body)
    assert delivered[0].event == WebhookEvent.RUNNING
    body = delivered[0].json
    assert body["event"] == "running"
    assert body["task"]["uid"] == task["uid"] and body["task"]["status"] == "running"

    webhook = wait_until(
        lambda: (state := _status(client, task["uid"])["webhook"])["delivered"] == 1 and state,
        what="the status to show the delivery",
    )
    assert webhook["attempts"] == 2 and webhook["pending"] == 0
    assert webhook["last_answer"] == "200 OK" and webhook["last_attempt_at"] is not None


def test_running_finished_failed_and_cancelled_are_each_delivered_in_order(
    start_app, webhook_settings, receiver: Receiver
) -> None:
    client = start_app(webhook_settings())
    _secret(client)
    register_model(client)
    finishes = _submit_ok(client, receiver.url)["uid"]
    fails = _submit_ok(client, receiver.url)["uid"]
    cancelled = _submit_ok(client, receiver.url)["uid"]

    _claim_ok(client, finishes)
    _claim_ok(client, finishes)  # the holder claiming again is not a new event
    _upload_output(client, finishes)
    _claim_ok(client, fails)
    failure = {"error": "exit code 3: bad input", "exit_code": 3}
    assert (
        client.post(f"/tasks/{fails}/fail", json=failure, headers=as_consumer("consumer-a")).status_code
        == 200
    )
    assert client.post(f"/tasks/{cancelled}/cancel", headers=ALICE).status_code == 200

    wait_until(lambda: len(receiver.accepted()) >= 5, what="five events")
    events: dict[str, list[tuple[str, str]]] = {}
    for request in receiver.accepted():
        events.setdefault(request.json["task"]["uid"], []).append(
            (request.event, request.json["task"]["status"])
        )
    assert events == {
        finishes: [("running", "running"), ("finished", "finished")],
        fails: [("running", "running"), ("failed", "failed")],
        cancelled: [("cancelled", "cancelled")],
    }
    finished_body = next(r.json for r in receiver.accepted() if r.event == "finished")
    assert finished_body["task"]["output_present"] is True
    assert len(receiver.all()) == 5  # nothing sent twice


@pytest.mark.parametrize(
    ("allowed", "url", "headers", "detail"),
    [
        ("", "http://127.0.0.1:9/hook", ALICE, "webhooks are not enabled"),
        ("127.0.0.1", "http://10.0.0.1/hook", ALICE, "10.0.0.1:80 is not among the allowed"),
        ("127.0.0.1:8080", "http://127.0.0.1:9090/hook", ALICE, "127.0.0.1:9090 is not among the allowed"),
        ("127.0.0.1", "ftp://127.0.0.1/hook", ALICE, "http or https"),
        ("127.0.0.1", "file:///etc/passwd", ALICE, "http or https"),
        ("127.0.0.1", "http://user:pw@127.0.0.1/hook", ALICE, "user name or password"),
        ("127.0.0.1", "http://127.0.0.1/" + "a" * 2100, ALICE, "longer than"),
        ("127.0.0.1", "http://127.0.0.1/hook", acting_as(None), "webhooks need an API key"),
        ("127.0.0.1", "http://127.0.0.1/hook", {}, "webhooks need an API key"),
    ],
)
def test_a_webhook_that_may_not_be_sent_is_refused_and_nothing_is_stored(
    start_app, webhook_settings, allowed: str, url: str, headers: dict[str, str], detail: str
) -> None:
    settings = webhook_settings(webhook_allowed_hosts=allowed)
    client = start_app(settings)
    _secret(client)
    register_model(client)
    response = _submit(client, url, headers=headers)
    assert response.status_code == 422, response.text
    assert detail in response.json()["detail"]
    assert row_counts(client) == (1, 0)
    assert stored_files(settings) == []


def test_an_allowed_host_any_port_and_https_are_accepted(start_app, webhook_settings) -> None:
    client = start_app(webhook_settings(webhook_allowed_hosts="127.0.0.1, hooks.example.org:8443"))
    _secret(client)
    register_model(client)
    for url in ("http://127.0.0.1:1234/a?b=c", "https://HOOKS.example.org:8443/x"):
        assert _submit(client, url).status_code == 201, url
    assert _submit(client, "https://hooks.example.org/x").status_code == 422  # port 443 not named


def test_deliveries_pending_at_a_restart_are_sent_by_the_next_process(
    webhook_settings, receiver: Receiver
) -> None:
    settings = webhook_settings()
    upgrade_database(settings.database_url)
    receiver.default = 503
    with TestClient(create_app(settings), headers={SERVICE_TOKEN_HEADER: SERVICE_TOKEN}) as first:
        _secret(first)
        register_model(first)
        uid = _submit_ok(first, receiver.url)["uid"]
        _claim_ok(first, uid)
        _upload_output(first, uid)
        wait_until(lambda: len(receiver.all()) >= 2, what="refused attempts before the restart")
        assert _pending_metric(first) == 2.0
    assert receiver.accepted() == []

    receiver.default = 200
    tried_before = len(receiver.all())
    with TestClient(create_app(settings), headers={SERVICE_TOKEN_HEADER: SERVICE_TOKEN}) as second:
        wait_until(lambda: len(receiver.accepted()) >= 2, what="both events after the restart")
        assert [request.event for request in receiver.accepted()] == ["running", "finished"]
        assert len(receiver.all()) > tried_before
        webhook = wait_until(
            lambda: (state := _status(second, uid)["webhook"])["pending"] == 0 and state,
            what="nothing pending",
        )
        assert webhook["delivered"] == 2
        assert _pending_metric(second) == 0.0


def test_a_delivery_is_given_up_after_the_retry_window(
    start_app, webhook_settings, receiver: Receiver
) -> None:
    client = start_app(webhook_settings(webhook_retry_for_s=0.5))
    _secret(client)
    register_model(client)
    receiver.default = 500
    uid = _submit_ok(client, receiver.url)["uid"]
    _claim_ok(client, uid)

    webhook = wait_until(
        lambda: (state := _status(client, uid)["webhook"])["attempts"] and state["pending"] == 0 and state,
        what="the delivery to be given up",
    )
    assert webhook["delivered"] == 0 and webhook["attempts"] >= 2
    assert webhook["last_answer"] == "500 Internal Server Error"
    with client.app.state.session_factory() as session:
        delivery = session.scalars(select(WebhookDelivery)).one()
        assert delivery.given_up_at is not None and delivery.next_attempt_at is None
    tried = len(receiver.all())
    receiver.default = 200
    # Given up means no further attempt: a new event of the same task is sent, the old one is not.
    assert client.post(f"/tasks/{uid}/cancel", headers=ALICE).status_code == 200
    wait_until(receiver.accepted, what="the cancelled event")
    assert [request.event for request in receiver.all()[tried:]] == ["cancelled"]


def test_two_senders_never_claim_the_same_attempt(start_app, webhook_settings, receiver: Receiver) -> None:
    # The sender idles (a long interval after its first round), so the test holds the claims.
    client = start_app(webhook_settings(webhook_interval_s=3600))
    _secret(client)
    register_model(client)
    uid = _submit_ok(client, receiver.url)["uid"]
    _claim_ok(client, uid)
    policy = DeliveryPolicy.of(webhook_settings())
    factory = client.app.state.session_factory
    with factory() as one, factory() as other:
        (due,) = due_deliveries(one, utcnow())
        one.rollback()
        won = claim_attempt(one, *due, policy)
        lost = claim_attempt(other, *due, policy)
    assert won is not None and won.attempt == 1 and lost is None
    with factory() as session:
        assert due_deliveries(session, utcnow()) == []  # claimed: not due until the claim lapses


def test_the_reaper_failing_a_task_tells_its_webhook(start_app, webhook_settings, receiver: Receiver) -> None:
    client = start_app(webhook_settings(max_attempts=1))
    _secret(client)
    register_model(client)
    uid = _submit_ok(client, receiver.url)["uid"]
    _claim_ok(client, uid)
    with client.app.state.session_factory() as session:
        # The consumer vanished on the task's only attempt: its lease lapsed ten seconds ago.
        session.execute(
            update(Task).where(Task.uid == uid).values(lease_expires_at=utcnow() - timedelta(seconds=10))
        )
        session.commit()
        reaped = leases.reap_expired_leases(
            session=session, publisher=client.app.state.publisher, max_attempts=1
        )
    assert reaped == 1
    wait_until(lambda: len(receiver.accepted()) >= 2, what="running, then failed")
    failed = receiver.accepted()[1]
    assert failed.event == WebhookEvent.FAILED
    assert failed.json["task"]["status"] == "failed"
    assert "stopped renewing its lease" in failed.json["task"]["error"]


def test_a_later_event_waits_while_an_earlier_one_of_its_task_is_retried(
    start_app, webhook_settings, receiver: Receiver
) -> None:
    # The running event is refused once and retried only after half a second; the finished event,
    # due meanwhile, must not overtake it.
    client = start_app(webhook_settings(webhook_first_retry_s=0.5, webhook_max_retry_s=0.5))
    _secret(client)
    register_model(client)
    receiver.script = [503]
    uid = _submit_ok(client, receiver.url)["uid"]
    _claim_ok(client, uid)
    wait_until(receiver.all, what="the first, refused, attempt")
    _upload_output(client, uid)
    wait_until(lambda: len(receiver.accepted()) >= 2, what="both events")
    assert [(request.event, request.status) for request in receiver.all()] == [
        ("running", 503),
        ("running", 200),
        ("finished", 200),
    ]
