"""JSON request bodies, read by the route itself once its access check has passed.

A FastAPI body parameter would be read and parsed before the route's dependencies run, so a
caller without a key could make this process hold whatever it sends. Routes call read_json
instead, and describe the body for /docs with json_request_body.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from inference_server.serving import is_json_request
from public_api.errors import PublicAPIError

SchemaT = TypeVar("SchemaT", bound=BaseModel)


async def read_json(request: Request, schema: type[SchemaT]) -> SchemaT:
    """The body, parsed and validated. Its size is bounded by JsonBodyLimit (installed by
    create_app), which is also why any other media type is refused here before a byte is read."""
    if not is_json_request(request.headers):
        raise PublicAPIError(415, "send the body as JSON (Content-Type: application/json)")
    raw = await request.body()
    if not raw:
        missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
        raise RequestValidationError([missing])
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise PublicAPIError(400, f"the body is not valid JSON: {exc}") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        # Located under "body", as FastAPI itself reports a body parameter's problems.
        raise RequestValidationError(
            [{**problem, "loc": ("body", *problem["loc"])} for problem in exc.errors()]
        ) from None


def json_request_body(schema: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra describing a required JSON body of `schema`."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema.model_json_schema()}},
        }
    }
