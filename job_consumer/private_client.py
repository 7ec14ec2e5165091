"""The consumer's only way to the data: the private API, over HTTP with the service token."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from inference_server.contract import (
    CONSUMER_ID_HEADER,
    LOG_MEDIA_TYPE,
    OUTPUT_LOG_FIELD,
    PROGRESS_MESSAGE_PARAM,
    PROGRESS_PARAM,
    SERVICE_TOKEN_HEADER,
    ZIP_MEDIA_TYPE,
    CacheAnswer,
    CacheLookup,
    ConsumerHeartbeat,
    ConsumerHeartbeatReply,
    ConsumerPublic,
    ConsumerRegistration,
    GpuReading,
    HeartbeatReply,
    ModelPublic,
    PrivateRoutes,
    RunTimes,
    TaskClaim,
    TaskFailure,
    TaskPublic,
    TaskRelease,
    error_detail,
)
from job_consumer.config import ConsumerSettings
from job_consumer.progress import Progress

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
# Answers that mean "the service is there but cannot serve now": treated like a dropped
# connection, so the caller backs off and retries instead of giving up on the task.
UNAVAILABLE_STATUSES = frozenset({502, 503, 504})


class PrivateApiUnavailable(Exception):
    """The private API could not be reached or answered 502/503/504: try again later."""


class PrivateApiHttpError(Exception):
    """The private API answered with an error status; `detail` is its explanation."""

    def __init__(self, method: str, path: str, status_code: int, detail: str) -> None:
        super().__init__(f"{method} {path} -> {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail

    @property
    def is_conflict(self) -> bool:
        """409: this consumer does not (or no longer) hold the task, or the task is already done."""
        return self.status_code == 409


class PrivateApiClient:
    """One HTTP client per consumer process; every method maps errors to the two exceptions above."""

    def __init__(
        self,
        base_url: str,
        service_token: str,
        consumer_id: str,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.consumer_id = consumer_id
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={SERVICE_TOKEN_HEADER: service_token, CONSUMER_ID_HEADER: consumer_id},
            # Read/write timeouts apply per chunk, so big streamed bodies are not cut short.
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            transport=transport,
        )

    @classmethod
    def from_settings(cls, settings: ConsumerSettings) -> PrivateApiClient:
        return cls(
            settings.private_api_url,
            settings.service_token.get_secret_value(),
            settings.consumer_id,
            connect_timeout_s=settings.http_connect_timeout_s,
            read_timeout_s=settings.http_read_timeout_s,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> PrivateApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ------------------------------------------------------------------------

    @staticmethod
    def _path(route: str, **params: str) -> str:
        return route.format(**{key: quote(value, safe="") for key, value in params.items()})

    def _check(self, method: str, path: str, response: httpx.Response) -> None:
        if not response.is_error:
            return
        detail = error_detail(response.content, fallback=response.reason_phrase)
        if response.status_code in UNAVAILABLE_STATUSES:
            raise PrivateApiUnavailable(f"{method} {path} -> {response.status_code}: {detail}")
        raise PrivateApiHttpError(method, path, response.status_code, detail)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise PrivateApiUnavailable(f"{method} {path}: {exc!r}") from exc
        self._check(method, path, response)
        return response

    def _download(self, path: str, dest: Path) -> str:
        """Stream a body into `dest` (never whole in memory); returns its sha256."""
        digest = hashlib.sha256()
        try:
            with self._client.stream("GET", path) as response:
                if response.is_error:
                    response.read()
                    self._check("GET", path, response)
                with open(dest, "wb") as sink:
                    for chunk in response.iter_bytes(CHUNK):
                        digest.update(chunk)
                        sink.write(chunk)
        except httpx.TransportError as exc:
            dest.unlink(missing_ok=True)
            raise PrivateApiUnavailable(f"GET {path}: {exc!r}") from exc
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        return digest.hexdigest()

    # --- the calls the consumer makes -------------------------------------------------------

    def claim(self, uid: str) -> TaskClaim | None:
        """Win the task; None when it is not ours to run (409: taken, done, cancelled; 404: gone)."""
        path = self._path(PrivateRoutes.TASK_CLAIM, uid=uid)
        try:
            response = self._request("POST", path)
        except PrivateApiHttpError as exc:
            if exc.status_code in (404, 409):
                log.info("task %s not claimable (%s): %s", uid, exc.status_code, exc.detail)
                return None
            raise
        return TaskClaim.model_validate(response.json())

    def heartbeat(self, uid: str) -> HeartbeatReply:
        response = self._request("POST", self._path(PrivateRoutes.TASK_HEARTBEAT, uid=uid))
        return HeartbeatReply.model_validate(response.json())

    def get_task(self, uid: str) -> TaskPublic:
        response = self._request("GET", self._path(PrivateRoutes.TASK, uid=uid))
        return TaskPublic.model_validate(response.json())

    def download_input(self, uid: str, dest: Path) -> str:
        return self._download(self._path(PrivateRoutes.TASK_INPUT, uid=uid), dest)

    def download_model_zip(self, human_readable_id: str, dest: Path) -> str:
        return self._download(self._path(PrivateRoutes.MODEL_ZIP, human_readable_id=human_readable_id), dest)

    def download_model_from(self, uid: str, dest: Path) -> str:
        """The zip of the output of the task's model_from upstream, mounted at /model instead of
        the model's own zip."""
        return self._download(self._path(PrivateRoutes.TASK_MODEL_FROM, uid=uid), dest)

    def cache_lookup(self, uid: str, image_id: str) -> CacheAnswer:
        """Ask whether a finished task ran the same image (by ID), model zip, input and params;
        on a hit the private API has already finished this task from that task's output."""
        response = self._request(
            "POST",
            self._path(PrivateRoutes.TASK_CACHE_LOOKUP, uid=uid),
            json=CacheLookup(image_id=image_id).model_dump(mode="json"),
        )
        return CacheAnswer.model_validate(response.json())

    def upload_logs(self, uid: str, text: str, progress: Progress | None = None) -> None:
        """Replace the task's log with `text` (all of it so far), with the progress it reports."""
        params: dict[str, str | float] = {}
        if progress is not None:
            params[PROGRESS_PARAM] = progress.fraction
            if progress.message is not None:
                params[PROGRESS_MESSAGE_PARAM] = progress.message
        self._request(
            "PUT",
            self._path(PrivateRoutes.TASK_LOGS, uid=uid),
            content=text.encode("utf-8", errors="replace"),
            headers={"Content-Type": LOG_MEDIA_TYPE},
            params=params,
        )

    def upload_output(
        self,
        uid: str,
        zip_path: Path,
        run_times: RunTimes | None = None,
        final_log: str | None = None,
        progress: Progress | None = None,
    ) -> TaskPublic:
        """Finish the task with its output and the container's run times (query parameters), and
        with its final log and progress when given (form fields: one request, not two)."""
        path = self._path(PrivateRoutes.TASK_OUTPUT, uid=uid)
        params = (run_times or RunTimes()).model_dump(mode="json", exclude_none=True)
        form: dict[str, str] = {}
        if final_log is not None:
            form[OUTPUT_LOG_FIELD] = final_log
            if progress is not None:
                form[PROGRESS_PARAM] = repr(progress.fraction)
                if progress.message is not None:
                    form[PROGRESS_MESSAGE_PARAM] = progress.message
        with open(zip_path, "rb") as body:
            # httpx reads a file object in chunks, so the zip is never held whole in memory.
            response = self._request(
                "POST",
                path,
                params=params,
                data=form,
                files={"zip_file": ("output.zip", body, ZIP_MEDIA_TYPE)},
            )
        return TaskPublic.model_validate(response.json())

    def fail(self, uid: str, failure: TaskFailure) -> TaskPublic:
        response = self._request(
            "POST", self._path(PrivateRoutes.TASK_FAIL, uid=uid), json=failure.model_dump(mode="json")
        )
        return TaskPublic.model_validate(response.json())

    def release(self, uid: str, reason: str) -> TaskPublic:
        response = self._request(
            "POST",
            self._path(PrivateRoutes.TASK_RELEASE, uid=uid),
            json=TaskRelease(reason=reason[:2000]).model_dump(mode="json"),
        )
        return TaskPublic.model_validate(response.json())

    def list_models(self) -> list[ModelPublic]:
        """Every registered model (the consumer reads which are warm)."""
        response = self._request("GET", PrivateRoutes.MODELS)
        return [ModelPublic.model_validate(model) for model in response.json()]

    # --- this consumer in the registry -----------------------------------------------------------

    def register(self, registration: ConsumerRegistration) -> ConsumerPublic:
        """Declare this consumer and what it has (again after a restart: the same id updates)."""
        response = self._request(
            "PUT",
            self._path(PrivateRoutes.CONSUMER, consumer_id=self.consumer_id),
            json=registration.model_dump(mode="json"),
        )
        return ConsumerPublic.model_validate(response.json())

    def consumer_heartbeat(
        self, running_tasks: list[str], gpu_readings: list[GpuReading] | None = None
    ) -> ConsumerHeartbeatReply:
        """Say this consumer is alive, what it runs and what its real GPUs use; 404 (an HTTP
        error) when the registry does not know it, so it registers again."""
        beat = ConsumerHeartbeat(running_tasks=running_tasks, gpu_readings=gpu_readings or [])
        response = self._request(
            "POST",
            self._path(PrivateRoutes.CONSUMER_HEARTBEAT, consumer_id=self.consumer_id),
            json=beat.model_dump(mode="json"),
        )
        return ConsumerHeartbeatReply.model_validate(response.json())
