"""A real private API (its own create_app, migrated SQLite, real RabbitMQ queue) in a uvicorn
thread, plus the calls the consumer tests make on it as an operator and as a user would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pika
import pika.exceptions

from inference_server.contract import (
    SERVICE_TOKEN_HEADER,
    TASK_QUEUE_ARGUMENTS,
    ZIP_MEDIA_TYPE,
    ApiKeyRole,
    ModelPublic,
    Principal,
    PrivateRoutes,
    TaskPublic,
    TaskSubmitFields,
    encode_acting_headers,
)
from private_api.config import PrivateSettings
from private_api.db import upgrade_database
from private_api.main import create_app
from tests.helpers import ServerThread, make_zip, register_model_private, zip_members

SERVICE_TOKEN = "consumer-tests-service-token-0123456789"
# What the consumers under test present, as deployed: the consumer role's own token, which
# opens only the routes running a task needs. SERVICE_TOKEN (full access) is the harness's.
CONSUMER_TOKEN = "consumer-tests-consumer-token-0123456789"


def queue_depth(rabbitmq_url: str, queue_name: str) -> int:
    """Ready messages on the queue (unacked ones are not counted while their consumer lives)."""
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        method = connection.channel().queue_declare(queue_name, passive=True)
        return method.method.message_count
    finally:
        connection.close()


def consumers_on(rabbitmq_url: str, queue_name: str) -> int:
    """Subscriptions on the queue; 0 while it is not declared yet."""
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        return connection.channel().queue_declare(queue_name, passive=True).method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if connection.is_open:
            connection.close()


def publish_uid(
    rabbitmq_url: str, queue_name: str, uid: str, headers: dict[str, Any] | None = None, priority: int = 0
) -> None:
    """Put a task id on a queue as the private API would (or would not: any headers go)."""
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue_name, durable=True, arguments=TASK_QUEUE_ARGUMENTS)
        properties = pika.BasicProperties(delivery_mode=2, headers=headers, priority=priority)
        channel.basic_publish("", queue_name, uid.encode(), properties)
    finally:
        connection.close()


class PrivateApiServer:
    """The private API on a free port (tests.helpers.ServerThread); `stop()` shuts it down."""

    def __init__(self, *, data_dir: Path, database_url: str, rabbitmq_url: str, queue_name: str) -> None:
        upgrade_database(database_url)
        self.settings = PrivateSettings(
            database_url=database_url,
            data_dir=data_dir,
            rabbitmq_url=rabbitmq_url,
            queue_name=queue_name,
            service_token=SERVICE_TOKEN,
            consumer_token=CONSUMER_TOKEN,
            lease_seconds=30,
        )
        self.server = ServerThread(create_app(self.settings), name="private-api")
        self._http: httpx.Client | None = None

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def http(self) -> httpx.Client:
        """The harness's own client, with the full-access service token."""
        if self._http is None:
            raise RuntimeError("the private API is not started")
        return self._http

    def start(self, timeout_s: float = 30.0) -> PrivateApiServer:
        self.server.start(timeout_s)
        self._http = httpx.Client(
            base_url=self.url, headers={SERVICE_TOKEN_HEADER: SERVICE_TOKEN}, timeout=60
        )
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
        self.server.stop()

    # --- operator and user calls -------------------------------------------------------------

    def register_model(
        self, human_readable_id: str, container_tag: str, *, model_zip: bytes | None = None, **params: Any
    ) -> ModelPublic:
        registered = register_model_private(
            self.http,
            human_readable_id,
            container_tag,
            model_zip=model_zip,
            description=f"consumer test model {human_readable_id}",
            **params,
        )
        return ModelPublic.model_validate(registered)

    def submit(
        self,
        human_readable_id: str,
        files: dict[str, bytes] | bytes | None,
        priority: int = 0,
        *,
        params: dict[str, Any] | None = None,
        input_from: str | None = None,
        model_from: str | None = None,
        cache: bool | None = None,
        owner: str | None = None,
    ) -> TaskPublic:
        """Submit a task: an input zip of `files` (or the zip itself, when bytes: a zip made
        again differs in its timestamps), or none with `input_from`; the extras as the form's
        text fields (multipart, like the zip). `owner`: submitted for that user key, as the
        public API relays it (the result cache answers a key only from its own results)."""
        form: dict[str, Any] = {}
        if files is not None:
            zip_bytes = files if isinstance(files, bytes) else make_zip(files)
            form[TaskSubmitFields.ZIP_FILE] = ("input.zip", zip_bytes, ZIP_MEDIA_TYPE)
        for field, value in (
            (TaskSubmitFields.PARAMS, None if params is None else json.dumps(params)),
            (TaskSubmitFields.INPUT_FROM, input_from),
            (TaskSubmitFields.MODEL_FROM, model_from),
        ):
            if value is not None:
                form[field] = (None, value)  # no file name: a plain form field
        query: dict[str, Any] = {"model_human_readable_id": human_readable_id, "priority": priority}
        if cache is not None:
            query[TaskSubmitFields.CACHE_QUERY] = str(cache).lower()
        acting = encode_acting_headers(Principal(name=owner, role=ApiKeyRole.USER)) if owner else None
        response = self.http.post(PrivateRoutes.TASKS, params=query, files=form, headers=acting)
        assert response.status_code == 201, response.text
        return TaskPublic.model_validate(response.json())

    def task(self, uid: str) -> TaskPublic:
        response = self.http.get(PrivateRoutes.TASK.format(uid=uid))
        assert response.status_code == 200, response.text
        return TaskPublic.model_validate(response.json())

    def cancel(self, uid: str) -> TaskPublic:
        response = self.http.post(PrivateRoutes.TASK_CANCEL.format(uid=uid))
        assert response.status_code == 200, response.text
        return TaskPublic.model_validate(response.json())

    def output(self, uid: str) -> dict[str, bytes]:
        response = self.http.get(PrivateRoutes.TASK_OUTPUT.format(uid=uid))
        assert response.status_code == 200, response.text
        return zip_members(response.content)

    def logs(self, uid: str) -> str:
        response = self.http.get(PrivateRoutes.TASK_LOGS.format(uid=uid))
        assert response.status_code == 200, response.text
        return response.text
