"""Submitting, reading, cancelling and deleting tasks through the HTTP routes."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

from inference_server.capacity import NEEDS_HEADER_GPU
from inference_server.contract import SERVICE_TOKEN_HEADER, FailureCategory, TaskStatus, broker_priority
from tests.private_api.helpers import (
    as_consumer,
    claim,
    make_zip,
    register_consumer,
    register_model,
    row_counts,
    stored_files,
    submit,
    submit_ok,
    task_row,
)


def test_submit_stores_row_and_blob_then_publishes_persistent_uid(client, settings, queue):
    register_model(client)
    data = make_zip({"case1/scan.nii": b"\x00\x01" * 5000, "notes.txt": b"hello"})

    task = submit_ok(client, data=data, priority=7)

    assert task["status"] == TaskStatus.PENDING
    assert task["model_human_readable_id"] == "seg-model"
    assert task["priority"] == 7
    assert task["input_sha256"] == hashlib.sha256(data).hexdigest()
    assert len(task["uid"]) == 32  # token_urlsafe(24): 192 random bits
    row = task_row(client, task["uid"])
    assert row.published_at is not None
    assert row.input_blob_key is not None
    assert (settings.blob_dir / row.input_blob_key).read_bytes() == data

    body, properties = queue.get()
    assert body == task["uid"]
    assert properties.delivery_mode == 2
    assert properties.priority == broker_priority(7, retry=False) == 14
    assert properties.headers == {NEEDS_HEADER_GPU: 0}
    assert queue.count() == 0


def test_get_task_and_download_its_input(client):
    register_model(client)
    data = make_zip({"a.txt": b"A" * 3000})
    uid = submit_ok(client, data=data)["uid"]

    got = client.get(f"/tasks/{uid}")
    assert got.status_code == 200
    assert got.json()["uid"] == uid
    assert got.json()["output_present"] is False

    download = client.get(f"/tasks/{uid}/input")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/zip"
    assert download.content == data


def test_unknown_task_is_404_everywhere(client):
    for path in ("/tasks/nope-nope-nope-nope", "/tasks/nope-nope-nope-nope/input", "/tasks/x/output"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "unknown" in response.json()["detail"]
    assert client.post("/tasks/nope-nope-nope-nope/cancel").status_code == 404
    assert client.delete("/tasks/nope-nope-nope-nope").status_code == 404


def test_output_of_unfinished_task_is_409(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    response = client.get(f"/tasks/{uid}/output")
    assert response.status_code == 409
    assert "pending" in response.json()["detail"]


def test_logs_are_empty_until_uploaded(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    response = client.get(f"/tasks/{uid}/logs")
    assert response.status_code == 200
    assert response.text == ""
    assert response.headers["content-type"].startswith("text/plain")


def test_cancel_pending_task_then_it_cannot_be_claimed(client):
    register_model(client)
    uid = submit_ok(client)["uid"]

    cancelled = client.post(f"/tasks/{uid}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == TaskStatus.CANCELLED
    assert cancelled.json()["finished_at"] is not None
    assert cancelled.json()["failure"] == FailureCategory.CANCELLED

    again = client.post(f"/tasks/{uid}/cancel")
    assert again.status_code == 200
    assert again.json()["status"] == TaskStatus.CANCELLED

    refused = claim(client, uid)
    assert refused.status_code == 409
    assert "cancelled" in refused.json()["detail"]


def test_delete_removes_every_blob_and_hides_the_task(client, settings):
    register_model(client)
    uid = submit_ok(client)["uid"]
    assert claim(client, uid).status_code == 200
    consumer = as_consumer("consumer-a")
    assert client.put(f"/tasks/{uid}/logs", content=b"log line\n", headers=consumer).status_code == 204
    output = client.post(
        f"/tasks/{uid}/output", files={"zip_file": ("o.zip", make_zip({"out.txt": b"o"}))}, headers=consumer
    )
    assert output.status_code == 200, output.text
    assert len(stored_files(settings)) == 3

    deleted = client.delete(f"/tasks/{uid}")

    assert deleted.status_code == 200
    assert deleted.json()["status"] == TaskStatus.DELETED
    assert deleted.json()["output_present"] is False
    assert stored_files(settings) == []
    assert client.get(f"/tasks/{uid}").status_code == 404
    assert client.get(f"/tasks/{uid}/output").status_code == 404
    assert client.delete(f"/tasks/{uid}").status_code == 404
    heartbeat = client.post(f"/tasks/{uid}/heartbeat", headers=consumer)
    assert heartbeat.json() == {"keep_running": False, "status": "deleted"}


def test_delete_running_task_tells_its_consumer_to_stop(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    assert claim(client, uid).status_code == 200
    assert client.delete(f"/tasks/{uid}").status_code == 200
    late_output = client.post(
        f"/tasks/{uid}/output", files={"zip_file": ("o.zip", make_zip())}, headers=as_consumer("consumer-a")
    )
    assert late_output.status_code == 409
    assert row_counts(client) == (1, 1)


def test_service_token_is_required(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    wrong = {SERVICE_TOKEN_HEADER: "wrong-token-wrong-token"}
    requests = [
        ("GET", "/models", {}),
        ("GET", f"/tasks/{uid}", {}),
        ("POST", "/tasks", {"params": {"model_human_readable_id": "seg-model"}}),
        ("POST", f"/tasks/{uid}/claim", {"headers": as_consumer("c")}),
        ("GET", "/health/ready", {}),
        ("GET", "/metrics", {}),
    ]
    for method, path, extra in requests:
        headers = extra.pop("headers", {})
        missing = client.request(method, path, headers={SERVICE_TOKEN_HEADER: "", **headers}, **extra)
        assert missing.status_code == 401, (method, path)
        bad = client.request(method, path, headers={**wrong, **headers}, **extra)
        assert bad.status_code == 401, (method, path)
        assert "X-Service-Token" in bad.json()["detail"]
    # The claim above was refused, so the task is untouched.
    assert client.get(f"/tasks/{uid}").json()["status"] == TaskStatus.PENDING
    assert client.get("/health/live", headers={SERVICE_TOKEN_HEADER: ""}).status_code == 200


def test_metrics_count_tasks_and_submissions(client):
    register_model(client)
    submit_ok(client)
    uid = submit_ok(client)["uid"]
    client.post(f"/tasks/{uid}/cancel")

    text = client.get("/metrics").text

    assert 'inference_tasks_in_status{status="pending"} 1.0' in text
    assert 'inference_tasks_in_status{status="cancelled"} 1.0' in text
    assert 'inference_task_submissions_total{model="seg-model"} 2.0' in text


def test_ready_reports_database_and_rabbitmq(client):
    response = client.get("/health/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "rabbitmq": "ok"}}


def test_ready_is_503_without_rabbitmq(start_app, make_settings):
    client = start_app(make_settings(rabbitmq_url="amqp://guest:guest@127.0.0.1:1/%2F"))
    response = client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "ok"
    assert response.json()["checks"]["rabbitmq"] != "ok"


def test_submit_while_rabbitmq_down_still_accepts(start_app, make_settings):
    client = start_app(make_settings(rabbitmq_url="amqp://guest:guest@127.0.0.1:1/%2F"))
    register_model(client)
    task = submit_ok(client)
    assert task["status"] == TaskStatus.PENDING
    assert task_row(client, task["uid"]).published_at is None
    assert submit(client).status_code == 201


def metric_value(text: str, sample: str) -> float:
    """The value of one exposition line, e.g. `inference_tasks_total{model="m",status="failed"}`."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split(" ")[1])
    return 0.0


def test_platform_metrics_move_as_a_task_runs_and_fails(client):
    register_model(client)
    model = 'model="seg-model"'
    before = client.get("/metrics").text
    assert "# TYPE inference_tasks_total counter" in before
    assert "# TYPE inference_task_queue_seconds histogram" in before
    assert "# TYPE inference_task_run_seconds histogram" in before
    assert 'inference_queue_depth{queue="cpu"} 0.0' in before

    uid = submit_ok(client)["uid"]
    queued = client.get("/metrics").text
    assert metric_value(queued, f'inference_tasks_total{{{model},status="submitted"}}') == 1
    assert 'inference_queue_depth{queue="cpu"} 1.0' in queued

    register_consumer(client, "consumer-a")
    assert claim(client, uid).status_code == 200
    beat = client.post(
        "/consumers/consumer-a/heartbeat",
        json={
            "running_tasks": [uid],
            "gpu_readings": [{"index": 0, "memory_used_bytes": 5, "utilization_ratio": 0.5}],
        },
        headers=as_consumer("consumer-a"),
    )
    assert beat.status_code == 200, beat.text
    started = datetime.now(UTC)
    failure = {
        "error": "exit code 3",
        "exit_code": 3,
        "failure": FailureCategory.MODEL_EXIT_CODE,
        "run_started_at": started.isoformat(),
        "run_finished_at": (started + timedelta(seconds=2)).isoformat(),
    }
    failed = client.post(f"/tasks/{uid}/fail", json=failure, headers=as_consumer("consumer-a"))
    assert failed.status_code == 200, failed.text

    after = client.get("/metrics").text
    assert metric_value(after, f'inference_tasks_total{{{model},status="failed"}}') == 1
    assert metric_value(after, f"inference_task_queue_seconds_count{{{model}}}") == 1
    assert metric_value(after, f'inference_task_run_seconds_count{{{model},outcome="failed"}}') == 1
    assert metric_value(after, f'inference_task_run_seconds_bucket{{le="1.0",{model},outcome="failed"}}') == 0
    assert metric_value(after, f'inference_task_run_seconds_bucket{{le="2.5",{model},outcome="failed"}}') == 1
    assert 'inference_queue_depth{queue="cpu"} 0.0' in after
    assert 'inference_consumer_running_tasks{consumer="consumer-a"} 1.0' in after
    assert 'inference_gpu_memory_used_bytes{consumer="consumer-a",gpu="0"} 5.0' in after


def test_platform_counters_are_the_same_from_every_process_and_after_a_restart(start_app, settings):
    """Read from the database, not counted in memory: a second private API process (or this one
    restarted) reports what the first one saw."""
    first = start_app(settings)
    register_model(first)
    uid = submit_ok(first)["uid"]
    first.post(f"/tasks/{uid}/cancel")
    second = start_app(settings)
    for client in (first, second):
        text = client.get("/metrics").text
        assert metric_value(text, 'inference_tasks_total{model="seg-model",status="submitted"}') == 1
        assert metric_value(text, 'inference_tasks_total{model="seg-model",status="cancelled"}') == 1
