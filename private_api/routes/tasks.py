"""Task routes the public API relays for users: submit, status, downloads, cancel, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from inference_server.contract import (
    HUMAN_READABLE_ID_PATTERN,
    LOG_MEDIA_TYPE,
    MAX_PRIORITY,
    TASK_FILTER_MODEL,
    TASK_FILTER_OWNER,
    TASK_FILTER_UID,
    TASK_UID_SEARCH_MIN_CHARS,
    PrivateRoutes,
    TaskPublic,
    TaskStatus,
    TaskSubmitFields,
)
from private_api import chains, model_registry, task_lifecycle, task_params, webhooks
from private_api.cancel_push import push_cancel
from private_api.db import QuickQueriesDep
from private_api.deps import (
    ActorDep,
    BlobsDep,
    MetricsDep,
    PublisherDep,
    SchedulingDep,
    SessionDep,
    SettingsDep,
    ZipUploadsDep,
    require_service_token,
    require_task_holder,
)
from private_api.exceptions import NotFound
from private_api.responses import blob_response, json_response, zip_response
from private_api.uploads import zip_request_body

router = APIRouter(tags=["tasks"], dependencies=[Depends(require_service_token)])


@router.post(
    PrivateRoutes.TASKS,
    status_code=201,
    response_model=TaskPublic,
    responses={
        403: {"description": "priority above the acting key's maximum"},
        422: {"description": "bad params, upstreams, or a webhook_url that is not allowed"},
        429: {"description": "the acting key holds its limit of active tasks (Retry-After)"},
    },
    openapi_extra=zip_request_body(required=False),
)
async def submit_task(
    model_human_readable_id: Annotated[str, Query(pattern=HUMAN_READABLE_ID_PATTERN, max_length=128)],
    session: SessionDep,
    settings: SettingsDep,
    uploads: ZipUploadsDep,
    publisher: PublisherDep,
    metrics: MetricsDep,
    actor: ActorDep,
    policy: SchedulingDep,
    priority: Annotated[int, Query(ge=0, le=MAX_PRIORITY)] = 0,
    # False forces a run even when a cacheable model has an equal finished task.
    cache: Annotated[bool, Query(alias=TaskSubmitFields.CACHE_QUERY)] = True,
) -> TaskPublic:
    # Unknown model, priority above the key's, too many active tasks: refuse before a byte of the
    # upload is stored (the limits are checked again in the insert's transaction).
    model = await run_in_threadpool(
        model_registry.get_model, session=session, human_readable_id=model_human_readable_id
    )
    await run_in_threadpool(
        task_lifecycle.check_submission, session=session, actor=actor, priority=priority, settings=settings
    )
    await run_in_threadpool(session.close)  # no connection held while the body streams in
    # The zip is optional: a chained task's input may be an upstream's output (input_from).
    async with uploads.optional_zip("inputs", settings.input_zip_limits) as input_blob:
        task = await run_in_threadpool(
            task_lifecycle.create_task,
            session=session,
            model_human_readable_id=model_human_readable_id,
            priority=priority,
            input_blob=input_blob,
            owner=actor.name if actor is not None else None,
            actor=actor,
            settings=settings,
            # Checked once the body is in; a refusal deletes the stored zip (the `async with`).
            params=task_params.submitted_params(
                uploads.text_fields.get(TaskSubmitFields.PARAMS), model.params_schema
            ),
            use_cache=cache,
            input_from=chains.named_upstream(
                TaskSubmitFields.INPUT_FROM, uploads.text_fields.get(TaskSubmitFields.INPUT_FROM)
            ),
            model_from=chains.named_upstream(
                TaskSubmitFields.MODEL_FROM, uploads.text_fields.get(TaskSubmitFields.MODEL_FROM)
            ),
            webhook_url=webhooks.accepted_webhook_url(
                uploads.text_fields.get(TaskSubmitFields.WEBHOOK_URL),
                actor=actor,
                allowed=settings.webhook_destinations,
            ),
        )
    metrics.submissions.labels(model=model_human_readable_id).inc()
    # After the commit: a broker outage leaves the task to the outbox, never fails the submit.
    await run_in_threadpool(
        task_lifecycle.publish_task, session=session, publisher=publisher, policy=policy, uid=task.uid
    )
    return task


@router.get(PrivateRoutes.TASKS, response_model=list[TaskPublic])
def list_tasks(
    session: SessionDep,
    actor: ActorDep,
    policy: SchedulingDep,
    status: TaskStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    model: Annotated[str | None, Query(alias=TASK_FILTER_MODEL, max_length=128)] = None,
    owner: Annotated[str | None, Query(alias=TASK_FILTER_OWNER, max_length=255)] = None,
    uid: Annotated[
        str | None, Query(alias=TASK_FILTER_UID, min_length=TASK_UID_SEARCH_MIN_CHARS, max_length=64)
    ] = None,
) -> list[TaskPublic]:
    return task_lifecycle.list_tasks(
        session=session,
        actor=actor,
        status=status,
        limit=limit,
        offset=offset,
        policy=policy,
        filters=task_lifecycle.TaskFilters(model=model, owner=owner, uid_prefix=uid),
    )


@router.get(PrivateRoutes.TASK, response_model=TaskPublic)
async def get_task(uid: str, queries: QuickQueriesDep, actor: ActorDep, policy: SchedulingDep) -> Response:
    # Every status poll lands here: one thread hop, one serialization (a pending task's
    # waiting_reason costs a few more queries; others none).
    return json_response(await queries.run(task_lifecycle.get_task, uid=uid, actor=actor, policy=policy))


@router.get(
    PrivateRoutes.TASK_INPUT, response_class=StreamingResponse, dependencies=[Depends(require_task_holder)]
)
def get_task_input(uid: str, session: SessionDep, blobs: BlobsDep, actor: ActorDep) -> StreamingResponse:
    key = task_lifecycle.input_blob_key(session=session, uid=uid, actor=actor)
    return zip_response(blobs, key, f"{uid}-input.zip", f"the input of task {uid} is missing from storage")


@router.get(
    PrivateRoutes.TASK_MODEL_FROM,
    response_class=StreamingResponse,
    dependencies=[Depends(require_task_holder)],
    responses={404: {"description": "the task has no model_from, or its upstream has not finished"}},
)
def get_task_model_from(uid: str, session: SessionDep, blobs: BlobsDep, actor: ActorDep) -> StreamingResponse:
    key = task_lifecycle.model_from_blob_key(session=session, uid=uid, actor=actor)
    return zip_response(
        blobs, key, f"{uid}-model-from.zip", f"the model_from output of task {uid} is missing from storage"
    )


@router.get(
    PrivateRoutes.TASK_OUTPUT,
    response_class=StreamingResponse,
    responses={
        404: {"description": "task unknown, or finished with its output missing"},
        409: {"description": "not finished"},
    },
)
def get_task_output(uid: str, session: SessionDep, blobs: BlobsDep, actor: ActorDep) -> StreamingResponse:
    key = task_lifecycle.output_blob_key(session=session, uid=uid, actor=actor)
    return zip_response(
        blobs, key, f"{uid}.zip", f"task {uid} is finished but its output is missing from storage"
    )


@router.get(PrivateRoutes.TASK_LOGS, response_class=PlainTextResponse)
def get_task_logs(uid: str, session: SessionDep, blobs: BlobsDep, actor: ActorDep) -> Response:
    key = task_lifecycle.log_blob_key(session=session, uid=uid, actor=actor)
    if key is None:
        return Response(content=b"", media_type=LOG_MEDIA_TYPE)
    try:
        return blob_response(
            blobs, key, media_type=LOG_MEDIA_TYPE, filename=f"{uid}.log", missing_detail="log missing"
        )
    except NotFound:
        # Replaced by a newer upload between the lookup and the open: the newer one is next time's.
        return Response(content=b"", media_type=LOG_MEDIA_TYPE)


@router.post(PrivateRoutes.TASK_CANCEL, response_model=TaskPublic)
def cancel_task(uid: str, session: SessionDep, actor: ActorDep, publisher: PublisherDep) -> TaskPublic:
    task = task_lifecycle.cancel_task(session=session, uid=uid, actor=actor)
    push_cancel(publisher, task)
    return task


@router.delete(PrivateRoutes.TASK, response_model=TaskPublic)
def delete_task(
    uid: str, session: SessionDep, blobs: BlobsDep, actor: ActorDep, publisher: PublisherDep
) -> TaskPublic:
    task = task_lifecycle.delete_task(session=session, blobs=blobs, uid=uid, actor=actor)
    push_cancel(publisher, task)
    return task
