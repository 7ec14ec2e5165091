"""Params, params_schema and the result cache through the public API: the form fields and the
cache switch reach the private API, its refusals come back as they are, and a cached answer
shows in the status."""

from __future__ import annotations

import json
from typing import Any

import httpx

from inference_server.contract import (
    MODEL_PARAMS_SCHEMA_FIELD,
    PrivateRoutes,
    PublicRoutes,
    TaskPublic,
    TaskStatus,
    TaskSubmitFields,
)
from tests.public_api.stack import (
    BASE_IMAGE_TAG,
    ConsumerDriver,
    PrivateStack,
    make_zip,
    shared_http,
    unique_id,
)

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"threshold": {"type": "number"}},
    "required": ["threshold"],
}
IMAGE_ID = "sha256:" + "a" * 64


def register(public_url: str, schema: Any, **query: Any) -> httpx.Response:
    text = schema if isinstance(schema, str) else json.dumps(schema)
    return shared_http().post(
        public_url + PublicRoutes.MODELS,
        params={
            "human_readable_id": unique_id(),
            "container_tag": BASE_IMAGE_TAG,
            "description": "a model with parameters",
            "model_available": False,
            "use_gpu": False,
            **query,
        },
        files={MODEL_PARAMS_SCHEMA_FIELD: (None, text)},
    )


def submit(
    public_url: str, model_id: str, params: Any, key: str | None = None, **query: Any
) -> httpx.Response:
    data = {TaskSubmitFields.PARAMS: params if isinstance(params, str) else json.dumps(params)}
    return shared_http().post(
        public_url + PublicRoutes.TASKS,
        params={"model_human_readable_id": model_id, **query},
        headers=bearer(key),
        data=data,
        files={"zip_file": ("input.zip", make_zip({"scan.txt": b"voxels"}), "application/zip")},
    )


def bearer(key: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {key}"} if key else None


def status(public_url: str, uid: str, key: str | None = None) -> TaskPublic:
    response = shared_http().get(public_url + PublicRoutes.TASK_STATUS.format(uid=uid), headers=bearer(key))
    assert response.status_code == 200, response.text
    return TaskPublic.model_validate(response.json())


def lookup(consumer: ConsumerDriver, uid: str) -> dict[str, Any]:
    consumer.claim(uid)
    response = consumer.http.post(
        PrivateRoutes.TASK_CACHE_LOOKUP.format(uid=uid), json={"image_id": IMAGE_ID}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_a_schema_and_cacheable_given_at_registration_are_shown(public_url: str) -> None:
    response = register(public_url, SCHEMA, cacheable=True)
    assert response.status_code == 200, response.text  # v1.2 answers 200
    assert response.json()["params_schema"] == SCHEMA
    assert response.json()["cacheable"] is True


def test_a_schema_that_is_not_json_schema_is_refused(public_url: str) -> None:
    response = register(public_url, {"type": "nonsense"})
    assert response.status_code == 422
    assert "params_schema is not a valid JSON Schema" in response.json()["detail"]


def test_patch_changes_the_schema_and_refuses_an_invalid_one(public_url: str) -> None:
    model_id = register(public_url, SCHEMA).json()["human_readable_id"]
    url = public_url + PublicRoutes.MODEL.format(human_readable_id=model_id)
    changed = shared_http().patch(url, json={"params_schema": {"type": "object"}, "cacheable": True})
    assert changed.status_code == 200, changed.text
    assert changed.json()["params_schema"] == {"type": "object"}
    assert changed.json()["cacheable"] is True
    refused = shared_http().patch(url, json={"params_schema": {"required": "threshold"}})
    assert refused.status_code == 422
    assert "params_schema is not a valid JSON Schema" in refused.json()["detail"]


def test_params_on_the_v12_route_round_trip_and_bad_ones_name_the_path(public_url: str) -> None:
    model_id = register(public_url, SCHEMA).json()["human_readable_id"]
    accepted = submit(public_url, model_id, {"threshold": 0.25})
    assert accepted.status_code == 200, accepted.text
    assert status(public_url, accepted.json()).params == {"threshold": 0.25}

    wrong_type = submit(public_url, model_id, {"threshold": "x"})
    assert wrong_type.status_code == 422
    assert wrong_type.json()["detail"] == "params.threshold: 'x' is not of type 'number'"
    not_object = submit(public_url, model_id, "[0.25]")
    assert not_object.status_code == 422
    assert "params must be a JSON object" in not_object.json()["detail"]


def test_a_cached_answer_shows_in_the_status_and_cache_false_runs(
    public_url: str, consumer: ConsumerDriver, private_api: PrivateStack
) -> None:
    # Results answer only their own key's tasks (anonymous ones never), so this user has one.
    key = private_api.create_key(unique_id("cache-user"))
    model_id = register(public_url, SCHEMA, cacheable=True).json()["human_readable_id"]
    original = submit(public_url, model_id, {"threshold": 1}, key).json()
    assert lookup(consumer, original) == {"hit": False, "cached_from": None}
    consumer.finish(original, make_zip({"mask.txt": b"mask"}))

    forced = submit(public_url, model_id, {"threshold": 1}, key, cache="false").json()
    assert lookup(consumer, forced)["hit"] is False
    assert status(public_url, forced, key).status == TaskStatus.RUNNING

    cached = submit(public_url, model_id, {"threshold": 1}, key).json()
    assert lookup(consumer, cached) == {"hit": True, "cached_from": original}
    task = status(public_url, cached, key)
    assert task.status == TaskStatus.FINISHED
    assert task.cached_from == original
    output = shared_http().get(public_url + PublicRoutes.TASK.format(uid=cached), headers=bearer(key))
    assert output.status_code == 200
    first = shared_http().get(public_url + PublicRoutes.TASK.format(uid=original), headers=bearer(key))
    assert output.content == first.content
