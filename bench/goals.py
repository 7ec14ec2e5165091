"""The benchmark goals, in one table, and the headline: which goals a run met, from its figures.

Both results.json (the `goals` entries, the log at the end of a run) and BENCHMARKS.md (the Goal
column) read the targets from GOALS, so a goal is changed in one place. Nothing here measures or
imports the platform: the headline is a pure function of a run's `details`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

Comparison = Literal["<=", "<", ">=", "=="]

_COMPARE: dict[Comparison, Callable[[Any, Any], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    "==": operator.eq,
}

PHASES = ("dispatch", "throughput", "bigfiles", "polling", "queue", "push", "real_model")
# Parallel tasks the throughput phase measures; each level has a goal of its own.
THROUGHPUT_LEVELS = (1, 2, 4)


@dataclass(frozen=True)
class Goal:
    """One target: a headline figure `key` compared with `target`.

    A goal over a family of figures (one per throughput level, one per service process) is judged
    for each member: `instances` names the members that must be there (a missing one is "not
    measured"); without it, whichever members the run measured are judged.
    """

    key: str
    # The figure's label in BENCHMARKS.md; `{instance}` is the member of a family.
    description: str
    comparison: Comparison
    target: float | bool
    unit: str = ""
    instances: tuple[str, ...] = ()

    @property
    def target_text(self) -> str:
        """The Goal column: `<= 1.25`; an equality shows the target alone (`0`, `yes`)."""
        shown = ("yes" if self.target else "no") if isinstance(self.target, bool) else f"{self.target:g}"
        return shown if self.comparison == "==" else f"{self.comparison} {shown}"

    def label(self, instance: str = "", **fields: str) -> str:
        text = self.description.format(instance=instance, **fields)
        return f"{text} ({self.unit})" if self.unit else text

    def name(self, instance: str = "") -> str:
        """The entry's name in results.json's `goals`: the key, then the member if any."""
        return f"{self.key}_{instance}" if instance else self.key

    def met(self, value: Any) -> bool | None:
        """None when the figure was not measured."""
        if value is None:
            return None
        return bool(_COMPARE[self.comparison](value, self.target))


GOALS: tuple[Goal, ...] = (
    # The platform knows the model before the task comes, so it is to beat a bare run.
    Goal("dispatch_ratio", "Dispatch: platform / raw `docker run --rm`, medians", "<=", 0.9),
    Goal("dispatch_overhead_ms_median", "Dispatch: median overhead", "<=", 150, "ms"),
    Goal(
        "throughput_ratio",
        "Throughput, {instance} consumer(s): platform / raw",
        ">=",
        0.95,
        instances=tuple(str(level) for level in THROUGHPUT_LEVELS),
    ),
    # Against this disk's own read + sha256 + write of the same file, measured in the same run.
    Goal(
        "upload_disk_ratio", "Upload {file} via the public API / the disk's read + sha256 + write", ">=", 0.8
    ),
    Goal("peak_rss_mb", "Peak RSS `{instance}`", "<", 200, "MiB"),
    Goal("poll_p99_ms", "Polling, 200 clients x 1 req/s: p99", "<", 50, "ms"),
    Goal("poll_errors", "Polling errors, both loads", "==", 0),
    Goal("queue_all_ran_once", "Queue: all later run exactly once", "==", True),
    Goal(
        "services_cpu_ms_per_task",
        "Throughput: CPU of the platform's services (APIs, consumers) per task",
        "<=",
        50,
        "ms",
    ),
    Goal("notify_latency_ms_p50", "Output stored to the waiting client knowing it: p50", "<=", 20, "ms"),
    Goal("cancel_running_s_p50", "Cancel of a running task to its container's SIGTERM: p50", "<=", 2, "s"),
    Goal("wait_1000_p99_ms", "1,000 clients waiting through `?wait=`: p99 notify latency", "<", 100, "ms"),
    Goal("wait_1000_errors", "1,000 clients waiting through `?wait=`: errors", "==", 0),
)
GOALS_BY_KEY: dict[str, Goal] = {goal.key: goal for goal in GOALS}


def goal(key: str) -> Goal:
    return GOALS_BY_KEY[key]


def _get(details: dict[str, Any], *path: str) -> Any:
    value: Any = details
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _scaled(stats: dict[str, Any] | None, factor: float) -> dict[str, Any] | None:
    if stats is None:
        return None
    return {
        key: (value * factor if key != "n" and isinstance(value, float) else value)
        for key, value in stats.items()
    }


def _ratio(part: float | None, whole: float | None) -> float | None:
    return None if part is None or not whole else part / whole


def figures(details: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a run (results.json's top-level keys), None where not measured."""
    levels = _get(details, "throughput", "levels") or {}
    peak_rss: dict[str, float] = {}
    for phase in PHASES:
        for name, value in (_get(details, phase, "peak_rss_mb") or {}).items():
            peak_rss[name] = max(peak_rss.get(name, 0.0), value)
    paced_errors = _get(details, "polling", "paced", "errors")
    saturation_errors = _get(details, "polling", "saturation", "errors")
    return {
        "dispatch_ratio": _get(details, "dispatch", "ratio_platform_over_raw_cli"),
        "dispatch_overhead_ms_median": _get(details, "dispatch", "overhead_ms_median_vs_cli"),
        "dispatch_platform_ms": _scaled(_get(details, "dispatch", "platform_s"), 1000),
        "dispatch_raw_ms": _scaled(_get(details, "dispatch", "raw_docker_run_cli_s"), 1000),
        "dispatch_platform_without_poll_wait_ms": _scaled(
            _get(details, "dispatch", "platform_without_poll_wait_s"), 1000
        ),
        "throughput_ratio": {level: data.get("ratio") for level, data in levels.items()},
        "upload_mb_s": _get(details, "bigfiles", "upload_mb_s"),
        "upload_disk_ratio": _ratio(
            _get(details, "bigfiles", "upload_mb_s"), _get(details, "bigfiles", "disk_read_sha256_write_mb_s")
        ),
        "download_mb_s": _get(details, "bigfiles", "download_mb_s"),
        "peak_rss_mb": peak_rss,
        "peak_rss_mb_bigfiles": _get(details, "bigfiles", "peak_rss_mb"),
        "poll_requests_per_s": _get(details, "polling", "paced", "requests_per_s"),
        "poll_p50_ms": _get(details, "polling", "paced", "p50_ms"),
        "poll_p99_ms": _get(details, "polling", "paced", "p99_ms"),
        # Errors of either load count; without the paced load there is nothing to judge.
        "poll_errors": None if paced_errors is None else paced_errors + (saturation_errors or 0),
        "poll_saturation_requests_per_s": _get(details, "polling", "saturation", "requests_per_s"),
        "poll_saturation_p99_ms": _get(details, "polling", "saturation", "p99_ms"),
        "queue_submissions_per_s": _get(details, "queue", "submissions_per_s"),
        "queue_all_ran_once": _get(details, "queue", "all_ran_once"),
        "queue_ran_once_sampled": _get(details, "queue", "sampled"),
        "queue_tasks_run": _get(details, "queue", "finished"),
        "services_cpu_ms_per_task": _get(details, "throughput", "services_cpu_ms_per_task"),
        "notify_latency_ms_p50": _get(details, "push", "notify_latency_ms_p50"),
        "notify_latency_ms_p99": _get(details, "push", "notify_latency_ms_p99"),
        "cancel_running_s_p50": _get(details, "push", "cancel_running_s_p50"),
        "wait_1000_p99_ms": _get(details, "push", "wait_crowd", "p99_ms"),
        "wait_1000_errors": _get(details, "push", "wait_crowd", "errors"),
        "wait_crowd_clients": _get(details, "push", "wait_crowd", "clients"),
        "real_model_ratio": _get(details, "real_model", "ratio_platform_over_raw_cli"),
        "real_model_platform_s": _get(details, "real_model", "platform_s", "median"),
        "real_model_raw_s": _get(details, "real_model", "raw_docker_run_cli_s", "median"),
    }


def judged(headline_figures: dict[str, Any]) -> Iterator[tuple[str, Goal, str, Any]]:
    """(name, goal, instance, value) for every goal entry, in the table's order."""
    for entry in GOALS:
        value = headline_figures.get(entry.key)
        if not entry.instances and not isinstance(value, dict):
            yield entry.name(), entry, "", value
            continue
        members = value if isinstance(value, dict) else {}
        for instance in entry.instances or tuple(members):
            yield entry.name(instance), entry, instance, members.get(instance)


def judge(headline_figures: dict[str, Any]) -> dict[str, Any]:
    """One goal entry per figure (met: true/false/null if not measured), and the names of the goals
    missed and not measured."""
    goals = {
        name: {"value": value, "goal": entry.target_text, "met": entry.met(value)}
        for name, entry, _instance, value in judged(headline_figures)
    }
    return {
        "goals": goals,
        "goals_missed": sorted(name for name, result in goals.items() if result["met"] is False),
        "goals_not_measured": sorted(name for name, result in goals.items() if result["met"] is None),
    }


def headline(details: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of a run and how they stand against the goals."""
    out = figures(details)
    out.update(judge(out))
    return out
