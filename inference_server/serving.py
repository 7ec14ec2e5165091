"""Serving an API app with uvicorn, the same way for both APIs."""

from __future__ import annotations

import gc

import uvicorn
from fastapi import FastAPI


def serve(app: FastAPI, *, host: str, port: int, log_level: str) -> None:
    # Everything built so far (the app, its routes and schemas) lives as long as the process:
    # frozen, the collector stops walking it on every full collection, which under polling load
    # showed up as latency spikes.
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # One log line per poll costs more CPU than answering the poll; errors are still logged.
        access_log=False,
    )
