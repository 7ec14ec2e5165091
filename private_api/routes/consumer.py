"""Task routes only job consumers call; each names the consumer in X-Consumer-Id."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from inference_server.contract import (
    PROGRESS_MESSAGE_MAX_CHARS,
    CacheAnswer,
    CacheLookup,
    HeartbeatReply,
    PrivateRoutes,
    RunTimes,
    TaskClaim,
    TaskFailure,
    TaskPublic,
    TaskRelease,
)
from private_api import leases, outbox, result_cache
from private_api.deps import (
    BlobsDep,
    ConsumerIdDep,
    MetricsDep,
    PublisherDep,
    SchedulingDep,
    SessionDep,
    SettingsDep,
    ZipUploadsDep,
    require_service_token,
)
from private_api.uploads import FinalLog, log_upload, zip_request_body

router = APIRouter(tags=["consumer"], dependencies=[Depends(require_service_token)])


@router.post(PrivateRoutes.TASK_CLAIM, response_model=TaskClaim)
def claim_task(
    request: Request,
    uid: str,
    consumer_id: ConsumerIdDep,
    session: SessionDep,
    settings: SettingsDep,
    publisher: PublisherDep,
    policy: SchedulingDep,
) -> TaskClaim:
    claim = leases.claim_task(
        session=session,
        uid=uid,
        consumer_id=consumer_id,
        lease_seconds=settings.lease_seconds,
        max_attempts=settings.max_attempts,
        leases_enforced=request.app.state.maintenance.leases_enforced,
    )
    # After the claim's commit: the owner's next held task takes the turn it freed.
    outbox.free_turn_after_claim(
        session=session,
        publisher=publisher,
        policy=policy,
        uid=uid,
        lane=outbox.Lane(owner=claim.task.owner, gpu=claim.model.use_gpu),
    )
    return claim


@router.post(PrivateRoutes.TASK_HEARTBEAT, response_model=HeartbeatReply)
def heartbeat(
    uid: str, consumer_id: ConsumerIdDep, session: SessionDep, settings: SettingsDep
) -> HeartbeatReply:
    return leases.heartbeat(
        session=session, uid=uid, consumer_id=consumer_id, lease_seconds=settings.lease_seconds
    )


@router.post(
    PrivateRoutes.TASK_OUTPUT, response_model=TaskPublic, openapi_extra=zip_request_body(required=True)
)
async def upload_output(
    uid: str,
    consumer_id: ConsumerIdDep,
    session: SessionDep,
    settings: SettingsDep,
    blobs: BlobsDep,
    uploads: ZipUploadsDep,
    run_times: Annotated[RunTimes, Query()],
    publisher: PublisherDep,
    policy: SchedulingDep,
) -> TaskPublic:
    await run_in_threadpool(leases.require_holder, session=session, uid=uid, consumer_id=consumer_id)
    # Before the body streams in, so impossible run times cost no upload.
    await run_in_threadpool(leases.check_run_times, session=session, uid=uid, run_times=run_times)
    await run_in_threadpool(session.close)
    async with uploads.zip("outputs", settings.output_zip_limits) as output_blob:
        final_log = FinalLog.of_form(uploads.text_fields)
        if final_log is not None:
            # The final log came with the output (one request); stored first, while it runs.
            await run_in_threadpool(
                leases.store_final_log,
                session=session,
                blobs=blobs,
                uid=uid,
                consumer_id=consumer_id,
                final_log=final_log,
                max_bytes=settings.max_log_bytes,
            )
        return await run_in_threadpool(
            leases.store_output,
            session=session,
            uid=uid,
            consumer_id=consumer_id,
            output_blob=output_blob,
            run_times=run_times,
            publisher=publisher,
            policy=policy,
        )


@router.post(PrivateRoutes.TASK_FAIL, response_model=TaskPublic)
def fail_task(
    uid: str,
    failure: TaskFailure,
    consumer_id: ConsumerIdDep,
    session: SessionDep,
    settings: SettingsDep,
    publisher: PublisherDep,
    policy: SchedulingDep,
) -> TaskPublic:
    return leases.fail_task(
        session=session,
        publisher=publisher,
        uid=uid,
        consumer_id=consumer_id,
        failure=failure,
        max_attempts=settings.max_attempts,
        policy=policy,
    )


@router.post(PrivateRoutes.TASK_RELEASE, response_model=TaskPublic)
def release_task(
    uid: str,
    release: TaskRelease,
    consumer_id: ConsumerIdDep,
    session: SessionDep,
    publisher: PublisherDep,
    policy: SchedulingDep,
) -> TaskPublic:
    return leases.release_task(
        session=session, publisher=publisher, policy=policy, uid=uid, consumer_id=consumer_id, release=release
    )


@router.post(PrivateRoutes.TASK_CACHE_LOOKUP, response_model=CacheAnswer)
def cache_lookup(
    uid: str,
    lookup: CacheLookup,
    consumer_id: ConsumerIdDep,
    session: SessionDep,
    blobs: BlobsDep,
    metrics: MetricsDep,
    publisher: PublisherDep,
    policy: SchedulingDep,
    settings: SettingsDep,
) -> CacheAnswer:
    answer = result_cache.lookup(
        session=session,
        blobs=blobs,
        uid=uid,
        consumer_id=consumer_id,
        image_id=lookup.image_id,
        across_owners=settings.cache_across_owners,
        publisher=publisher,
        policy=policy,
    )
    (metrics.cache_hits if answer.hit else metrics.cache_misses).inc()
    return answer


@router.put(
    PrivateRoutes.TASK_LOGS,
    status_code=204,
    response_class=Response,
    openapi_extra={"requestBody": {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def put_task_logs(
    request: Request,
    uid: str,
    consumer_id: ConsumerIdDep,
    session: SessionDep,
    settings: SettingsDep,
    blobs: BlobsDep,
    # The latest progress line of the log sent (PROGRESS_LINE_PREFIX): a live upload carries it.
    progress: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    progress_message: Annotated[str | None, Query(max_length=PROGRESS_MESSAGE_MAX_CHARS)] = None,
) -> Response:
    await run_in_threadpool(
        leases.require_holder,
        session=session,
        uid=uid,
        consumer_id=consumer_id,
        statuses=leases.LOG_WRITABLE_STATUSES,
    )
    await run_in_threadpool(session.close)
    async with log_upload(request, blobs=blobs, max_bytes=settings.max_log_bytes) as log_blob:
        await run_in_threadpool(
            leases.store_logs,
            session=session,
            blobs=blobs,
            uid=uid,
            consumer_id=consumer_id,
            log_blob=log_blob,
            progress=progress,
            progress_message=progress_message,
        )
    return Response(status_code=204)
