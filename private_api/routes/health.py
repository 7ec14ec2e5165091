"""Liveness (no token, for orchestrators), readiness and metrics (token)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from inference_server.contract import HealthReport, PrivateRoutes
from private_api import health
from private_api.deps import MetricsDep, PublisherDep, SessionDep, require_service_token

router = APIRouter(tags=["health"])
guarded = APIRouter(tags=["health"], dependencies=[Depends(require_service_token)])


@router.get(PrivateRoutes.HEALTH_LIVE, response_model=HealthReport)
def live() -> HealthReport:
    return HealthReport(status="ok", checks={})


@guarded.get(
    PrivateRoutes.HEALTH_READY, response_model=HealthReport, responses={503: {"model": HealthReport}}
)
async def ready(session: SessionDep, publisher: PublisherDep) -> JSONResponse:
    database = await run_in_threadpool(health.database_problem, session=session)
    rabbitmq = await run_in_threadpool(publisher.check)
    report = HealthReport(
        status="ok" if database is None and rabbitmq is None else "unavailable",
        checks={"database": database or "ok", "rabbitmq": rabbitmq or "ok"},
    )
    return JSONResponse(status_code=200 if report.status == "ok" else 503, content=report.model_dump())


@guarded.get(PrivateRoutes.METRICS, response_class=Response)
def metrics(metrics: MetricsDep) -> Response:
    return Response(content=metrics.render(), media_type=metrics.content_type)


router.include_router(guarded)
