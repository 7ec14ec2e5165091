"""The dashboard overview: tasks with set times give exact counts, medians and history buckets;
a user's task figures count their own tasks, while queues and consumers are the platform's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from inference_server.contract import (
    OVERVIEW_HOURS_MAX,
    ApiKeyRole,
    ConsumerState,
    FailureCategory,
    PlatformOverview,
    PrivateRoutes,
    TaskQueue,
    TaskStatus,
)
from private_api.access import Actor
from private_api.models import Task, utcnow
from private_api.overview import HISTORY_BUCKETS, platform_overview
from tests.private_api.helpers import acting_as, age_consumer, register_consumer, register_model, submit_ok

ALICE = acting_as("alice")
OPERATOR = acting_as("root", ApiKeyRole.OPERATOR)
CPU_MODEL, GPU_MODEL = "seg-model", "gpu-model"
OUTPUT_SHA256 = "0" * 64


@dataclass(frozen=True)
class Planned:
    """A task as the test sets it: its owner, model, state, and its times in minutes before now."""

    owner: str
    model: str
    status: TaskStatus
    created: float
    started: float | None = None
    run: tuple[float, float] | None = None
    finished: float | None = None
    failure: FailureCategory | None = None


# Times in minutes before now, chosen away from the 15-minute bucket ends of a 6-hour overview.
PLAN = {
    "alice_finished_recently": Planned(
        "alice", CPU_MODEL, TaskStatus.FINISHED, created=50, started=40, run=(39, 35), finished=34
    ),
    "alice_finished_earlier": Planned(
        "alice", CPU_MODEL, TaskStatus.FINISHED, created=100, started=99, run=(98, 96), finished=95
    ),
    "alice_failed": Planned(
        "alice",
        CPU_MODEL,
        TaskStatus.FAILED,
        created=178,
        started=170,
        run=(165, 160),
        finished=160,
        failure=FailureCategory.MODEL_EXIT_CODE,
    ),
    "bob_finished": Planned(
        "bob", GPU_MODEL, TaskStatus.FINISHED, created=40, started=39.5, run=(38, 38 - 1000 / 60), finished=20
    ),
    "bob_failed": Planned(
        "bob",
        GPU_MODEL,
        TaskStatus.FAILED,
        created=14,
        started=12,
        finished=10,
        failure=FailureCategory.INFRASTRUCTURE,
    ),
    "bob_cancelled": Planned(
        "bob", CPU_MODEL, TaskStatus.CANCELLED, created=8, finished=5, failure=FailureCategory.CANCELLED
    ),
    "alice_outside_the_window": Planned(
        "alice", CPU_MODEL, TaskStatus.FINISHED, created=480, started=479, run=(478, 421), finished=420
    ),
    "alice_pending": Planned("alice", CPU_MODEL, TaskStatus.PENDING, created=25),
    "bob_pending": Planned("bob", GPU_MODEL, TaskStatus.PENDING, created=125),
    "alice_running": Planned("alice", CPU_MODEL, TaskStatus.RUNNING, created=3, started=1, run=(0.5, 0)),
}


def _ago(now: datetime, minutes: float | None) -> datetime | None:
    return None if minutes is None else now - timedelta(minutes=minutes)


def _plant(client: TestClient, now: datetime) -> None:
    register_model(client, CPU_MODEL)
    register_model(client, GPU_MODEL, use_gpu=True, gpu_memory_mb=1000)
    uids = [
        submit_ok(client, planned.model, headers=acting_as(planned.owner))["uid"] for planned in PLAN.values()
    ]
    with client.app.state.session_factory() as session:
        for uid, planned in zip(uids, PLAN.values(), strict=True):
            values: dict[str, Any] = {
                "status": planned.status,
                "created_at": _ago(now, planned.created),
                "started_at": _ago(now, planned.started),
                "finished_at": _ago(now, planned.finished),
                "failure": planned.failure,
                "output_sha256": OUTPUT_SHA256 if planned.status == TaskStatus.FINISHED else None,
            }
            if planned.run is not None:
                values |= {
                    "run_started_at": _ago(now, planned.run[0]),
                    "run_finished_at": _ago(now, planned.run[1]),
                }
            # Still running: the run has not finished.
            if planned.status == TaskStatus.RUNNING:
                values["run_finished_at"] = None
            session.execute(update(Task).where(Task.uid == uid).values(**values))
        session.commit()


def _overview(client: TestClient, headers: dict[str, str], **params: Any) -> PlatformOverview:
    response = client.get(PrivateRoutes.OVERVIEW, headers=headers, params=params)
    assert response.status_code == 200, response.text
    return PlatformOverview.model_validate(response.json())


def _by_model(overview: PlatformOverview) -> dict[str, tuple[int, float | None, float | None]]:
    return {
        timing.model: (timing.tasks_ended, timing.queue_wait_s_median, timing.run_s_median)
        for timing in overview.models
    }


def _points(overview: PlatformOverview) -> list[tuple[int, int, int]]:
    return [(point.finished, point.failed, point.queue_depth) for point in overview.history]


# Tasks waiting at each of the 24 bucket ends (every 15 minutes, the last one now), from PLAN:
# bob_pending from -125 min, alice_pending from -25, alice_finished_recently from -50 to -40.
PLATFORM_QUEUE_DEPTHS = [0] * 15 + [1, 1, 1, 1, 1, 2, 1, 2, 2]


def _expected_history(outcomes: dict[int, tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(finished, failed, queue_depth) per bucket; `outcomes` by the bucket's index from the end
    (0: the bucket ending now)."""
    return [
        (*outcomes.get(HISTORY_BUCKETS - 1 - index, (0, 0)), depth)
        for index, depth in enumerate(PLATFORM_QUEUE_DEPTHS)
    ]


def test_operators_see_every_task(client: TestClient) -> None:
    now = utcnow()
    _plant(client, now)
    register_consumer(client, "idle-consumer")
    register_consumer(client, "gone-consumer")
    age_consumer(client, "gone-consumer", 3600)

    overview = _overview(client, OPERATOR)
    assert overview.scope == "all"
    assert now <= overview.generated_at <= utcnow()
    assert (overview.pending, overview.running) == (2, 1)
    assert overview.queue_depth == {TaskQueue.CPU.value: 1, TaskQueue.GPU.value: 1}
    assert overview.consumers == {
        ConsumerState.IDLE.value: 1,
        ConsumerState.BUSY.value: 0,
        ConsumerState.DRAINING.value: 0,
        ConsumerState.LOST.value: 1,
    }
    # In the last hour: alice_finished_recently and bob_finished; bob_failed (not the cancellation).
    assert (overview.finished_last_hour, overview.failed_last_hour) == (2, 1)
    assert _by_model(overview) == {
        # Waits 600, 60 and 480 s (the cancelled task never started); runs 240, 120, 300 s.
        CPU_MODEL: (4, pytest.approx(480, abs=0.01), pytest.approx(240, abs=0.01)),
        # Waits 30 and 120 s; one run of 1000 s (the lost task reported none).
        GPU_MODEL: (2, pytest.approx(75, abs=0.01), pytest.approx(1000, abs=0.01)),
    }
    assert overview.history_bucket_s == 6 * 3600 // HISTORY_BUCKETS == 900
    assert len(overview.history) == HISTORY_BUCKETS
    assert overview.history[-1].at == overview.generated_at
    assert all(
        later.at - earlier.at == timedelta(seconds=900)
        for earlier, later in zip(overview.history, overview.history[1:], strict=False)
    )
    # By the bucket's index from the end: bob_failed -10 min, bob_finished -20, alice's -34, -95
    # and her failure -160 (alice_outside_the_window, -7 h, is not in it).
    assert _points(overview) == _expected_history({0: (0, 1), 1: (1, 0), 2: (1, 0), 6: (1, 0), 10: (0, 1)})


def test_a_user_sees_their_own_task_figures_and_the_platforms_queues(client: TestClient) -> None:
    _plant(client, utcnow())
    register_consumer(client, "idle-consumer")

    overview = _overview(client, ALICE)
    assert overview.scope == "own"
    assert (overview.pending, overview.running) == (1, 1)
    assert (overview.finished_last_hour, overview.failed_last_hour) == (1, 0)
    assert _by_model(overview) == {CPU_MODEL: (3, pytest.approx(480, abs=0.01), pytest.approx(240, abs=0.01))}
    # Queues and consumers are everyone's: bob's pending GPU task is counted.
    assert overview.queue_depth == {TaskQueue.CPU.value: 1, TaskQueue.GPU.value: 1}
    assert overview.consumers[ConsumerState.IDLE.value] == 1
    assert _points(overview) == _expected_history({2: (1, 0), 6: (1, 0), 10: (0, 1)})

    # Someone with no tasks sees zeros for tasks, and still the platform's queues.
    carol = _overview(client, acting_as("carol"))
    assert (carol.pending, carol.running, carol.finished_last_hour, carol.failed_last_hour) == (0, 0, 0, 0)
    assert carol.models == []
    assert [(point.finished, point.failed) for point in carol.history] == [(0, 0)] * HISTORY_BUCKETS
    assert carol.queue_depth == overview.queue_depth


def test_the_window_follows_hours(client: TestClient) -> None:
    _plant(client, utcnow())
    one_hour = _overview(client, OPERATOR, hours=1)
    assert one_hour.history_bucket_s == 150
    # Only what ended in the last hour: alice_finished_recently and bob_cancelled on the CPU
    # model, bob_finished and bob_failed on the GPU one.
    assert {timing.model: timing.tasks_ended for timing in one_hour.models} == {CPU_MODEL: 2, GPU_MODEL: 2}
    assert sum(point.finished for point in one_hour.history) == 2
    assert sum(point.failed for point in one_hour.history) == 1

    widest = _overview(client, OPERATOR, hours=OVERVIEW_HOURS_MAX)
    assert widest.history_bucket_s == OVERVIEW_HOURS_MAX * 3600 // HISTORY_BUCKETS
    # Now alice_outside_the_window is in too.
    assert {timing.model: timing.tasks_ended for timing in widest.models} == {CPU_MODEL: 5, GPU_MODEL: 2}
    assert sum(point.finished for point in widest.history) == 4


@pytest.mark.parametrize("hours", ["0", "-1", str(OVERVIEW_HOURS_MAX + 1), "six", "1.5"])
def test_hours_out_of_range_is_422(client: TestClient, hours: str) -> None:
    response = client.get(PrivateRoutes.OVERVIEW, headers=OPERATOR, params={"hours": hours})
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


def test_an_empty_platform(client: TestClient) -> None:
    overview = _overview(client, OPERATOR)
    assert (overview.pending, overview.running, overview.finished_last_hour, overview.failed_last_hour) == (
        0,
    ) * 4
    assert overview.models == [] and overview.queue_depth == {"cpu": 0, "gpu": 0}
    assert _points(overview) == [(0, 0, 0)] * HISTORY_BUCKETS


def test_the_function_at_a_given_moment(client: TestClient) -> None:
    """Called directly with `now`: the buckets end exactly at now, now - 15 min, ..."""
    now = utcnow()
    _plant(client, now)
    with client.app.state.session_factory() as session:
        overview = platform_overview(session=session, actor=Actor(name="bob"), lost_after_s=30, now=now)
    assert overview.generated_at == now and overview.history[0].at == now - timedelta(minutes=15 * 23)
    assert (overview.pending, overview.running, overview.finished_last_hour, overview.failed_last_hour) == (
        1,
        0,
        1,
        1,
    )
