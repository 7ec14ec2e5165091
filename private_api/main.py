"""The private API application: `create_app(settings)` wires settings, database, blobs and broker."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from inference_server.api_docs import install_offline_docs
from inference_server.serving import NO_OPENTELEMETRY, install_json_body_limit
from private_api.blobs import BlobStore
from private_api.config import PrivateSettings
from private_api.db import QuickQueries, make_engine, make_session_factory, schema_revision_problem
from private_api.errors import install_error_handlers
from private_api.maintenance import MaintenanceLoop
from private_api.metrics import Metrics
from private_api.queue import TaskPublisher
from private_api.routes import api_router
from private_api.scheduling import SchedulingPolicy
from private_api.task_events import TaskEvents
from private_api.webhook_delivery import DeliveryPolicy, WebhookSender

log = logging.getLogger(__name__)


def create_app(settings: PrivateSettings | None = None) -> FastAPI:
    """Build the app; the database must already be migrated (db.upgrade_database)."""
    settings = settings if settings is not None else PrivateSettings()
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size)
    session_factory = make_session_factory(engine)
    blobs = BlobStore(settings.blob_dir)
    publisher = TaskPublisher(settings.rabbitmq_url, settings.queue_name)
    scheduling = SchedulingPolicy.of(settings)
    task_events = TaskEvents(session_factory, policy=scheduling)
    task_events.attach(session_factory)
    maintenance = MaintenanceLoop(
        session_factory=session_factory,
        publisher=publisher,
        max_attempts=settings.max_attempts,
        reaper_interval_s=settings.reaper_interval_s,
        outbox_interval_s=settings.outbox_interval_s,
        republish_after_s=settings.republish_after_s,
        blobs=blobs,
        retention=timedelta(days=settings.retention_days) if settings.retention_days else None,
        retention_interval_s=settings.retention_interval_s,
        lease_grace_s=settings.lease_seconds,
        policy=scheduling,
        unrunnable_timeout_s=settings.unrunnable_timeout_s,
        consumer_forget_after_s=settings.consumer_forget_after_s,
    )
    webhooks = WebhookSender(
        session_factory=session_factory,
        policy=DeliveryPolicy.of(settings),
        interval_s=settings.webhook_interval_s,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        problem = await run_in_threadpool(schema_revision_problem, engine)
        if problem is not None:
            raise RuntimeError(problem)
        await run_in_threadpool(blobs.remove_stale_temp_files)
        maintenance.start()
        webhooks.start()
        await task_events.start()
        log.info("private API ready (queue %s, data in %s)", settings.queue_name, settings.data_dir)
        try:
            yield
        finally:
            await task_events.stop()
            await run_in_threadpool(webhooks.stop)
            await run_in_threadpool(maintenance.stop)
            await run_in_threadpool(publisher.close)
            engine.dispose()

    app = FastAPI(
        title="InferenceServer private API",
        summary="Database, blob store and queue behind the public API and the job consumers.",
        version="1.0",
        lifespan=lifespan,
        telemetry=NO_OPENTELEMETRY,
        # /docs and /redoc are served from assets shipped with the platform (offline networks).
        docs_url=None,
        redoc_url=None,
    )
    install_offline_docs(app)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = session_factory
    app.state.quick_queries = QuickQueries(session_factory, settings.db_quick_threads)
    app.state.blobs = blobs
    app.state.publisher = publisher
    app.state.scheduling = scheduling
    app.state.maintenance = maintenance
    app.state.webhooks = webhooks
    app.state.task_events = task_events
    app.state.metrics = Metrics(session_factory, lost_after_s=settings.consumer_lost_after_s)
    install_json_body_limit(app)
    install_error_handlers(app)
    app.include_router(api_router)
    return app
