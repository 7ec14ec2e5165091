"""InferenceClient against a real public API and private API."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from inference_client.client import (
    CHUNK_SIZE,
    InferenceClient,
    InferenceClientError,
    multipart_file_body,
    resolve_token,
)
from inference_server.contract import TaskPublic, TaskStatus
from tests.helpers import make_zip, wait_until, zip_members
from tests.inference_client.conftest import RegisterConsumer
from tests.public_api.stack import BASE_IMAGE_TAG, ConsumerDriver, unique_id


@pytest.fixture
def client(public_url: str) -> Iterator[InferenceClient]:
    with InferenceClient(public_url, timeout=30) as client:
        yield client


@pytest.fixture
def input_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "scans"
    (folder / "series-1").mkdir(parents=True)
    (folder / "series-1" / "slice.txt").write_text("slice one")
    (folder / "notes.txt").write_text("notes")
    return folder


def test_add_and_list_models_with_a_model_folder(client: InferenceClient, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "w.bin").write_bytes(b"\x00\x01" * 100)
    model_id = unique_id()
    model = client.add_model(BASE_IMAGE_TAG, model_id, "described", model_zip=weights, memory_mb=256)
    assert model.human_readable_id == model_id
    assert model.model_available is True
    assert model.memory_mb == 256
    assert model_id in {m.human_readable_id for m in client.list_models()}


def test_submit_folder_then_status_wait_logs_download(
    client: InferenceClient, model_id: str, input_folder: Path, consumer: ConsumerDriver, tmp_path: Path
) -> None:
    uid = client.submit(model_id, input_folder, priority=3)
    task = client.status(uid)
    assert task.status == TaskStatus.PENDING
    assert task.priority == 3
    # The uploaded zip is the folder, structure kept: check via the private API's input route.
    stored_input = consumer.http.get(f"/tasks/{uid}/input")
    assert stored_input.status_code == 200
    assert zip_members(stored_input.content) == {"series-1/slice.txt": b"slice one", "notes.txt": b"notes"}

    with pytest.raises(InferenceClientError) as pending:
        client.download(uid, tmp_path / "early.zip")
    assert pending.value.status_code == 551
    assert "not finished" in str(pending.value)
    assert not (tmp_path / "early.zip").exists()
    assert not list(tmp_path.glob(".early.zip*"))
    with pytest.raises(InferenceClientError, match="still pending"):
        client.wait(uid, poll_interval=0.05, timeout=0.3)

    consumer.run_to_finish(uid, make_zip({"seg/mask.txt": b"mask"}), logs="ran fine\n")
    done = client.wait(uid, poll_interval=0.05, timeout=30)
    assert done.status == TaskStatus.FINISHED
    assert client.logs(uid) == "ran fine\n"
    saved = client.download(uid, tmp_path / "out.zip")
    assert zip_members(saved.read_bytes()) == {"seg/mask.txt": b"mask"}

    deleted = client.delete(uid)
    assert deleted.status == TaskStatus.DELETED
    with pytest.raises(InferenceClientError) as gone:
        client.download(uid, tmp_path / "again.zip")
    assert gone.value.status_code == 554
    assert "unknown or was deleted" in str(gone.value)


def test_submit_a_zip_file_with_progress_bar(
    client: InferenceClient, model_id: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "input.zip"
    archive.write_bytes(make_zip({"x.txt": b"x" * 10_000}))
    uid = client.submit(model_id, archive, progress=True)
    assert client.status(uid).status == TaskStatus.PENDING
    assert "upload input.zip" in capsys.readouterr().err


def test_cancel_and_failed_task_errors(
    client: InferenceClient, model_id: str, input_folder: Path, consumer: ConsumerDriver, tmp_path: Path
) -> None:
    cancelled = client.cancel(client.submit(model_id, input_folder))
    assert cancelled.status == TaskStatus.CANCELLED
    uid = client.submit(model_id, input_folder)
    consumer.claim(uid)
    consumer.fail(uid, "container exited with code 2")
    assert client.wait(uid, poll_interval=0.05, timeout=10).status == TaskStatus.FAILED
    with pytest.raises(InferenceClientError) as failed:
        client.download(uid, tmp_path / "out.zip")
    assert failed.value.status_code == 552
    assert "exited with code 2" in failed.value.detail


def test_errors_carry_status_and_detail(client: InferenceClient, input_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(InferenceClientError) as unknown_model:
        client.submit("no-such-model", input_folder)
    assert unknown_model.value.status_code == 404
    assert "no-such-model" in unknown_model.value.detail
    with pytest.raises(InferenceClientError) as malformed:
        client.status("bad uid")
    assert malformed.value.status_code == 422
    with pytest.raises(InferenceClientError, match="no such file or folder"):
        client.submit("any", tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InferenceClientError, match="holds no files"):
        client.submit("any", empty)
    deep = tmp_path / "deep"
    (deep / "/".join(["d"] * 70)).mkdir(parents=True)
    (deep / "/".join(["d"] * 70) / "scan.nii").write_bytes(b"x")
    with pytest.raises(InferenceClientError, match=r"cannot be sent as a zip.*levels deep") as refused:
        client.submit("any", deep)
    assert refused.value.status_code is None  # refused before anything was sent


def test_unreachable_server_is_a_client_error_without_status() -> None:
    with (
        InferenceClient("http://127.0.0.1:9", timeout=5) as client,
        pytest.raises(InferenceClientError) as error,
    ):
        client.list_models()
    assert error.value.status_code is None
    assert "cannot connect" in str(error.value)


def test_token_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IS_API_TOKEN", raising=False)
    monkeypatch.setenv("IS_DATA_DIR", str(tmp_path))
    assert resolve_token() is None
    (tmp_path / "operator.key").write_text("from-file\n")
    assert resolve_token() == "from-file"
    monkeypatch.setenv("IS_API_TOKEN", "from-env")
    assert resolve_token() == "from-env"
    assert resolve_token("from-argument") == "from-argument"
    with InferenceClient("http://127.0.0.1:9") as client:
        assert client._http.headers["Authorization"] == "Bearer from-env"


def test_multipart_body_streams_in_chunks_with_exact_length(tmp_path: Path) -> None:
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("blob.bin", b"\x07" * (3 * CHUNK_SIZE))
    seen: list[int] = []
    headers, body = multipart_file_body(path, field="zip_file", on_chunk=seen.append)
    parts = list(body)
    assert max(len(part) for part in parts) <= CHUNK_SIZE
    assert sum(seen) == path.stat().st_size
    assert int(headers["Content-Length"]) == sum(len(part) for part in parts)
    joined = b"".join(parts)
    assert b'name="zip_file"; filename="data.zip"' in joined
    assert path.read_bytes() in joined


def test_list_tasks_newest_first_with_a_status_filter(
    client: InferenceClient, model_id: str, input_folder: Path
) -> None:
    first = client.submit(model_id, input_folder)
    second = client.submit(model_id, input_folder)
    client.cancel(first)
    listed = [task.uid for task in client.list_tasks(limit=1000)]
    assert listed.index(second) < listed.index(first)
    cancelled = client.list_tasks(status=TaskStatus.CANCELLED, limit=1000)
    assert first in {task.uid for task in cancelled}
    assert {task.status for task in cancelled} == {TaskStatus.CANCELLED}
    assert len(client.list_tasks(limit=1)) == 1


def test_wait_calls_on_change_once_per_status_or_waiting_reason(
    client: InferenceClient,
    public_url: str,
    input_folder: Path,
    consumer: ConsumerDriver,
    register_consumer: RegisterConsumer,
) -> None:
    # Only a CPU consumer at first: what the GPU task waits for is known exactly, and no test in
    # this module registers a GPU consumer that could make it runnable.
    register_consumer()
    model = client.add_model(BASE_IMAGE_TAG, unique_id(), "big GPU model", use_gpu=True, gpu_memory_mb=30000)
    uid = client.submit(model.human_readable_id, input_folder)
    changes: list[tuple[TaskStatus, str | None]] = []

    def record(task: TaskPublic) -> None:
        assert task.uid == uid
        changes.append((task.status, task.waiting_reason))

    # The waiter polls with a client of its own, as another process would.
    with InferenceClient(public_url, timeout=30) as waiting_client, ThreadPoolExecutor(1) as pool:
        waited = pool.submit(waiting_client.wait, uid, poll_interval=0.02, timeout=60, on_change=record)
        try:
            wait_until(lambda: changes, what="the first status")
            assert changes == [(TaskStatus.PENDING, "needs a GPU; no GPU consumer is registered")]

            # Still pending, for another reason: polls in between report nothing new.
            register_consumer(gpu_memory_mb=24576)
            wait_until(lambda: len(changes) == 2, what="the new waiting reason")
            assert changes[1] == (
                TaskStatus.PENDING,
                "needs 30000 MiB of GPU memory; the largest GPU has 24576 MiB",
            )

            consumer.claim(uid)
            wait_until(lambda: len(changes) == 3, what="the task running")
        finally:
            # Ends the wait in the thread whether or not the steps above held.
            client.cancel(uid)
        assert waited.result(timeout=60).status == TaskStatus.CANCELLED
    assert changes == [
        (TaskStatus.PENDING, "needs a GPU; no GPU consumer is registered"),
        (TaskStatus.PENDING, "needs 30000 MiB of GPU memory; the largest GPU has 24576 MiB"),
        (TaskStatus.RUNNING, None),
        (TaskStatus.CANCELLED, None),
    ]


def test_add_model_passes_gpu_memory_and_cpu_limits(client: InferenceClient) -> None:
    model_id = unique_id()
    added = client.add_model(
        BASE_IMAGE_TAG, model_id, "packed", use_gpu=True, gpu_memory_mb=8000, cpus=2.5, memory_mb=4096
    )
    listed = {model.human_readable_id: model for model in client.list_models()}[model_id]
    for model in (added, listed):
        assert (model.use_gpu, model.gpu_memory_mb, model.cpus, model.memory_mb) == (True, 8000, 2.5, 4096)
