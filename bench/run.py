"""`python -m bench.run [--quick]`: every benchmark phase, then results.json, BENCHMARKS.md, plot.png.

Each phase starts its own embedded platform (LocalPlatform: private API, public API, consumers as
local processes, SQLite, the real RabbitMQ and Docker) on its own queue and data folder under
bench/work/, and all of it is removed afterwards. A phase that fails is reported, the rest still run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.bigfiles import run_bigfiles
from bench.common import (
    BENCH_DIR,
    MIB,
    REPO_ROOT,
    BenchContext,
    build_passthrough_image,
    cpu_pressure_total_us,
    machine_info,
    rounded,
)
from bench.dispatch import run_dispatch, run_throughput
from bench.goals import PHASES, headline, judge
from bench.polling import run_polling
from bench.push import run_push
from bench.queue_depth import run_queue_depth
from bench.real_model import run_real_model
from bench.report import TEMPLATE_PATH, markdown, plot
from inference_server.file_trees import remove_tree

log = logging.getLogger("bench")

# The queue phase runs its backlog to the end, but not past this (each task is a real container).
QUEUE_RUN_LIMIT_S = 45 * 60


@dataclass(frozen=True)
class Plan:
    dispatch_reps: int
    throughput_tasks: int
    throughput_reps: int
    big_bytes: int
    big_reps: int
    poll_s: float
    queue_tasks: int
    queue_budget_s: float
    # The push phase: notify-latency samples, and how many clients wait at once on how many tasks.
    push_samples: int = 20
    wait_clients: int = 1000
    wait_tasks: int = 10
    # The real model (brain-mask, 128^3) against the same container run bare, interleaved pairs.
    real_model_reps: int = 5


FULL = Plan(30, 60, 3, 1024 * MIB, 3, 30.0, 5000, QUEUE_RUN_LIMIT_S)
QUICK = Plan(
    5, 8, 1, 64 * MIB, 1, 5.0, 200, 45.0, push_samples=5, wait_clients=200, wait_tasks=4, real_model_reps=3
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: few repetitions, small files")
    parser.add_argument("--only", nargs="+", choices=PHASES, help="run only these phases")
    parser.add_argument("--queue-budget-s", type=float, help="time the consumers get to run the backlog")
    parser.add_argument("--big-mib", type=int, help="size of the big input file in MiB")
    parser.add_argument(
        "--poll-ms", type=float, default=25.0, help="dispatch: the client's poll period in ms (default 25)"
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="where results.json, plot.png and BENCHMARKS.md go (default: bench/ and the repo root; "
        "--quick: bench/work/quick/)",
    )
    parser.add_argument("--keep-work", action="store_true", help="keep bench/work/<run> (logs, databases)")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: write BENCHMARKS.md and the plot again from a results.json",
    )
    return parser.parse_args(argv)


def _write_report(results: dict[str, Any], plot_path: Path, md_path: Path) -> None:
    """The plot (what drew it recorded in results["plot"]) and BENCHMARKS.md from the figures.

    The prose comes from the repository's BENCHMARKS.md (read before it is written over), so a
    quick run's report in bench/work/ says the same around its own figures.
    """
    try:
        results["plot"] = plot(results, plot_path)
    except Exception:
        log.error("plot failed:\n%s", traceback.format_exc())
        results["plot"] = None
    md_path.write_text(markdown(results, TEMPLATE_PATH.read_text()))


def _render(results_path: Path, plot_path: Path, md_path: Path) -> int:
    """The report again from stored figures, e.g. after the goals or the report's wording changed:
    the stored headline figures are judged again, by today's goals table."""
    results = json.loads(results_path.read_text())
    results.update(judge(results))
    _write_report(results, plot_path, md_path)
    log.info("wrote %s and %s from %s", md_path, plot_path, results_path)
    return 0


def _environment(pressure_before: int | None, wall_s: float) -> dict[str, Any]:
    """How busy the machine was during a phase: others' work shows up in every figure."""
    pressure_after = cpu_pressure_total_us()
    stalled = None
    if pressure_before is not None and pressure_after is not None and wall_s > 0:
        stalled = (pressure_after - pressure_before) / (wall_s * 1e6) * 100
    return {"load_average_1m_at_end": os.getloadavg()[0], "cpu_pressure_some_pct": stalled}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    # pika logs every connection step at INFO; the bench opens many short connections.
    logging.getLogger("pika").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("job_consumer").setLevel(logging.WARNING)  # the raw baseline reuses its runner
    plan = QUICK if args.quick else FULL
    if args.big_mib:
        plan = Plan(**{**plan.__dict__, "big_bytes": args.big_mib * MIB})
    if args.out_dir:
        results_path, plot_path, md_path = (
            args.out_dir / "results.json",
            args.out_dir / "plot.png",
            args.out_dir / "BENCHMARKS.md",
        )
    elif args.quick:
        quick_dir = BENCH_DIR / "work" / "quick"
        results_path, plot_path, md_path = (
            quick_dir / "results.json",
            quick_dir / "plot.png",
            quick_dir / "BENCHMARKS.md",
        )
    else:
        results_path, plot_path, md_path = (
            BENCH_DIR / "results.json",
            BENCH_DIR / "plot.png",
            REPO_ROOT / "BENCHMARKS.md",
        )
    if args.render is not None:
        return _render(args.render, plot_path, md_path)
    for path in (results_path, plot_path, md_path):
        path.parent.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    ctx = BenchContext.create(quick=args.quick)
    phases = args.only or list(PHASES)
    machine = machine_info()
    log.info("bench run %s (%s): %s", ctx.run_id, "quick" if args.quick else "full", ", ".join(phases))
    details: dict[str, Any] = {}
    errors: dict[str, str] = {}
    durations: dict[str, float] = {}

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "dispatch": lambda: run_dispatch(ctx, plan.dispatch_reps, args.poll_ms / 1000),
        "throughput": lambda: run_throughput(ctx, plan.throughput_tasks, plan.throughput_reps),
        "bigfiles": lambda: run_bigfiles(ctx, plan.big_bytes, plan.big_reps),
        "polling": lambda: run_polling(ctx, plan.poll_s),
        "queue": lambda: run_queue_depth(
            ctx,
            plan.queue_tasks,
            args.queue_budget_s if args.queue_budget_s is not None else plan.queue_budget_s,
        ),
        "push": lambda: run_push(ctx, plan.push_samples, plan.wait_clients, plan.wait_tasks),
        "real_model": lambda: run_real_model(ctx, plan.real_model_reps),
    }
    try:
        build_passthrough_image(ctx)
        for phase in phases:
            # What an earlier phase wrote (gigabytes after the big files) would otherwise still be
            # written back, with the kernel's CPU and the disk, during this one.
            sync_started = time.monotonic()
            os.sync()
            phase_started = time.monotonic()
            pressure_before = cpu_pressure_total_us()
            log.info(
                "=== %s (after %.1f s writing back earlier phases' files) ===",
                phase,
                phase_started - sync_started,
            )
            try:
                details[phase] = runners[phase]()
                details[phase]["environment"] = _environment(
                    pressure_before, time.monotonic() - phase_started
                )
            except Exception as exc:  # a failed phase is a result too; the others still run
                log.error("phase %s failed:\n%s", phase, traceback.format_exc())
                errors[phase] = f"{type(exc).__name__}: {exc}"
            finally:
                durations[phase] = time.monotonic() - phase_started
                ctx.delete_queues()
            log.info("=== %s done in %.0fs ===", phase, durations[phase])
    finally:
        ctx.delete_queues()
        if not args.keep_work:
            remove_tree(ctx.work_dir)

    machine["load_average_at_end"] = list(os.getloadavg())
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "run_id": ctx.run_id,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "runtime_s": time.monotonic() - started,
        "phase_runtime_s": durations,
        "machine": machine,
        **headline(details),
        "phase_errors": errors,
        "details": details,
    }
    results = rounded(results)
    _write_report(results, plot_path, md_path)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    log.info("wrote %s, %s, %s in %.1f min", results_path, md_path, plot_path, results["runtime_s"] / 60)
    for name, goal in results["goals"].items():
        log.info(
            "goal %-34s %-12s value %-10s %s",
            name,
            goal["goal"],
            goal["value"],
            {True: "met", False: "MISSED", None: "not measured"}[goal["met"]],
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
