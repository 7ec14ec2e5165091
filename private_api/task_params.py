"""Task parameters: a model's params_schema (JSON Schema) and the params each task carries.

A schema is checked against the metaschema of the draft it declares ($schema), the latest draft
when it declares none, so a schema that could never validate anything is refused when it is
registered, not at every submission. Params are a JSON object sent as a multipart form field;
they are checked against the model's schema at submission, and a refusal names the failing path
("params.threshold: 'x' is not of type 'number'").
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.exceptions import SchemaError, best_match

from inference_server.contract import MODEL_PARAMS_SCHEMA_FIELD, PARAMS_MAX_BYTES, TaskSubmitFields
from private_api.exceptions import TooLarge, Unprocessable

# Big enough for any real schema; the multipart overhead bound (uploads.py) caps it anyway.
PARAMS_SCHEMA_MAX_BYTES = 256 * 1024


def _json_object(text: str, *, field: str, max_bytes: int) -> dict[str, Any]:
    if len(text.encode()) > max_bytes:
        raise TooLarge(f"{field} is larger than the limit of {max_bytes} bytes")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Unprocessable(f"{field} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise Unprocessable(f"{field} must be a JSON object, not {type(value).__name__}")
    return value


def _where(path: Iterable[str | int]) -> str:
    """A JSON path as a dotted name: params.layers[2].size."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)


def checked_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """The schema itself if it is valid JSON Schema (None stays None: no schema), else 422."""
    if schema is None:
        return None
    validator = validators.validator_for(schema, default=Draft202012Validator)
    try:
        validator.check_schema(schema)
    except SchemaError as exc:
        at = f" (at {MODEL_PARAMS_SCHEMA_FIELD}{_where(exc.path)})" if exc.path else ""
        raise Unprocessable(
            f"{MODEL_PARAMS_SCHEMA_FIELD} is not a valid JSON Schema{at}: {exc.message}"
        ) from exc
    return schema


def schema_from_form(text: str | None) -> dict[str, Any] | None:
    """The params_schema multipart field of a registration: JSON text of a JSON Schema object."""
    if text is None:
        return None
    schema = _json_object(text, field=MODEL_PARAMS_SCHEMA_FIELD, max_bytes=PARAMS_SCHEMA_MAX_BYTES)
    return checked_schema(schema)


def params_from_form(text: str | None) -> dict[str, Any] | None:
    """The params multipart field of a submission: None when absent, else a JSON object."""
    if text is None:
        return None
    return _json_object(text, field=TaskSubmitFields.PARAMS, max_bytes=PARAMS_MAX_BYTES)


def check_params(params: dict[str, Any] | None, schema: dict[str, Any] | None) -> None:
    """422 naming the first failing path unless `params` satisfy `schema`. A task without params
    is checked as an empty object, so a schema with required properties refuses it."""
    if schema is None:
        return
    validator_class = validators.validator_for(schema, default=Draft202012Validator)
    error: ValidationError | None = best_match(validator_class(schema).iter_errors(params or {}))
    if error is not None:
        raise Unprocessable(f"{TaskSubmitFields.PARAMS}{_where(error.absolute_path)}: {error.message}")


def submitted_params(text: str | None, schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """The params of a submission, parsed and checked against the model's schema."""
    params = params_from_form(text)
    check_params(params, schema)
    return params


def canonical_params(params: dict[str, Any] | None) -> str:
    """One text per value, whatever order or spacing the client sent: the cache key's part."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
