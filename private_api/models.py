"""The database tables, as typed SQLAlchemy ORM classes; migrations/versions/ creates them."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from inference_server.contract import ApiKeyRole, FailureCategory, TaskStatus, WebhookEvent, WebhookState

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Always-aware UTC datetimes on both databases.

    SQLite keeps no time zone and hands back naive values; comparing those with aware ones
    (lease expiry) would raise, so values are normalised to UTC on the way in and out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        # SQLite stores text; dropping the offset keeps every stored value in one sortable format.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_Enum = TypeVar("_Enum", bound=StrEnum)


class StrEnumText(TypeDecorator[_Enum]):
    """A string enum (TaskStatus, ApiKeyRole) stored as its plain value: portable, readable in
    SQL, no native enum type to migrate when a value is added."""

    impl = String(16)
    cache_ok = True

    def __init__(self, enum: type[_Enum]) -> None:
        super().__init__()
        self.enum = enum

    def process_bind_param(self, value: _Enum | str | None, dialect: Dialect) -> str | None:
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> _Enum | None:
        return None if value is None else self.enum(value)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    human_readable_id: Mapped[str] = mapped_column(String(128), unique=True)
    container_tag: Mapped[str] = mapped_column(String(512))
    description: Mapped[str] = mapped_column(Text)
    use_gpu: Mapped[bool]
    model_available: Mapped[bool]
    model_zip_key: Mapped[str | None] = mapped_column(String(255))
    model_zip_sha256: Mapped[str | None] = mapped_column(String(64))
    # None means "the platform default" (IS_DEFAULT_* on the consumer).
    timeout_s: Mapped[int | None]
    memory_mb: Mapped[int | None]
    cpus: Mapped[float | None] = mapped_column(Float)
    gpu_memory_mb: Mapped[int | None]
    pids: Mapped[int | None]
    tmp_mb: Mapped[int | None]
    allow_network: Mapped[bool]
    run_as_root: Mapped[bool]
    writable_rootfs: Mapped[bool] = mapped_column(default=False)
    cacheable: Mapped[bool] = mapped_column(default=False)
    warm: Mapped[bool] = mapped_column(default=False)
    params_schema: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        Index("ix_tasks_status", "status"),
        Index("ix_tasks_status_lease_expires_at", "status", "lease_expires_at"),
        Index("ix_tasks_model_id", "model_id"),
        Index("ix_tasks_owner", "owner"),
        # Fair share counts an owner's queued tasks (scheduling.queued_of_owner).
        Index("ix_tasks_status_owner_priority", "status", "owner", "priority"),
        # The result cache finds a finished task by its key (result_cache.lookup), and
        # blob_sharing asks whether any task still holds a blob before deleting it.
        Index("ix_tasks_cache_key", "cache_key"),
        Index("ix_tasks_input_blob_key", "input_blob_key"),
        Index("ix_tasks_output_blob_key", "output_blob_key"),
        # What waits on a task (chains.py), and who else holds a blob (blob_sharing.is_held).
        Index("ix_tasks_input_from", "input_from"),
        Index("ix_tasks_model_from", "model_from"),
        Index("ix_tasks_model_from_blob_key", "model_from_blob_key"),
        # The overview (overview.py) reads what ended lately.
        Index("ix_tasks_finished_at", "finished_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = mapped_column(String(64), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    status: Mapped[TaskStatus] = mapped_column(StrEnumText(TaskStatus))
    priority: Mapped[int]
    attempts: Mapped[int]
    exit_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    # The category of `error` (FailureCategory); NULL unless the task failed or was cancelled.
    failure: Mapped[FailureCategory | None] = mapped_column(StrEnumText(FailureCategory))
    input_blob_key: Mapped[str | None] = mapped_column(String(255))
    input_sha256: Mapped[str | None] = mapped_column(String(64))
    output_blob_key: Mapped[str | None] = mapped_column(String(255))
    output_sha256: Mapped[str | None] = mapped_column(String(64))
    log_blob_key: Mapped[str | None] = mapped_column(String(255))
    consumer_id: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Outbox marker: NULL while a pending task still has to be put on the queue.
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The container's start and end on the latest attempt that reported them (consumer's clock).
    run_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    run_finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The latest progress the model printed (PROGRESS_LINE_PREFIX), shipped with its live log.
    progress: Mapped[float | None] = mapped_column(Float)
    progress_message: Mapped[str | None] = mapped_column(Text)
    # The name of the API key that submitted the task; NULL for an anonymous submission.
    owner: Mapped[str | None] = mapped_column(String(255))
    # The task's parameters (a JSON object checked against its model's params_schema), or NULL.
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # False when the submission sent cache=false: always run, never answered from the cache.
    use_cache: Mapped[bool] = mapped_column(default=True)
    # Set at the cache lookup of a cacheable model's task (result_cache.cache_key); a finished
    # task's key answers later tasks with the same image ID, model zip, input and params.
    cache_key: Mapped[str | None] = mapped_column(String(64))
    # The finished task whose output answered this one.
    cached_from: Mapped[str | None] = mapped_column(String(64))
    # Where its events are POSTed (webhooks.py); NULL: no webhook.
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    # Chained tasks (chains.py): the uid of the task whose output is this task's input, and of
    # the one whose output is mounted at /model. input_blob_key / model_from_blob_key stay NULL
    # while that upstream has not finished; then they point at its output, shared, not copied.
    input_from: Mapped[str | None] = mapped_column(String(64))
    model_from: Mapped[str | None] = mapped_column(String(64))
    model_from_blob_key: Mapped[str | None] = mapped_column(String(255))

    # Every task answer names its model, so load it in the same query.
    model: Mapped[Model] = relationship(lazy="joined", innerjoin=True)

    @property
    def model_human_readable_id(self) -> str:
        return self.model.human_readable_id

    @property
    def output_present(self) -> bool:
        return self.output_blob_key is not None

    # Read only for a task with a webhook (the `webhook` property), so others never query it.
    webhook_deliveries: Mapped[list[WebhookDelivery]] = relationship(
        lazy="select", viewonly=True, order_by="WebhookDelivery.id"
    )

    @property
    def webhook(self) -> WebhookState | None:
        """How its webhook deliveries stand (TaskPublic.webhook); None without a webhook."""
        if self.webhook_url is None:
            return None
        deliveries = self.webhook_deliveries
        tried = [delivery for delivery in deliveries if delivery.last_attempt_at is not None]
        latest = max(tried, key=lambda delivery: delivery.last_attempt_at or self.created_at, default=None)
        return WebhookState(
            url=self.webhook_url,
            attempts=sum(delivery.attempts for delivery in deliveries),
            delivered=sum(delivery.delivered_at is not None for delivery in deliveries),
            pending=sum(delivery.is_pending for delivery in deliveries),
            last_answer=latest.last_answer if latest is not None else None,
            last_attempt_at=latest.last_attempt_at if latest is not None else None,
        )


class ApiKey(Base):
    """An API key, stored as the SHA-256 of the whole key; the key itself is shown once at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    # The public part of the key (isk_<key_id>_<secret>): finds the row, and names it in `keys list`.
    key_id: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    # The owner label its tasks are recorded under (tasks.owner).
    name: Mapped[str] = mapped_column(String(255), unique=True)
    role: Mapped[ApiKeyRole] = mapped_column(StrEnumText(ApiKeyRole))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Limits on submissions; None takes the role's default (keys.submission_limits), so a changed
    # IS_DEFAULT_* setting reaches every key that was never given its own.
    max_priority: Mapped[int | None]
    max_active_tasks: Mapped[int | None]
    # Signs the webhook bodies of its tasks (HMAC-SHA256; webhook_signing.py); shown to the
    # operator by `keys create` and `keys webhook-secret`, to hand to the key's owner.
    webhook_secret: Mapped[str] = mapped_column(String(128))


class WebhookDelivery(Base):
    """One event of a task to POST to its webhook: the durable outbox of webhook_delivery.py.

    Written in the transaction of the state change it reports, so an event is never lost nor
    sent for a change that did not commit. `next_attempt_at` is when it is due (NULL once it is
    delivered or given up); a sender claims an attempt by moving it forward with a conditional
    UPDATE, so two private API processes never send the same attempt.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_next_attempt_at", "next_attempt_at"),
        Index("ix_webhook_deliveries_task_id", "task_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    event: Mapped[WebhookEvent] = mapped_column(StrEnumText(WebhookEvent))
    # The WebhookBody as it was at the change: a late delivery still tells what happened then.
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int]
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    given_up_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # "200 OK", "503 Service Unavailable", "connection failed: ...", as the last attempt ended.
    last_answer: Mapped[str | None] = mapped_column(String(255))
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def is_pending(self) -> bool:
        return self.delivered_at is None and self.given_up_at is None


class Consumer(Base):
    """A job consumer as it registered itself, and when it was last heard from."""

    __tablename__ = "consumers"

    # The consumer's own id (X-Consumer-Id): stable across restarts of one consumer.
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    runtime: Mapped[str] = mapped_column(String(32))
    version: Mapped[str] = mapped_column(String(64))
    # GpuInfo dicts, as registered.
    gpus: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    cpus: Mapped[float] = mapped_column(Float)
    memory_mb: Mapped[int]
    max_tasks: Mapped[int]
    takes_gpu_tasks: Mapped[bool]
    takes_cpu_tasks: Mapped[bool]
    # Task uids, as its latest heartbeat listed them.
    running_tasks: Mapped[list[str]] = mapped_column(JSON)
    # GpuReading dicts, as its latest heartbeat sent them (empty for simulated GPUs).
    gpu_readings: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # Set by an operator; kept when the consumer registers again (a restart does not undrain).
    draining: Mapped[bool]
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class AuditRecord(Base):
    """One entry of the audit trail (private_api/audit.py). Append-only: rows are inserted in the
    transaction of the change they record and nothing in the platform updates or deletes them;
    no route, service function or retention sweep touches an existing row."""

    __tablename__ = "audit_entries"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # A key's name, "anonymous", "platform" or "operator CLI" (contract.AUDIT_ACTOR_*).
    actor: Mapped[str] = mapped_column(String(255), index=True)
    actor_role: Mapped[ApiKeyRole | None] = mapped_column(StrEnumText(ApiKeyRole))
    # An AuditAction value; plain String(64), as StrEnumText's 16 characters are too few.
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(255), index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)


class DashboardSessionRecord(Base):
    """A dashboard login (private_api/dashboard_sessions.py), kept here rather than in a public API
    process so that logout and key revocation end it on every replica at once. Only the token's
    SHA-256 is stored: a copy of the database opens no session."""

    __tablename__ = "dashboard_sessions"
    __table_args__ = (Index("ix_dashboard_sessions_expires_at", "expires_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    csrf_token: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)

    api_key: Mapped[ApiKey] = relationship(lazy="joined", innerjoin=True)
