"""What a long poll is woken by (contract.WakeOn): the states a waiting client saw, and when a
task no longer matches them."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from inference_server.contract import (
    TaskPublic,
    TaskStatus,
    WakeOn,
    state_is_current,
    status_is_current,
    task_state,
)


def task(
    status: TaskStatus, *, progress: float | None = None, waiting_reason: str | None = None
) -> TaskPublic:
    return TaskPublic(
        uid="u" * 32,
        model_human_readable_id="m",
        status=status,
        created_at=datetime.now(UTC),
        progress=progress,
        waiting_reason=waiting_reason,
    )


PENDING = task(TaskStatus.PENDING, waiting_reason="no consumer serves this model")
PENDING_OTHER_REASON = task(TaskStatus.PENDING, waiting_reason="3 tasks ahead")
RUNNING = task(TaskStatus.RUNNING)
RUNNING_HALF = task(TaskStatus.RUNNING, progress=0.5)
FINISHED = task(TaskStatus.FINISHED)
FAILED = task(TaskStatus.FAILED)


@pytest.mark.parametrize(
    ("on", "seen", "now", "current"),
    [
        (WakeOn.CHANGE, PENDING, PENDING_OTHER_REASON, False),
        (WakeOn.CHANGE, RUNNING, RUNNING_HALF, False),
        (WakeOn.CHANGE, RUNNING, RUNNING, True),
        (WakeOn.STATUS, PENDING, PENDING_OTHER_REASON, True),
        (WakeOn.STATUS, RUNNING, RUNNING_HALF, True),
        (WakeOn.STATUS, PENDING, RUNNING, False),
        (WakeOn.END, PENDING, RUNNING_HALF, True),
        (WakeOn.END, RUNNING, FINISHED, False),
        (WakeOn.END, PENDING, FAILED, False),
        (WakeOn.END, FINISHED, FAILED, True),
    ],
)
def test_a_seen_state_is_out_of_date_only_by_what_its_wake_on_names(
    on: WakeOn, seen: TaskPublic, now: TaskPublic, current: bool
) -> None:
    assert state_is_current(task_state(seen, on), now) is current
    # A caller that names only the status it saw: for CHANGE, only a new status is news.
    expected = seen.status == now.status if on is WakeOn.CHANGE else current
    assert status_is_current(seen.status, now, on) is expected


def test_the_default_state_keeps_the_format_of_the_release_before_wake_on() -> None:
    # A public API of the previous release sends these during a rolling update.
    assert task_state(RUNNING_HALF) == "running:0.5:"
    assert task_state(PENDING) == "pending::no consumer serves this model"
    assert state_is_current("running:0.5:", RUNNING_HALF)
    assert not state_is_current("pending::", RUNNING)
