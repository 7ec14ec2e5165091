"""5,000 small tasks submitted with no consumer running, then run by 4 consumers.

The submissions are timed; afterwards four consumers work the backlog down for at most a time
budget. Every task costs a real container (~0.5 s of a 2-core machine), so the whole backlog
may not fit the budget: then what ran is checked (each task claimed once, its container started
once) and the rest is reported as not run - `all_ran_once` is true only if all of them ran.
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
import httpx

from bench.common import (
    BenchContext,
    BenchPlatform,
    ContainerRuns,
    queue_consumer_count,
    submit_small,
    write_small_zip,
)
from inference_server.contract import TaskQueue, TaskStatus

log = logging.getLogger("bench.queue")

SUBMITTERS = 8
CONSUMERS = 4


def _status_counts(bench_platform: BenchPlatform) -> dict[str, int]:
    database = bench_platform.platform.data_dir / "inference.db"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as db:
        return dict(db.execute("select status, count(*) from tasks group by status").fetchall())


def _finished_attempts(bench_platform: BenchPlatform) -> dict[int, int]:
    database = bench_platform.platform.data_dir / "inference.db"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as db:
        rows = db.execute(
            "select attempts, count(*) from tasks where status = ? group by attempts",
            (TaskStatus.FINISHED.value,),
        )
        return {int(attempts): count for attempts, count in rows.fetchall()}


def run_queue_depth(ctx: BenchContext, tasks: int, run_budget_s: float) -> dict[str, Any]:
    phase_dir = ctx.work_dir / "queue"
    input_zip = write_small_zip(phase_dir / "input.zip", size=64)
    with BenchPlatform(ctx, "queue", consumers=0) as bench_platform:
        errors: Counter[str] = Counter()
        uids: list[str] = []
        lock = threading.Lock()
        local = threading.local()

        def submit(_index: int) -> None:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=bench_platform.public_url, timeout=60)
            try:
                uid = submit_small(local.client, input_zip)
            except (httpx.HTTPError, RuntimeError) as exc:
                with lock:
                    errors[f"{type(exc).__name__}: {str(exc)[:200]}"] += 1
                return
            with lock:
                uids.append(uid)
                if len(uids) % 1000 == 0:
                    log.info("[queue] %d submitted", len(uids))

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=SUBMITTERS) as pool:
            list(pool.map(submit, range(tasks)))
        submit_s = time.perf_counter() - started
        if not uids:
            raise RuntimeError(f"no submission was accepted: {dict(errors)}")
        # Fair share keeps a few of one owner's tasks on the broker; the rest wait in the database.
        ready, _ = queue_consumer_count(ctx.rabbitmq_url, TaskQueue.CPU.queue_name(bench_platform.queue))
        log.info(
            "[queue] %d submissions in %.1fs (%.0f/s); %d messages ready",
            len(uids),
            submit_s,
            len(uids) / submit_s,
            ready,
        )

        # Listening before the first consumer starts, until the last has exited: every exit counts.
        docker_client = docker.from_env()
        with ContainerRuns(docker_client) as container_runs:
            bench_platform.add_consumers(CONSUMERS, wait=False)
            run_started = time.perf_counter()
            deadline = run_started + run_budget_s
            counts: dict[str, int] = {}
            while time.perf_counter() < deadline:
                counts = _status_counts(bench_platform)
                if counts.get(TaskStatus.FINISHED, 0) + counts.get(TaskStatus.FAILED, 0) >= len(uids):
                    break
                time.sleep(2.0)
            run_s = time.perf_counter() - run_started
            # First SIGTERM: each consumer finishes the task in hand, then exits.
            consumers = [
                p for name, p in bench_platform.platform.processes.items() if name.startswith("consumer-")
            ]
            for process in consumers:
                process.send(signal.SIGTERM)
            for process in consumers:
                # wait, not stop(): a second SIGTERM would stop the container and release its task.
                process.wait(timeout=120)
        counts = _status_counts(bench_platform)
        attempts = _finished_attempts(bench_platform)
        docker_client.close()
        started_per_task = container_runs.per_task(uids)
        rss = bench_platform.rss_mb()

    finished = counts.get(TaskStatus.FINISHED, 0)
    started_twice = sum(1 for count in started_per_task.values() if count > 1)
    each_ran_once = 0 < finished == sum(attempts.values()) == attempts.get(1, 0) and started_twice == 0
    all_ran = finished == len(uids) == tasks
    rate = finished / run_s if run_s else 0.0
    return {
        "tasks": tasks,
        "submitters": SUBMITTERS,
        "accepted": len(uids),
        "submit_errors": dict(errors),
        "submit_s": submit_s,
        "submissions_per_s": len(uids) / submit_s,
        "messages_ready_before_consumers": ready,
        # More messages than tasks: the outbox loop published some a second time (it can run
        # between a submit's commit and its own publish). Harmless - the second claim loses.
        "duplicate_messages": max(0, ready - len(uids)),
        "consumers": CONSUMERS,
        "run_budget_s": run_budget_s,
        "run_s": run_s,
        "status_counts_after_run": counts,
        "finished": finished,
        "finished_attempts": {str(key): value for key, value in attempts.items()},
        "containers_started": sum(started_per_task.values()),
        "tasks_with_two_container_runs": started_twice,
        "tasks_run_per_s": rate,
        "estimated_s_for_all": len(uids) / rate if rate else None,
        "every_finished_task_ran_once": each_ran_once,
        "all_ran_once": bool(all_ran and each_ran_once),
        "sampled": not all_ran,
        "peak_rss_mb": rss,
    }
