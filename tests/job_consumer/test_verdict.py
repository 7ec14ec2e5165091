"""verdict_for: every way a run can end, decided without Docker."""

from __future__ import annotations

import dataclasses

import docker.errors
import pytest

from inference_server.contract import FailureCategory
from job_consumer.active_task import StopReason
from job_consumer.config import ConsumerSettings
from job_consumer.runner import ModelRunError, RunLimits, RunResult
from job_consumer.verdict import ERROR_TAIL_LINES, Failed, Finished, Stopped, run_error, verdict_for
from tests.job_consumer.helpers import make_model

MAX_OUTPUT_BYTES = 1000
LIMITS = RunLimits.of(
    make_model("verdict:test", timeout_s=30, memory_mb=64),
    ConsumerSettings(service_token="verdict-tests-token-0123"),
    engine_cpus=1,
)
SUCCESS = RunResult(
    exit_code=0,
    timed_out=False,
    oom_killed=False,
    cancelled=False,
    logs="done\n",
    duration_s=1.5,
    limits=LIMITS,
)


def run(**changes: object) -> RunResult:
    return dataclasses.replace(SUCCESS, **changes)


def judge(result: RunResult, stop_reason: StopReason | None = None):
    return verdict_for(result, stop_reason, max_output_bytes=MAX_OUTPUT_BYTES)


def test_exit_code_zero_is_finished():
    assert judge(SUCCESS) == Finished()


def test_a_shutdown_after_the_model_exited_keeps_its_result():
    assert judge(SUCCESS, StopReason.SHUTDOWN) == Finished()
    failed = judge(run(exit_code=3), StopReason.SHUTDOWN)
    assert isinstance(failed, Failed) and failed.exit_code == 3


def test_timeout_is_a_final_failure_naming_the_limit():
    verdict = judge(run(exit_code=137, timed_out=True))
    assert verdict == Failed(
        "timeout: the model ran longer than its 30 s limit and was killed",
        retryable=False,
        exit_code=137,
        category=FailureCategory.TIMEOUT,
    )


def test_out_of_memory_is_a_final_failure_naming_the_limit():
    verdict = judge(run(exit_code=137, oom_killed=True))
    assert verdict == Failed(
        "out of memory: the model went over its 64 MB limit and was killed (exit code 137)",
        retryable=False,
        exit_code=137,
        category=FailureCategory.OUT_OF_MEMORY,
    )


def test_non_zero_exit_fails_with_the_last_log_lines():
    logs = "".join(f"line {n}\n" for n in range(100))
    verdict = judge(run(exit_code=2, logs=logs))
    assert isinstance(verdict, Failed)
    assert (verdict.retryable, verdict.exit_code, verdict.category) == (
        False,
        2,
        FailureCategory.MODEL_EXIT_CODE,
    )
    assert verdict.reason.startswith("model exited with code 2; last log lines:\nline 80\n")
    assert verdict.reason.endswith("line 99")
    assert verdict.reason.count("line ") == ERROR_TAIL_LINES
    assert len(judge(run(exit_code=1, logs="x" * 100_000)).reason) < 4100


def test_output_too_large_wins_over_the_kill_it_caused():
    verdict = judge(run(exit_code=137, output_too_large=True, timed_out=True))
    assert verdict == Failed(
        f"output too large: the model wrote more than {MAX_OUTPUT_BYTES} bytes to /output "
        "(the consumer's IS_MAX_OUTPUT_BYTES) and was stopped",
        retryable=False,
        exit_code=137,
        category=FailureCategory.OUTPUT_TOO_LARGE,
    )


@pytest.mark.parametrize("reason", [StopReason.CANCELLED, StopReason.LEASE_LOST])
def test_cancelled_or_lease_lost_voids_any_result(reason):
    for result in (SUCCESS, run(exit_code=1), run(exit_code=137, cancelled=True), run(timed_out=True)):
        assert judge(result, reason) == Stopped(reason)


def test_stopped_for_shutdown_is_released():
    assert judge(run(exit_code=143, cancelled=True), StopReason.SHUTDOWN) == Stopped(StopReason.SHUTDOWN)


def test_stopped_without_a_reason_reports_nothing():
    # Cannot happen (the runner stops only when asked to); reporting nothing leaves it to the reaper.
    assert judge(run(exit_code=143, cancelled=True)) == Stopped(StopReason.LEASE_LOST)


def run_error_caused_by(cause: Exception | None, *, retryable: bool) -> ModelRunError:
    try:
        raise ModelRunError("could not run", retryable=retryable) from cause
    except ModelRunError as exc:
        return exc


def test_a_missing_image_is_its_own_category():
    missing = run_error_caused_by(docker.errors.ImageNotFound("no such image"), retryable=False)
    assert run_error(missing) == Failed(
        "could not run", retryable=False, category=FailureCategory.IMAGE_MISSING
    )


def test_an_engine_failing_to_start_the_container_is_infrastructure():
    engine = run_error_caused_by(docker.errors.APIError("engine down"), retryable=True)
    assert run_error(engine) == Failed(
        "could not run", retryable=True, category=FailureCategory.INFRASTRUCTURE
    )
