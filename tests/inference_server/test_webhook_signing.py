"""What a receiver checks: a signature over the timestamp and the exact body, within a window."""

from __future__ import annotations

import hashlib
import hmac
import time

from inference_server.contract import WEBHOOK_SIGNATURE_HEADER, WEBHOOK_TIMESTAMP_HEADER
from inference_server.webhook_signing import sign, signature_headers, verify

SECRET = "whsec_test-secret"
BODY = b'{"event":"finished","task":{"uid":"abc"}}'


def test_the_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET.encode(), b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1700000000, BODY) == f"sha256={expected}"


def test_a_fresh_signature_verifies_with_headers_in_any_case() -> None:
    headers = signature_headers(SECRET, BODY)
    assert verify(SECRET, headers, BODY)
    assert verify(SECRET, {name.lower(): value for name, value in headers.items()}, BODY)


def test_an_altered_body_another_secret_or_missing_headers_fail() -> None:
    headers = signature_headers(SECRET, BODY)
    assert not verify(SECRET, headers, BODY.replace(b"finished", b"failed"))
    assert not verify("whsec_other", headers, BODY)
    assert not verify(SECRET, {WEBHOOK_TIMESTAMP_HEADER: headers[WEBHOOK_TIMESTAMP_HEADER]}, BODY)
    assert not verify(SECRET, {WEBHOOK_SIGNATURE_HEADER: headers[WEBHOOK_SIGNATURE_HEADER]}, BODY)
    assert not verify(SECRET, {**headers, WEBHOOK_TIMESTAMP_HEADER: "soon"}, BODY)


def test_a_replayed_delivery_is_refused_once_its_timestamp_is_old() -> None:
    now = time.time()
    sent_at = int(now) - 301
    old = signature_headers(SECRET, BODY, timestamp=sent_at)
    assert verify(SECRET, old, BODY, now=sent_at + 10)  # when it was fresh
    assert not verify(SECRET, old, BODY, now=now)  # replayed five minutes later
    assert verify(SECRET, old, BODY, now=now, tolerance_s=600)
    # A timestamp moved forward to look fresh no longer matches the signature.
    assert not verify(SECRET, {**old, WEBHOOK_TIMESTAMP_HEADER: str(int(now))}, BODY, now=now)


def test_a_timestamp_from_the_future_is_refused_too() -> None:
    now = time.time()
    ahead = signature_headers(SECRET, BODY, timestamp=int(now) + 3600)
    assert not verify(SECRET, ahead, BODY, now=now)
