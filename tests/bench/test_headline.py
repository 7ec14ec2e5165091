"""Which goals a run met, judged from small results dicts: no benchmark runs here."""

from __future__ import annotations

from typing import Any

import pytest

from bench.goals import GOALS, goal, headline, judge

EVERY_GOAL_MET: dict[str, Any] = {
    "dispatch": {
        "ratio_platform_over_raw_cli": 0.85,
        "overhead_ms_median_vs_cli": 90.0,
        "peak_rss_mb": {"public-api": 80.0, "private-api": 100.0},
    },
    "throughput": {
        "levels": {level: {"ratio": 0.95} for level in ("1", "2", "4")},
        "services_cpu_ms_per_task": 40.0,
    },
    "bigfiles": {
        "upload_mb_s": 130.0,
        "disk_read_sha256_write_mb_s": 150.0,
        "peak_rss_mb": {"public-api": 120.0},
    },
    "polling": {"paced": {"p99_ms": 30.0, "errors": 0}, "saturation": {"errors": 0}},
    "queue": {"all_ran_once": True},
    "push": {
        "notify_latency_ms_p50": 12.0,
        "notify_latency_ms_p99": 40.0,
        "cancel_running_s_p50": 0.8,
        "wait_crowd": {"clients": 1000, "p99_ms": 60.0, "errors": 0},
    },
}


def with_changes(**phases: dict[str, Any]) -> dict[str, Any]:
    """EVERY_GOAL_MET with some phases' figures replaced (shallowly, phase by phase)."""
    return {**EVERY_GOAL_MET, **phases}


def test_a_run_that_meets_every_goal_has_none_missed_or_unmeasured() -> None:
    result = headline(EVERY_GOAL_MET)
    assert result["goals_missed"] == []
    assert result["goals_not_measured"] == []
    assert set(result["goals"]) == {
        "dispatch_ratio",
        "dispatch_overhead_ms_median",
        "throughput_ratio_1",
        "throughput_ratio_2",
        "throughput_ratio_4",
        "upload_disk_ratio",
        "peak_rss_mb_public-api",
        "peak_rss_mb_private-api",
        "poll_p99_ms",
        "poll_errors",
        "queue_all_ran_once",
        "services_cpu_ms_per_task",
        "notify_latency_ms_p50",
        "cancel_running_s_p50",
        "wait_1000_p99_ms",
        "wait_1000_errors",
    }


def test_the_goal_text_comes_from_the_goals_table() -> None:
    goals = headline(EVERY_GOAL_MET)["goals"]
    assert goals["dispatch_ratio"] == {"value": 0.85, "goal": "<= 0.9", "met": True}
    assert goals["throughput_ratio_2"]["goal"] == ">= 0.95"
    assert goals["upload_disk_ratio"] == {"value": 130.0 / 150.0, "goal": ">= 0.8", "met": True}
    assert goals["peak_rss_mb_public-api"]["goal"] == "< 200"
    assert goals["poll_errors"]["goal"] == "0"
    assert goals["queue_all_ran_once"]["goal"] == "yes"


def test_no_figures_at_all_leaves_every_fixed_goal_unmeasured_and_none_missed() -> None:
    result = headline({})
    assert result["goals_missed"] == []
    # Per-process memory goals exist only for processes that ran; the throughput levels always do.
    assert result["goals_not_measured"] == sorted(
        [
            "dispatch_ratio",
            "dispatch_overhead_ms_median",
            "throughput_ratio_1",
            "throughput_ratio_2",
            "throughput_ratio_4",
            "upload_disk_ratio",
            "poll_p99_ms",
            "poll_errors",
            "queue_all_ran_once",
            "services_cpu_ms_per_task",
            "notify_latency_ms_p50",
            "cancel_running_s_p50",
            "wait_1000_p99_ms",
            "wait_1000_errors",
        ]
    )
    assert result["peak_rss_mb"] == {}


def test_a_phase_that_did_not_run_leaves_only_its_goals_unmeasured() -> None:
    details = dict(EVERY_GOAL_MET)
    del details["polling"]
    result = headline(details)
    assert result["goals_not_measured"] == ["poll_errors", "poll_p99_ms"]
    assert result["goals_missed"] == []


def test_a_missing_throughput_level_is_unmeasured_and_an_extra_one_is_not_judged() -> None:
    levels = {"1": {"ratio": 0.95}, "4": {"ratio": 0.5}, "8": {"ratio": 0.1}}
    result = headline(with_changes(throughput={"levels": levels, "services_cpu_ms_per_task": 40.0}))
    assert result["goals_not_measured"] == ["throughput_ratio_2"]
    assert result["goals_missed"] == ["throughput_ratio_4"]
    assert "throughput_ratio_8" not in result["goals"]


@pytest.mark.parametrize(
    ("phase", "figures", "goal_name", "met"),
    [
        ("dispatch", {"ratio_platform_over_raw_cli": 0.9}, "dispatch_ratio", True),
        ("dispatch", {"ratio_platform_over_raw_cli": 0.91}, "dispatch_ratio", False),
        ("dispatch", {"overhead_ms_median_vs_cli": 150.0}, "dispatch_overhead_ms_median", True),
        ("dispatch", {"overhead_ms_median_vs_cli": 151.0}, "dispatch_overhead_ms_median", False),
        ("bigfiles", {"upload_mb_s": 80.0, "disk_read_sha256_write_mb_s": 100.0}, "upload_disk_ratio", True),
        ("bigfiles", {"upload_mb_s": 79.9, "disk_read_sha256_write_mb_s": 100.0}, "upload_disk_ratio", False),
        ("bigfiles", {"upload_mb_s": 80.0}, "upload_disk_ratio", None),
        ("polling", {"paced": {"p99_ms": 49.9, "errors": 0}}, "poll_p99_ms", True),
        ("polling", {"paced": {"p99_ms": 50.0, "errors": 0}}, "poll_p99_ms", False),
        ("queue", {"all_ran_once": False}, "queue_all_ran_once", False),
        ("throughput", {"services_cpu_ms_per_task": 50.0}, "services_cpu_ms_per_task", True),
        ("throughput", {"services_cpu_ms_per_task": 50.1}, "services_cpu_ms_per_task", False),
    ],
)
def test_each_goal_is_judged_at_its_boundary(
    phase: str, figures: dict[str, Any], goal_name: str, met: bool | None
) -> None:
    result = headline(with_changes(**{phase: figures}))
    assert result["goals"][goal_name]["met"] is met
    assert (goal_name in result["goals_missed"]) is (met is False)


def test_errors_of_either_polling_load_count_but_the_paced_load_must_have_run() -> None:
    some_errors = headline(
        with_changes(polling={"paced": {"p99_ms": 30.0, "errors": 0}, "saturation": {"errors": 3}})
    )
    assert some_errors["poll_errors"] == 3
    assert some_errors["goals"]["poll_errors"]["met"] is False

    only_saturation = headline(with_changes(polling={"saturation": {"errors": 0}}))
    assert only_saturation["poll_errors"] is None
    assert only_saturation["goals"]["poll_errors"]["met"] is None


def test_peak_memory_is_the_highest_of_every_phase_and_judged_per_process() -> None:
    result = headline(
        with_changes(
            queue={"all_ran_once": True, "peak_rss_mb": {"consumer-0": 250.0, "public-api": 90.0}},
        )
    )
    assert result["peak_rss_mb"] == {"public-api": 120.0, "private-api": 100.0, "consumer-0": 250.0}
    assert result["goals_missed"] == ["peak_rss_mb_consumer-0"]
    # Exactly at the limit is over it: the goal is "< 200".
    at_limit = headline(with_changes(bigfiles={"upload_mb_s": 130.0, "peak_rss_mb": {"public-api": 200.0}}))
    assert at_limit["goals_missed"] == ["peak_rss_mb_public-api"]


def test_stored_figures_are_judged_again_by_todays_table() -> None:
    """What `--render` does with a results.json: the figures stay, the verdicts follow GOALS."""
    stored = {"dispatch_ratio": 0.95, "throughput_ratio": {"1": 0.95}, "peak_rss_mb": {"public-api": 80.0}}
    verdict = judge(stored)
    assert verdict["goals_missed"] == ["dispatch_ratio"]
    assert "throughput_ratio_2" in verdict["goals_not_measured"]
    assert verdict["goals"]["peak_rss_mb_public-api"]["met"] is True


def test_every_goal_in_the_table_has_a_distinct_key_and_a_known_comparison() -> None:
    assert len({entry.key for entry in GOALS}) == len(GOALS)
    assert {entry.comparison for entry in GOALS} <= {"<=", "<", ">=", "=="}
    assert goal("poll_p99_ms").label() == "Polling, 200 clients x 1 req/s: p99 (ms)"
    assert goal("peak_rss_mb").label("public-api") == "Peak RSS `public-api` (MiB)"
