"""What each public route does, in terms of private API calls; the routes stay thin."""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from inference_server.contract import (
    API_KEY_MAX_LENGTH,
    DASHBOARD_TOKEN_MAX_LENGTH,
    OVERVIEW_HOURS_DEFAULT,
    TASK_FILTER_MODEL,
    TASK_FILTER_OWNER,
    TASK_FILTER_UID,
    AuditEntry,
    ConsumerPublic,
    DashboardSession,
    DashboardSessionCreated,
    HealthReport,
    ModelCreate,
    ModelPublic,
    ModelUpdate,
    PlatformOverview,
    Principal,
    PrivateRoutes,
    TaskPublic,
    TaskStatus,
    TaskSubmitFields,
    V12Code,
    encode_acting_headers,
    v12_code_for,
)
from public_api.errors import PublicAPIError, UpstreamHTTPError, UpstreamUnavailableError, V12Error
from public_api.relay import UploadBody
from public_api.upstream import PrivateAPI, Reply, checked

SchemaT = TypeVar("SchemaT", bound=BaseModel)
_MODEL_LIST = TypeAdapter(list[ModelPublic])
_TASK_LIST = TypeAdapter(list[TaskPublic])
_CONSUMER_LIST = TypeAdapter(list[ConsumerPublic])
_AUDIT_LIST = TypeAdapter(list[AuditEntry])


def _parse(schema: type[SchemaT], data: Any) -> SchemaT:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise UpstreamHTTPError(502, f"private API answered with an unexpected body: {exc}") from exc


def _without_none(params: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in params.items() if value is not None}


def v12_detail(task: TaskPublic, code: int) -> str:
    if code == V12Code.PENDING:
        return f"task {task.uid} is {task.status}; ask again later"
    if code == V12Code.FAILED:
        reason = f": {task.error}" if task.error else ""
        return f"task {task.uid} {task.status}{reason}"
    if code == V12Code.NOT_FOUND:
        return f"task {task.uid} was deleted"
    return f"task {task.uid} is {task.status} but its output is missing"


def unknown_task_v12(uid: str) -> V12Error:
    return V12Error(V12Code.NOT_FOUND, f"task {uid} is unknown or was deleted")


async def submit_task(
    api: PrivateAPI,
    *,
    caller: Principal | None,
    model_id: str,
    priority: int,
    body: UploadBody,
    cache: bool = True,
) -> TaskPublic:
    if body.chunks is None:
        raise PublicAPIError(422, "the request needs a multipart body with the field 'zip_file'")
    data = await api.upload(
        PrivateRoutes.TASKS,
        # The form's fields (params, ...) go through with the body; the private API reads them.
        params={
            "model_human_readable_id": model_id,
            "priority": priority,
            TaskSubmitFields.CACHE_QUERY: cache,
        },
        body=body.chunks,
        headers={**body.headers, **encode_acting_headers(caller)},
    )
    return _parse(TaskPublic, data)


async def list_tasks(
    api: PrivateAPI,
    *,
    caller: Principal | None,
    status: TaskStatus | None,
    limit: int,
    offset: int,
    model: str | None = None,
    owner: str | None = None,
    uid: str | None = None,
) -> list[TaskPublic]:
    """The caller's tasks (every task for operators), newest first; `owner` narrows an operator's
    list to one key's tasks, `uid` to the tasks whose uid starts with it."""
    params = _without_none(
        {
            "status": status,
            "limit": limit,
            "offset": offset,
            TASK_FILTER_MODEL: model,
            TASK_FILTER_OWNER: owner,
            TASK_FILTER_UID: uid,
        }
    )
    data = await api.call("GET", PrivateRoutes.TASKS, params=params, headers=encode_acting_headers(caller))
    try:
        return _TASK_LIST.validate_python(data)
    except ValidationError as exc:
        raise UpstreamHTTPError(502, f"private API answered with an unexpected body: {exc}") from exc


async def get_task(api: PrivateAPI, uid: str, *, caller: Principal | None) -> TaskPublic:
    data = await api.call("GET", PrivateRoutes.TASK.format(uid=uid), headers=encode_acting_headers(caller))
    return _parse(TaskPublic, data)


async def task_status_json(api: PrivateAPI, uid: str, *, caller: Principal | None) -> bytes:
    """The private API's TaskPublic JSON as it came: status polls are the hottest route, and
    parsing, validating and serializing it again here would change nothing in it."""
    return checked(
        await api.exchange("GET", PrivateRoutes.TASK.format(uid=uid), headers=encode_acting_headers(caller))
    ).body


async def _task_or_554(api: PrivateAPI, uid: str, caller: Principal | None) -> TaskPublic:
    try:
        return await get_task(api, uid, caller=caller)
    except UpstreamHTTPError as exc:
        if exc.status_code == 404:
            raise unknown_task_v12(uid) from exc
        raise


async def open_output_v12(api: PrivateAPI, uid: str, *, caller: Principal | None) -> httpx.Response:
    """The v1.2 poll: an open stream of the output zip, or the 551-554 answer for the task's state."""
    task = await _task_or_554(api, uid, caller)
    code = v12_code_for(task.status, task.output_present)
    if code != 200:
        raise V12Error(code, v12_detail(task, code))
    try:
        return await api.open_stream(
            "GET", PrivateRoutes.TASK_OUTPUT.format(uid=uid), headers=encode_acting_headers(caller)
        )
    except UpstreamHTTPError as exc:
        if exc.status_code not in (404, 409):
            raise
    # The task changed between the two calls (deleted, or its output vanished): answer for now.
    task = await _task_or_554(api, uid, caller)
    code = v12_code_for(task.status, task.output_present)
    if code == 200:
        code = V12Code.OUTPUT_MISSING
    raise V12Error(code, v12_detail(task, code))


async def delete_task_v12(api: PrivateAPI, uid: str, *, caller: Principal | None) -> TaskPublic:
    try:
        data = await api.call(
            "DELETE", PrivateRoutes.TASK.format(uid=uid), headers=encode_acting_headers(caller)
        )
    except UpstreamHTTPError as exc:
        if exc.status_code == 404:
            raise unknown_task_v12(uid) from exc
        raise
    return _parse(TaskPublic, data)


async def cancel_task(api: PrivateAPI, uid: str, *, caller: Principal | None) -> TaskPublic:
    data = await api.call(
        "POST", PrivateRoutes.TASK_CANCEL.format(uid=uid), headers=encode_acting_headers(caller)
    )
    return _parse(TaskPublic, data)


async def open_logs(api: PrivateAPI, uid: str, *, caller: Principal | None) -> httpx.Response:
    return await api.open_stream(
        "GET", PrivateRoutes.TASK_LOGS.format(uid=uid), headers=encode_acting_headers(caller)
    )


async def list_models(api: PrivateAPI) -> list[ModelPublic]:
    data = await api.call("GET", PrivateRoutes.MODELS)
    try:
        return _MODEL_LIST.validate_python(data)
    except ValidationError as exc:
        raise UpstreamHTTPError(502, f"private API answered with an unexpected body: {exc}") from exc


async def register_model(
    api: PrivateAPI, *, caller: Principal | None, params: ModelCreate, body: UploadBody
) -> ModelPublic:
    # The caller goes along: what a non-operator may set (IS_ANONYMOUS_MODELS) is the private
    # API's rule. Only what the caller sent is relayed; the private API has the same defaults.
    data = await api.upload(
        PrivateRoutes.MODELS,
        params=params.model_dump(exclude_unset=True),
        body=body.chunks,
        headers={**body.headers, **encode_acting_headers(caller)},
    )
    return _parse(ModelPublic, data)


async def update_model(
    api: PrivateAPI, human_readable_id: str, changes: ModelUpdate, *, caller: Principal | None
) -> ModelPublic:
    data = await api.call(
        "PATCH",
        PrivateRoutes.MODEL.format(human_readable_id=human_readable_id),
        json=changes.model_dump(mode="json", exclude_unset=True),
        headers=encode_acting_headers(caller),
    )
    return _parse(ModelPublic, data)


async def delete_model(api: PrivateAPI, human_readable_id: str, *, caller: Principal | None) -> ModelPublic:
    data = await api.call(
        "DELETE",
        PrivateRoutes.MODEL.format(human_readable_id=human_readable_id),
        headers=encode_acting_headers(caller),
    )
    return _parse(ModelPublic, data)


async def list_consumers(api: PrivateAPI, *, caller: Principal) -> list[ConsumerPublic]:
    data = await api.call("GET", PrivateRoutes.CONSUMERS, headers=encode_acting_headers(caller))
    try:
        return _CONSUMER_LIST.validate_python(data)
    except ValidationError as exc:
        raise UpstreamHTTPError(502, f"private API answered with an unexpected body: {exc}") from exc


async def set_consumer_draining(
    api: PrivateAPI, consumer_id: str, *, draining: bool, caller: Principal
) -> ConsumerPublic:
    """Drain (take no new task) or resume one consumer."""
    data = await api.call(
        "POST" if draining else "DELETE",
        PrivateRoutes.CONSUMER_DRAIN.format(consumer_id=consumer_id),
        headers=encode_acting_headers(caller),
    )
    return _parse(ConsumerPublic, data)


async def list_audit_entries(
    api: PrivateAPI, filters: dict[str, Any], *, caller: Principal
) -> list[AuditEntry]:
    """The audit trail, newest first; `filters` are the query parameters GET /api/audit was given."""
    params = {name: value for name, value in filters.items() if value is not None}
    data = await api.call("GET", PrivateRoutes.AUDIT, params=params, headers=encode_acting_headers(caller))
    try:
        return _AUDIT_LIST.validate_python(data)
    except ValidationError as exc:
        raise UpstreamHTTPError(502, f"private API answered with an unexpected body: {exc}") from exc


def _body_of(reply: Reply) -> Any:
    try:
        return reply.json()
    except ValueError as exc:
        raise UpstreamHTTPError(502, "private API answered with a body that is not JSON") from exc


def _refused_with_challenge(reply: Reply) -> bool:
    """A 401 with a Bearer challenge: the private API's "no such key or session". A 401 without
    one means it refused this service's own token, which upstream_error reports as such."""
    return reply.status_code == 401 and reply.headers.get("www-authenticate", "").startswith("Bearer")


def _plausible(secret: str, max_length: int) -> bool:
    # A key or cookie nothing could have issued is not worth a private API call (nor its 422).
    return 0 < len(secret) <= max_length and secret.isascii() and secret.isprintable()


def _plausible_session_token(token: str) -> bool:
    return _plausible(token, DASHBOARD_TOKEN_MAX_LENGTH)


async def create_dashboard_session(api: PrivateAPI, key: str) -> DashboardSessionCreated | None:
    """A new dashboard session for the owner of `key`; None when the key is unknown, revoked or
    malformed."""
    key = key.strip()
    if not _plausible(key, API_KEY_MAX_LENGTH):
        return None
    reply = await api.exchange("POST", PrivateRoutes.SESSIONS, json={"key": key})
    if _refused_with_challenge(reply):
        return None
    return _parse(DashboardSessionCreated, _body_of(checked(reply)))


async def resolve_dashboard_session(api: PrivateAPI, token: str) -> DashboardSession | None:
    """Whom the session `token` acts for; None when it is unknown, expired or ended, or its key
    was revoked."""
    if not _plausible_session_token(token):
        return None
    reply = await api.exchange("POST", PrivateRoutes.SESSION_RESOLVE, json={"token": token})
    if _refused_with_challenge(reply):
        return None
    return _parse(DashboardSession, _body_of(checked(reply)))


async def end_dashboard_session(api: PrivateAPI, token: str) -> None:
    """Logs the session out; ending an unknown or already ended session does nothing."""
    if not _plausible_session_token(token):
        return
    checked(await api.exchange("POST", PrivateRoutes.SESSION_END, json={"token": token}))


async def overview(
    api: PrivateAPI, *, caller: Principal | None, hours: int = OVERVIEW_HOURS_DEFAULT
) -> PlatformOverview:
    """The dashboard's overview as `caller` may see it: every task for operators, their own for
    users; the last `hours` hours of history."""
    data = await api.call(
        "GET", PrivateRoutes.OVERVIEW, params={"hours": hours}, headers=encode_acting_headers(caller)
    )
    return _parse(PlatformOverview, data)


async def readiness(api: PrivateAPI) -> tuple[bool, HealthReport]:
    """Ready when the private API answers and says its database and RabbitMQ are reachable."""
    try:
        response = await api.exchange("GET", PrivateRoutes.HEALTH_READY)
    except UpstreamUnavailableError as exc:
        report = HealthReport(status="unavailable", checks={"private_api": str(exc.detail)})
        return False, report
    try:
        upstream_checks = HealthReport.model_validate(response.json()).checks
    except (ValueError, ValidationError):
        upstream_checks = {}
    if response.status_code == 200:
        private_state = "ok"
    elif response.status_code in (401, 403):
        private_state = "refused the public API's service token"
    else:
        private_state = f"not ready (HTTP {response.status_code})"
    ready = response.status_code == 200
    report = HealthReport(
        status="ok" if ready else "unavailable", checks={"private_api": private_state, **upstream_checks}
    )
    return ready, report
