"""Signing webhook bodies, and checking a signature on the receiving side.

The platform signs each body with HMAC-SHA256 under the submitting key's webhook secret, over
"<timestamp>." followed by the body's exact bytes; the timestamp (Unix seconds) is sent beside
the signature and is part of what is signed, so a receiver that refuses old timestamps refuses
replays of a body it once accepted. A receiver may import `verify` from here, or do the same in a
few lines of its own (README, "Webhooks").
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

from inference_server.contract import WEBHOOK_SIGNATURE_HEADER, WEBHOOK_TIMESTAMP_HEADER

SIGNATURE_SCHEME = "sha256="
# How far a timestamp may lie from the receiver's clock, either way, before it is refused.
DEFAULT_TOLERANCE_S = 300.0


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: "sha256=" and the hex HMAC-SHA256 of "<timestamp>.<body>"."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return SIGNATURE_SCHEME + digest


def signature_headers(secret: str, body: bytes, *, timestamp: int | None = None) -> dict[str, str]:
    """The signature and timestamp headers for `body`, signed now (or at `timestamp`)."""
    moment = int(time.time()) if timestamp is None else timestamp
    return {WEBHOOK_SIGNATURE_HEADER: sign(secret, moment, body), WEBHOOK_TIMESTAMP_HEADER: str(moment)}


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # Receivers hand over what their framework gives: case-insensitive mappings or plain dicts.
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    return next((value for key, value in headers.items() if key.lower() == wanted), None)


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True only when `headers` carry a signature of exactly `body` under `secret` and a
    timestamp within `tolerance_s` of now: a forged, altered or replayed delivery is False."""
    signature = _header(headers, WEBHOOK_SIGNATURE_HEADER)
    timestamp = _header(headers, WEBHOOK_TIMESTAMP_HEADER)
    if signature is None or timestamp is None or not timestamp.strip().isdigit():
        return False
    moment = int(timestamp)
    current = time.time() if now is None else now
    if abs(current - moment) > tolerance_s:
        return False
    # Constant time: a comparison that stops at the first wrong character tells an attacker how
    # much of a forged signature was right.
    return hmac.compare_digest(sign(secret, moment, body).encode(), signature.strip().encode())
