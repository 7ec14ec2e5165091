"""Task parameters: a model's params_schema (registration form field, PATCH) and the params each
task carries (submission form field), checked against it; a refusal stores nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from inference_server.contract import (
    MODEL_PARAMS_SCHEMA_FIELD,
    PARAMS_MAX_BYTES,
    PrivateRoutes,
    TaskSubmitFields,
)
from tests.private_api.helpers import make_zip, row_counts, stored_files, task_row

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "threshold": {"type": "number", "minimum": 0},
        "method": {"enum": ["otsu", "fixed"]},
        "layers": {"type": "array", "items": {"type": "integer"}},
    },
    "required": ["threshold"],
    "additionalProperties": False,
}


def register(client, hrid: str = "seg-model", schema: Any = None, *, zip_bytes: bytes | None = None):
    """POST /models with the schema as its multipart form field (JSON text, or as given if str)."""
    data = {}
    if schema is not None:
        data[MODEL_PARAMS_SCHEMA_FIELD] = schema if isinstance(schema, str) else json.dumps(schema)
    files = {"zip_file": ("model.zip", zip_bytes, "application/zip")} if zip_bytes is not None else None
    query = {
        "human_readable_id": hrid,
        "container_tag": "inference-server/test-script:1",
        "description": "a model with parameters",
        "model_available": zip_bytes is not None,
        "use_gpu": False,
    }
    # httpx sends a multipart body only with files; an empty file-less part list needs one field.
    return client.post(PrivateRoutes.MODELS, params=query, data=data, files=files or {"unused": ("", b"")})


def submit(client, params: Any = None, *, model: str = "seg-model", **query: Any):
    data = {}
    if params is not None:
        data[TaskSubmitFields.PARAMS] = params if isinstance(params, str) else json.dumps(params)
    return client.post(
        PrivateRoutes.TASKS,
        params={"model_human_readable_id": model, **query},
        data=data,
        files={"zip_file": ("input.zip", make_zip(), "application/zip")},
    )


def test_a_schema_given_at_registration_is_stored_and_shown(client):
    response = register(client, schema=SCHEMA)
    assert response.status_code == 201, response.text
    assert response.json()["params_schema"] == SCHEMA
    assert client.get("/models/seg-model").json()["params_schema"] == SCHEMA


def test_a_model_registered_without_a_schema_has_none(client):
    response = register(client)
    assert response.status_code == 201, response.text
    assert response.json()["params_schema"] is None


@pytest.mark.parametrize(
    ("schema", "detail"),
    [
        ({"type": "nonsense"}, "params_schema is not a valid JSON Schema (at params_schema.type)"),
        (
            {"properties": {"threshold": {"type": 5}}},
            "params_schema is not a valid JSON Schema (at params_schema.properties.threshold.type)",
        ),
        # Checked against the draft it declares: draft 4's exclusiveMinimum is a boolean.
        (
            {"$schema": "http://json-schema.org/draft-04/schema#", "exclusiveMinimum": 3},
            "params_schema is not a valid JSON Schema (at params_schema.exclusiveMinimum)",
        ),
        ("{not json", "params_schema is not valid JSON"),
        ("[1, 2]", "params_schema must be a JSON object"),
    ],
)
def test_a_schema_that_is_not_json_schema_is_refused_and_nothing_is_stored(client, settings, schema, detail):
    response = register(client, schema=schema, zip_bytes=make_zip({"weights.bin": b"w" * 100}))
    assert response.status_code == 422, response.text
    assert detail in response.json()["detail"]
    assert row_counts(client) == (0, 0)
    assert stored_files(settings) == []  # the model zip streamed in and was discarded


def test_patch_sets_checks_and_removes_the_schema(client):
    assert register(client).status_code == 201
    changed = client.patch("/models/seg-model", json={"params_schema": SCHEMA})
    assert changed.status_code == 200, changed.text
    assert changed.json()["params_schema"] == SCHEMA

    refused = client.patch("/models/seg-model", json={"params_schema": {"type": 12}})
    assert refused.status_code == 422
    assert "params_schema is not a valid JSON Schema" in refused.json()["detail"]
    assert client.get("/models/seg-model").json()["params_schema"] == SCHEMA

    removed = client.patch("/models/seg-model", json={"params_schema": None})
    assert removed.status_code == 200
    assert removed.json()["params_schema"] is None


def test_params_round_trip_into_the_status(client):
    assert register(client, schema=SCHEMA).status_code == 201
    params = {"threshold": 0.5, "method": "otsu", "layers": [1, 2, 3]}
    response = submit(client, params)
    assert response.status_code == 201, response.text
    uid = response.json()["uid"]
    assert response.json()["params"] == params
    assert client.get(f"/tasks/{uid}").json()["params"] == params
    assert task_row(client, uid).params == params


def test_a_task_without_params_for_a_model_without_schema_has_none(client):
    assert register(client).status_code == 201
    response = submit(client)
    assert response.status_code == 201, response.text
    assert response.json()["params"] is None


def test_params_without_a_schema_are_taken_as_given(client):
    assert register(client).status_code == 201
    response = submit(client, {"anything": {"nested": [1, None, "x"]}})
    assert response.status_code == 201, response.text
    assert response.json()["params"] == {"anything": {"nested": [1, None, "x"]}}


@pytest.mark.parametrize(
    ("params", "status", "detail"),
    [
        ({"threshold": "x"}, 422, "params.threshold: 'x' is not of type 'number'"),
        ({"threshold": -1}, 422, "params.threshold: -1 is less than the minimum of 0"),
        ({"threshold": 1, "layers": [1, "two"]}, 422, "params.layers[1]: 'two' is not of type 'integer'"),
        ({"threshold": 1, "colour": "red"}, 422, "params: Additional properties are not allowed"),
        (None, 422, "params: 'threshold' is a required property"),
        ({}, 422, "params: 'threshold' is a required property"),
        ("[1, 2]", 422, "params must be a JSON object, not list"),
        ('"text"', 422, "params must be a JSON object, not str"),
        ("{threshold: 1}", 422, "params is not valid JSON"),
        (json.dumps({"threshold": 1, "pad": "x" * PARAMS_MAX_BYTES}), 413, "params is larger than the limit"),
    ],
)
def test_bad_params_are_refused_with_the_failing_path_and_nothing_is_stored(
    client, settings, params, status, detail
):
    assert register(client, schema=SCHEMA).status_code == 201
    response = submit(client, params)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]
    assert row_counts(client) == (1, 0)
    assert stored_files(settings) == []  # the input zip streamed in and was discarded


def test_params_at_the_size_limit_are_accepted(client):
    assert register(client).status_code == 201
    text = json.dumps({"pad": ""})
    params = {"pad": "x" * (PARAMS_MAX_BYTES - len(text))}
    assert len(json.dumps(params).encode()) == PARAMS_MAX_BYTES
    response = submit(client, params)
    assert response.status_code == 201, response.text
    assert response.json()["params"] == params


def test_the_cache_switch_is_stored_on_the_task(client):
    assert register(client).status_code == 201
    default = submit(client).json()["uid"]
    forced = submit(client, cache="false").json()["uid"]
    assert task_row(client, default).use_cache is True
    assert task_row(client, forced).use_cache is False
