"""The wire contract shared by every service: task states, status codes, schemas, routes, and
how its headers and error bodies are written and read.

Every service and the client import from here; nothing in this module is copied elsewhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum, StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

SERVICE_TOKEN_HEADER = "X-Service-Token"
CONSUMER_ID_HEADER = "X-Consumer-Id"
# Users present their API key as `Authorization: Bearer <key>`; later versions of the original
# client send it as `X-Token: <key>`, accepted the same way.
API_KEY_HEADER = "X-Token"
API_KEY_MAX_LENGTH = 512
DASHBOARD_TOKEN_MAX_LENGTH = 128
# Who a relayed user request acts for: set by the public API on task routes and trusted by the
# private API only because the service token comes with it. The role is an ApiKeyRole value or
# ANONYMOUS_ROLE; without these headers a caller acts as the platform itself (consumers, tools).
ACTING_OWNER_HEADER = "X-Acting-Owner"
ACTING_ROLE_HEADER = "X-Acting-Role"
ANONYMOUS_ROLE = "anonymous"
# Marks a private API 403 that refuses the user a request acts for; a 403 without it refuses
# the calling service's own token, which the public API reports as its own fault (502).
ACTOR_REFUSED_HEADER = "X-Actor-Refused"

HUMAN_READABLE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
HUMAN_READABLE_ID_RE = re.compile(HUMAN_READABLE_ID_PATTERN)
# A docker image reference: [registry[:port]/]path[:tag][@digest], kept deliberately strict.
CONTAINER_TAG_PATTERN = (
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._/-][a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$"
)
CONTAINER_TAG_RE = re.compile(CONTAINER_TAG_PATTERN)
TASK_UID_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"
TASK_UID_RE = re.compile(TASK_UID_PATTERN)
# Consumer ids end up in Docker labels, HTTP headers and file names, so keep them plain.
CONSUMER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
CONSUMER_ID_RE = re.compile(CONSUMER_ID_PATTERN)


_NUMBER_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _iso_8601_only(value: Any) -> Any:
    """Pydantic reads a bare number as Unix seconds; a filter documented as an ISO 8601 time
    refuses one instead of guessing what `until=0.5` meant."""
    if isinstance(value, int | float):  # bool is an int too
        raise ValueError("an ISO 8601 time is expected, e.g. 2026-12-01T09:00:00Z")
    if isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        raise ValueError("an ISO 8601 time is expected, e.g. 2026-12-01T09:00:00Z")
    return value


# A time with its zone, written in ISO 8601 (query filters such as the audit trail's).
IsoTime = Annotated[AwareDatetime, BeforeValidator(_iso_8601_only)]


class TaskStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    DELETED = "deleted"

    @property
    def is_terminal(self) -> bool:
        return self not in (TaskStatus.PENDING, TaskStatus.RUNNING)


class V12Code(IntEnum):
    """The custom HTTP codes InferenceServer v1.2 clients switch on when polling a task."""

    PENDING = 551
    FAILED = 552
    OUTPUT_MISSING = 553
    NOT_FOUND = 554


def v12_code_for(status: TaskStatus, output_present: bool) -> int:
    """The v1.2 poll answer for a task: 200 means the output zip follows."""
    if status in (TaskStatus.PENDING, TaskStatus.RUNNING):
        return V12Code.PENDING
    if status in (TaskStatus.FAILED, TaskStatus.CANCELLED):
        return V12Code.FAILED
    if status == TaskStatus.DELETED:
        return V12Code.NOT_FOUND
    if status == TaskStatus.FINISHED and output_present:
        return 200
    return V12Code.OUTPUT_MISSING


class ErrorBody(BaseModel):
    detail: str


# An upstream's error body is not ours to trust with the size of a log line or a message.
ERROR_DETAIL_MAX_CHARS = 2000
# A body that is not JSON is a proxy's page or a crash text: its first words are enough.
ERROR_PAGE_MAX_CHARS = 300


def error_detail(body: bytes | str, *, fallback: str) -> str:
    """The explanation in an error answer's body, as one line of text for a person or a log.

    A JSON body's `detail` (FastAPI's list of validation errors as `where: what` pairs), any other
    JSON as it came, and a body that is not JSON at all as its first words on one line;
    `fallback` (say, the status) when that leaves nothing.
    """
    try:
        parsed = json.loads(body)
    except ValueError:  # UnicodeDecodeError included
        text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
        return " ".join(text.split())[:ERROR_PAGE_MAX_CHARS] or fallback
    detail = parsed.get("detail", parsed) if isinstance(parsed, dict) else parsed
    if isinstance(detail, str):
        text = detail
    elif (
        isinstance(detail, list)
        and detail
        and all(isinstance(item, dict) and "msg" in item for item in detail)
    ):
        text = "; ".join(_validation_problem(item) for item in detail)
    else:
        text = json.dumps(detail)
    return text[:ERROR_DETAIL_MAX_CHARS] or fallback


def _validation_problem(item: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in item.get("loc", ()))
    return f"{where}: {item['msg']}" if where else str(item["msg"])


class ApiKeyRole(StrEnum):
    """A user key submits and handles its own tasks; an operator key also manages models and sees
    every task."""

    USER = "user"
    OPERATOR = "operator"


class Principal(BaseModel):
    """Whom an API key belongs to: `name` is the owner label its tasks are recorded under."""

    name: str
    role: ApiKeyRole

    @property
    def is_operator(self) -> bool:
        return self.role == ApiKeyRole.OPERATOR


class ActingHeadersError(ValueError):
    """X-Acting-* headers that do not name one identity (the private API answers 422)."""


@dataclass(frozen=True)
class Acting:
    """Whom a relayed user request acts for: a key's principal, or None for an anonymous caller."""

    principal: Principal | None


def encode_acting_headers(caller: Principal | None) -> dict[str, str]:
    """The headers saying whom a relayed request acts for; None is an anonymous caller."""
    if caller is None:
        return {ACTING_ROLE_HEADER: ANONYMOUS_ROLE}
    return {ACTING_OWNER_HEADER: caller.name, ACTING_ROLE_HEADER: caller.role.value}


def decode_acting_headers(headers: Mapping[str, str]) -> Acting | None:
    """Whom the headers (as `encode_acting_headers` writes them) say a request acts for; None when
    they say nothing: the caller acts as the platform itself. `headers` is a request's own,
    case-insensitive headers or a dict keyed by the names above."""
    owner = headers.get(ACTING_OWNER_HEADER)
    role = headers.get(ACTING_ROLE_HEADER)
    if role is None:
        if owner is not None:
            raise ActingHeadersError(f"{ACTING_OWNER_HEADER} was sent without {ACTING_ROLE_HEADER}")
        return None
    if role == ANONYMOUS_ROLE:
        if owner is not None:
            raise ActingHeadersError(f"an anonymous request cannot name an owner in {ACTING_OWNER_HEADER}")
        return Acting(principal=None)
    try:
        key_role = ApiKeyRole(role)
    except ValueError:
        raise ActingHeadersError(f"unknown {ACTING_ROLE_HEADER} {role!r}") from None
    if not owner:
        raise ActingHeadersError(f"{ACTING_ROLE_HEADER} {role} needs {ACTING_OWNER_HEADER}")
    return Acting(principal=Principal(name=owner, role=key_role))


class KeyResolveRequest(BaseModel):
    """Body of the private API's POST /auth/resolve: the key exactly as the caller presented it."""

    key: str = Field(max_length=API_KEY_MAX_LENGTH)


class ModelLimits(BaseModel):
    """A model's resource limits and isolation, declared once: the create, update and public
    views below take them from here (and a test holds the ORM's columns to the same names).
    None means the platform default."""

    timeout_s: int | None = Field(default=None, ge=1, le=7 * 24 * 3600, description="Seconds per task.")
    memory_mb: int | None = Field(default=None, ge=16, le=4 * 1024 * 1024)
    cpus: float | None = Field(default=None, gt=0, le=1024)
    # The GPU memory one task of the model needs. Consumers pack tasks onto a GPU while their
    # declared memory fits; a GPU model that declares none takes a whole GPU.
    gpu_memory_mb: int | None = Field(
        default=None, ge=1, le=16 * 1024 * 1024, description="GPU memory one task needs, in MiB."
    )
    pids: int | None = Field(default=None, ge=8, le=1_000_000)
    # Size of the tmpfs mounted at /tmp, the only writable place besides /output while the
    # root filesystem is read-only; it counts against the memory limit.
    tmp_mb: int | None = Field(
        default=None, ge=1, le=1024 * 1024, description="Size of the tmpfs at /tmp, in MB."
    )
    allow_network: bool = False
    run_as_root: bool = False
    # Off by default: a model that can write its own root filesystem can fill the host's disk
    # outside every limit. An operator turns it on for images that write next to their code.
    writable_rootfs: bool = Field(
        default=False, description="Let the model write its root filesystem (read-only by default)."
    )


class ModelBehaviour(BaseModel):
    """What the platform does with a model's tasks besides limiting them: set at registration
    (query parameters) and in PATCH, like the limits."""

    # Off by default: only an operator knows whether a model is deterministic enough that the
    # same image, model zip, input and params may be answered with an earlier output.
    cacheable: bool = Field(
        default=False,
        description="Answer a task whose image ID, model zip, input and params match a finished "
        "task's with that task's output, without running a container.",
    )
    # Consumers keep a container of a warm model created ahead (not started) even before they
    # have run it, so its first task starts without the create; other models get one only after
    # a consumer ran them.
    warm: bool = Field(
        default=False,
        description="Consumers keep a container of this model created ahead, ready to start.",
    )


# The switches an operator sets on purpose to loosen a model's isolation.
MODEL_SWITCHES = ("allow_network", "run_as_root", "writable_rootfs")
# Every true/false field of a model (JSON bodies must send real booleans for these).
MODEL_FLAGS = (*MODEL_SWITCHES, "cacheable", "warm")
MODEL_NUMERIC_LIMITS = ("timeout_s", "memory_mb", "cpus", "gpu_memory_mb", "pids", "tmp_mb")
MODEL_DESCRIPTION_MAX_LENGTH = 10_000


class _ModelRegistration(BaseModel):
    """The v1.2 registration fields, in the order v1.2 documents its query parameters."""

    container_tag: str = Field(pattern=CONTAINER_TAG_PATTERN, max_length=512, description="Docker image.")
    human_readable_id: str = Field(
        pattern=HUMAN_READABLE_ID_PATTERN, max_length=128, description="Stable name tasks are sent to."
    )
    description: str = Field(default="", max_length=MODEL_DESCRIPTION_MAX_LENGTH)
    model_available: bool = Field(default=False, description="True when zip_file is sent.")
    use_gpu: bool = False


# Pydantic orders fields from the last base to the first, so the limits follow the fields
# of the other base here, as they do in the query string and the JSON v1.2 clients know.
class ModelCreate(ModelBehaviour, ModelLimits, _ModelRegistration):
    """The query parameters of POST /models in both APIs (the v1.2 ones, the optional limits, the
    behaviour). The params_schema comes as a multipart form field (MODEL_PARAMS_SCHEMA_FIELD)."""


class ModelUpdate(ModelBehaviour, ModelLimits):
    """PATCH body for a model: only the fields sent change; a limit sent as null returns to the
    platform default. The image and the id stay fixed (register a new model to change those)."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field(default="", max_length=MODEL_DESCRIPTION_MAX_LENGTH)
    # A JSON Schema the params of each task must satisfy; null removes it.
    params_schema: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _json_types_only(cls, data: Any) -> Any:
        """A JSON body must say what it means: lax parsing would take 0 for false or "512" for 512,
        which the documented schema refuses (5.0 stays a valid integer, as in JSON Schema)."""
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            if name in MODEL_FLAGS and not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false")
            if name in MODEL_NUMERIC_LIMITS and isinstance(value, str | bool):
                raise ValueError(f"{name} must be a number or null")
        return data


class _ModelIdentity(BaseModel):
    """What the platform records about a registered model besides its limits."""

    id: int
    human_readable_id: str
    container_tag: str
    description: str
    use_gpu: bool
    model_available: bool
    model_zip_sha256: str | None = None


class ModelPublic(ModelBehaviour, ModelLimits, _ModelIdentity):
    """A registered model as every service and client sees it (limits after the identity)."""

    model_config = ConfigDict(from_attributes=True)

    params_schema: dict[str, Any] | None = None
    created_at: datetime


class WebhookEvent(StrEnum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


class WebhookState(BaseModel):
    """How a task's webhook deliveries stand, for its status."""

    url: str
    attempts: int = 0
    delivered: int = 0
    pending: int = 0
    # The last answer of the receiver: "200 OK", "503 Service Unavailable", "connection refused".
    last_answer: str | None = None
    last_attempt_at: datetime | None = None


class WebhookBody(BaseModel):
    """What a webhook POSTs: the event and the task's status JSON at that moment."""

    event: WebhookEvent
    task: TaskPublic


# Each webhook body is signed: HMAC-SHA256 under the submitting key's webhook secret over
# "<timestamp>.<body>", sent as "sha256=<hex>"; the timestamp (Unix seconds) lets a receiver
# refuse replays. inference_server/webhook_signing.py signs and verifies.
WEBHOOK_SIGNATURE_HEADER = "X-InferenceServer-Signature"
WEBHOOK_TIMESTAMP_HEADER = "X-InferenceServer-Timestamp"
WEBHOOK_EVENT_HEADER = "X-InferenceServer-Event"


class TaskSubmitFields:
    """Multipart form fields of POST /api/tasks/ (the v1.2 route) and the private POST /tasks,
    besides the zip; all optional. `cache` is a query parameter, like `priority`."""

    ZIP_FILE = "zip_file"
    PARAMS = "params"  # a JSON object, checked against the model's params_schema
    WEBHOOK_URL = "webhook_url"
    INPUT_FROM = "input_from"  # an upstream task's uid: its output is this task's input
    MODEL_FROM = "model_from"  # an upstream task's uid: its output is mounted at /model
    CACHE_QUERY = "cache"


MODEL_PARAMS_SCHEMA_FIELD = "params_schema"
PARAMS_MAX_BYTES = 64 * 1024


class FailureCategory(StrEnum):
    """Why a failed (or cancelled) task ended, so a user can act without reading its logs.

    UPSTREAM_FAILED is beyond the issue's list: a chained task whose upstream failed, expired or
    was deleted did not fail on its own, and calling that `infrastructure` would send users to
    the operator for what is the upstream's failure (whose own category says more)."""

    TIMEOUT = "timeout"
    OUT_OF_MEMORY = "out_of_memory"
    OUTPUT_TOO_LARGE = "output_too_large"
    MODEL_EXIT_CODE = "model_exit_code"
    IMAGE_MISSING = "image_missing"
    UNSCHEDULABLE = "unschedulable"
    CANCELLED = "cancelled"
    INFRASTRUCTURE = "infrastructure"
    UPSTREAM_FAILED = "upstream_failed"


class TaskPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    uid: str
    model_human_readable_id: str
    status: TaskStatus
    # The name of the key that submitted it (None: an anonymous task); operators see it on every
    # task, a user only on their own.
    owner: str | None = None
    priority: int = 0
    attempts: int = 0
    exit_code: int | None = None
    error: str | None = None
    # The category of `error` for a failed or cancelled task; None while it has not ended so.
    failure: FailureCategory | None = None
    input_sha256: str | None = None
    output_sha256: str | None = None
    output_present: bool = False
    consumer_id: str | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # The model container's run on the latest attempt that reported one, by the consumer's clock:
    # from the consumer creating the container until it had exited and its log was read. Beside
    # started_at - created_at (the queue wait), run_finished_at - run_started_at is the run time.
    # Both None when that attempt ran no container (it failed before) or none has reported yet.
    run_started_at: datetime | None = None
    run_finished_at: datetime | None = None
    # Why a pending task is not running yet, in words (None once it runs or ended): no consumer
    # could ever run it, none has room for it now, or its owner's turn has not come.
    waiting_reason: str | None = None
    # What the task was submitted with besides its zip (TaskSubmitFields), shown back.
    params: dict[str, Any] | None = None
    input_from: str | None = None
    model_from: str | None = None
    # Answered from this finished task's output (same image ID, model zip, input and params).
    cached_from: str | None = None
    webhook: WebhookState | None = None
    # What the model last reported of its progress while running (a PROGRESS_LINE_PREFIX line in
    # its log): a fraction 0..1 and the rest of that line. None until it reports any.
    progress: float | None = None
    progress_message: str | None = None


# GET PublicRoutes.TASK_STATUS?wait=S[&seen=STATUS][&on=WAKE_ON]: a long poll answered as soon
# as what the caller saw (the status `seen`, else the state at the time of the request) is out of
# date at the granularity `on` asks for, or after S seconds (WAIT_MIN_S..WAIT_MAX_S) with the
# state as it is; at once for a task that has ended. /events takes `on` too.
WAIT_PARAM = "wait"
SEEN_PARAM = "seen"
WAKE_ON_PARAM = "on"
WAIT_MIN_S = 1.0
WAIT_MAX_S = 60.0
TASKS_WAIT_MAX_UIDS = 10_000
EVENT_STREAM_MEDIA_TYPE = "text/event-stream"


class WakeOn(StrEnum):
    """What wakes a long poll or sends an event. A client that only wants the result asks for END:
    a crowd of such clients is not woken, and does not poll again, each time the tasks it waits on
    change status, report progress or get a new waiting_reason."""

    CHANGE = "change"  # status, progress or waiting_reason (the default)
    STATUS = "status"  # a new status
    END = "end"  # the task ended: finished, failed or cancelled


def task_state(task: TaskPublic, on: WakeOn = WakeOn.CHANGE) -> str:
    """What a waiting client has seen of a task, as far as `on` cares. For CHANGE: its status,
    the progress its model reports and, while pending, why it waits, so a long poll also reports a
    running model's progress and a pending task's new waiting_reason."""
    if on is WakeOn.END:
        return f"{WakeOn.END.value}:{int(task.status.is_terminal)}"
    if on is WakeOn.STATUS:
        return f"{WakeOn.STATUS.value}:{task.status.value}"
    # Unprefixed, as before WakeOn existed: a service of the previous release, during a rolling
    # update, sends and compares these strings as they are.
    progress = "" if task.progress is None else repr(task.progress)
    return f"{task.status.value}:{progress}:{task.waiting_reason or ''}"


def state_is_current(seen: str, task: TaskPublic) -> bool:
    """Whether `seen` (a task_state of any WakeOn) still describes `task`."""
    kind = seen.partition(":")[0]
    on = WakeOn(kind) if kind in (WakeOn.STATUS.value, WakeOn.END.value) else WakeOn.CHANGE
    return seen == task_state(task, on)


def status_is_current(seen: TaskStatus, task: TaskPublic, on: WakeOn) -> bool:
    """Whether a caller that saw the status `seen` has nothing new to learn, as far as `on` cares."""
    if on is WakeOn.END:
        return seen.is_terminal == task.status.is_terminal
    return seen == task.status


class TaskWaitRequest(BaseModel):
    """Body of the private API's POST TASKS_WAIT: for each uid, the states (task_state, of any
    WakeOn) its waiting clients last saw. Answered as soon as one of those tasks is in another state, or
    after timeout_s with nothing changed."""

    model_config = ConfigDict(extra="forbid")

    states: dict[str, list[str]] = Field(max_length=TASKS_WAIT_MAX_UIDS)
    timeout_s: float = Field(ge=0.0, le=WAIT_MAX_S)


class TaskWaitAnswer(BaseModel):
    """The tasks whose state differs from one the caller gave (as they are now), and the uids
    that are unknown (never existed, or their row is gone)."""

    changed: list[TaskPublic] = Field(default_factory=list)
    unknown: list[str] = Field(default_factory=list)


class RunTimes(BaseModel):
    """When a task's container started and ended, as a consumer reports them with its verdict
    (query parameters of the output upload; fields of a TaskFailure). Both or neither: a failure
    before the container started has none."""

    # Aware only: a naive time means nothing across hosts, so it is refused rather than guessed.
    run_started_at: AwareDatetime | None = None
    run_finished_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _both_and_in_order(self) -> RunTimes:
        if (self.run_started_at is None) != (self.run_finished_at is None):
            raise ValueError("run_started_at and run_finished_at are sent together or not at all")
        if (
            self.run_started_at is not None
            and self.run_finished_at is not None
            and self.run_finished_at < self.run_started_at
        ):
            raise ValueError("run_finished_at is before run_started_at")
        return self


class TaskClaim(BaseModel):
    """What a consumer receives when it wins a task: everything needed to run it."""

    task: TaskPublic
    model: ModelPublic
    lease_seconds: int


class CacheLookup(BaseModel):
    """The image the consumer will run, by ID (a tag rebuilt under the same name must miss)."""

    model_config = ConfigDict(extra="forbid")

    image_id: str = Field(min_length=1, max_length=255)


class CacheAnswer(BaseModel):
    """hit: the task is finished already, from `cached_from`'s output; run nothing."""

    hit: bool
    cached_from: str | None = None


class HeartbeatReply(BaseModel):
    """The consumer keeps running only while `keep_running` is true (false once cancelled)."""

    keep_running: bool
    status: TaskStatus


class TaskFailure(RunTimes):
    error: str = Field(max_length=20_000)
    exit_code: int | None = None
    retryable: bool = False
    # Optional so a consumer of an older version still reports; the private API stores
    # `infrastructure` for a failure that names no category.
    failure: FailureCategory | None = None


class TaskRelease(BaseModel):
    """A consumer giving a task back unrun (shutdown, infrastructure error)."""

    reason: str = Field(max_length=2_000)


class GpuInfo(BaseModel):
    """One GPU a consumer owns, as NVML reports it (or as a simulated GPU declares it)."""

    index: int = Field(ge=0, le=1023)
    uuid: str = Field(min_length=1, max_length=128)
    name: str = Field(default="", max_length=256)
    memory_total_mb: int = Field(ge=1, le=16 * 1024 * 1024)
    simulated: bool = False


class GpuReading(BaseModel):
    """One real GPU's use at a heartbeat, as NVML reads it (for the platform's metrics)."""

    index: int = Field(ge=0, le=1023)
    memory_used_bytes: int = Field(ge=0)
    utilization_ratio: float = Field(ge=0, le=1)


class ConsumerRegistration(BaseModel):
    """What a consumer declares about itself at start-up (PUT /consumers/{consumer_id})."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(min_length=1, max_length=255)
    runtime: str = Field(default="docker", min_length=1, max_length=32)
    version: str = Field(default="", max_length=64)
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=64)
    cpus: float = Field(gt=0, le=65536, description="CPU cores its tasks may use together.")
    memory_mb: int = Field(ge=16, le=1024 * 1024 * 1024, description="Memory its tasks may use together.")
    max_tasks: int = Field(default=1, ge=1, le=1024, description="Tasks it runs at once at most.")
    takes_gpu_tasks: bool = False
    takes_cpu_tasks: bool = True


class ConsumerHeartbeat(BaseModel):
    """A consumer's periodic word that it is alive, and what it runs now."""

    model_config = ConfigDict(extra="forbid")

    running_tasks: list[str] = Field(default_factory=list, max_length=1024)
    # NVML's readings of its real GPUs at this heartbeat; empty for simulated GPUs or none.
    gpu_readings: list[GpuReading] = Field(default_factory=list, max_length=64)


class ConsumerState(StrEnum):
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    LOST = "lost"


# The private API's answer to a claim by a consumer an operator is draining: it takes no new
# task, so it hands the message back to the queue (unlike a 409, where the task is not there
# to run and the message is dropped).
CLAIM_REFUSED_DRAINING = 423


class ConsumerHeartbeatReply(BaseModel):
    """draining: take no new task; finish (or hand back) the ones running."""

    draining: bool


class ConsumerPublic(ConsumerRegistration):
    """A consumer as GET /api/consumers lists it."""

    model_config = ConfigDict(from_attributes=True, extra="ignore")

    id: str
    state: ConsumerState
    draining: bool
    running_tasks: list[str]
    registered_at: datetime
    last_seen_at: datetime
    # NVML's readings of its real GPUs at its latest heartbeat (empty for simulated GPUs or none).
    gpu_readings: list[GpuReading] = Field(default_factory=list)


class AuditAction(StrEnum):
    """What an audit entry records: a change to a model, a task, a key or a consumer."""

    MODEL_REGISTERED = "model.registered"
    MODEL_UPDATED = "model.updated"
    MODEL_REMOVED = "model.removed"
    TASK_CANCELLED = "task.cancelled"
    TASK_DELETED = "task.deleted"
    KEY_CREATED = "key.created"
    KEY_REVOKED = "key.revoked"
    KEY_LIMITS_SET = "key.limits_set"
    KEY_WEBHOOK_SECRET_ROTATED = "key.webhook_secret_rotated"
    CONSUMER_DRAINED = "consumer.drained"
    CONSUMER_RESUMED = "consumer.resumed"


# Audit actors that are no API key: the full-access service token, and the operator command
# working on the database directly.
AUDIT_ACTOR_PLATFORM = "platform"
AUDIT_ACTOR_OPERATOR_CLI = "operator CLI"
AUDIT_ACTOR_ANONYMOUS = "anonymous"
AUDIT_PAGE_DEFAULT = 100
AUDIT_PAGE_MAX = 1000


class AuditEntry(BaseModel):
    """One entry of the audit trail. `actor` is a key's name (with `actor_role`), "anonymous",
    "platform" or "operator CLI"; `target` the model id, task uid, key name or consumer id;
    `details` a few facts about the change (the fields a PATCH set), never a key or a secret."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    at: AwareDatetime
    actor: str
    actor_role: ApiKeyRole | None = None
    action: AuditAction
    target: str
    details: dict[str, Any] = Field(default_factory=dict)


class DashboardLogin(BaseModel):
    """Body of the private API's POST /sessions: the API key a dashboard user logged in with."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=API_KEY_MAX_LENGTH)


class DashboardSessionToken(BaseModel):
    """Body of POST /sessions/resolve and /sessions/end: the session cookie's value. Tokens travel
    in bodies, never in paths or query strings, so no access log records one."""

    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=DASHBOARD_TOKEN_MAX_LENGTH)


class DashboardSession(BaseModel):
    """A live dashboard session: whom it acts for, the CSRF token every action must echo, and
    when it ends. Ended by logout, by its expiry, or by its key being revoked."""

    principal: Principal
    csrf_token: str
    expires_at: AwareDatetime


class DashboardSessionCreated(DashboardSession):
    """The answer to a login: the session plus its token, shown this once (stored hashed)."""

    token: str


class ModelTimings(BaseModel):
    """Median queue wait (submitted to started) and run time of one model's tasks that ended in
    the overview's window; None where none did."""

    model: str
    tasks_ended: int
    queue_wait_s_median: float | None = None
    run_s_median: float | None = None


class OverviewPoint(BaseModel):
    """One bucket of the overview's history: tasks that ended in it, and the tasks waiting at its
    end (from the tasks' own times, so the history needs no sampler)."""

    at: AwareDatetime
    finished: int
    failed: int
    queue_depth: int


class PlatformOverview(BaseModel):
    """What the dashboard's overview shows. `scope` "all" for operators; "own" for a user, whose
    task figures count their own tasks only (queues and consumers are the platform's)."""

    scope: Literal["all", "own"]
    generated_at: AwareDatetime
    queue_depth: dict[str, int]
    pending: int
    running: int
    consumers: dict[str, int]
    finished_last_hour: int
    failed_last_hour: int
    models: list[ModelTimings]
    history: list[OverviewPoint]
    history_bucket_s: int


class HealthReport(BaseModel):
    status: str
    checks: dict[str, str]


class PrivateRoutes:
    """Paths of the private API, relative to its base URL."""

    MODELS = "/models"
    MODEL = "/models/{human_readable_id}"
    MODEL_ZIP = "/models/{human_readable_id}/zip"
    TASKS = "/tasks"
    TASK = "/tasks/{uid}"
    TASK_CANCEL = "/tasks/{uid}/cancel"
    TASK_INPUT = "/tasks/{uid}/input"
    TASK_OUTPUT = "/tasks/{uid}/output"
    TASK_LOGS = "/tasks/{uid}/logs"
    TASK_CLAIM = "/tasks/{uid}/claim"
    TASK_HEARTBEAT = "/tasks/{uid}/heartbeat"
    TASK_FAIL = "/tasks/{uid}/fail"
    TASK_RELEASE = "/tasks/{uid}/release"
    # Consumer, after the claim, for a cacheable model: the image ID it resolved; a hit finishes
    # the task from a finished task's output and no container runs.
    TASK_CACHE_LOOKUP = "/tasks/{uid}/cache-lookup"
    # Consumer: the zip of the model_from upstream's output, mounted at /model instead of the
    # model's own zip.
    TASK_MODEL_FROM = "/tasks/{uid}/model-from"
    AUTH_RESOLVE = "/auth/resolve"
    CONSUMERS = "/consumers"
    CONSUMER = "/consumers/{consumer_id}"
    CONSUMER_HEARTBEAT = "/consumers/{consumer_id}/heartbeat"
    # POST drains (no new tasks), DELETE resumes.
    CONSUMER_DRAIN = "/consumers/{consumer_id}/drain"
    # The audit trail, newest first; read only: no route changes or removes an entry.
    AUDIT = "/audit"
    # Dashboard sessions: POST SESSIONS logs in with a key (DashboardLogin); RESOLVE answers
    # whom a session token acts for; END logs out. Called by the public API only.
    SESSIONS = "/sessions"
    SESSION_RESOLVE = "/sessions/resolve"
    SESSION_END = "/sessions/end"
    # The dashboard overview for the acting caller (PlatformOverview).
    OVERVIEW = "/overview"
    # Long poll for many tasks at once (TaskWaitRequest -> TaskWaitAnswer): the public API's
    # one watcher per process waits here for all of its waiting clients.
    TASKS_WAIT = "/tasks/wait"
    HEALTH_LIVE = "/health/live"
    HEALTH_READY = "/health/ready"
    METRICS = "/metrics"


class PublicRoutes:
    """Paths of the public API; the first five are the v1.2 ones existing clients call."""

    TASKS = "/api/tasks/"
    TASK = "/api/tasks/{uid}"
    MODELS = "/api/models/"
    TASK_STATUS = "/api/tasks/{uid}/status"
    TASK_LOGS = "/api/tasks/{uid}/logs"
    TASK_CANCEL = "/api/tasks/{uid}/cancel"
    # Server-sent events: the task's state (TaskPublic) at each change, until it has ended.
    TASK_EVENTS = "/api/tasks/{uid}/events"
    MODEL = "/api/models/{human_readable_id}"
    CONSUMERS = "/api/consumers"
    CONSUMER_DRAIN = "/api/consumers/{consumer_id}/drain"
    AUDIT = "/api/audit"
    OVERVIEW = "/api/overview"
    # Server-rendered pages for people (login with a key, then a session cookie).
    DASHBOARD = "/dashboard"
    HEALTH_LIVE = "/health/live"
    HEALTH_READY = "/health/ready"
    METRICS = "/metrics"
    # Traefik's forwardAuth asks here whether a request may pass, before it buffers the body.
    AUTH_CHECK = "/auth/check"


ZIP_MEDIA_TYPE = "application/zip"
LOG_MEDIA_TYPE = "text/plain; charset=utf-8"
# A model reports its progress by printing a line `INFERENCE_PROGRESS <fraction 0..1> [message]`;
# the consumer ships the latest such line of the live log as these query parameters of its log
# upload (PUT PrivateRoutes.TASK_LOGS), and the task shows them as progress / progress_message.
PROGRESS_LINE_PREFIX = "INFERENCE_PROGRESS"
PROGRESS_PARAM = "progress"
PROGRESS_MESSAGE_PARAM = "progress_message"
PROGRESS_MESSAGE_MAX_CHARS = 500
# The output upload (POST PrivateRoutes.TASK_OUTPUT) may carry the task's final log as this text
# field of its form, with the progress as PROGRESS_PARAM / PROGRESS_MESSAGE_PARAM fields: one
# request instead of a log PUT and the upload. The separate log upload stays accepted.
OUTPUT_LOG_FIELD = "log"
# A final log above this goes up on its own (the form's text fields are bounded).
OUTPUT_LOG_MAX_BYTES = 512 * 1024
# GET PublicRoutes.TASK_LOGS?follow=true streams the log until the task ends.
FOLLOW_PARAM = "follow"

# Task list filters (GET /api/tasks/ and the private /tasks), beside status, limit and offset:
# the model's id, the owner (operators only; a user's list is always their own) and the start of
# a uid (TASK_UID_SEARCH_MIN_CHARS or more).
TASK_FILTER_MODEL = "model"
TASK_FILTER_OWNER = "owner"
TASK_FILTER_UID = "uid"
TASK_UID_SEARCH_MIN_CHARS = 4
OVERVIEW_HOURS_DEFAULT = 6
OVERVIEW_HOURS_MAX = 48

# The dashboard's session cookie (HttpOnly, SameSite=Strict, Secure behind HTTPS) and the header
# (or form field) that carries the session's CSRF token on every action.
DASHBOARD_SESSION_COOKIE = "is_dashboard_session"
DASHBOARD_CSRF_HEADER = "X-CSRF-Token"
DASHBOARD_CSRF_FIELD = "csrf_token"

MAX_PRIORITY = 9
# Declared identically by the private API (publisher) and every consumer: RabbitMQ refuses a
# redeclaration with other arguments (PRECONDITION_FAILED). Broker priorities are twice the task
# priority, plus one for a retried task (broker_priority), so they run to 2 * MAX_PRIORITY + 1.
TASK_QUEUE_ARGUMENTS: dict[str, int] = {"x-max-priority": 2 * MAX_PRIORITY + 1}


def broker_priority(priority: int, *, retry: bool) -> int:
    """A retried task goes ahead of the fresh tasks of its own priority, which were submitted
    after it, and behind every task of a higher priority: FIFO within a level survives a retry."""
    return 2 * priority + (1 if retry else 0)


class TaskQueue(StrEnum):
    """GPU and CPU tasks wait in queues of their own, so neither kind delays the other."""

    CPU = "cpu"
    GPU = "gpu"

    def queue_name(self, base: str) -> str:
        return f"{base}.{self.value}"


# A cancelled running task's uid, pushed by the private API to every consumer: a fanout exchange
# named after the queue base, declared identically by both sides (CANCEL_EXCHANGE_ARGUMENTS);
# each consumer reads it through an exclusive auto-delete queue of its own. The heartbeat's
# keep_running stays the fallback when the broker loses the message.
CANCEL_EXCHANGE_TYPE = "fanout"


def cancel_exchange_name(queue_base: str) -> str:
    return f"{queue_base}.cancel"
