"""Dispatch overhead (one task at a time) and throughput (60 tasks at parallelism 1, 2, 4).

Platform side: the v1.2 client loop, from the start of the submit POST to the output zip written
to disk. Raw side: the same input zip unpacked, the same image run with the consumer's exact
container options, the output zipped: what a user scripting `docker run` by hand would do.
"""

from __future__ import annotations

import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BenchContext,
    BenchPlatform,
    RawRunner,
    container_run_s,
    machine_busy_cpu_s,
    platform_cpu_s,
    services_cpu_delta_s,
    submit_small,
    summary,
    try_download_v12,
    write_small_zip,
)
from bench.goals import THROUGHPUT_LEVELS
from inference_server.contract import PublicRoutes, TaskPublic

log = logging.getLogger("bench.dispatch")

# The client's poll period while it waits for one task: short, so it adds little to the latency
# (on average half of it), long enough not to load a 2-core machine.
POLL_INTERVAL_S = 0.025
# A batch client waits for many tasks: it polls the oldest unfinished one, less often than a
# client waiting for one answer (InferenceClient.wait polls every 2 s). On 2 cores every poll
# takes CPU from the containers; 200 ms adds at most that much to a batch of 60 tasks.
BATCH_POLL_INTERVAL_S = 0.2


def _seconds_since(moment: datetime | None, origin_wall: float) -> float | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp() - origin_wall


def run_platform_once(
    client: httpx.Client, input_zip: Path, out: Path, poll_interval_s: float = POLL_INTERVAL_S
) -> dict[str, Any]:
    """Submit, poll the v1.2 way, download; returns the latency and where the time went."""
    origin_wall = time.time()
    started = time.perf_counter()
    uid = submit_small(client, input_zip)
    submitted = time.perf_counter() - started
    polls = 0
    while True:
        polls += 1
        poll_started = time.perf_counter()
        if try_download_v12(client, uid, out):
            break
        time.sleep(poll_interval_s)
    total = time.perf_counter() - started
    last_poll = time.perf_counter() - poll_started
    status = TaskPublic.model_validate(client.get(PublicRoutes.TASK_STATUS.format(uid=uid)).json())
    out.unlink(missing_ok=True)
    created = _seconds_since(status.created_at, origin_wall)
    claimed = _seconds_since(status.started_at, origin_wall)
    finished = _seconds_since(status.finished_at, origin_wall)
    return {
        "uid": uid,
        "total_s": total,
        "submit_s": submitted,
        "polls": polls,
        "attempts": status.attempts,
        "container_s": container_run_s(status),
        # Server timestamps against the client's clock (same machine): where the latency went.
        "queue_to_claim_s": (claimed - created) if claimed is not None and created is not None else None,
        "claim_to_finished_s": (finished - claimed) if finished is not None and claimed is not None else None,
        "finished_to_downloaded_s": (total - finished) if finished is not None else None,
        # The same without the wait for the next poll: output stored -> the one answering poll.
        "without_poll_wait_s": (finished + last_poll) if finished is not None else None,
    }


def run_dispatch(ctx: BenchContext, reps: int, poll_interval_s: float = POLL_INTERVAL_S) -> dict[str, Any]:
    phase_dir = ctx.work_dir / "dispatch"
    input_zip = write_small_zip(phase_dir / "input.zip", size=1024)
    with BenchPlatform(ctx, "dispatch", consumers=1) as bench_platform:
        raw = RawRunner(bench_platform.model(), phase_dir / "raw")
        try:
            with httpx.Client(base_url=bench_platform.public_url, timeout=60) as client:
                # Warm-ups, not counted: image layers into the page cache, first-use paths in each service.
                for _ in range(2):
                    raw.run(input_zip, use_cli=True)
                    raw.run(input_zip, use_cli=False)
                    run_platform_once(client, input_zip, phase_dir / "out.zip")
                raw_cli: list[float] = []
                raw_cli_container: list[float] = []
                raw_sdk: list[float] = []
                platform_runs: list[dict[str, Any]] = []
                for rep in range(reps):
                    # Interleaved, starting point rotated, so background load drifts hit every side alike.
                    sides = ["cli", "sdk", "platform"]
                    for side in sides[rep % 3 :] + sides[: rep % 3]:
                        if side == "cli":
                            timing = raw.run(input_zip, use_cli=True)
                            raw_cli.append(timing.total_s)
                            raw_cli_container.append(timing.container_s)
                        elif side == "sdk":
                            raw_sdk.append(raw.run(input_zip, use_cli=False).total_s)
                        else:
                            platform_runs.append(
                                run_platform_once(client, input_zip, phase_dir / "out.zip", poll_interval_s)
                            )
                    if (rep + 1) % 10 == 0:
                        log.info("[dispatch] %d/%d repetitions", rep + 1, reps)
        finally:
            raw.close()
        rss = bench_platform.rss_mb()

    platform_total = [run["total_s"] for run in platform_runs]
    platform_container = [run["container_s"] for run in platform_runs if run["container_s"] is not None]

    def median_of(key: str) -> float | None:
        values = [run[key] for run in platform_runs if run[key] is not None]
        return statistics.median(values) if values else None

    platform_summary = summary(platform_total)
    cli_summary = summary(raw_cli)
    sdk_summary = summary(raw_sdk)
    paired = [p - r for p, r in zip(platform_total, raw_cli, strict=True)]
    without_wait = [
        run["without_poll_wait_s"] for run in platform_runs if run["without_poll_wait_s"] is not None
    ]
    return {
        "repetitions": reps,
        "poll_interval_s": poll_interval_s,
        "platform_s": platform_summary,
        "platform_without_poll_wait_s": summary(without_wait),
        "raw_docker_run_cli_s": cli_summary,
        "raw_docker_run_cli_container_only_s": summary(raw_cli_container),
        "raw_docker_sdk_s": sdk_summary,
        "ratio_platform_over_raw_cli": platform_summary["median"] / cli_summary["median"],
        "ratio_platform_over_raw_sdk": platform_summary["median"] / sdk_summary["median"],
        "overhead_ms_median_vs_cli": (platform_summary["median"] - cli_summary["median"]) * 1000,
        "overhead_ms_median_vs_sdk": (platform_summary["median"] - sdk_summary["median"]) * 1000,
        "overhead_ms_paired_median_vs_cli": statistics.median(paired) * 1000,
        "platform_breakdown_median_s": {
            "submit_request": median_of("submit_s"),
            "queued_until_claimed": median_of("queue_to_claim_s"),
            "claimed_until_output_stored": median_of("claim_to_finished_s"),
            "container_inside_consumer": statistics.median(platform_container)
            if platform_container
            else None,
            "output_stored_until_downloaded": median_of("finished_to_downloaded_s"),
            "polls_per_task": median_of("polls"),
        },
        "all_attempts_one": all(run["attempts"] == 1 for run in platform_runs),
        "peak_rss_mb": rss,
    }


# --- throughput ---------------------------------------------------------------------------------


def platform_batch(client: httpx.Client, input_zip: Path, tasks: int, out_dir: Path) -> float:
    """Submit `tasks` at once, collect every output; returns the wall time of the whole batch."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    uids = [submit_small(client, input_zip) for _ in range(tasks)]
    # Poll the oldest unfinished task only (the queue is FIFO at equal priority): one request per
    # period instead of one per pending task, so the client does not steal the platform's CPU.
    for uid in uids:
        out = out_dir / f"{uid}.zip"
        while not try_download_v12(client, uid, out):
            time.sleep(BATCH_POLL_INTERVAL_S)
        out.unlink()
    return time.perf_counter() - started


def _raw_batch(raw: RawRunner, input_zip: Path, tasks: int, parallel: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for _ in pool.map(lambda _i: raw.run(input_zip, use_cli=True), range(tasks)):
            pass
    return time.perf_counter() - started


def run_throughput(ctx: BenchContext, tasks: int, reps: int) -> dict[str, Any]:
    phase_dir = ctx.work_dir / "throughput"
    input_zip = write_small_zip(phase_dir / "input.zip", size=1024)
    levels: dict[str, Any] = {}
    # The services' CPU over every platform batch of the phase, and the tasks those batches ran.
    services_cpu_total_s = 0.0
    # The same by kind of service (the consumers together): where to look first.
    services_cpu_by_kind_s: dict[str, float] = {}
    platform_tasks_total = 0
    with BenchPlatform(ctx, "throughput", consumers=1) as bench_platform:
        raw = RawRunner(bench_platform.model(), phase_dir / "raw")
        try:
            with httpx.Client(base_url=bench_platform.public_url, timeout=60) as client:
                for level in THROUGHPUT_LEVELS:
                    bench_platform.add_consumers(level)
                    raw_tps: list[float] = []
                    platform_tps: list[float] = []
                    ratios: list[float] = []
                    # Machine-wide busy CPU per task (every process, Docker's included) and the
                    # platform's own services' share: at 2+ parallel tasks this 2-core machine is
                    # CPU-bound, so what the platform adds per task is what it loses in throughput.
                    cpu_ms_per_task: dict[str, list[float]] = {"raw": [], "platform": []}
                    services_ms_per_task: list[float] = []
                    for rep in range(reps):
                        # ABBA order across repetitions.
                        order = ("raw", "platform") if rep % 2 == 0 else ("platform", "raw")
                        measured: dict[str, float] = {}
                        for side in order:
                            busy_before = machine_busy_cpu_s()
                            services_before = platform_cpu_s(bench_platform)
                            if side == "raw":
                                measured[side] = tasks / _raw_batch(raw, input_zip, tasks, level)
                            else:
                                wall = platform_batch(client, input_zip, tasks, phase_dir / "out")
                                measured[side] = tasks / wall
                            busy_after = machine_busy_cpu_s()
                            if busy_before is not None and busy_after is not None:
                                cpu_ms_per_task[side].append((busy_after - busy_before) / tasks * 1000)
                            if side == "platform":
                                services_after = platform_cpu_s(bench_platform)
                                services_spent_s = services_cpu_delta_s(services_before, services_after)
                                for name, value in services_after.items():
                                    kind = "consumers" if name.startswith("consumer-") else name
                                    services_cpu_by_kind_s[kind] = (
                                        services_cpu_by_kind_s.get(kind, 0.0)
                                        + value
                                        - services_before.get(name, 0.0)
                                    )
                                services_ms_per_task.append(services_spent_s / tasks * 1000)
                                services_cpu_total_s += services_spent_s
                                platform_tasks_total += tasks
                        raw_tps.append(measured["raw"])
                        platform_tps.append(measured["platform"])
                        ratios.append(measured["platform"] / measured["raw"])
                        log.info(
                            "[throughput] %d consumer(s), rep %d: raw %.2f tasks/s, platform %.2f tasks/s",
                            level,
                            rep + 1,
                            measured["raw"],
                            measured["platform"],
                        )
                    levels[str(level)] = {
                        "tasks": tasks,
                        "repetitions": reps,
                        "raw_tasks_per_s": statistics.median(raw_tps),
                        "platform_tasks_per_s": statistics.median(platform_tps),
                        "ratio": statistics.median(ratios),
                        "ratios_each_rep": ratios,
                        "machine_cpu_ms_per_task": {
                            side: statistics.median(values) if values else None
                            for side, values in cpu_ms_per_task.items()
                        },
                        "platform_services_cpu_ms_per_task": (
                            statistics.median(services_ms_per_task) if services_ms_per_task else None
                        ),
                    }
        finally:
            raw.close()
        rss = bench_platform.rss_mb()
    return {
        "levels": levels,
        # Private API, public API and consumers (children included), all levels together.
        "services_cpu_ms_per_task": (
            services_cpu_total_s / platform_tasks_total * 1000 if platform_tasks_total else None
        ),
        "services_cpu_ms_per_task_by_kind": {
            kind: spent / platform_tasks_total * 1000
            for kind, spent in sorted(services_cpu_by_kind_s.items())
            if platform_tasks_total
        },
        "peak_rss_mb": rss,
    }
