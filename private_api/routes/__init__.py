"""All routers of the private API, assembled in one place."""

from __future__ import annotations

from fastapi import APIRouter

from private_api.routes import (
    audit,
    auth,
    consumer,
    consumers,
    health,
    models,
    overview,
    sessions,
    task_waits,
    tasks,
)

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(models.router)
api_router.include_router(task_waits.router)
api_router.include_router(tasks.router)
api_router.include_router(consumer.router)
api_router.include_router(consumers.router)
api_router.include_router(auth.router)
api_router.include_router(audit.router)
api_router.include_router(sessions.router)
api_router.include_router(overview.router)
