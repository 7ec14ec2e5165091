"""A small client for the public API that scripts can import.

    from inference_client import InferenceClient

    with InferenceClient("https://inference.example.org") as client:
        uid = client.submit("my-model", "scans/")
        task = client.wait(uid)
        client.download(uid, "result.zip")

Uploads and downloads stream from and to disk, so a zip of any size needs little memory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx
from pydantic import TypeAdapter, ValidationError
from tqdm import tqdm

from inference_server.contract import (
    FOLLOW_PARAM,
    MODEL_PARAMS_SCHEMA_FIELD,
    SEEN_PARAM,
    TASK_FILTER_MODEL,
    TASK_FILTER_OWNER,
    TASK_FILTER_UID,
    WAIT_MAX_S,
    WAIT_MIN_S,
    WAIT_PARAM,
    WAKE_ON_PARAM,
    AuditAction,
    AuditEntry,
    ConsumerPublic,
    ModelPublic,
    PublicRoutes,
    TaskPublic,
    TaskStatus,
    TaskSubmitFields,
    V12Code,
    WakeOn,
    error_detail,
    task_state,
)
from inference_server.data_folder import OPERATOR_KEY_FILE
from inference_server.zipsafe import UnsafeZipError, zip_directory

CHUNK_SIZE = 1024 * 1024
# How long one long poll of `wait` asks the server to hold on (it answers sooner on a change).
LONG_POLL_S = 30.0

_V12_MEANINGS: dict[int, str] = {
    V12Code.PENDING: "the task is not finished yet (pending or running)",
    V12Code.FAILED: "the task failed or was cancelled",
    V12Code.OUTPUT_MISSING: "the task finished but its output is missing",
    V12Code.NOT_FOUND: "the task is unknown or was deleted",
}
_MODEL = TypeAdapter(ModelPublic)
_MODEL_LIST = TypeAdapter(list[ModelPublic])
_TASK = TypeAdapter(TaskPublic)
_TASK_LIST = TypeAdapter(list[TaskPublic])
_CONSUMER = TypeAdapter(ConsumerPublic)
_CONSUMER_LIST = TypeAdapter(list[ConsumerPublic])
_AUDIT_LIST = TypeAdapter(list[AuditEntry])
_T = TypeVar("_T")


class InferenceClientError(Exception):
    """Anything that went wrong; `status_code` is the HTTP status, None when no answer came."""

    def __init__(self, status_code: int | None, detail: str) -> None:
        self.status_code = status_code
        self.detail = detail
        super().__init__(self.message)

    @property
    def message(self) -> str:
        if self.status_code is None:
            return self.detail
        meaning = _V12_MEANINGS.get(self.status_code)
        if meaning is not None:
            return f"{meaning} ({self.status_code}): {self.detail}"
        return f"HTTP {self.status_code}: {self.detail}"

    def __str__(self) -> str:
        return self.message


def resolve_token(token: str | None = None) -> str | None:
    """The API token: the argument, else IS_API_TOKEN, else <IS_DATA_DIR or ./data>/operator.key."""
    if token:
        return token.strip()
    from_env = os.environ.get("IS_API_TOKEN", "").strip()
    if from_env:
        return from_env
    token_file = Path(os.environ.get("IS_DATA_DIR") or "data") / OPERATOR_KEY_FILE
    try:
        return token_file.read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise InferenceClientError(None, f"cannot read the token file {token_file}: {exc}") from exc


def _error_from(response: httpx.Response) -> InferenceClientError:
    return InferenceClientError(
        response.status_code, error_detail(response.content, fallback=response.reason_phrase)
    )


def _progress_bar(total: int | None, description: str, progress: bool | None) -> tqdm[Any]:
    # progress None: show the bar only when stderr is a terminal (tqdm's disable=None).
    disable = {True: False, False: True, None: None}[progress]
    return tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=disable,
        leave=False,
    )


def _quoted(uid: str) -> str:
    # A uid is one path segment: "../models/" must not turn into another route.
    return urllib.parse.quote(uid, safe="")


def _safe_filename(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return cleaned or "upload.zip"


def multipart_file_body(
    path: Path,
    *,
    field: str,
    on_chunk: Callable[[int], object],
    text_fields: dict[str, str] | None = None,
) -> tuple[dict[str, str], Iterator[bytes]]:
    """A multipart/form-data body with one file field, produced chunk by chunk from disk, after
    the `text_fields` (params, webhook_url, ...), which are small.

    The length is known up front (headers + file size), so the request is sent with a
    Content-Length rather than chunked, and the file is never held in memory.
    """
    boundary = f"inference-client-{secrets.token_hex(12)}"
    texts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in (text_fields or {}).items()
    )
    head = (
        texts
        + (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="{_safe_filename(path.name)}"\r\n'
            "Content-Type: application/zip\r\n\r\n"
        ).encode()
    )
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = path.stat().st_size
    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + size + len(tail)),
    }

    def chunks() -> Iterator[bytes]:
        yield head
        with path.open("rb") as source:
            while chunk := source.read(CHUNK_SIZE):
                on_chunk(len(chunk))
                yield chunk
        yield tail

    return headers, chunks()


@contextmanager
def _as_zip(path: Path) -> Iterator[Path]:
    """The zip to upload: the file itself, or a folder zipped into a temporary file."""
    if path.is_dir():
        with tempfile.TemporaryDirectory(prefix="infer-upload-") as scratch:
            archive = Path(scratch) / f"{_safe_filename(path.resolve().name)}.zip"
            try:
                files = zip_directory(path, archive)
            except UnsafeZipError as exc:
                # Refused here by the default naming rules the server applies, before any upload.
                raise InferenceClientError(None, f"{path}: cannot be sent as a zip: {exc}") from exc
            if files == 0:
                raise InferenceClientError(None, f"{path}: the folder holds no files")
            yield archive
    elif path.is_file():
        yield path
    else:
        raise InferenceClientError(None, f"{path}: no such file or folder")


class InferenceClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        verify: bool | str = True,
        timeout: float = 60.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        headers = {"User-Agent": "inference-client"}
        resolved = resolve_token(token)
        if resolved:
            headers["Authorization"] = f"Bearer {resolved}"
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            verify=verify,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            follow_redirects=True,
        )
        # After an upload the server checks the whole zip before answering: allow it time.
        self._upload_timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0), read=max(timeout, 900.0))

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _transport_error(self, exc: httpx.HTTPError) -> InferenceClientError:
        if isinstance(exc, httpx.ConnectError):
            return InferenceClientError(None, f"cannot connect to {self.base_url}: {exc}")
        if isinstance(exc, httpx.TimeoutException):
            return InferenceClientError(None, f"{self.base_url} did not answer in time ({exc!r})")
        return InferenceClientError(None, f"request to {self.base_url} failed: {exc!r}")

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        if response.is_error:
            raise _error_from(response)
        if response.is_redirect:
            # Only uploads get here: a streamed body cannot be sent a second time.
            location = response.headers.get("location", "?")
            raise InferenceClientError(
                response.status_code, f"the server redirects to {location}; use that address as the URL"
            )
        return response

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise InferenceClientError(
                response.status_code,
                f"the server answered with something that is not JSON: {response.text[:200]!r}",
            ) from exc

    @contextmanager
    def _stream(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> Iterator[httpx.Response]:
        options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            with self._http.stream(method, path, params=params, **options) as response:
                if response.is_error:
                    response.read()
                    raise _error_from(response)
                yield response
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc

    def _upload(
        self,
        path: str,
        *,
        params: dict[str, Any],
        zip_path: Path | None,
        progress: bool | None,
        text_fields: dict[str, str] | None = None,
    ) -> Any:
        if zip_path is None:
            # Text fields alone still go as multipart/form-data, the form the routes read.
            files = {name: (None, value.encode()) for name, value in (text_fields or {}).items()}
            return self._json(
                self._request("POST", path, params=params, files=files or None, follow_redirects=False)
            )
        total = zip_path.stat().st_size
        with _progress_bar(total, f"upload {zip_path.name}", progress) as bar:
            headers, body = multipart_file_body(
                zip_path, field=TaskSubmitFields.ZIP_FILE, on_chunk=bar.update, text_fields=text_fields
            )
            response = self._request(
                "POST",
                path,
                params=params,
                headers=headers,
                content=body,
                timeout=self._upload_timeout,
                follow_redirects=False,
            )
        return self._json(response)

    @staticmethod
    def _parse(schema: TypeAdapter[_T], data: Any) -> _T:
        try:
            return schema.validate_python(data)
        except ValidationError as exc:
            raise InferenceClientError(None, f"unexpected answer from the server: {exc}") from exc

    # -- models --------------------------------------------------------------------------------

    def list_models(self) -> list[ModelPublic]:
        return self._parse(_MODEL_LIST, self._json(self._request("GET", PublicRoutes.MODELS)))

    def add_model(
        self,
        container_tag: str,
        human_readable_id: str,
        description: str = "",
        *,
        use_gpu: bool = False,
        model_zip: str | Path | None = None,
        progress: bool | None = False,
        params_schema: dict[str, Any] | None = None,
        cacheable: bool = False,
        warm: bool = False,
        **limits: Any,
    ) -> ModelPublic:
        """Register a model; `model_zip` (a zip or a folder) is unpacked at /model for every task.

        `params_schema`: a JSON Schema every task's params must satisfy (checked at submission).
        `cacheable`: the model is deterministic, so a task with the same image, model zip, input
        and params is answered with an earlier task's output, without running.
        `warm`: consumers keep a container of the model created ahead, even before its first task.
        `limits` are passed on as query parameters; None leaves one at the platform default:
        timeout_s, memory_mb, cpus, gpu_memory_mb (GPU memory one task needs, in MiB; with
        use_gpu), pids, tmp_mb (size of the tmpfs at /tmp), allow_network, run_as_root,
        writable_rootfs.
        """
        params: dict[str, Any] = {
            "container_tag": container_tag,
            "human_readable_id": human_readable_id,
            "description": description,
            "model_available": model_zip is not None,
            "use_gpu": use_gpu,
            **{key: value for key, value in limits.items() if value is not None},
        }
        if cacheable:
            # Sent only when set, so a server that predates the cache is served as before.
            params["cacheable"] = True
        if warm:
            params["warm"] = True
        fields = None if params_schema is None else {MODEL_PARAMS_SCHEMA_FIELD: json.dumps(params_schema)}
        if model_zip is None:
            data = self._upload(
                PublicRoutes.MODELS, params=params, zip_path=None, progress=progress, text_fields=fields
            )
        else:
            with _as_zip(Path(model_zip)) as archive:
                data = self._upload(
                    PublicRoutes.MODELS,
                    params=params,
                    zip_path=archive,
                    progress=progress,
                    text_fields=fields,
                )
        return self._parse(_MODEL, data)

    def update_model(self, human_readable_id: str, **changes: Any) -> ModelPublic:
        """Change a model (operators): only the fields given change, e.g. warm=True, memory_mb=4096
        (None returns a limit to the platform default)."""
        path = PublicRoutes.MODEL.format(human_readable_id=_quoted(human_readable_id))
        return self._parse(_MODEL, self._json(self._request("PATCH", path, json=changes)))

    # -- tasks ---------------------------------------------------------------------------------

    def submit(
        self,
        model_id: str,
        path: str | Path | None = None,
        priority: int = 0,
        progress: bool | None = False,
        *,
        params: dict[str, Any] | None = None,
        webhook_url: str | None = None,
        input_from: str | None = None,
        model_from: str | None = None,
        cache: bool = True,
    ) -> str:
        """Upload a zip, or a folder zipped on the fly, as a task for `model_id`; returns its uid.

        `params`: a JSON object the model reads at /params.json (checked against its schema).
        `webhook_url`: told of running, finished, failed and cancelled, signed with the key's
        webhook secret. `input_from`: another task's uid whose output is this task's input,
        instead of `path`; `model_from`: one whose output is mounted at /model. Either upstream
        may still be pending or running: this task waits for it. `cache=False` runs the task even
        when a cacheable model has its result already.
        """
        if (path is None) == (input_from is None):
            raise InferenceClientError(
                None, "give either a path to upload or input_from, not both or neither"
            )
        query: dict[str, Any] = {"model_human_readable_id": model_id}
        if priority:
            # Left out at 0 so a plain v1.2 server, which knows no priorities, is served too.
            query["priority"] = priority
        if not cache:
            query[TaskSubmitFields.CACHE_QUERY] = "false"
        fields = {
            name: value
            for name, value in (
                (TaskSubmitFields.PARAMS, None if params is None else json.dumps(params)),
                (TaskSubmitFields.WEBHOOK_URL, webhook_url),
                (TaskSubmitFields.INPUT_FROM, input_from),
                (TaskSubmitFields.MODEL_FROM, model_from),
            )
            if value is not None
        }
        if path is None:
            data = self._upload(
                PublicRoutes.TASKS, params=query, zip_path=None, progress=progress, text_fields=fields
            )
        else:
            with _as_zip(Path(path)) as archive:
                data = self._upload(
                    PublicRoutes.TASKS, params=query, zip_path=archive, progress=progress, text_fields=fields
                )
        uid = data.get("uid") if isinstance(data, dict) else data
        if not isinstance(uid, str):
            raise InferenceClientError(None, f"unexpected answer to a submission: {data!r}")
        return uid

    def list_tasks(
        self,
        status: TaskStatus | str | None = None,
        limit: int = 100,
        *,
        model: str | None = None,
        owner: str | None = None,
        uid: str | None = None,
    ) -> list[TaskPublic]:
        """The key owner's tasks, newest first (with an operator's key: everyone's). `model` keeps
        one model's tasks, `owner` one key name's (for operators: a user's list is always their
        own), `uid` those whose uid starts with it (TASK_UID_SEARCH_MIN_CHARS or more)."""
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            params["status"] = str(status)
        filters = {TASK_FILTER_MODEL: model, TASK_FILTER_OWNER: owner, TASK_FILTER_UID: uid}
        params |= {name: value for name, value in filters.items() if value is not None}
        return self._parse(_TASK_LIST, self._json(self._request("GET", PublicRoutes.TASKS, params=params)))

    def status(self, uid: str) -> TaskPublic:
        return self._parse(
            _TASK, self._json(self._request("GET", PublicRoutes.TASK_STATUS.format(uid=_quoted(uid))))
        )

    def status_after_change(
        self, uid: str, seen: TaskStatus, wait_s: float, on: WakeOn = WakeOn.CHANGE
    ) -> TaskPublic:
        """The task as soon as it changes in what `on` names (its status, progress or waiting
        reason; its status; its end), at once if `seen` is already out of date, or after `wait_s`
        seconds as it is then: GET status?wait= (a long poll)."""
        wait_s = min(max(wait_s, WAIT_MIN_S), WAIT_MAX_S)
        params = {WAIT_PARAM: f"{wait_s:g}", SEEN_PARAM: seen.value}
        if on is not WakeOn.CHANGE:  # the default, also on servers from before `on` existed
            params[WAKE_ON_PARAM] = on.value
        response = self._request(
            "GET",
            PublicRoutes.TASK_STATUS.format(uid=_quoted(uid)),
            params=params,
            timeout=httpx.Timeout(wait_s + 30.0, connect=10.0),
        )
        return self._parse(_TASK, self._json(response))

    def wait(
        self,
        uid: str,
        poll_interval: float = 2.0,
        timeout: float | None = None,
        on_change: Callable[[TaskPublic], None] | None = None,
    ) -> TaskPublic:
        """Wait until the task is finished, failed, cancelled or gone; returns its last status.

        The server is asked to answer on change (`status_after_change`), so the end is known the
        moment it happens; a server that does not know long polls (it refuses the parameter, or
        answers at once with nothing changed) is polled every `poll_interval` seconds instead.

        `on_change` is called with the task on the first poll and again each time its status,
        its waiting_reason or the progress the model reports differs from the last call's, the
        terminal status included. Without it, the long polls ask to be woken by the end only.
        """
        wake_on = WakeOn.END if on_change is None else WakeOn.CHANGE
        deadline = None if timeout is None else time.monotonic() + timeout
        last_reported: tuple[TaskStatus, str | None, float | None, str | None] | None = None
        long_polls = True
        task = self.status(uid)
        while True:
            seen = (task.status, task.waiting_reason, task.progress, task.progress_message)
            if on_change is not None and seen != last_reported:
                last_reported = seen
                on_change(task)
            if task.status.is_terminal:
                return task
            if deadline is not None and time.monotonic() >= deadline:
                raise InferenceClientError(
                    None, f"task {uid} is still {task.status} after waiting {timeout:g} s"
                )
            if long_polls:
                wait_s = LONG_POLL_S if deadline is None else min(LONG_POLL_S, deadline - time.monotonic())
                asked_at = time.monotonic()
                try:
                    answer = self.status_after_change(uid, task.status, wait_s, wake_on)
                except InferenceClientError as exc:
                    if exc.status_code not in (400, 422):
                        raise
                    long_polls = False  # a server that refuses ?wait=
                else:
                    # Nothing changed, yet answered at once: a server that ignores ?wait=.
                    unchanged = task_state(answer) == task_state(task)
                    if unchanged and time.monotonic() - asked_at < min(wait_s, WAIT_MIN_S) / 2:
                        long_polls = False
                    task = answer
                    if long_polls:
                        continue
            pause = poll_interval if deadline is None else min(poll_interval, deadline - time.monotonic())
            time.sleep(max(pause, 0.0))
            task = self.status(uid)

    def download(self, uid: str, dest_path: str | Path, progress: bool | None = False) -> Path:
        """Save the output zip of a finished task; a failed download leaves no partial file."""
        destination = Path(dest_path)
        partial = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.part")
        try:
            with self._stream("GET", PublicRoutes.TASK.format(uid=_quoted(uid))) as response:
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                with (
                    _progress_bar(total, f"download {destination.name}", progress) as bar,
                    partial.open("wb") as sink,
                ):
                    for chunk in response.iter_bytes(CHUNK_SIZE):
                        sink.write(chunk)
                        bar.update(len(chunk))
            partial.replace(destination)
        except OSError as exc:
            raise InferenceClientError(None, f"cannot write {destination}: {exc}") from exc
        finally:
            partial.unlink(missing_ok=True)
        return destination

    def logs(self, uid: str) -> str:
        return self._request("GET", PublicRoutes.TASK_LOGS.format(uid=_quoted(uid))).text

    def follow_logs(self, uid: str) -> Iterator[str]:
        """A task's log as it grows, in pieces, until the task has ended and its final log is in.

        No read timeout: a model may print nothing for longer than any sensible one, and the
        server ends the answer itself when the task ends.
        """
        follow_timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0), read=None)
        path = PublicRoutes.TASK_LOGS.format(uid=_quoted(uid))
        with self._stream("GET", path, params={FOLLOW_PARAM: "true"}, timeout=follow_timeout) as response:
            # A connection lost midway raises in _stream, as the client's error.
            yield from response.iter_text()

    def cancel(self, uid: str) -> TaskPublic:
        return self._parse(
            _TASK, self._json(self._request("POST", PublicRoutes.TASK_CANCEL.format(uid=_quoted(uid))))
        )

    def delete(self, uid: str) -> TaskPublic:
        return self._parse(
            _TASK, self._json(self._request("DELETE", PublicRoutes.TASK.format(uid=_quoted(uid))))
        )

    # -- consumers (operator keys) -------------------------------------------------------------

    def list_consumers(self) -> list[ConsumerPublic]:
        """Every registered consumer with its state (idle, busy, draining, lost); operator keys only."""
        return self._parse(_CONSUMER_LIST, self._json(self._request("GET", PublicRoutes.CONSUMERS)))

    def drain_consumer(self, consumer_id: str) -> ConsumerPublic:
        """Let the consumer finish its tasks and take no new one (host maintenance); operators only."""
        return self._set_draining("POST", consumer_id)

    def resume_consumer(self, consumer_id: str) -> ConsumerPublic:
        """Let a drained consumer take tasks again; operators only."""
        return self._set_draining("DELETE", consumer_id)

    def _set_draining(self, method: str, consumer_id: str) -> ConsumerPublic:
        path = PublicRoutes.CONSUMER_DRAIN.format(consumer_id=_quoted(consumer_id))
        return self._parse(_CONSUMER, self._json(self._request(method, path)))

    # -- audit trail (operator keys) -----------------------------------------------------------

    def list_audit_entries(
        self,
        *,
        action: AuditAction | None = None,
        actor: str | None = None,
        target: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        before_id: int | None = None,
        limit: int | None = None,
    ) -> list[AuditEntry]:
        """Who changed models, tasks, keys and consumers, newest first; operator keys only. Page on
        with `before_id` set to the last entry's id."""
        filters = {
            "action": action,
            "actor": actor,
            "target": target,
            "since": None if since is None else since.isoformat(),
            "until": None if until is None else until.isoformat(),
            "before_id": before_id,
            "limit": limit,
        }
        params = {name: value for name, value in filters.items() if value is not None}
        return self._parse(_AUDIT_LIST, self._json(self._request("GET", PublicRoutes.AUDIT, params=params)))
