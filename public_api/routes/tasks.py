"""Task routes: the v1.2 submit/poll/delete trio plus list, status, logs and cancel.

Every route acts for the caller (task_caller): a task the caller may not see answers exactly
like an unknown one (404, or 554 on the v1.2 routes), so a uid never reveals someone else's task.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response, StreamingResponse

from inference_server.contract import (
    EVENT_STREAM_MEDIA_TYPE,
    FOLLOW_PARAM,
    HUMAN_READABLE_ID_PATTERN,
    LOG_MEDIA_TYPE,
    MAX_PRIORITY,
    PARAMS_MAX_BYTES,
    SEEN_PARAM,
    TASK_FILTER_MODEL,
    TASK_FILTER_OWNER,
    TASK_FILTER_UID,
    TASK_UID_PATTERN,
    TASK_UID_SEARCH_MIN_CHARS,
    WAIT_MAX_S,
    WAIT_MIN_S,
    WAIT_PARAM,
    WAKE_ON_PARAM,
    ZIP_MEDIA_TYPE,
    PublicRoutes,
    TaskPublic,
    TaskStatus,
    TaskSubmitFields,
    V12Code,
    WakeOn,
)
from public_api import service, task_watch
from public_api.deps import PrivateAPIDep, SettingsDep, TaskCallerDep, task_caller
from public_api.log_follow import follow_log
from public_api.relay import stream_back, upload_body
from public_api.routes._docs import COMMON_RESPONSES, V12_POLL_RESPONSES, error, zip_upload_body
from public_api.task_watch import TaskWatchDep

router = APIRouter(tags=["tasks"], dependencies=[Depends(task_caller)], responses=COMMON_RESPONSES)

TaskUid = Annotated[str, Path(pattern=TASK_UID_PATTERN, description="The uid returned at submission.")]
WakeOnQuery = Annotated[
    WakeOn,
    Query(alias=WAKE_ON_PARAM, description="What wakes the wait: any change, a new status, or the end."),
]


# Without the slash too: a redirect would make clients send a large upload twice (or not at all).
@router.post(PublicRoutes.TASKS.rstrip("/"), include_in_schema=False)
@router.post(
    PublicRoutes.TASKS,
    summary="Submit a task (v1.2)",
    response_model=str,
    responses={
        200: {"description": "The new task's uid, as a JSON string."},
        400: error("The upload is not a valid, safe zip."),
        403: error("The priority is above the key's maximum (operators set it: `keys set`)."),
        404: error("No model with this id, or an input_from/model_from task unknown or not yours."),
        409: error("The input_from/model_from task failed, was cancelled or expired: no output."),
        413: error("The upload is larger than allowed."),
        422: error(
            "Both a zip and input_from, or neither; params that are not a JSON object or fail the "
            "model's params_schema; or a webhook_url that is not allowed."
        ),
        429: error("The key holds its limit of pending plus running tasks; try again after Retry-After."),
    },
    openapi_extra=zip_upload_body(
        required=True,
        zip_required=False,
        description="The task's input files, zipped (or input_from instead).",
        text_fields={
            TaskSubmitFields.INPUT_FROM: "The uid of one of your tasks whose output is this task's "
            "input, instead of a zip. It may still be pending or running: this task waits for it.",
            TaskSubmitFields.MODEL_FROM: "The uid of one of your tasks whose output is mounted at "
            "/model instead of the model's own files (fine-tuning from an earlier run).",
            TaskSubmitFields.PARAMS: "A JSON object of parameters the model reads at /params.json, "
            "checked against the model's params_schema (422 naming the failing path). At most "
            f"{PARAMS_MAX_BYTES} bytes.",
            TaskSubmitFields.WEBHOOK_URL: "POSTed to, signed with your key's webhook secret, when "
            "the task runs, finishes, fails or is cancelled: an http(s) URL on a host the operator "
            "allows (IS_WEBHOOK_ALLOWED_HOSTS; README, Webhooks). Needs a key.",
        },
    ),
)
async def submit_task(
    request: Request,
    api: PrivateAPIDep,
    settings: SettingsDep,
    caller: TaskCallerDep,
    model_human_readable_id: Annotated[
        str, Query(pattern=HUMAN_READABLE_ID_PATTERN, description="The model that runs the task.")
    ],
    priority: Annotated[
        int, Query(ge=0, le=MAX_PRIORITY, description="Higher runs sooner; at most the key's maximum.")
    ] = 0,
    cache: Annotated[
        bool,
        Query(
            alias=TaskSubmitFields.CACHE_QUERY,
            description="False runs the task even when a cacheable model has its result already.",
        ),
    ] = True,
) -> str:
    task = await service.submit_task(
        api,
        caller=caller,
        model_id=model_human_readable_id,
        priority=priority,
        cache=cache,
        body=upload_body(request, settings.max_upload_bytes),
    )
    # v1.2 clients json.loads() the body and expect the bare uid.
    return task.uid


@router.get(PublicRoutes.TASKS.rstrip("/"), include_in_schema=False)
@router.get(
    PublicRoutes.TASKS,
    summary="List your tasks (all tasks for operators)",
    response_model=list[TaskPublic],
    description=(
        "Newest first; deleted tasks are left out. Anonymous callers (IS_ANONYMOUS_TASKS) get an "
        "empty list: anonymous tasks are reachable only by their uid."
    ),
)
async def list_tasks(
    api: PrivateAPIDep,
    caller: TaskCallerDep,
    status: Annotated[TaskStatus | None, Query(description="Only tasks in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
    model: Annotated[
        str | None, Query(alias=TASK_FILTER_MODEL, max_length=128, description="Only this model's tasks.")
    ] = None,
    owner: Annotated[
        str | None,
        Query(
            alias=TASK_FILTER_OWNER,
            max_length=255,
            description="Only the tasks of this key's name (operators; a user's list is always their own).",
        ),
    ] = None,
    uid: Annotated[
        str | None,
        Query(
            alias=TASK_FILTER_UID,
            min_length=TASK_UID_SEARCH_MIN_CHARS,
            max_length=64,
            description=f"Only tasks whose uid starts with this ({TASK_UID_SEARCH_MIN_CHARS} "
            "characters or more).",
        ),
    ] = None,
) -> list[TaskPublic]:
    return await service.list_tasks(
        api, caller=caller, status=status, limit=limit, offset=offset, model=model, owner=owner, uid=uid
    )


@router.get(
    PublicRoutes.TASK,
    summary="Poll a task and download its output (v1.2)",
    response_class=StreamingResponse,
    responses=V12_POLL_RESPONSES,
)
async def poll_task(uid: TaskUid, api: PrivateAPIDep, caller: TaskCallerDep) -> StreamingResponse:
    upstream = await service.open_output_v12(api, uid, caller=caller)
    return stream_back(upstream, media_type=ZIP_MEDIA_TYPE, filename=f"{uid}.zip")


@router.delete(
    PublicRoutes.TASK,
    summary="Delete a task, cancelling it if it runs (v1.2)",
    response_model=TaskPublic,
    responses={V12Code.NOT_FOUND.value: error("554: no such task, or it was already deleted.")},
)
async def delete_task(uid: TaskUid, api: PrivateAPIDep, caller: TaskCallerDep) -> TaskPublic:
    return await service.delete_task_v12(api, uid, caller=caller)


@router.get(
    PublicRoutes.TASK_STATUS,
    summary="A task's status as JSON, at once or as soon as it changes",
    response_model=TaskPublic,
    description=(
        f"With `{WAIT_PARAM}=S`, a long poll: answered as soon as the task differs from what you "
        f"saw (`{SEEN_PARAM}`, a status; without it, the state at the time of the request) in what "
        f"`{WAKE_ON_PARAM}` names, or after S seconds with the status as it is then. "
        f"`{WAKE_ON_PARAM}={WakeOn.CHANGE.value}` (the default): its status, progress or waiting "
        f"reason; `{WakeOn.STATUS.value}`: its status; `{WakeOn.END.value}`: only its end, what a "
        "client waiting for the result needs. A task that has ended is answered at once."
    ),
    responses={
        404: error("No such task, or it was deleted."),
        422: error(
            f"`{WAIT_PARAM}` outside {WAIT_MIN_S:g}..{WAIT_MAX_S:g}, `{SEEN_PARAM}` not a status, "
            f"or `{WAKE_ON_PARAM}` not one of {', '.join(WakeOn)}."
        ),
    },
)
async def task_status(
    uid: TaskUid,
    api: PrivateAPIDep,
    caller: TaskCallerDep,
    watch: TaskWatchDep,
    wait: Annotated[
        float | None,
        Query(
            alias=WAIT_PARAM,
            ge=WAIT_MIN_S,
            le=WAIT_MAX_S,
            description="Wait up to this many seconds for the task to change.",
        ),
    ] = None,
    seen: Annotated[
        TaskStatus | None,
        Query(alias=SEEN_PARAM, description=f"The status you last saw (with `{WAIT_PARAM}`)."),
    ] = None,
    on: WakeOnQuery = WakeOn.CHANGE,
) -> Response:
    if wait is None:
        body = await service.task_status_json(api, uid, caller=caller)
    else:
        body = await task_watch.status_after_change(
            api, watch, uid, caller=caller, wait_s=wait, seen=seen, on=on
        )
    return Response(body, media_type="application/json")


@router.get(
    PublicRoutes.TASK_EVENTS,
    summary="A task's changes as server-sent events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "`text/event-stream`: first the task as it is, then one event at each "
            f"change of its status, progress or waiting reason (fewer with `{WAKE_ON_PARAM}`, as "
            "for the long poll; `event:` the status, `data:` the task's JSON), ending after a "
            "final status; a comment line while nothing changes.",
            "content": {EVENT_STREAM_MEDIA_TYPE: {}},
        },
        404: error("No such task."),
        422: error(f"`{WAKE_ON_PARAM}` not one of {', '.join(WakeOn)}."),
    },
)
async def task_events(
    uid: TaskUid,
    api: PrivateAPIDep,
    caller: TaskCallerDep,
    watch: TaskWatchDep,
    on: WakeOnQuery = WakeOn.CHANGE,
) -> StreamingResponse:
    # Asked before the answer starts: an unknown task is a 404, not an empty stream.
    task = await service.get_task(api, uid, caller=caller)
    return StreamingResponse(
        task_watch.task_events(watch, task, on=on),
        media_type=EVENT_STREAM_MEDIA_TYPE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    PublicRoutes.TASK_LOGS,
    summary="A task's container log (stdout and stderr)",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The log so far; empty before the task ran. With follow=true, the log "
            "as it grows (chunked) until the task has ended and its final log is in.",
            "content": {"text/plain": {}},
        },
        404: error("No such task."),
    },
)
async def task_logs(
    uid: TaskUid,
    api: PrivateAPIDep,
    caller: TaskCallerDep,
    follow: Annotated[
        bool, Query(alias=FOLLOW_PARAM, description="Stream the log while the task runs, until it ends.")
    ] = False,
) -> StreamingResponse:
    if follow:
        # Asked here, before the answer starts: an unknown task is a 404, not an empty stream.
        task = await service.get_task(api, uid, caller=caller)
        return StreamingResponse(follow_log(api, task, caller=caller), media_type=LOG_MEDIA_TYPE)
    upstream = await service.open_logs(api, uid, caller=caller)
    return stream_back(upstream, media_type=LOG_MEDIA_TYPE)


@router.post(
    PublicRoutes.TASK_CANCEL,
    summary="Cancel a pending or running task",
    response_model=TaskPublic,
    responses={404: error("No such task.")},
)
async def cancel_task(uid: TaskUid, api: PrivateAPIDep, caller: TaskCallerDep) -> TaskPublic:
    return await service.cancel_task(api, uid, caller=caller)
