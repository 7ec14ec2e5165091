"""Small builders and probes shared by the private API tests."""

from __future__ import annotations

import io
import stat
import zipfile
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pika
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func, select, update

from inference_server.contract import (
    CONSUMER_ID_HEADER,
    TASK_QUEUE_ARGUMENTS,
    ApiKeyRole,
    Principal,
    TaskQueue,
    encode_acting_headers,
)
from private_api.config import PrivateSettings
from private_api.models import Consumer, Model, Task, utcnow
from tests.helpers import make_zip as shared_make_zip
from tests.helpers import register_model_private, wait_until

T = TypeVar("T")


def make_zip(files: dict[str, bytes] | None = None) -> bytes:
    """A valid input zip; by default one small scan file."""
    return shared_make_zip(files if files is not None else {"scan.nii": b"voxels" * 100})


def zip_with_entry(info: zipfile.ZipInfo, data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(info, data)
    return buffer.getvalue()


def symlink_zip() -> bytes:
    info = zipfile.ZipInfo("link")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zip_with_entry(info, b"/etc/passwd")


def register_model(
    client: TestClient,
    hrid: str = "seg-model",
    *,
    zip_bytes: bytes | None = None,
    description: str = "a test model",
    **params: Any,
) -> dict[str, Any]:
    """register_model_private on the in-process app, with the names these tests default to."""
    return register_model_private(
        client,
        hrid,
        "inference-server/test-script:1",
        model_zip=zip_bytes,
        description=description,
        **params,
    )


def submit(
    client: TestClient,
    model: str = "seg-model",
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    **params,
) -> Response:
    """POST /tasks; `params` are query parameters, `headers` e.g. acting_as(...)."""
    files = {"zip_file": ("input.zip", make_zip() if data is None else data, "application/zip")}
    return client.post(
        "/tasks", params={"model_human_readable_id": model, **params}, files=files, headers=headers
    )


def submit_ok(
    client: TestClient,
    model: str = "seg-model",
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    **params,
) -> dict:
    response = submit(client, model, data, headers, **params)
    assert response.status_code == 201, response.text
    return response.json()


def acting_as(name: str | None, role: ApiKeyRole = ApiKeyRole.USER) -> dict[str, str]:
    """The headers the public API relays a request with: for key `name` of `role`, or for an
    anonymous caller when `name` is None (built by the contract's own encoder)."""
    return dict(encode_acting_headers(None if name is None else Principal(name=name, role=role)))


def as_consumer(name: str) -> dict[str, str]:
    return {CONSUMER_ID_HEADER: name}


def claim(client: TestClient, uid: str, consumer: str = "consumer-a") -> Response:
    return client.post(f"/tasks/{uid}/claim", headers=as_consumer(consumer))


def stored_files(settings: PrivateSettings) -> list[Path]:
    """Every file in the blob store, temp files of unfinished uploads included."""
    return sorted(path for path in settings.blob_dir.rglob("*") if path.is_file())


def row_counts(client: TestClient) -> tuple[int, int]:
    with client.app.state.session_factory() as session:
        return (
            session.scalar(select(func.count()).select_from(Model)),
            session.scalar(select(func.count()).select_from(Task)),
        )


def task_row(client: TestClient, uid: str) -> Task:
    with client.app.state.session_factory() as session:
        task = session.scalars(select(Task).where(Task.uid == uid)).one()
        session.expunge(task)
        return task


class QueueProbe:
    """Reads what the private API published to one class's queue (CPU by default), straight from
    RabbitMQ; `base` is the IS_QUEUE_NAME the private API was given."""

    def __init__(self, url: str, base: str, task_queue: TaskQueue = TaskQueue.CPU) -> None:
        self._connection = pika.BlockingConnection(pika.URLParameters(url))
        self._channel = self._connection.channel()
        queue = task_queue.queue_name(base)
        # Same arguments as the publisher, so whoever declares first, both agree.
        self._channel.queue_declare(queue, durable=True, arguments=TASK_QUEUE_ARGUMENTS)
        self.queue = queue

    def get(self, timeout: float = 5.0) -> tuple[str, pika.BasicProperties]:
        def fetch():
            method, properties, body = self._channel.basic_get(self.queue, auto_ack=True)
            return None if method is None else (body.decode(), properties)

        return wait_until(fetch, timeout=timeout, what=f"a message on {self.queue}")

    def count(self) -> int:
        return self._channel.queue_declare(
            self.queue, durable=True, arguments=TASK_QUEUE_ARGUMENTS, passive=True
        ).method.message_count

    def close(self) -> None:
        self._connection.close()


def gpu(memory_mb: int, index: int = 0) -> dict[str, Any]:
    """One GPU as a consumer declares it (simulated: these tests have none)."""
    return {"index": index, "uuid": f"GPU-test-{index}", "memory_total_mb": memory_mb, "simulated": True}


def consumer_body(*, gpu_memory_mb: int | None = None, **fields: Any) -> dict[str, Any]:
    """A ConsumerRegistration body: a CPU consumer, or one owning a GPU of `gpu_memory_mb` that
    takes only GPU tasks."""
    body: dict[str, Any] = {
        "host": "host-1",
        "version": "1.3.0",
        "cpus": 8,
        "memory_mb": 32768,
        "max_tasks": 4,
    }
    if gpu_memory_mb is not None:
        body |= {"gpus": [gpu(gpu_memory_mb)], "takes_gpu_tasks": True, "takes_cpu_tasks": False}
    return body | fields


def register_consumer(
    client: TestClient, consumer_id: str, *, gpu_memory_mb: int | None = None, **fields: Any
) -> dict[str, Any]:
    response = client.put(
        f"/consumers/{consumer_id}", json=consumer_body(gpu_memory_mb=gpu_memory_mb, **fields)
    )
    assert response.status_code == 200, response.text
    return response.json()


def age_consumer(client: TestClient, consumer_id: str, seconds: float) -> None:
    """Make the consumer last heard from `seconds` ago, as if it had stopped heartbeating."""
    with client.app.state.session_factory() as session:
        session.execute(
            update(Consumer)
            .where(Consumer.id == consumer_id)
            .values(last_seen_at=utcnow() - timedelta(seconds=seconds))
        )
        session.commit()
