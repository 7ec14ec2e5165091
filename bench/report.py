"""results.json's headline figures and goals, BENCHMARKS.md, and the plot."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.report")

RSS_LIMIT_MB = 200.0


def _get(details: dict[str, Any], *path: str) -> Any:
    value: Any = details
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _goal(value: Any, goal: str, ok: Any) -> dict[str, Any]:
    return {"value": value, "goal": goal, "met": None if value is None else bool(ok)}


def headline(details: dict[str, Any]) -> dict[str, Any]:
    """The keys the issue asks for, plus one goal entry per figure (met: true/false/null if not measured)."""
    levels = _get(details, "throughput", "levels") or {}
    throughput_ratio = {level: data["ratio"] for level, data in levels.items()}
    peak_rss: dict[str, float] = {}
    for phase in ("dispatch", "throughput", "bigfiles", "polling", "queue"):
        for name, value in (_get(details, phase, "peak_rss_mb") or {}).items():
            peak_rss[name] = max(peak_rss.get(name, 0.0), value)
    paced_errors = _get(details, "polling", "paced", "errors")
    saturation_errors = _get(details, "polling", "saturation", "errors")
    poll_errors = None if paced_errors is None else paced_errors + (saturation_errors or 0)
    out: dict[str, Any] = {
        "dispatch_ratio": _get(details, "dispatch", "ratio_platform_over_raw_cli"),
        "dispatch_overhead_ms_median": _get(details, "dispatch", "overhead_ms_median_vs_cli"),
        "dispatch_platform_ms": _scaled(_get(details, "dispatch", "platform_s"), 1000),
        "dispatch_raw_ms": _scaled(_get(details, "dispatch", "raw_docker_run_cli_s"), 1000),
        "throughput_ratio": throughput_ratio,
        "upload_mb_s": _get(details, "bigfiles", "upload_mb_s"),
        "download_mb_s": _get(details, "bigfiles", "download_mb_s"),
        "peak_rss_mb": peak_rss,
        "peak_rss_mb_bigfiles": _get(details, "bigfiles", "peak_rss_mb"),
        "poll_requests_per_s": _get(details, "polling", "paced", "requests_per_s"),
        "poll_p50_ms": _get(details, "polling", "paced", "p50_ms"),
        "poll_p99_ms": _get(details, "polling", "paced", "p99_ms"),
        "poll_errors": poll_errors,
        "poll_saturation_requests_per_s": _get(details, "polling", "saturation", "requests_per_s"),
        "poll_saturation_p99_ms": _get(details, "polling", "saturation", "p99_ms"),
        "queue_submissions_per_s": _get(details, "queue", "submissions_per_s"),
        "queue_all_ran_once": _get(details, "queue", "all_ran_once"),
        "queue_ran_once_sampled": _get(details, "queue", "sampled"),
        "queue_tasks_run": _get(details, "queue", "finished"),
    }
    goals: dict[str, Any] = {
        "dispatch_ratio": _goal(out["dispatch_ratio"], "<= 1.25", (out["dispatch_ratio"] or 0) <= 1.25),
        "dispatch_overhead_ms_median": _goal(
            out["dispatch_overhead_ms_median"], "<= 150", (out["dispatch_overhead_ms_median"] or 0) <= 150
        ),
    }
    for level in ("1", "2", "4"):
        ratio = throughput_ratio.get(level)
        goals[f"throughput_ratio_{level}"] = _goal(ratio, ">= 0.9", (ratio or 0) >= 0.9)
    goals["upload_mb_s"] = _goal(out["upload_mb_s"], ">= 100", (out["upload_mb_s"] or 0) >= 100)
    for name, value in peak_rss.items():
        goals[f"peak_rss_mb_{name}"] = _goal(value, f"< {RSS_LIMIT_MB:g}", value < RSS_LIMIT_MB)
    goals["poll_p99_ms"] = _goal(out["poll_p99_ms"], "< 50", (out["poll_p99_ms"] or 0) < 50)
    goals["poll_errors"] = _goal(poll_errors, "== 0", poll_errors == 0)
    goals["queue_all_ran_once"] = _goal(out["queue_all_ran_once"], "true", out["queue_all_ran_once"] is True)
    out["goals"] = goals
    out["goals_missed"] = sorted(name for name, goal in goals.items() if goal["met"] is False)
    out["goals_not_measured"] = sorted(name for name, goal in goals.items() if goal["met"] is None)
    return out


def _scaled(stats: dict[str, Any] | None, factor: float) -> dict[str, Any] | None:
    if stats is None:
        return None
    return {
        key: (value * factor if key != "n" and isinstance(value, float) else value)
        for key, value in stats.items()
    }


# --- BENCHMARKS.md ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _met(goal: dict[str, Any] | None) -> str:
    if goal is None or goal["met"] is None:
        return "not measured"
    return "met" if goal["met"] else "**MISSED**"


def markdown(results: dict[str, Any]) -> str:
    d = results["details"]
    g = results["goals"]
    m = results["machine"]
    disp = d.get("dispatch") or {}
    rows = [
        (
            "Dispatch: platform / raw `docker run --rm` (median)",
            _fmt(results["dispatch_ratio"], 2),
            "<= 1.25",
            _met(g.get("dispatch_ratio")),
        ),
        (
            "Dispatch: median overhead (ms)",
            _fmt(results["dispatch_overhead_ms_median"], 0),
            "<= 150",
            _met(g.get("dispatch_overhead_ms_median")),
        ),
    ]
    pm, rm = results.get("dispatch_platform_ms") or {}, results.get("dispatch_raw_ms") or {}
    rows.append(
        (
            "Dispatch: platform median / p95 (ms)",
            f"{_fmt(pm.get('median'), 0)} / {_fmt(pm.get('p95'), 0)}",
            "",
            "",
        )
    )
    rows.append(
        ("Dispatch: raw median / p95 (ms)", f"{_fmt(rm.get('median'), 0)} / {_fmt(rm.get('p95'), 0)}", "", "")
    )
    levels = (d.get("throughput") or {}).get("levels", {})
    for level in ("1", "2", "4"):
        data = levels.get(level)
        value = (
            f"{_fmt(data['ratio'], 2)} ({_fmt(data['platform_tasks_per_s'], 2)} vs "
            f"{_fmt(data['raw_tasks_per_s'], 2)} tasks/s)"
            if data
            else "n/a"
        )
        rows.append(
            (
                f"Throughput, {level} consumer(s): platform / raw",
                value,
                ">= 0.9",
                _met(g.get(f"throughput_ratio_{level}")),
            )
        )
    big = d.get("bigfiles") or {}
    size_label = f"{big.get('file_bytes', 0) / 1024**3:g} GiB" if big else ""
    rows.append(
        (
            f"Upload {size_label} through the public API (MB/s)",
            _fmt(results["upload_mb_s"]),
            ">= 100",
            _met(g.get("upload_mb_s")),
        )
    )
    rows.append((f"Download {size_label} output (MB/s)", _fmt(results["download_mb_s"]), "", ""))
    for name, value in sorted(results["peak_rss_mb"].items()):
        rows.append((f"Peak RSS `{name}` (MiB)", _fmt(value), "< 200", _met(g.get(f"peak_rss_mb_{name}"))))
    paced = (d.get("polling") or {}).get("paced") or {}
    sat = (d.get("polling") or {}).get("saturation") or {}
    rows.append(
        (
            "Polling, 200 clients x 1 req/s: req/s, p50 (ms)",
            f"{_fmt(paced.get('requests_per_s'), 0)}, {_fmt(paced.get('p50_ms'))}",
            "",
            "",
        )
    )
    rows.append(
        (
            "Polling, 200 clients x 1 req/s: p99 (ms)",
            _fmt(results["poll_p99_ms"]),
            "< 50",
            _met(g.get("poll_p99_ms")),
        )
    )
    rows.append(
        (
            "Polling, 200 clients back-to-back: req/s, p50, p99 (ms)",
            f"{_fmt(sat.get('requests_per_s'), 0)}, {_fmt(sat.get('p50_ms'))}, {_fmt(sat.get('p99_ms'))}",
            "",
            "",
        )
    )
    rows.append(
        ("Polling errors (both loads)", _fmt(results["poll_errors"]), "0", _met(g.get("poll_errors")))
    )
    queue = d.get("queue") or {}
    rows.append(
        (
            f"Queue: {queue.get('tasks', 'n/a')} submissions/s, no consumer",
            _fmt(results["queue_submissions_per_s"]),
            "",
            "",
        )
    )
    ran = (
        f"{_fmt(results['queue_all_ran_once'])} ({queue.get('finished', 'n/a')} of {queue.get('tasks', 'n/a')} "
        f"ran in the {_fmt(queue.get('run_budget_s'), 0)} s budget, each once: "
        f"{_fmt(queue.get('every_finished_task_ran_once'))})"
        if queue
        else "n/a"
    )
    rows.append(("Queue: all tasks later run exactly once", ran, "yes", _met(g.get("queue_all_ran_once"))))

    table = ["| Figure | Value | Goal | |", "|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows]
    breakdown = disp.get("platform_breakdown_median_s") or {}
    breakdown_lines = [
        f"- {key.replace('_', ' ')}: {_fmt(value * 1000 if isinstance(value, float) and key != 'polls_per_task' else value, 0)}"
        + ("" if key == "polls_per_task" else " ms")
        for key, value in breakdown.items()
    ]
    errors = results.get("phase_errors") or {}
    sampled_note = ""
    if queue and queue.get("sampled"):
        sampled_note = (
            f"\n**Queue depth was sampled, not run in full.** All {queue.get('accepted')} tasks were submitted "
            f"and queued, but with {queue.get('consumers')} consumers on this machine each task costs a real "
            f"container, so only {queue.get('finished')} ran within the {_fmt(queue.get('run_budget_s'), 0)} s "
            f"budget ({_fmt(queue.get('tasks_run_per_s'), 2)} tasks/s; all of them would take about "
            f"{_fmt((queue.get('estimated_s_for_all') or 0) / 60, 0)} min). For that sample: every finished task "
            f"has attempts == 1 and its container started once: {_fmt(queue.get('every_finished_task_ran_once'))}. "
            "`queue_all_ran_once` is therefore false: not shown, not assumed.\n"
        )
    return f"""# Benchmarks

Made by `make bench` (`python -m bench.run`; `--quick` for a smoke run). Mode: **{results["mode"]}**,
run {results["run_id"]}, took {_fmt(results["runtime_s"] / 60, 1)} min. Machine: {m.get("cores")} cores
({m.get("cpu_model")}), {m.get("memory_gib")} GiB, Docker {m.get("docker_version")}, no GPU; load average
at start {", ".join(f"{x:.1f}" for x in m.get("load_average_at_start", []))} (other work on the machine
shows up in every figure). Raw numbers: `bench/results.json`; plot: `bench/plot.png`.

{chr(10).join(table)}
{sampled_note}
![benchmarks](bench/plot.png)

## What each side includes

- **Platform (dispatch, throughput):** a v1.2 client: POST `/api/tasks/` with a 1 KiB zip, then
  GET `/api/tasks/{{uid}}` every {_fmt(disp.get("poll_interval_s", 0.025) * 1000, 0)} ms (throughput: every
  {_fmt(disp.get("poll_interval_s", 0.025) * 2000, 0)} ms on the oldest unfinished task) until the
  200 answer's zip is written to disk. Inside: public API -> private API (blob, SQLite row, RabbitMQ
  publish) -> consumer (claim, input download, unzip, container, logs, zip, output upload).
- **Raw:** the same zip unpacked with `zipsafe.extract_zip`, `docker run --rm` (CLI) of the same image
  with the consumer's exact options (taken from `ModelRunner.container_options`: `/input` ro,
  `/output` rw, network none, cap-drop ALL, no-new-privileges, user 65534, memory/CPU/PID limits,
  log options), the output zipped with `zipsafe.zip_directory`. The same via the Docker SDK
  with the consumer's own create/start/wait/logs/remove code is reported too
  (`raw_docker_sdk_s` in results.json). Dispatch runs are interleaved (CLI, SDK, platform) and the
  ratio is of medians from the same run; overhead = platform median - raw median.
- Dispatch breakdown (platform, medians, from the server's timestamps):
{chr(10).join("  " + line for line in breakdown_lines)}
- **Throughput:** 60 tasks submitted at once; tasks/s = 60 / (first submit -> last output
  downloaded). Raw: 60 jobs on a thread pool of the same size. Ratio per level from the same run.
- **Big files:** random (incompressible) data in a ZIP_STORED zip, made on disk. Upload = `InferenceClient.submit`
  (streamed, Content-Length) until the answer (the private API checks the zip before answering);
  repeated with no consumer running, extra tasks deleted; then one task runs (passthrough copies it),
  its output (ZIP_DEFLATED level 1 by the consumer, so about the same size) is downloaded with
  `InferenceClient.download`. MB = 10^6 bytes.
- **Peak RSS:** the largest of VmHWM and sampled VmRSS (every 0.2 s) of each service process
  (`LocalPlatform.processes`), maximum over all phases, in MiB.
- **Polling:** asyncio + httpx, 200 clients against GET `/api/tasks/{{uid}}/status` of pending tasks,
  30 s after a 3 s warm-up. The goal is judged on the paced load (each client once per second; the
  bundled client polls every 2 s); the back-to-back load shows capacity. The load generator runs
  on the same 2 cores; the CPU each process used is in results.json (`cpu_cores_used`).
- **Queue depth:** submissions from 8 threads with no consumer running; then 4 consumers.
  Checked in the database (status finished, attempts == 1) and in the consumer logs (one container
  start per task).
{"" if not errors else chr(10) + "## Phases that failed" + chr(10) + chr(10).join(f"- {k}: {v}" for k, v in errors.items())}
"""


# --- plot --------------------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: writing a plain bar chart without labels")
        _fallback_png(results, path)
        return "fallback"
    d = results["details"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    fig.suptitle(f"InferenceServer benchmarks ({results['mode']}, {results['machine'].get('cores')} cores)")

    ax = axes[0][0]
    disp = d.get("dispatch")
    if disp:
        labels = ["raw docker run\n(CLI)", "raw docker SDK", "platform"]
        keys = ["raw_docker_run_cli_s", "raw_docker_sdk_s", "platform_s"]
        med = [disp[k]["median"] * 1000 for k in keys]
        p95 = [disp[k]["p95"] * 1000 for k in keys]
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], med, 0.4, label="median")
        ax.bar([i + 0.2 for i in x], p95, 0.4, label="p95")
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("ms, submit -> output on disk")
        ax.set_title(f"Dispatch of a trivial task (ratio {disp['ratio_platform_over_raw_cli']:.2f})")
        ax.legend()

    ax = axes[0][1]
    levels = (d.get("throughput") or {}).get("levels", {})
    if levels:
        xs = sorted(levels, key=int)
        ax.plot(
            [int(x) for x in xs], [levels[x]["raw_tasks_per_s"] for x in xs], "o-", label="raw docker run"
        )
        ax.plot([int(x) for x in xs], [levels[x]["platform_tasks_per_s"] for x in xs], "s-", label="platform")
        for x in xs:
            ax.annotate(
                f"{levels[x]['ratio']:.2f}",
                (int(x), levels[x]["platform_tasks_per_s"]),
                textcoords="offset points",
                xytext=(0, -14),
                ha="center",
            )
        ax.set_xticks([int(x) for x in xs])
        ax.set_xlabel("consumers / parallel docker runs")
        ax.set_ylabel("tasks/s")
        ax.set_title("Throughput (labels: platform / raw)")
        ax.legend()

    ax = axes[1][0]
    rss = results.get("peak_rss_mb") or {}
    if rss:
        names = sorted(rss)
        ax.bar(names, [rss[n] for n in names], color="tab:green")
        ax.axhline(RSS_LIMIT_MB, color="red", linestyle="--", label="goal 200")
        ax.set_ylabel("MiB")
        ax.set_title(
            f"Peak RSS per process (upload {_fmt(results.get('upload_mb_s'))} MB/s, "
            f"download {_fmt(results.get('download_mb_s'))} MB/s)"
        )
        ax.tick_params(axis="x", rotation=30)
        ax.legend()

    ax = axes[1][1]
    polling = d.get("polling")
    if polling:
        loads = [("paced\n200 x 1/s", polling["paced"]), ("back-to-back\n200 clients", polling["saturation"])]
        x = range(len(loads))
        ax.bar([i - 0.2 for i in x], [load["p50_ms"] for _, load in loads], 0.4, label="p50")
        ax.bar([i + 0.2 for i in x], [load["p99_ms"] for _, load in loads], 0.4, label="p99")
        ax.axhline(50, color="red", linestyle="--", label="goal p99 50 ms")
        ax.set_xticks(list(x), [f"{name}\n{load['requests_per_s']:.0f} req/s" for name, load in loads])
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.set_title("Status polling latency")
        ax.legend()

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"


def _fallback_png(results: dict[str, Any], path: Path) -> None:
    """Bars of the goal ratios (value / goal, 1.0 = on the goal) as a bare PNG, no dependencies."""
    bars = []
    for goal in results["goals"].values():
        if goal["met"] is None or not isinstance(goal["value"], int | float):
            continue
        bars.append(1.0 if goal["met"] else 0.5)
    width, height = max(40 * len(bars), 40), 200
    rows = []
    for y in range(height):
        row = bytearray([0])
        for index in range(width):
            bar = index // 40
            filled = bar < len(bars) and index % 40 > 4 and (height - y) <= bars[bar] * (height - 10)
            color = (
                (40, 160, 40) if filled and bars[bar] == 1.0 else (200, 40, 40) if filled else (255, 255, 255)
            )
            row += bytes(color)
        rows.append(bytes(row))
    raw = zlib.compress(b"".join(rows))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    )
