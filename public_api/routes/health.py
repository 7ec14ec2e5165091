"""Liveness and readiness (no authentication: Traefik and probes call these) and Prometheus
metrics (an operator key or IS_METRICS_TOKEN)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from inference_server.contract import HealthReport, PublicRoutes
from public_api import service
from public_api.deps import MetricsReaderDep, PrivateAPIDep
from public_api.metrics import Metrics
from public_api.platform_metrics import render

router = APIRouter(tags=["health"])


@router.get(PublicRoutes.HEALTH_LIVE, response_model=HealthReport, summary="The process answers")
async def live() -> HealthReport:
    return HealthReport(status="ok", checks={})


@router.get(
    PublicRoutes.HEALTH_READY,
    response_model=HealthReport,
    summary="The private API, its database and RabbitMQ are reachable",
    responses={503: {"model": HealthReport, "description": "Something the API needs is down."}},
)
async def ready(api: PrivateAPIDep) -> JSONResponse:
    is_ready, report = await service.readiness(api)
    return JSONResponse(report.model_dump(), status_code=200 if is_ready else 503)


@router.get(
    PublicRoutes.METRICS,
    summary="Prometheus metrics: requests, and the platform's tasks, queues, consumers and GPUs",
    response_class=Response,
    responses={401: {"description": "No key or token."}, 403: {"description": "A user key."}},
)
async def metrics(request: Request, api: PrivateAPIDep, _reader: MetricsReaderDep) -> Response:
    metrics: Metrics = request.app.state.metrics
    return Response(await render(metrics.registry, metrics.platform, api), media_type=CONTENT_TYPE_LATEST)
