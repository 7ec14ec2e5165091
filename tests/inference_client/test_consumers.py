"""Consumers through InferenceClient and `infer consumers`: operators list, drain and resume them;
user keys get a 403 and an unknown id a 404, as one `infer: error:` line.

A module of its own: the GPU consumers registered here would change what GPU tasks wait for in
the other modules' platforms."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from inference_client.cli import main
from inference_client.client import InferenceClient, InferenceClientError
from inference_server.contract import ConsumerState
from tests.inference_client.conftest import RegisterConsumer
from tests.inference_client.tables import parse_table

CONSUMER_COLUMNS = ["ID", "STATE", "HOST", "RUNTIME", "GPU", "RUNNING", "LAST SEEN"]
# Consumers report running tasks by uid; the registry takes them as the consumer says.
RUNNING_UIDS = ("0" * 32, "1" * 32)


def run(public_url: str, *argv: str) -> int:
    return main(["--url", public_url, *argv])


def _error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infer: error: "), err
    return lines[0]


@pytest.fixture
def client(public_url: str) -> Iterator[InferenceClient]:
    with InferenceClient(public_url, timeout=30) as client:
        yield client


def test_client_lists_drains_and_resumes_consumers(
    client: InferenceClient, register_consumer: RegisterConsumer
) -> None:
    gpu_consumer = register_consumer(gpu_memory_mb=24576, running_tasks=RUNNING_UIDS, host="gpu-box")
    cpu_consumer = register_consumer(host="cpu-box")
    listed = {consumer.id: consumer for consumer in client.list_consumers()}
    assert listed[gpu_consumer].state == ConsumerState.BUSY
    assert listed[gpu_consumer].running_tasks == list(RUNNING_UIDS)
    assert [(gpu.memory_total_mb, gpu.simulated) for gpu in listed[gpu_consumer].gpus] == [(24576, True)]
    assert (listed[cpu_consumer].state, listed[cpu_consumer].gpus) == (ConsumerState.IDLE, [])

    drained = client.drain_consumer(cpu_consumer)
    assert (drained.id, drained.state, drained.draining) == (cpu_consumer, ConsumerState.DRAINING, True)
    assert {c.id: c.state for c in client.list_consumers()}[cpu_consumer] == ConsumerState.DRAINING
    resumed = client.resume_consumer(cpu_consumer)
    assert (resumed.state, resumed.draining) == (ConsumerState.IDLE, False)


def test_client_consumer_errors(public_url: str, user_key: str, client: InferenceClient) -> None:
    with pytest.raises(InferenceClientError) as unknown:
        client.drain_consumer("no-such-consumer")
    assert unknown.value.status_code == 404
    with InferenceClient(public_url, token=user_key) as user_client:
        for call in (user_client.list_consumers, lambda: user_client.drain_consumer("any")):
            with pytest.raises(InferenceClientError) as refused:
                call()
            assert refused.value.status_code == 403
            assert "operator" in refused.value.detail


def test_infer_consumers_list_drain_resume(
    public_url: str, register_consumer: RegisterConsumer, capsys: pytest.CaptureFixture[str]
) -> None:
    gpu_consumer = register_consumer(
        gpu_memory_mb=24576, running_tasks=RUNNING_UIDS, host="gpu-box", runtime="podman"
    )
    cpu_consumer = register_consumer(host="cpu-box")
    assert run(public_url, "consumers", "list") == 0
    rows = {row["ID"]: row for row in parse_table(capsys.readouterr().out, CONSUMER_COLUMNS)}
    gpu_row, cpu_row = rows[gpu_consumer], rows[cpu_consumer]
    assert (gpu_row["STATE"], gpu_row["HOST"], gpu_row["GPU"], gpu_row["RUNNING"]) == (
        "busy", "gpu-box", "24576 MiB simulated", "2",
    )  # fmt: skip
    assert (cpu_row["STATE"], cpu_row["HOST"], cpu_row["GPU"], cpu_row["RUNNING"]) == (
        "idle",
        "cpu-box",
        "-",
        "0",
    )
    assert (gpu_row["RUNTIME"], cpu_row["RUNTIME"]) == ("podman", "docker")
    assert len(cpu_row["LAST SEEN"]) == len("2026-01-01 00:00:00")

    assert run(public_url, "consumers", "drain", gpu_consumer) == 0
    drained = json.loads(capsys.readouterr().out)
    assert (drained["id"], drained["state"], drained["draining"]) == (gpu_consumer, "draining", True)
    assert run(public_url, "consumers", "list", "--json") == 0
    states = {consumer["id"]: consumer["state"] for consumer in json.loads(capsys.readouterr().out)}
    assert (states[gpu_consumer], states[cpu_consumer]) == ("draining", "idle")
    assert run(public_url, "consumers", "resume", gpu_consumer) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "busy"


@pytest.mark.parametrize(
    ("argv", "as_user", "expected"),
    [
        (["consumers", "list"], True, "403"),
        (["consumers", "drain", "any-consumer"], True, "403"),
        (["consumers", "resume", "any-consumer"], True, "403"),
        (["consumers", "drain", "no-such-consumer"], False, "404"),
        (["consumers", "resume", "no-such-consumer"], False, "404"),
    ],
)
def test_infer_consumers_failures_are_one_line_and_exit_1(
    public_url: str,
    user_key: str,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    as_user: bool,
    expected: str,
) -> None:
    token = ["--token", user_key] if as_user else []
    assert run(public_url, *token, *argv) == 1
    captured = capsys.readouterr()
    assert expected in _error_line(captured.err)
    assert captured.out == ""


def test_infer_consumers_usage(public_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run(public_url, "consumers", "drain")
    assert exited.value.code == 2
    assert "--help" in _error_line(capsys.readouterr().err)
