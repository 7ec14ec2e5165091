"""200 concurrent clients polling GET /api/tasks/{uid}/status for 30 s (asyncio, bench.httpload).

Two loads, both reported: *paced* (each client asks once per POLL_PERIOD_S, as a real client
does - InferenceClient.wait polls every 2 s) is the one the goal is judged on; *saturation* (each
client asks again as soon as it has its answer) shows the most the machine can serve. On a 2-core
machine the load generator itself shares the CPU with the services; its CPU time is reported.
"""

from __future__ import annotations

import asyncio
import logging
import random
import resource
import time
from collections import Counter
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BenchContext,
    BenchPlatform,
    percentile,
    platform_cpu_s,
    submit_small,
    write_small_zip,
)
from bench.httpload import HttpConnectionError, KeepAliveConnection
from inference_server.contract import PublicRoutes

log = logging.getLogger("bench.polling")

CLIENTS = 200
POLL_PERIOD_S = 1.0
WARMUP_S = 3.0
TASKS = 20
# The paced load is run this many times; the tail of one 30 s run moves with the machine's other work.
PACED_REPETITIONS = 3


async def _one_client(
    connection: KeepAliveConnection,
    path: str,
    *,
    paced: bool,
    start: float,
    measure_from: float,
    deadline: float,
    latencies: list[float],
    errors: Counter[str],
) -> None:
    next_at = start + (random.uniform(0, POLL_PERIOD_S) if paced else 0.0)
    try:
        while True:
            if paced:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at = max(next_at + POLL_PERIOD_S, time.perf_counter())
            sent = time.perf_counter()
            if sent >= deadline:
                return
            try:
                status, _ = await connection.get(path)
                if status != HTTPStatus.OK:
                    errors[f"HTTP {status}"] += 1
            except (HttpConnectionError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
            if sent >= measure_from:
                latencies.append(time.perf_counter() - sent)
    finally:
        connection.close()


async def _load(host: str, port: int, uids: list[str], *, paced: bool, duration_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    start = time.perf_counter()
    measure_from = start + WARMUP_S
    deadline = measure_from + duration_s
    await asyncio.gather(
        *(
            _one_client(
                KeepAliveConnection(host, port),
                PublicRoutes.TASK_STATUS.format(uid=uids[index % len(uids)]),
                paced=paced,
                start=start,
                measure_from=measure_from,
                deadline=deadline,
                latencies=latencies,
                errors=errors,
            )
            for index in range(CLIENTS)
        )
    )
    # The last answers can come in after the deadline; the rate counts them over the real span.
    span = max(time.perf_counter() - measure_from, duration_s)
    return {
        "clients": CLIENTS,
        "paced_period_s": POLL_PERIOD_S if paced else None,
        "duration_s": duration_s,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / span,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000 if latencies else None,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
    }


def _measured(
    bench_platform: BenchPlatform, uids: list[str], *, paced: bool, duration_s: float
) -> dict[str, Any]:
    cpu_before = platform_cpu_s(bench_platform)
    own_before = resource.getrusage(resource.RUSAGE_SELF)
    wall_before = time.perf_counter()
    platform = bench_platform.platform
    result = asyncio.run(_load(platform.host, platform.public_port, uids, paced=paced, duration_s=duration_s))
    wall = time.perf_counter() - wall_before
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_after = platform_cpu_s(bench_platform)
    # CPU use as a share of one core over the whole load (warm-up included): who is busy.
    result["cpu_cores_used"] = {
        name: (cpu_after[name] - cpu_before[name]) / wall for name in cpu_after if name in cpu_before
    }
    result["cpu_cores_used"]["load-generator"] = (
        own_after.ru_utime + own_after.ru_stime - own_before.ru_utime - own_before.ru_stime
    ) / wall
    return result


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median p99 stands for the load; errors count over every run."""
    median = dict(sorted(runs, key=lambda run: run["p99_ms"])[len(runs) // 2])
    kinds: Counter[str] = Counter()
    for run in runs:
        kinds.update(run["error_kinds"])
    median["errors"] = sum(run["errors"] for run in runs)
    median["error_kinds"] = dict(kinds)
    median["runs"] = [
        {key: run[key] for key in ("requests_per_s", "p50_ms", "p99_ms", "errors")} for run in runs
    ]
    return median


def run_polling(ctx: BenchContext, duration_s: float) -> dict[str, Any]:
    phase_dir = ctx.work_dir / "polling"
    input_zip = write_small_zip(Path(phase_dir) / "input.zip")
    # No consumer: the tasks stay pending, so every answer is a live status from the database.
    with BenchPlatform(ctx, "polling", consumers=0) as bench_platform:
        with httpx.Client(base_url=bench_platform.public_url, timeout=60) as client:
            uids = [submit_small(client, input_zip) for _ in range(TASKS)]
        runs = []
        for rep in range(PACED_REPETITIONS):
            run = _measured(bench_platform, uids, paced=True, duration_s=duration_s)
            log.info(
                "[polling] paced, run %d: %.0f req/s, p50 %.1f ms, p99 %.1f ms, %d errors",
                rep + 1,
                run["requests_per_s"],
                run["p50_ms"],
                run["p99_ms"],
                run["errors"],
            )
            runs.append(run)
        paced = _median_run(runs)
        saturation = _measured(bench_platform, uids, paced=False, duration_s=duration_s)
        log.info(
            "[polling] saturation: %.0f req/s, p50 %.1f ms, p99 %.1f ms, %d errors",
            saturation["requests_per_s"],
            saturation["p50_ms"],
            saturation["p99_ms"],
            saturation["errors"],
        )
        rss = bench_platform.rss_mb()
    return {"paced": paced, "saturation": saturation, "peak_rss_mb": rss}
