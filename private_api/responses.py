"""Answers built by hand: a stored blob streamed back, and a schema serialized once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import BinaryIO

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from inference_server.contract import ZIP_MEDIA_TYPE
from private_api.blobs import BlobStore
from private_api.exceptions import NotFound

CHUNK_BYTES = 1024 * 1024


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


def blob_response(
    blobs: BlobStore, key: str, *, media_type: str, filename: str, missing_detail: str
) -> StreamingResponse:
    """Open now, stream later: the open file survives a delete racing with the download."""
    try:
        handle = blobs.open(key)
    except FileNotFoundError:
        raise NotFound(missing_detail) from None
    size = os.fstat(handle.fileno()).st_size
    return StreamingResponse(
        _chunks(handle),
        media_type=media_type,
        headers={"Content-Length": str(size), "Content-Disposition": f'attachment; filename="{filename}"'},
    )


def zip_response(blobs: BlobStore, key: str, filename: str, missing_detail: str) -> StreamingResponse:
    """A stored zip (a task's input or output, a model's files) as a download."""
    return blob_response(
        blobs, key, media_type=ZIP_MEDIA_TYPE, filename=filename, missing_detail=missing_detail
    )


def json_response(answer: BaseModel) -> Response:
    """The answer serialized straight from its schema; a route declaring the same schema as its
    response_model would validate it a second time first, which hot routes can do without."""
    return Response(answer.model_dump_json(), media_type="application/json")
