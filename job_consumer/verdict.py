"""What a model's run means for its task: finished, failed (and whether to retry), or stopped.

A pure function of the run's result and the task's stop reason, so every outcome is decided
in one place and can be tested without Docker.
"""

from __future__ import annotations

from dataclasses import dataclass

import docker.errors

from inference_server.contract import FailureCategory
from job_consumer.active_task import StopReason
from job_consumer.runner import ModelRunError, RunResult

ERROR_TAIL_LINES = 20
ERROR_TAIL_CHARS = 4000


@dataclass(frozen=True)
class Finished:
    """The model succeeded: its output is to be collected and uploaded."""


@dataclass(frozen=True)
class Failed:
    """The task failed; `reason` goes to the user, `retryable` says whether another try may work."""

    reason: str
    retryable: bool
    exit_code: int | None = None
    category: FailureCategory = FailureCategory.INFRASTRUCTURE


@dataclass(frozen=True)
class Stopped:
    """The run was stopped or its result is void: the task goes back to the queue (shutdown) or
    is left as it is (cancelled; lease lost, another consumer's now)."""

    reason: StopReason


Verdict = Finished | Failed | Stopped


def verdict_for(result: RunResult, stop_reason: StopReason | None, *, max_output_bytes: int) -> Verdict:
    """The outcome of one run; `max_output_bytes` is the consumer's IS_MAX_OUTPUT_BYTES."""
    if stop_reason in (StopReason.CANCELLED, StopReason.LEASE_LOST):
        return Stopped(stop_reason)
    if result.cancelled:
        # Stopped without a reason cannot happen (the runner stops only when asked to); were it
        # to, reporting nothing is safe: the lease lapses and the reaper hands the task on.
        return Stopped(stop_reason or StopReason.LEASE_LOST)
    # A shutdown request that came after the model exited does not void its result.
    if result.output_too_large:
        return output_too_large(max_output_bytes, result.exit_code)
    limits = result.limits
    if result.timed_out:
        return Failed(
            f"timeout: the model ran longer than its {limits.timeout_s} s limit and was killed",
            retryable=False,
            exit_code=result.exit_code,
            category=FailureCategory.TIMEOUT,
        )
    if result.oom_killed:
        return Failed(
            f"out of memory: the model went over its {limits.memory_mb} MB limit and was killed"
            f" (exit code {result.exit_code})",
            retryable=False,
            exit_code=result.exit_code,
            category=FailureCategory.OUT_OF_MEMORY,
        )
    if result.exit_code != 0:
        return Failed(
            f"model exited with code {result.exit_code}; last log lines:\n{_tail(result.logs)}",
            retryable=False,
            exit_code=result.exit_code,
            category=FailureCategory.MODEL_EXIT_CODE,
        )
    return Finished()


def output_too_large(max_output_bytes: int, exit_code: int | None = None) -> Failed:
    """Found while the model ran (it was killed) or after it exited, before zipping."""
    return Failed(
        f"output too large: the model wrote more than {max_output_bytes} bytes to "
        "/output (the consumer's IS_MAX_OUTPUT_BYTES) and was stopped",
        retryable=False,
        exit_code=exit_code,
        category=FailureCategory.OUTPUT_TOO_LARGE,
    )


def run_error(exc: ModelRunError) -> Failed:
    """A container that could not be run at all: its image missing (the engine's ImageNotFound,
    kept as the cause), or the engine failing us, which is the platform's side."""
    missing = isinstance(exc.__cause__, docker.errors.ImageNotFound)
    return Failed(
        str(exc),
        retryable=exc.retryable,
        category=FailureCategory.IMAGE_MISSING if missing else FailureCategory.INFRASTRUCTURE,
    )


def _tail(logs: str) -> str:
    lines = logs.rstrip("\n").splitlines()[-ERROR_TAIL_LINES:]
    return "\n".join(lines)[-ERROR_TAIL_CHARS:]
