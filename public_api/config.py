"""Settings of the public API: read once from IS_* environment variables."""

from __future__ import annotations

from pydantic import Field, field_validator

from inference_server.settings import ServiceSettings, ServiceToken


class PublicSettings(ServiceSettings):
    private_api_url: str = Field(default="http://127.0.0.1:8001", pattern=r"^https?://")
    private_api_connect_timeout_s: float = Field(default=5.0, gt=0)
    private_api_read_timeout_s: float = Field(default=60.0, gt=0)
    # After an upload the private API checks the whole zip before answering; a big archive takes
    # minutes, so the wait for that answer has its own, longer limit.
    private_api_upload_timeout_s: float = Field(default=900.0, gt=0)
    # Connections for streamed bodies (uploads, downloads), each held for as long as one lasts.
    private_api_max_connections: int = Field(default=100, ge=1)
    # Small calls (status, lists, key checks) in flight to the private API at once; more wait
    # their turn here, up to the connect timeout, then get a 503.
    private_api_concurrency: int = Field(default=16, ge=1, le=1000)
    max_upload_bytes: int = Field(default=20 * 1024**3, ge=1)

    # Compatibility with InferenceServer v1.2 clients, which send no key. Off by default: with
    # IS_ANONYMOUS_TASKS anyone may submit tasks and poll, download, cancel and delete them by
    # uid; with IS_ANONYMOUS_MODELS anyone may register, change and remove models (the original's
    # ALLOW_PUBLIC_POST_MODEL).
    anonymous_tasks: bool = False
    anonymous_models: bool = False
    # A Bearer token that may read /metrics and nothing else, for Prometheus; unset: only
    # operator keys may. Checked like a service token (long, not blank).
    metrics_token: ServiceToken | None = None

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose passes `IS_METRICS_TOKEN: ${IS_METRICS_TOKEN:-}` as "" when .env leaves it out.
        return None if value == "" else value

    # How long a resolved key is trusted without asking the private API again: a revoked key
    # stops working within this many seconds.
    key_cache_ttl_s: float = Field(default=5.0, ge=0, le=10)
    # Requests that fail the key check (no key where one is needed, a wrong or revoked one) per
    # client address: this many at once, refilled at this many a minute; past it, 429.
    unauthenticated_rate_per_minute: int = Field(default=60, ge=1)
    # The proxies (addresses or networks, comma-separated, "*" for any) whose X-Forwarded-For
    # names the client; behind Traefik, its address, or the rate above counts all clients as one.
    forwarded_allow_ips: str = "127.0.0.1"
