"""Request bodies straight into the blob store: one pass, bounded memory, size limit while streaming.

A multipart body is parsed as it arrives (python-multipart's push parser); the bytes of the
file field go to a BlobWriter in ~1 MiB batches hashed and written by a worker thread while the
next batch is received, so neither the event loop blocks on disk nor is a file ever held whole
in memory (two batches at most). The upload is cut off with
413 as soon as it crosses the limit, and every failure path deletes what was written.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from inference_server.contract import (
    OUTPUT_LOG_FIELD,
    PROGRESS_MESSAGE_MAX_CHARS,
    PROGRESS_MESSAGE_PARAM,
    PROGRESS_PARAM,
)
from inference_server.zipsafe import UnsafeZipError, ZipLimits, inspect_zip
from private_api.blobs import BlobStore, BlobTooLarge, BlobWriter, StoredBlob
from private_api.exceptions import BadInput, TooLarge, Unprocessable

if TYPE_CHECKING:  # python_multipart defines it for type checkers only
    from python_multipart.multipart import MultipartCallbacks

ZIP_FIELD = "zip_file"
FLUSH_BYTES = 1024 * 1024
# Room for boundaries, part headers and the odd extra text field around the file.
FORM_OVERHEAD_BYTES = 1024 * 1024


def zip_request_body(*, required: bool) -> dict[str, Any]:
    """OpenAPI for a body this module parses by hand (FastAPI cannot see it)."""
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {ZIP_FIELD: {"type": "string", "format": "binary"}},
    }
    if required:
        schema["required"] = [ZIP_FIELD]
    return {"requestBody": {"required": required, "content": {"multipart/form-data": {"schema": schema}}}}


class _FormSink:
    """python-multipart callbacks: collect part headers, buffer the wanted field's bytes."""

    def __init__(self, blobs: BlobStore, *, kind: str, field: str, max_bytes: int) -> None:
        self._blobs = blobs
        self._kind = kind
        self._field = field.encode()
        self._max_bytes = max_bytes
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._in_file_part = False
        self._text_part: bytearray | None = None
        self._other_bytes = 0
        # The other (text) fields of the form, by name: params, webhook_url, input_from, ...
        self.text_fields: dict[str, bytearray] = {}
        self.writer: BlobWriter | None = None
        self._file_field_seen = False
        self.file_bytes = 0
        self.buffer = bytearray()
        self.file_part_ended = False
        self.stored: StoredBlob | None = None
        self.body_complete = False
        # Held by the worker thread for each batch, and by `discard`: a discard never races a write.
        self._disk_lock = threading.Lock()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }

    def _on_part_begin(self) -> None:
        self._headers.clear()
        self._in_file_part = False
        self._text_part = None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[bytes(self._header_name).strip().lower()] = bytes(self._header_value).strip()
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition", b"").decode("latin-1")
        _, options = parse_options_header(disposition)
        name = options.get(b"name")
        if name != self._field:
            text_name = (name or b"").decode("latin-1")
            if text_name in self.text_fields:
                raise BadInput(f"the multipart body has more than one {text_name!r} field")
            self._text_part = self.text_fields[text_name] = bytearray()
            return
        if self._file_field_seen:
            raise BadInput(f"the multipart body has more than one {self._field.decode()!r} field")
        self._file_field_seen = True
        self.writer = self._blobs.writer(self._kind, suffix=".zip", max_bytes=self._max_bytes)
        self._in_file_part = True

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file_part:
            self.file_bytes += end - start
            if self.file_bytes > self._max_bytes:
                raise BlobTooLarge(
                    f"{self._field.decode()} is larger than the limit of {self._max_bytes} bytes"
                )
            self.buffer += memoryview(data)[start:end]
            return
        # Other fields are kept for the route to read, but not without bound.
        self._other_bytes += end - start
        if self._other_bytes > FORM_OVERHEAD_BYTES:
            raise TooLarge(f"form fields besides {self._field.decode()!r} exceed {FORM_OVERHEAD_BYTES} bytes")
        if self._text_part is not None:
            self._text_part += data[start:end]

    def _on_part_end(self) -> None:
        if self._in_file_part:
            self._in_file_part = False
            self.file_part_ended = True

    def _on_end(self) -> None:
        self.body_complete = True

    def take_batch(self) -> tuple[bytearray, bool]:
        """The file bytes buffered so far, and whether the file part ended after them."""
        batch, self.buffer = self.buffer, bytearray()
        ended, self.file_part_ended = self.file_part_ended, False
        return batch, ended

    # Disk work, run in a worker thread by the receiving coroutine, one batch at a time.

    def write_batch(self, batch: bytearray, ended: bool) -> None:
        with self._disk_lock:
            if self.writer is None:  # nothing of the file yet, or discarded meanwhile
                return
            if batch:
                self.writer.write(batch)
            if ended:
                self.stored = self.writer.commit()
                self.writer = None

    def discard(self, blobs: BlobStore) -> None:
        with self._disk_lock:
            if self.writer is not None:
                self.writer.abort()
                self.writer = None
            if self.stored is not None:
                blobs.delete(self.stored.key)
                self.stored = None


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadInput("Content-Length is not a number") from None


def _decoded_text_fields(sink: _FormSink) -> dict[str, str]:
    # Not refused here: a file sent under a wrong field name is the route's "no zip_file" error,
    # and text that was not UTF-8 fails the field's own check (JSON, URL, uid) with its name.
    return {name: bytes(value).decode(errors="replace") for name, value in sink.text_fields.items()}


async def _receive_multipart_file(
    request: Request,
    *,
    blobs: BlobStore,
    kind: str,
    field: str,
    max_bytes: int,
    required: bool,
    text_fields: dict[str, str] | None = None,
) -> StoredBlob | None:
    """Store the file field and return it; the form's other fields go into `text_fields`."""
    mime, options = parse_options_header(request.headers.get("content-type"))
    length = _declared_length(request)
    if mime != b"multipart/form-data":
        if not required and not mime and not length and "transfer-encoding" not in request.headers:
            return None
        raise Unprocessable(f"send a multipart/form-data body with the file field {field!r}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadInput("the multipart/form-data Content-Type has no boundary")
    if length is not None and length > max_bytes + FORM_OVERHEAD_BYTES:
        # Refuse before reading a byte: honest clients learn at once, nothing touches the disk.
        raise TooLarge(f"the upload ({length} bytes) is larger than the limit of {max_bytes} bytes")

    sink = _FormSink(blobs, kind=kind, field=field, max_bytes=max_bytes)
    # The batch being written while the next one is received: one core hashes and writes while
    # the other parses (hashing and writing release the GIL).
    writing: asyncio.Future[None] | None = None

    async def hand_over_batch() -> None:
        nonlocal writing
        if writing is not None:
            await writing
        batch, ended = sink.take_batch()
        writing = asyncio.ensure_future(run_in_threadpool(sink.write_batch, batch, ended))

    try:
        parser = MultipartParser(boundary, sink.callbacks())
        async for chunk in request.stream():
            parser.write(chunk)
            if len(sink.buffer) >= FLUSH_BYTES or sink.file_part_ended:
                await hand_over_batch()
        parser.finalize()
        await hand_over_batch()
        assert writing is not None
        await writing
        if not sink.body_complete or sink.writer is not None:
            raise BadInput("the multipart body ended before its closing boundary (upload cut short?)")
        if text_fields is not None:
            text_fields.update(_decoded_text_fields(sink))
    except FormParserError as exc:
        _abandon(writing)
        sink.discard(blobs)
        raise BadInput(f"malformed multipart body: {exc}") from exc
    except BaseException:
        _abandon(writing)
        # Synchronous on purpose: after a cancellation (client gone, server stopping) an await
        # here could be cancelled too and leave the partial file behind. It waits for a batch
        # being written, if any, then deletes the partial file; later batches find no writer.
        sink.discard(blobs)
        raise
    if sink.stored is None and required:
        raise Unprocessable(f"the multipart body has no file field {field!r}")
    return sink.stored


def _abandon(writing: asyncio.Future[None] | None) -> None:
    """A batch write no one will await: its outcome, an error too, is of no interest any more."""
    if writing is not None:
        writing.add_done_callback(lambda done: done.cancelled() or done.exception())


def _check_zip(blobs: BlobStore, blob: StoredBlob, field: str, limits: ZipLimits) -> None:
    try:
        inspect_zip(blobs.path(blob.key), limits)
    except UnsafeZipError as exc:
        raise BadInput(f"{field}: {exc}") from exc


@contextlib.contextmanager
def _deleted_if_raised(blobs: BlobStore, blob: StoredBlob) -> Iterator[StoredBlob]:
    """Yields `blob`; if the block raises (the row could not be committed), the blob is deleted."""
    try:
        yield blob
    except BaseException:
        blobs.delete(blob.key)  # not awaited: must happen even when the request was cancelled
        raise


@dataclass(frozen=True)
class ZipUploads:
    """Receives the zip in a request's `zip_file` field: streamed into the store (under `kind`),
    cut off past `max_bytes`, checked against `limits`, and yielded to an `async with` block. If
    the block raises (the row could not be committed), the blob is deleted: nothing is ever left
    half-stored. The form's other fields are in `text_fields` once the block starts."""

    request: Request
    blobs: BlobStore
    max_bytes: int
    text_fields: dict[str, str] = field(default_factory=dict)

    @contextlib.asynccontextmanager
    async def optional_zip(
        self, kind: str, limits: ZipLimits, *, required: bool = False
    ) -> AsyncIterator[StoredBlob | None]:
        blob = await _receive_multipart_file(
            self.request,
            blobs=self.blobs,
            kind=kind,
            field=ZIP_FIELD,
            max_bytes=self.max_bytes,
            required=required,
            text_fields=self.text_fields,
        )
        if blob is None:
            yield None
            return
        with _deleted_if_raised(self.blobs, blob):
            await run_in_threadpool(_check_zip, self.blobs, blob, ZIP_FIELD, limits)
            yield blob

    @contextlib.asynccontextmanager
    async def zip(self, kind: str, limits: ZipLimits) -> AsyncIterator[StoredBlob]:
        """Like `optional_zip`, for a body that must carry the zip (422 without it)."""
        async with self.optional_zip(kind, limits, required=True) as blob:
            if blob is None:  # _receive_multipart_file raised already; this keeps the type exact
                raise Unprocessable(f"the multipart body has no file field {ZIP_FIELD!r}")
            yield blob


class _HeadAndTail:
    """Keeps the first and the last `limit / 2` bytes of a stream: a log's start and its end,
    where a failing model says why."""

    def __init__(self, writer: BlobWriter, limit: int) -> None:
        self._writer = writer
        self._head_room = limit // 2
        self._tail_size = limit - self._head_room
        self.head = bytearray()
        self.tail = bytearray()
        self.cut = 0

    def feed(self, chunk: bytes) -> None:
        take = min(self._head_room, len(chunk))
        if take:
            self.head += chunk[:take]
            self._head_room -= take
            chunk = chunk[take:]
        if chunk:
            self.tail += chunk
            excess = len(self.tail) - self._tail_size
            if excess > 0:
                del self.tail[:excess]  # cheap: CPython bytearrays drop a prefix in O(1)
                self.cut += excess

    def flush_head(self) -> None:
        if self.head:
            self._writer.write(self.head)
            self.head.clear()

    def finish(self) -> StoredBlob:
        self.flush_head()
        if self.cut:
            self._writer.write(f"\n[... {self.cut} bytes of log cut by the private API ...]\n".encode())
        self._writer.write(self.tail)
        return self._writer.commit()


@contextlib.asynccontextmanager
async def log_upload(request: Request, *, blobs: BlobStore, max_bytes: int) -> AsyncIterator[StoredBlob]:
    """Stream a raw log body into the store and yield it, deleted again if the `async with`
    block raises; past `max_bytes` the middle is cut, not refused."""
    blob = await _receive_log(request, blobs=blobs, max_bytes=max_bytes)
    with _deleted_if_raised(blobs, blob):
        yield blob


async def _receive_log(request: Request, *, blobs: BlobStore, max_bytes: int) -> StoredBlob:
    writer = blobs.writer("logs", suffix=".txt")
    keeper = _HeadAndTail(writer, max_bytes)
    try:
        async for chunk in request.stream():
            keeper.feed(chunk)
            if len(keeper.head) >= FLUSH_BYTES:
                await run_in_threadpool(keeper.flush_head)
        return await run_in_threadpool(keeper.finish)
    except BaseException:
        writer.abort()  # not awaited: must happen even when the request was cancelled
        raise


@dataclass(frozen=True)
class FinalLog:
    """The final log an output upload carried in its form (OUTPUT_LOG_FIELD), with its progress."""

    text: bytes
    progress: float | None = None
    progress_message: str | None = None

    @classmethod
    def of_form(cls, text_fields: dict[str, str]) -> FinalLog | None:
        """None when the form has no log (the consumer sent it on its own); 422 for bad progress."""
        text = text_fields.get(OUTPUT_LOG_FIELD)
        if text is None:
            return None
        progress: float | None = None
        raw_progress = text_fields.get(PROGRESS_PARAM)
        if raw_progress is not None:
            try:
                progress = float(raw_progress)
            except ValueError:
                progress = None
            if progress is None or not 0.0 <= progress <= 1.0:
                raise Unprocessable(
                    f"{PROGRESS_PARAM} must be a number from 0 to 1, not {raw_progress[:50]!r}"
                )
        message = text_fields.get(PROGRESS_MESSAGE_PARAM)
        if message is not None and len(message) > PROGRESS_MESSAGE_MAX_CHARS:
            raise Unprocessable(
                f"{PROGRESS_MESSAGE_PARAM} is longer than {PROGRESS_MESSAGE_MAX_CHARS} characters"
            )
        return cls(text.encode("utf-8"), progress, message if progress is not None else None)


def store_log(blobs: BlobStore, text: bytes, *, max_bytes: int) -> StoredBlob:
    """A log that came whole (a form field) into the store, cut in the middle past `max_bytes`
    as a streamed one is."""
    writer = blobs.writer("logs", suffix=".txt")
    keeper = _HeadAndTail(writer, max_bytes)
    try:
        keeper.feed(text)
        return keeper.finish()
    except BaseException:
        writer.abort()
        raise
