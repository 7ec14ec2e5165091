"""Liveness, readiness and Prometheus metrics; no authentication, Traefik and probes call these."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from inference_server.contract import HealthReport, PublicRoutes
from public_api import service
from public_api.deps import PrivateAPIDep

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


@router.get(PublicRoutes.METRICS, summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
