"""The `infer` command line against a real public API and private API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from inference_client.cli import main
from inference_client.client import InferenceClient
from inference_server.contract import TASK_UID_RE, TaskStatus
from tests.helpers import make_zip
from tests.inference_client.tables import parse_table
from tests.public_api.stack import BASE_IMAGE_TAG, ConsumerDriver, unique_id

# No test in this module registers a consumer, so a GPU task's reason to wait is known exactly.
NO_GPU_CONSUMER = "needs a GPU; no GPU consumer is registered"
LIST_COLUMNS = ["UID", "STATUS", "MODEL", "CREATED", "WAITING"]
MODEL_COLUMNS = ["ID", "CONTAINER TAG", "GPU", "MODEL ZIP", "DESCRIPTION"]

INFER = str(Path(sys.executable).with_name("infer"))


def run(public_url: str, *argv: str) -> int:
    return main(["--url", public_url, *argv])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "case"
    (path / "dicom").mkdir(parents=True)
    (path / "dicom" / "1.dcm").write_bytes(b"DICM")
    return path


@pytest.fixture(scope="module")
def gpu_model_id(public_url: str) -> str:
    with InferenceClient(public_url) as client:
        return client.add_model(BASE_IMAGE_TAG, unique_id(), "needs a GPU", use_gpu=True).human_readable_id


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("infer: error: ")
    return lines[0]


def test_models_add_and_list(public_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model_id = unique_id()
    weights = tmp_path / "weights.zip"
    weights.write_bytes(make_zip({"w.bin": b"w"}))
    code = run(
        public_url, "models", "add", "--container-tag", "inference-server/base:bookworm",
        "--id", model_id, "--description", "cli model", "--model-zip", str(weights),
    )  # fmt: skip
    assert code == 0
    added = json.loads(capsys.readouterr().out)
    assert added["human_readable_id"] == model_id
    assert added["model_available"] is True
    assert run(public_url, "models", "list") == 0
    rows = {row["ID"]: row for row in parse_table(capsys.readouterr().out, MODEL_COLUMNS)}
    assert rows[model_id]["GPU"] == "no"
    assert rows[model_id]["MODEL ZIP"] == "yes"
    assert rows[model_id]["DESCRIPTION"] == "cli model"
    assert run(public_url, "models", "list", "--json") == 0
    assert model_id in {m["human_readable_id"] for m in json.loads(capsys.readouterr().out)}


def test_submit_status_logs_get_delete(
    public_url: str,
    model_id: str,
    folder: Path,
    consumer: ConsumerDriver,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run(public_url, "submit", model_id, str(folder), "--priority", "4") == 0
    uid = capsys.readouterr().out.strip()
    assert TASK_UID_RE.match(uid)
    assert run(public_url, "status", uid) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == TaskStatus.PENDING and status["priority"] == 4

    assert run(public_url, "get", uid) == 1
    assert "551" in _one_error_line(capsys.readouterr().err)

    consumer.run_to_finish(uid, make_zip({"out/labels.txt": b"liver"}), logs="inference done\n")
    assert run(public_url, "logs", uid) == 0
    assert capsys.readouterr().out == "inference done\n"

    monkeypatch.chdir(tmp_path)
    assert run(public_url, "get", uid) == 0
    assert (tmp_path / f"{uid}.zip").is_file()
    assert run(public_url, "get", uid, "-o", str(tmp_path / "named.zip")) == 0
    assert (tmp_path / "named.zip").is_file()
    assert run(public_url, "get", uid, "-o", str(tmp_path / "unpacked") + "/") == 0
    assert (tmp_path / "unpacked" / "out" / "labels.txt").read_text() == "liver"
    existing = tmp_path / "existing"
    existing.mkdir()
    assert run(public_url, "get", uid, "-o", str(existing)) == 0
    assert (existing / "out" / "labels.txt").read_text() == "liver"
    capsys.readouterr()

    assert run(public_url, "delete", uid) == 0
    assert json.loads(capsys.readouterr().out)["status"] == TaskStatus.DELETED
    assert run(public_url, "get", uid) == 1
    assert "554" in _one_error_line(capsys.readouterr().err)


def test_list(public_url: str, model_id: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(public_url, "submit", model_id, str(folder)) == 0
    uid = capsys.readouterr().out.strip()
    assert run(public_url, "list") == 0
    newest = parse_table(capsys.readouterr().out, LIST_COLUMNS)[0]
    assert (newest["UID"], newest["STATUS"], newest["MODEL"]) == (uid, "pending", model_id)
    assert run(public_url, "list", "--status", "pending", "--json", "--limit", "5") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["uid"] == uid and len(listed) <= 5
    with pytest.raises(SystemExit):
        run(public_url, "list", "--limit", "0")
    assert "1-1000" in _one_error_line(capsys.readouterr().err)


def test_cancel(public_url: str, model_id: str, folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(public_url, "submit", model_id, str(folder)) == 0
    uid = capsys.readouterr().out.strip()
    assert run(public_url, "cancel", uid) == 0
    assert json.loads(capsys.readouterr().out)["status"] == TaskStatus.CANCELLED


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["submit", "no-such-model", "{folder}"], "404"),
        (["submit", "any-model", "{folder}/missing"], "no such file or folder"),
        (["status", "not a uid"], "422"),
        (["logs", "0123456789abcdef0123456789abcdef"], "404"),
    ],
)
def test_failures_are_one_line_and_exit_1(
    public_url: str, folder: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    assert run(public_url, *(arg.format(folder=folder) for arg in argv)) == 1
    assert expected in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "argv",
    [["submit", "m", "{folder}", "--priority", "12"], ["frobnicate"], ["submit"], ["models"]],
)
def test_usage_errors_are_one_line_and_exit_2(
    public_url: str, folder: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        run(public_url, *(arg.format(folder=folder) for arg in argv))
    assert exited.value.code == 2
    assert "--help" in _one_error_line(capsys.readouterr().err)


def test_installed_infer_submit_wait_downloads_the_output(
    public_url: str, model_id: str, folder: Path, consumer: ConsumerDriver, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    process = subprocess.Popen(
        [INFER, "--url", public_url, "submit", model_id, str(folder), "--wait", "-o", f"{out}/",
         "--poll-interval", "0.1", "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None
    uid = process.stdout.readline().strip()  # printed before waiting, so a script can keep it
    assert TASK_UID_RE.match(uid), uid
    consumer.run_to_finish(uid, make_zip({"report.txt": b"all good"}))
    _stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert (out / "report.txt").read_text() == "all good"
    assert "Traceback" not in stderr


def test_installed_infer_submit_wait_on_failed_task_exits_nonzero(
    public_url: str, model_id: str, folder: Path, consumer: ConsumerDriver
) -> None:
    process = subprocess.Popen(
        [INFER, "--url", public_url, "submit", model_id, str(folder), "--wait", "--poll-interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    uid = process.stdout.readline().strip()
    consumer.claim(uid)
    consumer.fail(uid, "segmentation crashed")
    _stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    # The lines before the error report each change of the task while it was waited for.
    *changes, last = stderr.splitlines()
    assert changes and all(line.startswith(f"infer: task {uid} ") for line in changes), stderr
    line = _one_error_line(last)
    assert "failed" in line and "segmentation crashed" in line


def test_installed_infer_unreachable_server_is_one_line() -> None:
    result = subprocess.run(
        [INFER, "--url", "http://127.0.0.1:9", "models", "list"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "cannot connect" in _one_error_line(result.stderr)
    assert result.stdout == ""


def test_models_add_with_gpu_memory_cpus_and_memory(
    public_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    packed, whole_gpu = unique_id(), unique_id()
    code = run(
        public_url, "models", "add", "--container-tag", BASE_IMAGE_TAG, "--id", packed,
        "--description", "packed", "--gpu-memory-mb", "8000", "--cpus", "1.5", "--memory-mb", "2048",
    )  # fmt: skip
    assert code == 0
    added = json.loads(capsys.readouterr().out)
    # --gpu-memory-mb alone makes a GPU model: the memory means nothing without a GPU.
    assert (added["use_gpu"], added["gpu_memory_mb"], added["cpus"], added["memory_mb"]) == (
        True,
        8000,
        1.5,
        2048,
    )
    assert run(public_url, "models", "add", "--container-tag", BASE_IMAGE_TAG, "--id", whole_gpu,
               "--description", "whole GPU", "--gpu") == 0  # fmt: skip
    capsys.readouterr()
    assert run(public_url, "models", "list") == 0
    rows = {row["ID"]: row for row in parse_table(capsys.readouterr().out, MODEL_COLUMNS)}
    assert rows[packed]["GPU"] == "yes (8000 MiB)"
    assert rows[whole_gpu]["GPU"] == "yes"
    assert rows[packed]["DESCRIPTION"] == "packed"
    with pytest.raises(SystemExit):
        run(public_url, "models", "add", "--container-tag", BASE_IMAGE_TAG, "--id", unique_id(),
            "--description", "d", "--gpu-memory-mb", "0")  # fmt: skip
    assert "more than 0" in _one_error_line(capsys.readouterr().err)


def test_list_shows_why_pending_tasks_wait(
    public_url: str, model_id: str, gpu_model_id: str, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(public_url, "submit", model_id, str(folder)) == 0
    cancelled = capsys.readouterr().out.strip()
    assert run(public_url, "cancel", cancelled) == 0
    assert run(public_url, "submit", gpu_model_id, str(folder)) == 0
    waiting = capsys.readouterr().out.strip().splitlines()[-1]
    assert run(public_url, "list") == 0
    rows = {row["UID"]: row for row in parse_table(capsys.readouterr().out, LIST_COLUMNS)}
    assert (rows[waiting]["STATUS"], rows[waiting]["WAITING"]) == ("pending", NO_GPU_CONSUMER)
    assert (rows[cancelled]["STATUS"], rows[cancelled]["WAITING"]) == ("cancelled", "")
    assert run(public_url, "list", "--json") == 0
    listed = {task["uid"]: task for task in json.loads(capsys.readouterr().out)}
    assert listed[waiting]["waiting_reason"] == NO_GPU_CONSUMER
    assert listed[cancelled]["waiting_reason"] is None


def test_installed_infer_submit_wait_prints_each_change(
    public_url: str, gpu_model_id: str, folder: Path, consumer: ConsumerDriver
) -> None:
    process = subprocess.Popen(
        [INFER, "--url", public_url, "submit", gpu_model_id, str(folder), "--wait",
         "--poll-interval", "0.05", "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    uid = process.stdout.readline().strip()
    assert TASK_UID_RE.match(uid), uid
    # Each line is read before the task moves on, so every change is seen by a poll.
    assert process.stderr.readline() == f"infer: task {uid} pending: {NO_GPU_CONSUMER}\n"
    consumer.claim(uid)
    assert process.stderr.readline() == f"infer: task {uid} running\n"
    consumer.fail(uid, "out of GPU memory")
    _stdout, rest = process.communicate(timeout=60)
    assert process.returncode == 1
    assert rest.splitlines() == [
        f"infer: task {uid} failed",
        f"infer: error: task {uid} failed: out of GPU memory",
    ]
