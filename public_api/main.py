"""The public API application: the only service users (and Traefik) talk to."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import Route

from inference_server.api_docs import install_offline_docs
from inference_server.serving import NO_OPENTELEMETRY, install_json_body_limit
from public_api.auth import KeyResolver
from public_api.config import PublicSettings
from public_api.dashboard import DashboardSessionCache
from public_api.dashboard import router as dashboard_router
from public_api.errors import install_error_handlers
from public_api.metrics import Metrics, MetricsMiddleware
from public_api.ratelimit import FailureBudget
from public_api.routes import access, audit, consumers, health, models, overview, tasks
from public_api.task_watch import TaskWatch
from public_api.upstream import PrivateAPI

DESCRIPTION = """\
Submit a zip of inputs to a named model, poll, and download a zip of outputs.

The five `/api/tasks/` and `/api/models/` routes keep InferenceServer v1.2 semantics, including
its custom poll codes: **551** pending or running, **552** failed or cancelled, **553** finished
but output missing, **554** unknown or deleted. Every other error is JSON with a `detail`.

**Access.** Send your API key as `Authorization: Bearer <key>` (or `X-Token: <key>`); operators
create keys with `inference-server keys create`. A user key submits tasks and sees, downloads,
cancels and deletes its own tasks; an operator key also registers, changes and removes models and
sees every task. A missing, unknown or revoked key is a **401**, a valid key without the right a
**403**. Someone else's task answers exactly like an unknown one. Deployments may let clients
without a key in (IS_ANONYMOUS_TASKS, IS_ANONYMOUS_MODELS); both are off by default. An address
whose requests keep failing the key check gets **429** for a while (`Retry-After`); valid keys
are never held back. The key is checked before any request body is read.

**Consumers.** Operator keys list the job consumers with their state (`/api/consumers`) and
drain or resume one (`/api/consumers/{consumer_id}/drain`, POST and DELETE).

**Audit trail.** Operator keys read who registered, changed and removed models, cancelled and
deleted tasks, managed keys and drained consumers, and when (`/api/audit`, newest first).
"""


def create_app(settings: PublicSettings | None = None) -> FastAPI:
    settings = settings or PublicSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One pooled client per process: connections to the private API are reused by all requests.
        app.state.private_api = PrivateAPI(settings)
        app.state.key_resolver = KeyResolver(app.state.private_api, settings.key_cache_ttl_s)
        app.state.task_watch = TaskWatch(settings)
        try:
            yield
        finally:
            await app.state.task_watch.aclose()
            await app.state.private_api.aclose()

    app = FastAPI(
        title="InferenceServer public API",
        version="1.3.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        telemetry=NO_OPENTELEMETRY,
        # /docs and /redoc are served from assets shipped with the platform (offline networks).
        docs_url=None,
        redoc_url=None,
    )
    install_offline_docs(app)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.failure_budget = FailureBudget(settings.unauthenticated_rate_per_minute)
    app.state.dashboard_sessions = DashboardSessionCache(settings.key_cache_ttl_s)
    install_json_body_limit(app)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    install_error_handlers(app)
    routers = (
        tasks.router,
        models.router,
        consumers.router,
        audit.router,
        overview.router,
        access.router,
        health.router,
        dashboard_router,
    )
    for router in routers:
        app.include_router(router)
    # Every route with the dependencies it runs (/docs and /openapi.json included), for the
    # access check Traefik asks before buffering a body.
    app.state.access_routes = [
        *(route for route in app.router.routes if isinstance(route, Route)),
        *(route for router in routers for route in router.routes),
    ]
    return app
