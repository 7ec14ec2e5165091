"""The private API's settings: one class, read from IS_* environment variables, built once."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator

from inference_server.contract import MAX_PRIORITY
from inference_server.settings import BrokerSettings, ServiceToken, ZipLimitSettings
from private_api.webhook_destinations import AllowedHosts


class PrivateSettings(BrokerSettings, ZipLimitSettings):
    database_url: str = "sqlite:///./data/inference.db"
    # Connections kept open; as many again may open for a burst and close after it. Requests run
    # on up to 40 threads: with fewer kept, a polling burst opens and closes a connection per
    # request (profiled: a quarter of the private API's CPU).
    db_pool_size: int = Field(default=20, ge=1, le=500)
    # Threads for the quick queries of status polls (db.QuickQueries); few on purpose.
    db_quick_threads: int = Field(default=2, ge=1, le=64)
    data_dir: Path = Path("./data")
    # Least privilege between the services (deps.py, ROUTE_GRANTS): the public API and the
    # consumers each present a token of their own that opens only the routes they call, so a
    # leaked consumer token cannot read other tasks or change models. Optional, so a platform
    # started with IS_SERVICE_TOKEN alone keeps working; unset, that role does not exist and its
    # service has to present the full-access token instead. Every shipped way to start the
    # platform (launcher, docker-compose.yaml, docker-stack.yaml) sets both.
    public_api_token: ServiceToken | None = None
    consumer_token: ServiceToken | None = None

    lease_seconds: int = Field(default=60, ge=1, le=24 * 3600)
    max_attempts: int = Field(default=3, ge=1, le=100)
    max_upload_bytes: int = Field(default=50 * 1024**3, ge=1)
    # Logs past this size are cut (with a note), not refused: a chatty model must not lose its result.
    max_log_bytes: int = Field(default=16 * 1024**2, ge=1024)

    # What a user key may do when the operator gave it no limits of its own (`keys set`); operator
    # keys default to MAX_PRIORITY and no limit. Anonymous submissions get the user priority.
    default_max_priority: int = Field(default=5, ge=0, le=MAX_PRIORITY)
    # Pending plus running tasks per user key; 0 is unlimited.
    default_max_active_tasks: int = Field(default=0, ge=0)

    # A consumer not heard from (registration, heartbeat) for this long is listed as lost and no
    # longer counts as able to run anything; after consumer_forget_after_s its row is deleted.
    consumer_lost_after_s: float = Field(default=30.0, gt=0)
    consumer_forget_after_s: float = Field(default=24 * 3600.0, gt=0)
    # Fair share: an owner has at most this many tasks waiting in the broker per queue (CPU, GPU)
    # at or above a task's priority; the rest wait unpublished, so owners take turns. 0: no cap.
    fair_share_queued_per_owner: int = Field(default=2, ge=0)
    # A cache hit across owners would tell one user that another submitted the very same input
    # (a patient's scan, say), so by default a task is answered only from its own owner's
    # results, and anonymous tasks, who share no identity, never. A lab that wants one shared
    # cache turns this on.
    cache_across_owners: bool = False
    # Pending tasks no registered consumer could run are failed after this long; 0 never fails them.
    unrunnable_timeout_s: float = Field(default=0.0, ge=0)

    reaper_interval_s: float = Field(default=2.0, gt=0)
    outbox_interval_s: float = Field(default=2.0, gt=0)
    # Pending tasks whose message is older than this are published again, in case the broker
    # lost it (queue deleted, broker data wiped); see service.publish_unpublished.
    republish_after_s: float = Field(default=900.0, gt=0)
    # Files of tasks that ended longer ago than this are removed (rows kept); 0 keeps them forever.
    retention_days: float = Field(default=30.0, ge=0)
    retention_interval_s: float = Field(default=600.0, gt=0)
    # How long a dashboard login lasts (dashboard_sessions.py); logout or revoking its key ends
    # it sooner.
    dashboard_session_hours: float = Field(default=12.0, gt=0, le=24 * 30)

    # Webhooks (webhook_destinations.py, webhook_delivery.py). The hosts a webhook_url may name,
    # comma-separated, each "host" (any port) or "host:port"; empty refuses every webhook, so the
    # platform is never made to reach an address the operator did not name.
    webhook_allowed_hosts: str = ""
    # A delivery is retried, waiting webhook_first_retry_s and then twice as long each time (at
    # most webhook_max_retry_s), until this long after its event; then it is given up.
    webhook_retry_for_s: float = Field(default=24 * 3600.0, gt=0)
    webhook_first_retry_s: float = Field(default=10.0, gt=0)
    webhook_max_retry_s: float = Field(default=3600.0, gt=0)
    # How often the sender looks for due deliveries, and how long one POST may take.
    webhook_interval_s: float = Field(default=1.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120)

    @field_validator("public_api_token", "consumer_token")
    @classmethod
    def _token_is_its_own(cls, value: ServiceToken | None, info: ValidationInfo) -> ServiceToken | None:
        # A token shared by two roles would be resolved to one of them: whichever service holds
        # it would get the other's rights, or lose its own. Refuse at start-up instead.
        if value is None:
            return value
        for other in ("service_token", "public_api_token"):
            taken = info.data.get(other)
            if other != info.field_name and taken is not None and taken == value:
                raise ValueError(f"must differ from IS_{other.upper()}")
        return value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _hosts_parse(cls, value: str) -> str:
        AllowedHosts.parse(value)  # a bad entry stops the start, naming it
        return value

    @property
    def webhook_destinations(self) -> AllowedHosts:
        return AllowedHosts.parse(self.webhook_allowed_hosts)

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"
