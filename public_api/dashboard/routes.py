"""The dashboard's pages, the fragments its script polls, and its actions (thin: read the request,
call the public API's service functions as the session's principal, render).

Traefik's forwardAuth sees these routes as open (no key dependency): they check the session
cookie themselves. GETs never change anything; every POST but the login echoes the session's
CSRF token.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.datastructures import UploadFile
from starlette.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from inference_server.contract import (
    API_KEY_MAX_LENGTH,
    CONSUMER_ID_PATTERN,
    DASHBOARD_CSRF_FIELD,
    HUMAN_READABLE_ID_PATTERN,
    OVERVIEW_HOURS_DEFAULT,
    OVERVIEW_HOURS_MAX,
    TASK_UID_PATTERN,
    TASK_UID_SEARCH_MIN_CHARS,
    ZIP_MEDIA_TYPE,
    AuditAction,
    DashboardSession,
    PublicRoutes,
    TaskPublic,
    TaskStatus,
    V12Code,
)
from public_api import service
from public_api.auth import invalid_key
from public_api.config import PublicSettings
from public_api.dashboard.forms import (
    model_create_from,
    model_update_from,
    read_small_form,
    zip_upload_body,
)
from public_api.dashboard.rendering import (
    LOGIN_PATH,
    STATIC_DIR,
    DashboardRoute,
    render,
    throughput_chart,
)
from public_api.dashboard.sessions import (
    check_csrf,
    clear_session_cookie,
    current_session,
    session_token,
    set_session_cookie,
)
from public_api.deps import Access, PrivateAPIDep, SettingsDep, authorize, refused
from public_api.errors import PublicAPIError, UpstreamHTTPError, V12Error
from public_api.relay import UploadBody, stream_back
from public_api.upstream import PrivateAPI

DASHBOARD = PublicRoutes.DASHBOARD
OVERVIEW_PATH = f"{DASHBOARD}/overview"
TASKS_PATH = f"{DASHBOARD}/tasks"
MODELS_PATH = f"{DASHBOARD}/models"
CONSUMERS_PATH = f"{DASHBOARD}/consumers"
AUDIT_PATH = f"{DASHBOARD}/audit"
FRAGMENTS = f"{DASHBOARD}/fragments"
TASKS_PAGE_SIZE = 25
AUDIT_PAGE_SIZE = 50
# The end of a long log is what someone watching a task wants; the whole log is one API call away.
LOG_TAIL_CHARS = 64 * 1024
ENDED_STATES = frozenset(
    {TaskStatus.FINISHED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.EXPIRED, TaskStatus.DELETED}
)
STATIC_FILES = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}

router = APIRouter(route_class=DashboardRoute, include_in_schema=False)

SessionDep = Annotated[DashboardSession, Depends(current_session)]
TaskUid = Annotated[str, Path(pattern=TASK_UID_PATTERN)]
ModelId = Annotated[str, Path(pattern=HUMAN_READABLE_ID_PATTERN, max_length=128)]
ConsumerId = Annotated[str, Path(pattern=CONSUMER_ID_PATTERN, max_length=128)]


def _back_to(path: str) -> RedirectResponse:
    # 303: the browser follows an action's answer with a GET, so a reload never repeats it.
    return RedirectResponse(path, status_code=303)


async def _checked_form(request: Request, session: DashboardSession) -> dict[str, str]:
    """The action's small form, once its CSRF token (field or header) matched the session's."""
    form = await read_small_form(request)
    check_csrf(request, session, form.get(DASHBOARD_CSRF_FIELD))
    return form


def _require(request: Request, session: DashboardSession, access: Access, settings: PublicSettings) -> None:
    """The API's own rule for `access` (deps.authorize), applied to the session's principal."""
    authorize(request, session.principal, access, settings)


# --- login and logout ----------------------------------------------------------------------------


@router.get(DASHBOARD)
async def dashboard_root() -> RedirectResponse:
    return _back_to(OVERVIEW_PATH)


@router.get(LOGIN_PATH)
async def login_page(request: Request) -> Response:
    if session_token(request) is not None:
        try:
            await current_session(request)
            return _back_to(OVERVIEW_PATH)
        except PublicAPIError:
            pass
    return render("login.html", {})


@router.post(LOGIN_PATH)
async def log_in(request: Request, api: PrivateAPIDep) -> Response:
    form = await read_small_form(request)
    key = form.get("key", "").strip()
    created = None
    if key and len(key) <= API_KEY_MAX_LENGTH and key.isascii() and key.isprintable():
        created = await service.create_dashboard_session(api, key)
    if created is None:
        # A wrong key here spends the address's budget exactly as one sent to the API does.
        error = refused(request, invalid_key())
        refusal = render("login.html", {"error": error.detail}, status_code=error.status_code)
        for name, value in (error.headers or {}).items():
            if name.lower() == "retry-after":
                refusal.headers[name] = value
        return refusal
    response = _back_to(OVERVIEW_PATH)
    set_session_cookie(request, response, created.token, created.expires_at)
    return response


@router.post(f"{DASHBOARD}/logout")
async def log_out(request: Request, api: PrivateAPIDep, session: SessionDep) -> Response:
    await _checked_form(request, session)
    token = session_token(request)
    if token is not None:
        await service.end_dashboard_session(api, token)
        request.app.state.dashboard_sessions.forget(token)
    response = _back_to(LOGIN_PATH)
    clear_session_cookie(request, response)
    return response


# --- overview ------------------------------------------------------------------------------------


async def _overview(api: PrivateAPI, session: DashboardSession, hours: int) -> dict[str, Any]:
    overview = await service.overview(api, caller=session.principal, hours=hours)
    return {"overview": overview, "chart": throughput_chart(overview.history), "hours": hours}


OverviewHours = Annotated[int, Query(ge=1, le=OVERVIEW_HOURS_MAX)]


@router.get(OVERVIEW_PATH)
async def overview_page(
    api: PrivateAPIDep, session: SessionDep, hours: OverviewHours = OVERVIEW_HOURS_DEFAULT
) -> Response:
    return render(
        "overview.html", {**await _overview(api, session, hours), "page": "overview"}, session=session
    )


@router.get(f"{FRAGMENTS}/overview")
async def overview_fragment(
    api: PrivateAPIDep, session: SessionDep, hours: OverviewHours = OVERVIEW_HOURS_DEFAULT
) -> Response:
    return render("_overview.html", await _overview(api, session, hours), session=session)


# --- tasks ---------------------------------------------------------------------------------------


async def _task_list(
    request: Request, api: PrivateAPI, session: DashboardSession, page: int
) -> dict[str, Any]:
    query = request.query_params
    filters = {name: query.get(name, "").strip() for name in ("status", "model", "owner", "uid")}
    if filters["status"] and filters["status"] not in TaskStatus.__members__.values():
        raise PublicAPIError(422, f"status must be one of {', '.join(TaskStatus)}")
    notice = None
    uid = filters["uid"] or None
    if uid is not None and len(uid) < TASK_UID_SEARCH_MIN_CHARS:
        notice = f"type at least {TASK_UID_SEARCH_MIN_CHARS} characters of a uid to search"
        uid = None
    tasks = await service.list_tasks(
        api,
        caller=session.principal,
        status=TaskStatus(filters["status"]) if filters["status"] else None,
        limit=TASKS_PAGE_SIZE + 1,
        offset=(page - 1) * TASKS_PAGE_SIZE,
        model=filters["model"] or None,
        owner=(filters["owner"] or None) if session.principal.is_operator else None,
        uid=uid,
    )
    return {
        "tasks": tasks[:TASKS_PAGE_SIZE],
        "has_next": len(tasks) > TASKS_PAGE_SIZE,
        "page_number": page,
        "filters": filters,
        "notice": notice,
        "statuses": list(TaskStatus),
        "query": request.url.query,
    }


TasksPage = Annotated[int, Query(ge=1, le=1_000_000)]


@router.get(TASKS_PATH)
async def tasks_page(
    request: Request, api: PrivateAPIDep, session: SessionDep, page: TasksPage = 1
) -> Response:
    context = await _task_list(request, api, session, page)
    return render("tasks.html", {**context, "page": "tasks"}, session=session)


@router.get(f"{FRAGMENTS}/tasks")
async def tasks_fragment(
    request: Request, api: PrivateAPIDep, session: SessionDep, page: TasksPage = 1
) -> Response:
    return render("_tasks.html", await _task_list(request, api, session, page), session=session)


async def _log_tail(api: PrivateAPI, task: TaskPublic, session: DashboardSession) -> str:
    if task.started_at is None:
        return ""
    try:
        upstream = await service.open_logs(api, task.uid, caller=session.principal)
    except UpstreamHTTPError as exc:
        if exc.status_code == 404:
            return ""
        raise
    try:
        text = (await upstream.aread()).decode(errors="replace")
    finally:
        await upstream.aclose()
    return text[-LOG_TAIL_CHARS:]


async def _task(api: PrivateAPI, uid: str, session: DashboardSession) -> dict[str, Any]:
    task = await service.get_task(api, uid, caller=session.principal)
    return {"task": task, "log": await _log_tail(api, task, session), "ended": task.status in ENDED_STATES}


@router.get(f"{TASKS_PATH}/{{uid}}")
async def task_page(uid: TaskUid, api: PrivateAPIDep, session: SessionDep) -> Response:
    return render("task.html", {**await _task(api, uid, session), "page": "tasks"}, session=session)


@router.get(f"{FRAGMENTS}/tasks/{{uid}}")
async def task_fragment(uid: TaskUid, api: PrivateAPIDep, session: SessionDep) -> Response:
    return render("_task.html", await _task(api, uid, session), session=session)


@router.get(f"{TASKS_PATH}/{{uid}}/download")
async def download_output(uid: TaskUid, api: PrivateAPIDep, session: SessionDep) -> StreamingResponse:
    try:
        upstream = await service.open_output_v12(api, uid, caller=session.principal)
    except V12Error as exc:
        # The v1.2 poll codes mean nothing to a browser: unknown is a 404, any other state a 409.
        raise PublicAPIError(404 if exc.status_code == V12Code.NOT_FOUND else 409, exc.detail) from None
    return stream_back(upstream, media_type=ZIP_MEDIA_TYPE, filename=f"{uid}.zip")


@router.post(f"{TASKS_PATH}/{{uid}}/cancel")
async def cancel_task(uid: TaskUid, request: Request, api: PrivateAPIDep, session: SessionDep) -> Response:
    await _checked_form(request, session)
    await service.cancel_task(api, uid, caller=session.principal)
    return _back_to(f"{TASKS_PATH}/{uid}")


@router.post(f"{TASKS_PATH}/{{uid}}/delete")
async def delete_task(uid: TaskUid, request: Request, api: PrivateAPIDep, session: SessionDep) -> Response:
    await _checked_form(request, session)
    try:
        await service.delete_task_v12(api, uid, caller=session.principal)
    except V12Error as exc:
        raise PublicAPIError(404, exc.detail) from None
    return _back_to(TASKS_PATH)


# --- models --------------------------------------------------------------------------------------


@router.get(MODELS_PATH)
async def models_page(
    request: Request, api: PrivateAPIDep, settings: SettingsDep, session: SessionDep
) -> Response:
    # Reading models is what any key may do (Access.READ_MODELS); managing them, operators.
    _require(request, session, Access.READ_MODELS, settings)
    may_manage = session.principal.is_operator or settings.anonymous_models
    models = await service.list_models(api)
    return render(
        "models.html", {"models": models, "may_manage": may_manage, "page": "models"}, session=session
    )


@router.post(MODELS_PATH)
async def register_model(
    request: Request, api: PrivateAPIDep, settings: SettingsDep, session: SessionDep
) -> Response:
    _require(request, session, Access.OPERATOR, settings)
    # Parsed only now that the caller may register models; the zip is spooled to disk.
    async with request.form(max_files=1, max_fields=40) as form:
        check_csrf(request, session, _text(form.get(DASHBOARD_CSRF_FIELD)))
        upload = form.get("zip_file")
        has_zip = isinstance(upload, UploadFile) and bool(upload.filename) and bool(upload.size)
        params = model_create_from(form, with_zip=has_zip)
        body = (
            zip_upload_body(upload, settings.max_upload_bytes)
            if has_zip and isinstance(upload, UploadFile)
            else UploadBody({}, None)
        )
        await service.register_model(api, caller=session.principal, params=params, body=body)
    return _back_to(MODELS_PATH)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


@router.post(f"{MODELS_PATH}/{{human_readable_id}}")
async def update_model(
    human_readable_id: ModelId,
    request: Request,
    api: PrivateAPIDep,
    settings: SettingsDep,
    session: SessionDep,
) -> Response:
    _require(request, session, Access.OPERATOR, settings)
    form = await _checked_form(request, session)
    await service.update_model(api, human_readable_id, model_update_from(form), caller=session.principal)
    return _back_to(MODELS_PATH)


# --- consumers (operators) -----------------------------------------------------------------------


async def _consumers(
    request: Request, api: PrivateAPI, settings: PublicSettings, session: DashboardSession
) -> dict[str, Any]:
    _require(request, session, Access.OPERATOR_KEY, settings)
    return {"consumers": await service.list_consumers(api, caller=session.principal)}


@router.get(CONSUMERS_PATH)
async def consumers_page(
    request: Request, api: PrivateAPIDep, settings: SettingsDep, session: SessionDep
) -> Response:
    context = await _consumers(request, api, settings, session)
    return render("consumers.html", {**context, "page": "consumers"}, session=session)


@router.get(f"{FRAGMENTS}/consumers")
async def consumers_fragment(
    request: Request, api: PrivateAPIDep, settings: SettingsDep, session: SessionDep
) -> Response:
    return render("_consumers.html", await _consumers(request, api, settings, session), session=session)


async def _set_draining(
    consumer_id: str,
    request: Request,
    api: PrivateAPI,
    settings: PublicSettings,
    session: DashboardSession,
    *,
    draining: bool,
) -> Response:
    _require(request, session, Access.OPERATOR_KEY, settings)
    await _checked_form(request, session)
    await service.set_consumer_draining(api, consumer_id, draining=draining, caller=session.principal)
    return _back_to(CONSUMERS_PATH)


@router.post(f"{CONSUMERS_PATH}/{{consumer_id}}/drain")
async def drain_consumer(
    consumer_id: ConsumerId, request: Request, api: PrivateAPIDep, settings: SettingsDep, session: SessionDep
) -> Response:
    return await _set_draining(consumer_id, request, api, settings, session, draining=True)


@router.post(f"{CONSUMERS_PATH}/{{consumer_id}}/resume")
async def resume_consumer(
    consumer_id: ConsumerId, request: Request, api: PrivateAPIDep, settings: SettingsDep, session: SessionDep
) -> Response:
    return await _set_draining(consumer_id, request, api, settings, session, draining=False)


# --- audit (operators) ---------------------------------------------------------------------------


@router.get(AUDIT_PATH)
async def audit_page(
    request: Request,
    api: PrivateAPIDep,
    settings: SettingsDep,
    session: SessionDep,
    before_id: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    _require(request, session, Access.OPERATOR_KEY, settings)
    query = request.query_params
    filters = {name: query.get(name, "").strip()[:255] for name in ("action", "actor", "target")}
    if filters["action"] and filters["action"] not in AuditAction.__members__.values():
        raise PublicAPIError(422, f"action must be one of {', '.join(AuditAction)}")
    entries = await service.list_audit_entries(
        api,
        {
            **{name: value or None for name, value in filters.items()},
            "before_id": before_id,
            "limit": AUDIT_PAGE_SIZE,
        },
        caller=session.principal,
    )
    return render(
        "audit.html",
        {
            "entries": entries,
            "filters": filters,
            "actions": list(AuditAction),
            "next_before_id": entries[-1].id if len(entries) == AUDIT_PAGE_SIZE else None,
            "page": "audit",
        },
        session=session,
    )


# --- static files --------------------------------------------------------------------------------


@router.get(f"{DASHBOARD}/static/{{name}}")
async def static_file(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise PublicAPIError(404, f"no static file {name!r}")
    # Revalidated on every use: a new version is picked up at once, an unchanged one is a 304.
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "no-cache"})
