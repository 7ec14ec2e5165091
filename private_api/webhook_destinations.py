"""Where webhooks may go: the operator's IS_WEBHOOK_ALLOWED_HOSTS, and the check of a submitted
webhook_url against it.

The private API POSTs to the URL from inside the platform's network, so an unchecked URL would
let any user make it reach internal addresses (the database, the broker's management port, a
cloud metadata service) and read something from the answer it reports. Only hosts the operator
named are accepted, and the URL is checked before anything is stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from private_api.exceptions import Unprocessable

WEBHOOK_URL_MAX_LENGTH = 2048
WEBHOOK_SCHEMES = {"http": 80, "https": 443}


@dataclass(frozen=True)
class AllowedHost:
    """One entry of the list: a host name or address, and the one port allowed (None: any)."""

    host: str
    port: int | None

    def allows(self, host: str, port: int) -> bool:
        return host == self.host and (self.port is None or self.port == port)

    @classmethod
    def parse(cls, entry: str) -> AllowedHost:
        """One entry: host, host:port, [v6 address] or [v6 address]:port."""
        try:
            parts = urlsplit(f"//{entry}")
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{entry!r} is not a host or host:port ({exc})") from None
        if not parts.hostname or parts.username is not None or parts.path or parts.query:
            raise ValueError(f"{entry!r} is not a host or host:port")
        return cls(host=parts.hostname.lower(), port=port)


@dataclass(frozen=True)
class AllowedHosts:
    entries: tuple[AllowedHost, ...]

    @classmethod
    def parse(cls, text: str) -> AllowedHosts:
        """The comma-separated setting; blanks around entries are ignored, a bad entry raises."""
        return cls(tuple(AllowedHost.parse(entry.strip()) for entry in text.split(",") if entry.strip()))

    def allows(self, host: str, port: int) -> bool:
        return any(entry.allows(host, port) for entry in self.entries)


def _split(url: str) -> tuple[SplitResult, int]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Unprocessable(f"webhook_url is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in WEBHOOK_SCHEMES:
        raise Unprocessable(f"webhook_url must be an http or https URL, not {parts.scheme or 'schemeless'!r}")
    if not parts.hostname:
        raise Unprocessable("webhook_url has no host")
    return parts, port if port is not None else WEBHOOK_SCHEMES[parts.scheme.lower()]


def checked_webhook_url(url: str, allowed: AllowedHosts) -> str:
    """`url` if the platform may POST to it (stripped of surrounding blanks); else Unprocessable,
    naming the problem."""
    url = url.strip()
    if len(url) > WEBHOOK_URL_MAX_LENGTH:
        raise Unprocessable(f"webhook_url is longer than {WEBHOOK_URL_MAX_LENGTH} characters")
    if any(character.isspace() or ord(character) < 0x20 for character in url):
        raise Unprocessable("webhook_url contains blanks or control characters")
    parts, port = _split(url)
    if parts.username is not None or parts.password is not None:
        # Credentials in the URL would be shown back in every status and log line.
        raise Unprocessable("webhook_url must not carry a user name or password")
    host = (parts.hostname or "").lower()
    if not allowed.allows(host, port):
        raise Unprocessable(
            f"webhook_url's host {host}:{port} is not among the allowed webhook destinations "
            "(IS_WEBHOOK_ALLOWED_HOSTS)"
        )
    return url
