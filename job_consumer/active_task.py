"""A task a consumer holds: its claim, what it takes of the consumer, its work folder, and why
it must stop, if it must."""

from __future__ import annotations

from enum import StrEnum

from inference_server.capacity import TaskNeeds
from inference_server.contract import TaskClaim
from job_consumer.workspace import TaskWorkspace


class StopReason(StrEnum):
    SHUTDOWN = "shutdown"  # second SIGTERM: stop now and give the task back to the queue
    CANCELLED = "cancelled"  # the private API says the task was cancelled or deleted
    LEASE_LOST = "lease_lost"  # another consumer holds the task now; our results are void


class ActiveTask:
    """A task in hand. Its stop flag is a plain attribute: signal handlers set it."""

    def __init__(self, claim: TaskClaim) -> None:
        self.claim = claim
        self.uid = claim.task.uid
        # From the claimed model, not the message's headers: the model is the truth.
        self.needs = TaskNeeds.of_model(claim.model)
        self.stop_reason: StopReason | None = None
        # Its work folder, once made: the sweep must leave it alone.
        self.workspace: TaskWorkspace | None = None

    def stop(self, reason: StopReason) -> None:
        # The first reason wins: a task whose lease is lost stays lost whatever comes after.
        if self.stop_reason is None:
            self.stop_reason = reason

    def should_stop(self) -> bool:
        return self.stop_reason is not None
