"""The push phase: how soon a waiting client learns its result, a crowd of waiting clients, and
how soon a running task's container hears of its cancel.

- notify latency: one client long-polls (GET status?wait=) a passthrough task; from the moment
  the output was stored (the task's finished_at, the private API's clock, the same machine's)
  to the moment the client has the finished answer in hand.
- 1,000 waiting clients: tasks are submitted while no consumer runs, each gets its share of
  clients long-polling it through the public API (aiohttp, one connection each), then a
  consumer starts; the same latency for every client, and every answer that was not a 200.
  The clients ask to be woken by the end (`on=end`), as InferenceClient.wait does; the same crowd
  woken by every change (`on=change`, the default: the start, the waiting reason that changes
  when the consumer registers) is measured too, apart.
- cancel of a running task: a model that prints the moment SIGTERM reaches it, cancelled while
  it runs; from the cancel request to that moment (the consumers' heartbeats left at 5 s, so
  the push is what is measured).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import docker
import httpx

from bench.common import PASSTHROUGH, BenchContext, BenchPlatform, percentile, summary, write_small_zip
from inference_server.contract import (
    SEEN_PARAM,
    WAIT_PARAM,
    WAKE_ON_PARAM,
    PrivateRoutes,
    PublicRoutes,
    TaskPublic,
    TaskStatus,
    WakeOn,
)

log = logging.getLogger(__name__)

SIGTERM_IMAGE = "inference-server/bench-sigterm:1"
SIGTERM_MODEL = "bench-sigterm"
# Prints the moment SIGTERM arrives (containers share the host's clock), then exits.
SIGTERM_SCRIPT = (
    "trap 'echo \"SIGTERM at $(date +%s.%N)\"; exit 143' TERM; echo started; while true; do sleep 0.05; done"
)
SIGTERM_LINE = re.compile(r"SIGTERM at (\d+\.\d+)")
LONG_POLL_S = 30
# What the errors were (this process's runs): a count per HTTP status and body start, or exception.
ERROR_KINDS: Counter[str] = Counter()


def _build_sigterm_image(base_image: str) -> None:
    dockerfile = f"FROM {base_image}\nCMD {json.dumps(['sh', '-c', SIGTERM_SCRIPT])}\n"
    client = docker.from_env()
    try:
        client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=SIGTERM_IMAGE, rm=True, pull=False)
    finally:
        client.close()


def _register_sigterm_model(bench: BenchPlatform) -> None:
    with bench.private_client() as client:
        response = client.post(
            PrivateRoutes.MODELS,
            params={
                "human_readable_id": SIGTERM_MODEL,
                "container_tag": SIGTERM_IMAGE,
                "description": "prints when SIGTERM reaches it",
                "model_available": "false",
                "use_gpu": "false",
            },
        )
        response.raise_for_status()


def _submit(http: httpx.Client, public_url: str, model: str, input_zip: Path) -> str:
    with input_zip.open("rb") as body:
        response = http.post(
            public_url + PublicRoutes.TASKS,
            params={"model_human_readable_id": model},
            files={"zip_file": ("input.zip", body, "application/zip")},
        )
    response.raise_for_status()
    uid: str = response.json()
    return uid


def _ms_after(finished_at: datetime | None, known_at: float) -> float | None:
    return None if finished_at is None else (known_at - finished_at.timestamp()) * 1000


async def _wait_to_end(
    session: aiohttp.ClientSession, public_url: str, uid: str, deadline: float, wake_on: WakeOn
) -> tuple[TaskPublic | None, float, int]:
    """Long-poll `uid` until it has ended: (its last state, when that was in hand, non-200s)."""
    url = public_url + PublicRoutes.TASK_STATUS.format(uid=uid)
    seen = TaskStatus.PENDING
    errors = 0
    while time.monotonic() < deadline:
        try:
            params = {WAIT_PARAM: str(LONG_POLL_S), SEEN_PARAM: seen.value, WAKE_ON_PARAM: wake_on.value}
            async with session.get(url, params=params) as r:
                body = await r.read()
                known_at = time.time()
                if r.status != 200:
                    errors += 1
                    ERROR_KINDS[f"HTTP {r.status}: {body[:120]!r}"] += 1
                    await asyncio.sleep(0.5)
                    continue
        except (aiohttp.ClientError, TimeoutError) as exc:
            errors += 1
            ERROR_KINDS[type(exc).__name__] += 1
            await asyncio.sleep(0.5)
            continue
        task = TaskPublic.model_validate_json(body)
        if task.status.is_terminal:
            return task, known_at, errors
        seen = task.status
    return None, time.time(), errors + 1


async def _crowd(
    public_url: str, uids: list[str], clients: int, timeout_s: float, wake_on: WakeOn = WakeOn.END
) -> list[Any]:
    connector = aiohttp.TCPConnector(limit=clients + 10)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=LONG_POLL_S + 30)
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return await asyncio.gather(
            *(
                _wait_to_end(session, public_url, uids[i % len(uids)], deadline, wake_on)
                for i in range(clients)
            )
        )


def _notify_latency(bench: BenchPlatform, input_zip: Path, samples: int) -> list[float]:
    latencies: list[float] = []
    with httpx.Client(timeout=60) as http:
        for _ in range(samples):
            uid = _submit(http, bench.public_url, PASSTHROUGH, input_zip)
            [(task, known_at, errors)] = asyncio.run(_crowd(bench.public_url, [uid], 1, 120))
            if task is None or errors or task.status != TaskStatus.FINISHED:
                raise RuntimeError(f"task {uid} did not finish cleanly: {task} ({errors} errors)")
            latency = _ms_after(task.finished_at, known_at)
            if latency is not None:
                latencies.append(latency)
    return latencies


def _cancel_latency(bench: BenchPlatform, input_zip: Path, samples: int) -> list[float]:
    seconds: list[float] = []
    with httpx.Client(timeout=60) as http:
        for _ in range(samples):
            uid = _submit(http, bench.public_url, SIGTERM_MODEL, input_zip)
            logs_url = bench.public_url + PublicRoutes.TASK_LOGS.format(uid=uid)
            deadline = time.monotonic() + 60
            while "started" not in http.get(logs_url).text:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"task {uid} never started")
                time.sleep(0.05)
            cancelled_at = time.time()
            http.post(bench.public_url + PublicRoutes.TASK_CANCEL.format(uid=uid)).raise_for_status()
            deadline = time.monotonic() + 60
            while not (match := SIGTERM_LINE.search(http.get(logs_url).text)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"task {uid}: no SIGTERM line in its log")
                time.sleep(0.1)
            seconds.append(float(match.group(1)) - cancelled_at)
    return seconds


def _crowd_scenario(
    ctx: BenchContext, input_zip: Path, crowd: int, crowd_tasks: int, wake_on: WakeOn
) -> tuple[dict[str, Any], dict[str, float]]:
    """`crowd` clients waiting on `crowd_tasks` pending tasks until a consumer has run them all:
    the figures, and the services' peak memory."""
    ERROR_KINDS.clear()
    with BenchPlatform(ctx, "push-crowd", consumers=0) as bench, httpx.Client(timeout=60) as http:
        uids = [_submit(http, bench.public_url, PASSTHROUGH, input_zip) for _ in range(crowd_tasks)]

        async def crowd_then_consumer() -> list[Any]:
            waiting = asyncio.ensure_future(_crowd(bench.public_url, uids, crowd, 300, wake_on))
            await asyncio.sleep(3)  # every client is waiting before anything runs
            # Not waiting for it to listen: it takes a task at once and stops listening meanwhile.
            await asyncio.to_thread(bench.add_consumers, 1, wait=False)
            return await waiting

        started = time.monotonic()
        answers = asyncio.run(crowd_then_consumer())
        latencies = [
            latency
            for task, known_at, _ in answers
            if task is not None and (latency := _ms_after(task.finished_at, known_at)) is not None
        ]
        errors = sum(errors for _, _, errors in answers)
        unfinished = sum(1 for task, _, _ in answers if task is None or task.status != TaskStatus.FINISHED)
        figures = {
            "clients": crowd,
            "tasks": crowd_tasks,
            "wake_on": wake_on.value,
            "wall_s": time.monotonic() - started,
            "latency_ms": summary(latencies) if latencies else None,
            "p99_ms": percentile(latencies, 99) if latencies else None,
            "errors": errors + unfinished,
            "error_kinds": dict(ERROR_KINDS.most_common(5)),
        }
        return figures, bench.rss_mb()


def run_push(ctx: BenchContext, samples: int, crowd: int, crowd_tasks: int) -> dict[str, Any]:
    _build_sigterm_image(ctx.base_image)
    input_zip = write_small_zip(ctx.work_dir / "push-input.zip")
    details: dict[str, Any] = {}
    with BenchPlatform(ctx, "push", consumers=1) as bench:
        _register_sigterm_model(bench)
        notify = _notify_latency(bench, input_zip, samples)
        details["notify_latency_ms"] = summary(notify)
        details["notify_latency_ms_p50"] = percentile(notify, 50)
        details["notify_latency_ms_p99"] = percentile(notify, 99)
        cancel = _cancel_latency(bench, input_zip, max(3, samples // 4))
        details["cancel_running_s"] = summary(cancel)
        details["cancel_running_s_p50"] = percentile(cancel, 50)
        details["peak_rss_mb"] = bench.rss_mb()

    for key, wake_on in (("wait_crowd", WakeOn.END), ("wait_crowd_any_change", WakeOn.CHANGE)):
        details[key], peaks = _crowd_scenario(ctx, input_zip, crowd, crowd_tasks, wake_on)
        details["peak_rss_mb"] = {
            name: max(value, details["peak_rss_mb"].get(name, 0.0)) for name, value in peaks.items()
        }
    log.info(
        "push: notify p50 %.1f ms p99 %.1f ms; cancel p50 %.2f s; %d waiting: p99 %s ms, %d errors"
        " (woken by any change: p99 %s ms)",
        details["notify_latency_ms_p50"],
        details["notify_latency_ms_p99"],
        details["cancel_running_s_p50"],
        crowd,
        details["wait_crowd"]["p99_ms"],
        details["wait_crowd"]["errors"],
        details["wait_crowd_any_change"]["p99_ms"],
    )
    return details
