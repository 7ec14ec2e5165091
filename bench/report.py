"""BENCHMARKS.md and the plot, from a run's results (see bench.goals for the headline and goals).

BENCHMARKS.md is both the template and the report: its prose (what each side includes, what was
fixed, what bounds a missed goal) is written by hand in the file, and rendering replaces only the
text between marker comments, `<!-- bench:NAME -->...<!-- /bench:NAME -->`, with the figure NAME
of the run. So `python -m bench.run --render` brings the figures up to date and keeps the words.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: the plot only goes to a file
import matplotlib.pyplot as plt

from bench.goals import Goal, goal, judged

MIB = 1024 * 1024
# The prose around the figures; --quick and --out-dir reports take it from here too.
TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
MARKER_RE = re.compile(
    r"<!-- bench:(?P<name>[a-z0-9_]+) -->(?P<inner>.*?)<!-- /bench:(?P=name) -->", re.DOTALL
)
# Its instances are the throughput levels, in the order the table and the CPU breakdown list them.
THROUGHPUT_GOAL = goal("throughput_ratio")


class TemplateError(ValueError):
    """BENCHMARKS.md asks for a figure the renderer does not make, or has no figures at all."""


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _met(result: dict[str, Any] | None) -> str:
    if result is None or result["met"] is None:
        return "not measured"
    return "met" if result["met"] else "**MISSED**"


def _pair(stats: dict[str, Any], first: str = "median", second: str = "p95") -> str:
    return f"{_fmt(stats.get(first), 0)} / {_fmt(stats.get(second), 0)}"


def _file_size(big: dict[str, Any]) -> str:
    size = big.get("file_bytes")
    if size is None:
        return "a big file"
    return f"{size / 1024**3:g} GiB" if size >= 1024**3 else f"{size // MIB} MiB"


# --- the figures table -----------------------------------------------------------------------------

Row = tuple[str, str, str, str]


class _Table:
    """The rows of the figures table; goal rows take their label and target from bench.goals."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.results = results
        self.rows: list[Row] = []
        self.judged_names: set[str] = set()

    def info(self, label: str, value: str) -> None:
        self.rows.append((label, value, "", ""))

    def goal(self, entry: Goal, value: str, instance: str = "", **fields: str) -> None:
        name = entry.name(instance)
        self.judged_names.add(name)
        result = (self.results.get("goals") or {}).get(name)
        self.rows.append((entry.label(instance, **fields), value, entry.target_text, _met(result)))

    def markdown(self) -> str:
        return "\n".join(
            [
                "| Figure | Value | Goal | |",
                "|---|---|---|---|",
                *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self.rows),
            ]
        )


def figures_table(results: dict[str, Any]) -> str:
    d = results["details"]
    table = _Table(results)
    table.goal(goal("dispatch_ratio"), _fmt(results.get("dispatch_ratio"), 2))
    table.goal(goal("dispatch_overhead_ms_median"), _fmt(results.get("dispatch_overhead_ms_median"), 0))
    table.info("Dispatch: platform median / p95 (ms)", _pair(results.get("dispatch_platform_ms") or {}))
    table.info(
        "Dispatch: platform minus the wait for the next poll, median / p95 (ms)",
        _pair(results.get("dispatch_platform_without_poll_wait_ms") or {}),
    )
    table.info("Dispatch: raw median / p95 (ms)", _pair(results.get("dispatch_raw_ms") or {}))
    levels = (d.get("throughput") or {}).get("levels", {})
    for level in THROUGHPUT_GOAL.instances:
        data = levels.get(level) or {}
        value = "n/a"
        if data:
            value = (
                f"{_fmt(data['ratio'], 2)} ({_fmt(data['platform_tasks_per_s'], 2)} vs "
                f"{_fmt(data['raw_tasks_per_s'], 2)} tasks/s)"
            )
        table.goal(THROUGHPUT_GOAL, value, level)
        cpu = data.get("machine_cpu_ms_per_task") or {}
        if cpu.get("raw") is not None and cpu.get("platform") is not None:
            table.info(
                f"Throughput, {level} consumer(s): machine CPU per task, platform vs raw (ms)",
                f"{_fmt(cpu['platform'], 0)} vs {_fmt(cpu['raw'], 0)} "
                f"(platform services: {_fmt(data.get('platform_services_cpu_ms_per_task'), 0)})",
            )
    table.goal(goal("services_cpu_ms_per_task"), _fmt(results.get("services_cpu_ms_per_task"), 0))
    table.info(
        "Real model (brain-mask, 128^3 NIfTI): platform / raw `docker run --rm`, medians",
        (
            f"{_fmt(results.get('real_model_ratio'), 2)} ({_fmt(results.get('real_model_platform_s'), 2)} "
            f"vs {_fmt(results.get('real_model_raw_s'), 2)} s)"
            if results.get("real_model_ratio") is not None
            else "n/a"
        ),
    )
    big = d.get("bigfiles") or {}
    size = _file_size(big) if big else None
    table.info(
        f"Upload {size} via the public API (MB/s)" if size else "Upload (MB/s)",
        _fmt(results.get("upload_mb_s")),
    )
    upload_ratio = results.get("upload_disk_ratio")
    table.goal(
        goal("upload_disk_ratio"),
        "n/a"
        if upload_ratio is None
        else f"{_fmt(upload_ratio, 2)} ({_fmt(results.get('upload_mb_s'))} vs "
        f"{_fmt(big.get('disk_read_sha256_write_mb_s'))} MB/s)",
        file=size or "a big file",
    )
    table.info(
        f"Download {size} output (MB/s)" if size else "Download output (MB/s)",
        _fmt(results.get("download_mb_s")),
    )
    for name, value in sorted((results.get("peak_rss_mb") or {}).items()):
        table.goal(goal("peak_rss_mb"), _fmt(value), name)
    paced = (d.get("polling") or {}).get("paced") or {}
    saturation = (d.get("polling") or {}).get("saturation") or {}
    table.info(
        "Polling, 200 clients x 1 req/s: req/s; p50 (ms)",
        f"{_fmt(paced.get('requests_per_s'), 0)}; {_fmt(paced.get('p50_ms'))}",
    )
    table.goal(goal("poll_p99_ms"), _fmt(results.get("poll_p99_ms")))
    table.info(
        "Polling, 200 clients back-to-back: req/s; p50; p99 (ms)",
        f"{_fmt(saturation.get('requests_per_s'), 0)}; {_fmt(saturation.get('p50_ms'))}; "
        f"{_fmt(saturation.get('p99_ms'))}",
    )
    table.goal(goal("poll_errors"), _fmt(results.get("poll_errors")))
    queue = d.get("queue") or {}
    table.info(
        f"Queue: submissions/s of {queue.get('tasks', 'n/a')}, no consumer",
        _fmt(results.get("queue_submissions_per_s")),
    )
    ran = "n/a"
    if queue:
        ran = (
            f"{_fmt(results.get('queue_all_ran_once'))} ({queue.get('finished')} of {queue.get('tasks')} "
            f"ran in the {_fmt(queue.get('run_budget_s'), 0)} s budget; each of those once: "
            f"{_fmt(queue.get('every_finished_task_ran_once'))})"
        )
    table.goal(goal("queue_all_ran_once"), ran)
    # A goal added to the table shows up even before it gets a row of its own above.
    for name, entry, instance, value in judged(results):
        if name not in table.judged_names:
            table.goal(entry, _fmt(value), instance, file="a big file")
    return table.markdown()


# --- the other figures BENCHMARKS.md names ----------------------------------------------------------


def _queue_sampled(queue: dict[str, Any]) -> str:
    """Said only when it happened: the backlog did not run in full, so its goal is not claimed."""
    if not queue.get("sampled"):
        return ""
    return (
        f"**The queue backlog was sampled, not run in full.** All {queue.get('accepted')} tasks were "
        f"accepted and queued, but each costs a real container, so {queue.get('consumers')} consumers ran "
        f"{queue.get('finished')} of them within the {_fmt(queue.get('run_budget_s'), 0)} s budget "
        f"({_fmt(queue.get('tasks_run_per_s'), 2)} tasks/s; all would take about "
        f"{_fmt((queue.get('estimated_s_for_all') or 0) / 60, 0)} min). Every task that ran has "
        f"attempts == 1 and one container start: {_fmt(queue.get('every_finished_task_ran_once'))}. "
        "So `queue_all_ran_once` is false: not shown, so not claimed."
    )


def _throughput_cpu(levels: dict[str, Any]) -> str:
    parts = []
    for level in THROUGHPUT_GOAL.instances:
        data = levels.get(level) or {}
        cpu = data.get("machine_cpu_ms_per_task") or {}
        if cpu.get("raw") and cpu.get("platform"):
            parts.append(
                f"{level} consumer(s): {_fmt(cpu['platform'], 0)} vs {_fmt(cpu['raw'], 0)} ms "
                f"(services {_fmt(data.get('platform_services_cpu_ms_per_task'), 0)} ms; "
                f"raw / platform = {_fmt(cpu['raw'] / cpu['platform'], 2)})"
            )
    return "; ".join(parts) or "n/a"


def _services_cpu_by_kind(throughput: dict[str, Any]) -> str:
    by_kind = throughput.get("services_cpu_ms_per_task_by_kind") or {}
    return ", ".join(f"{kind} {_fmt(value, 0)} ms" for kind, value in by_kind.items()) or "n/a"


def _phase_errors(errors: dict[str, str]) -> str:
    if not errors:
        return ""
    return "\n".join(
        ["## Phases that failed", "", *(f"- {phase}: {error}" for phase, error in errors.items())]
    )


def figure_texts(results: dict[str, Any]) -> dict[str, str]:
    """Every figure BENCHMARKS.md may name in a marker, as the text that goes between its markers."""
    from bench.dispatch import BATCH_POLL_INTERVAL_S  # the batch poll period is the dispatch phase's

    d = results["details"]
    machine = results["machine"]
    disp = d.get("dispatch") or {}
    breakdown = disp.get("platform_breakdown_median_s") or {}
    big = d.get("bigfiles") or {}
    paced = (d.get("polling") or {}).get("paced") or {}
    crowd_any_change = (d.get("push") or {}).get("wait_crowd_any_change") or {}

    def breakdown_ms(key: str) -> str:
        return _fmt((breakdown.get(key) or 0) * 1000, 0)

    claimed_to_stored_ms = (breakdown.get("claimed_until_output_stored") or 0) * 1000
    raw_ms = (results.get("dispatch_raw_ms") or {}).get("median") or 0
    breakdown_lines = [
        f"  {key.replace('_', ' ')}: "
        + (_fmt(value, 0) if key == "polls_per_task" else f"{_fmt((value or 0) * 1000, 0)} ms")
        + ";"
        for key, value in breakdown.items()
    ]
    pressures = {
        phase: (data.get("environment") or {}).get("cpu_pressure_some_pct")
        for phase, data in d.items()
        if isinstance(data, dict)
    }
    return {
        "run": (
            f"Mode: **{results['mode']}**, run {results['run_id']}, {_fmt(results['runtime_s'] / 60, 1)} min."
        ),
        "machine": (
            f"{machine.get('cores')} cores ({machine.get('cpu_model')}), {machine.get('memory_gib')} GiB, "
            f"Docker {machine.get('docker_version')}"
        ),
        "table": figures_table(results),
        "cpu_pressure": ", ".join(f"{phase} {_fmt(value, 0)} %" for phase, value in pressures.items()),
        "queue_sampled": _queue_sampled(d.get("queue") or {}),
        "dispatch_poll_ms": _fmt(disp.get("poll_interval_s", 0.025) * 1000, 0),
        "dispatch_breakdown": "\n".join(breakdown_lines) or "  n/a",
        "dispatch_submit_ms": breakdown_ms("submit_request"),
        "dispatch_queued_ms": breakdown_ms("queued_until_claimed"),
        "dispatch_claimed_to_stored_ms": _fmt(claimed_to_stored_ms, 0),
        "dispatch_raw_ms": _fmt(raw_ms, 0),
        "dispatch_container_ms": breakdown_ms("container_inside_consumer"),
        # Claim, input download and unzip, the gate or the start, the zip, the output upload.
        "dispatch_outside_container_ms": _fmt(
            claimed_to_stored_ms - (breakdown.get("container_inside_consumer") or 0) * 1000, 0
        ),
        "dispatch_stored_to_downloaded_ms": breakdown_ms("output_stored_until_downloaded"),
        "batch_poll_ms": _fmt(BATCH_POLL_INTERVAL_S * 1000, 0),
        "throughput_cpu_per_task": _throughput_cpu((d.get("throughput") or {}).get("levels") or {}),
        "services_cpu_by_kind": _services_cpu_by_kind(d.get("throughput") or {}),
        "upload_direct_mb_s": _fmt(big.get("upload_direct_to_private_api_mb_s")),
        "disk_mb_s": _fmt(big.get("disk_read_sha256_write_mb_s")),
        "disk_fsync_mb_s": _fmt(big.get("disk_read_sha256_write_fsync_mb_s")),
        "wait_any_change_p99_ms": _fmt(crowd_any_change.get("p99_ms")),
        "wait_any_change_errors": _fmt(crowd_any_change.get("errors"), 0),
        "poll_p99_runs": ", ".join(_fmt(run.get("p99_ms")) for run in paced.get("runs") or []) or "n/a",
        "phase_errors": _phase_errors(results.get("phase_errors") or {}),
    }


def fill(template: str, texts: dict[str, str]) -> str:
    """The template with the text between each pair of markers replaced by that figure's text.

    A marker pair standing on lines of its own keeps doing so (the figure gets lines between
    them); an inline pair stays inline. A marker naming no figure is an error, not a blank.
    """

    def replace(match: re.Match[str]) -> str:
        name, inner = match.group("name"), match.group("inner")
        if name not in texts:
            raise TemplateError(f"BENCHMARKS.md names a figure the report does not make: {name!r}")
        text = texts[name]
        before = "\n" if inner.startswith("\n") else ""
        after = "\n" if inner.endswith("\n") and text else ""
        return f"<!-- bench:{name} -->{before}{text}{after}<!-- /bench:{name} -->"

    filled, count = MARKER_RE.subn(replace, template)
    if count == 0:
        raise TemplateError("BENCHMARKS.md has no <!-- bench:NAME --> markers: nothing to fill in")
    return filled


def markdown(results: dict[str, Any], template: str) -> str:
    """BENCHMARKS.md for these results: the template's prose with this run's figures."""
    return fill(template, figure_texts(results))


# --- plot --------------------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> str:
    """The four panels of bench/plot.png; returns what drew it (recorded in results.json)."""
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
        rss_goal = goal("peak_rss_mb")
        ax.axhline(float(rss_goal.target), color="red", linestyle="--", label=f"goal {rss_goal.target:g}")
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
        p99_goal = goal("poll_p99_ms")
        ax.axhline(
            float(p99_goal.target),
            color="red",
            linestyle="--",
            label=f"goal p99 {p99_goal.target:g} {p99_goal.unit}",
        )
        ax.set_xticks(list(x), [f"{name}\n{load['requests_per_s']:.0f} req/s" for name, load in loads])
        ax.set_yscale("log")
        ax.set_ylim(bottom=1)
        ax.set_ylabel("ms")
        ax.set_title("Status polling latency")
        ax.legend()

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "matplotlib"
