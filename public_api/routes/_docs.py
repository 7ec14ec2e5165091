"""OpenAPI fragments for routes that read their body as a raw stream.

Those handlers declare no body parameter (declaring one would make FastAPI parse and buffer the
upload), so the multipart form they expect is described here for /docs instead.
"""

from __future__ import annotations

from typing import Any

from inference_server.contract import ErrorBody, V12Code


def zip_upload_body(
    *,
    required: bool,
    description: str,
    text_fields: dict[str, str] | None = None,
    zip_required: bool | None = None,
) -> dict[str, Any]:
    """A multipart body with the `zip_file` field and optional text fields (name: description);
    the zip is required with the body unless `zip_required` says otherwise (a field may stand
    in for it, as input_from does for a task's input)."""
    properties: dict[str, Any] = {
        "zip_file": {
            "type": "string",
            "format": "binary",
            "contentMediaType": "application/zip",
            "description": description,
        }
    }
    for name, text in (text_fields or {}).items():
        properties[name] = {"type": "string", "description": text}
    zip_required = required if zip_required is None else zip_required
    return {
        "requestBody": {
            "required": required,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": properties,
                        "required": ["zip_file"] if zip_required else [],
                    }
                }
            },
        }
    }


def error(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


ZIP_CONTENT = {"application/zip": {"schema": {"type": "string", "format": "binary"}}}

V12_POLL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The task finished: its output zip.", "content": ZIP_CONTENT},
    V12Code.PENDING.value: error("551: the task is pending or running; ask again later."),
    V12Code.FAILED.value: error("552: the task failed or was cancelled; `detail` says why."),
    V12Code.OUTPUT_MISSING.value: error("553: the task finished but its output is missing."),
    V12Code.NOT_FOUND.value: error("554: no such task, or it was deleted."),
}

# Any route that asks the private API something, the key check included, may answer these.
UPSTREAM_FAILURES: dict[int | str, dict[str, Any]] = {
    502: error("The private API failed or refused this service."),
    503: error("The private API is unreachable."),
    504: error("The private API did not answer in time."),
}

# Declaring 422 here also stops FastAPI from documenting its list-shaped default: every error
# body of this API, validation included, is {"detail": "<text>"}.
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: error(
        "No API key where one is needed, or the key is unknown or revoked "
        "(with a `WWW-Authenticate: Bearer` challenge)."
    ),
    422: error("Malformed parameters or body; `detail` names each problem."),
    429: error(
        "Too many requests without a valid API key from this address "
        "(IS_UNAUTHENTICATED_RATE_PER_MINUTE); `Retry-After` says when to try again."
    ),
    **UPSTREAM_FAILURES,
}

OPERATOR_ONLY: dict[int | str, dict[str, Any]] = {
    403: error("The key is valid but not an operator's (and IS_ANONYMOUS_MODELS is off)."),
}
