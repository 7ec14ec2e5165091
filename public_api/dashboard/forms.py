"""Reading the dashboard's forms: small url-encoded ones read whole within a bound, the model
registration's multipart form with its optional zip, and model fields from either."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import parse_qs

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from inference_server.contract import (
    MODEL_FLAGS,
    MODEL_NUMERIC_LIMITS,
    ZIP_MEDIA_TYPE,
    ModelCreate,
    ModelUpdate,
)
from public_api.errors import PublicAPIError, UploadTooLargeError
from public_api.relay import UploadBody

# Every url-encoded form here is a few short fields (a key, a token, a model's limits).
SMALL_FORM_MAX_BYTES = 64 * 1024
UPLOAD_CHUNK_BYTES = 1024 * 1024
FLOAT_LIMITS = frozenset({"cpus"})


async def read_small_form(request: Request) -> dict[str, str]:
    """The url-encoded form's fields (the first value of each), refused past SMALL_FORM_MAX_BYTES."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("application/x-www-form-urlencoded", ""):
        raise PublicAPIError(415, "send the form as application/x-www-form-urlencoded")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > SMALL_FORM_MAX_BYTES:
            raise PublicAPIError(413, f"the form is larger than {SMALL_FORM_MAX_BYTES} bytes")
    try:
        fields = parse_qs(body.decode(), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise PublicAPIError(400, "the form is not valid UTF-8") from None
    return {name: values[0] for name, values in fields.items()}


def _model_fields(form: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The text, number and checkbox fields of a model form, typed as the API's schemas expect:
    an empty number is null (the platform default), an unticked box false."""
    values: dict[str, Any] = {}
    for name in names:
        if name in MODEL_FLAGS or name == "use_gpu":
            values[name] = name in form
        elif name in MODEL_NUMERIC_LIMITS:
            text = str(form.get(name, "")).strip()
            try:
                values[name] = None if not text else (float(text) if name in FLOAT_LIMITS else int(text))
            except ValueError:
                raise PublicAPIError(422, f"{name} must be a number, or empty for the default") from None
        elif name in form:
            values[name] = str(form[name]).strip()
    return values


def _validation_detail(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or 'form'}: {problem['msg']}"
        for problem in exc.errors()
    )


def model_update_from(form: Mapping[str, Any]) -> ModelUpdate:
    names = ("description", *MODEL_NUMERIC_LIMITS, *MODEL_FLAGS)
    try:
        return ModelUpdate.model_validate(_model_fields(form, names))
    except ValidationError as exc:
        raise PublicAPIError(422, _validation_detail(exc)) from None


def model_create_from(form: Mapping[str, Any], *, with_zip: bool) -> ModelCreate:
    names = (
        "container_tag",
        "human_readable_id",
        "description",
        "use_gpu",
        *MODEL_NUMERIC_LIMITS,
        *MODEL_FLAGS,
    )
    values = {**_model_fields(form, names), "model_available": with_zip}
    # Only what the operator set goes to the private API, which has the same defaults.
    values = {name: value for name, value in values.items() if value is not None}
    try:
        return ModelCreate.model_validate(values)
    except ValidationError as exc:
        raise PublicAPIError(422, _validation_detail(exc)) from None


def zip_upload_body(upload: UploadFile, limit: int) -> UploadBody:
    """The model zip the operator picked, sent on as the multipart body the private API reads."""
    size = upload.size or 0
    if size > limit:
        raise UploadTooLargeError(limit)
    boundary = secrets.token_hex(16)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="zip_file"; filename="model.zip"\r\n'
        f"Content-Type: {ZIP_MEDIA_TYPE}\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    async def chunks() -> AsyncIterator[bytes]:
        yield head
        await upload.seek(0)
        while chunk := await upload.read(UPLOAD_CHUNK_BYTES):
            yield chunk
        yield tail

    headers = {
        "content-type": f"multipart/form-data; boundary={boundary}",
        "content-length": str(len(head) + size + len(tail)),
    }
    return UploadBody(headers, chunks())
