"""Models, error relaying, health, metrics and the OpenAPI document of the public API."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from inference_server.contract import HealthReport, ModelPublic, PublicRoutes
from local_platform.ports import free_port
from tests.public_api.stack import (
    ANONYMOUS_ALLOWED,
    BASE_IMAGE_TAG,
    METRICS_HEADERS,
    PrivateStack,
    ServerThread,
    make_zip,
    register_model,
    start_public_api,
    submit,
    unique_id,
)


@pytest.fixture(scope="module")
def orphan_public_url() -> Iterator[str]:
    """A public API whose private API is not there: nothing listens on its port."""
    server = start_public_api(f"http://127.0.0.1:{free_port()}")
    try:
        yield server.url
    finally:
        server.stop()


def _model_params(human_readable_id: str, **extra: object) -> dict[str, object]:
    return {
        "container_tag": BASE_IMAGE_TAG,
        "human_readable_id": human_readable_id,
        "description": "a model",
        "model_available": False,
        "use_gpu": False,
        **extra,
    }


def test_register_and_list_models(http: httpx.Client, public_url: str) -> None:
    plain = register_model(public_url)
    with_zip = unique_id()
    response = http.post(
        public_url + PublicRoutes.MODELS,
        params=_model_params(with_zip, model_available=True, use_gpu=True, memory_mb=512, gpu_memory_mb=8000),
        files={"zip_file": ("weights.zip", make_zip({"weights.bin": b"\x01" * 1000}), "application/zip")},
    )
    assert response.status_code == 200, response.text
    model = ModelPublic.model_validate(response.json())
    assert model.human_readable_id == with_zip
    assert model.model_available and model.use_gpu
    assert model.memory_mb == 512
    assert model.gpu_memory_mb == 8000
    assert model.model_zip_sha256
    listed = http.get(public_url + PublicRoutes.MODELS)
    assert listed.status_code == 200
    by_id = {item["human_readable_id"]: item for item in listed.json()}
    assert {plain, with_zip} <= by_id.keys()
    assert by_id[plain]["container_tag"] == BASE_IMAGE_TAG


def test_model_errors_pass_through_with_their_detail(http: httpx.Client, public_url: str) -> None:
    existing = register_model(public_url)
    duplicate = http.post(public_url + PublicRoutes.MODELS, params=_model_params(existing))
    assert duplicate.status_code == 409
    assert duplicate.json()["detail"]
    bad_tag = http.post(
        public_url + PublicRoutes.MODELS, params=_model_params(unique_id(), container_tag="Bad Tag!")
    )
    assert bad_tag.status_code == 422
    not_a_zip = http.post(
        public_url + PublicRoutes.MODELS,
        params=_model_params(unique_id(), model_available=True),
        files={"zip_file": ("weights.zip", b"definitely not a zip", "application/zip")},
    )
    assert not_a_zip.status_code == 400
    assert "zip" in not_a_zip.json()["detail"]
    missing = http.post(public_url + PublicRoutes.MODELS, params={"container_tag": BASE_IMAGE_TAG})
    assert missing.status_code == 422
    assert "human_readable_id" in missing.json()["detail"]
    out_of_range = http.post(public_url + PublicRoutes.MODELS, params=_model_params(unique_id(), memory_mb=1))
    assert out_of_range.status_code == 422
    assert "memory_mb" in out_of_range.json()["detail"]
    no_gpu_memory = http.post(
        public_url + PublicRoutes.MODELS, params=_model_params(unique_id(), gpu_memory_mb=0)
    )
    assert no_gpu_memory.status_code == 422
    assert "gpu_memory_mb" in no_gpu_memory.json()["detail"]
    without_zip = http.post(
        public_url + PublicRoutes.MODELS, params=_model_params(unique_id(), model_available=True)
    )
    assert without_zip.status_code == 422  # the private API's own rule, passed through
    assert isinstance(without_zip.json()["detail"], str)


def test_submit_errors_pass_through_with_their_detail(
    http: httpx.Client, public_url: str, model_id: str
) -> None:
    url = public_url + PublicRoutes.TASKS
    unknown_model = http.post(
        url,
        params={"model_human_readable_id": "no-such-model"},
        files={"zip_file": ("input.zip", make_zip({"a": b"a"}), "application/zip")},
    )
    assert unknown_model.status_code == 404
    assert "no-such-model" in unknown_model.json()["detail"]
    not_a_zip = http.post(
        url,
        params={"model_human_readable_id": model_id},
        files={"zip_file": ("input.zip", b"PK but not really a zip", "application/zip")},
    )
    assert not_a_zip.status_code == 400
    assert "zip" in not_a_zip.json()["detail"]
    wrong_field = http.post(
        url,
        params={"model_human_readable_id": model_id},
        files={"upload": ("input.zip", make_zip({"a": b"a"}), "application/zip")},
    )
    assert wrong_field.status_code == 422
    assert wrong_field.json()["detail"]
    no_body = http.post(url, params={"model_human_readable_id": model_id})
    assert no_body.status_code == 422
    no_model = http.post(url, files={"zip_file": ("input.zip", make_zip({"a": b"a"}), "application/zip")})
    assert no_model.status_code == 422


def test_upload_over_the_limit_is_413_before_reaching_the_private_api(
    http: httpx.Client, private_api: PrivateStack
) -> None:
    server = start_public_api(private_api.url, max_upload_bytes=1000)
    try:
        model_id = register_model(server.url)
        too_big = make_zip({"noise.bin": os.urandom(5000)})
        declared = http.post(
            server.url + PublicRoutes.TASKS,
            params={"model_human_readable_id": model_id},
            files={"zip_file": ("input.zip", too_big, "application/zip")},
        )
        assert declared.status_code == 413
        assert "1000" in declared.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: the relay has to count
            yield b'--b\r\nContent-Disposition: form-data; name="zip_file"; filename="a.zip"\r\n\r\n'
            yield too_big
            yield b"\r\n--b--\r\n"

        chunked = http.post(
            server.url + PublicRoutes.TASKS,
            params={"model_human_readable_id": model_id},
            headers={"content-type": "multipart/form-data; boundary=b"},
            content=chunks(),
        )
        assert chunked.status_code == 413
        small = submit(server.url, model_id)
        assert small
    finally:
        server.stop()


def test_private_api_down_is_503_not_500(http: httpx.Client, orphan_public_url: str) -> None:
    for method, path in [
        ("GET", PublicRoutes.MODELS),
        ("GET", PublicRoutes.TASK.format(uid="0123456789abcdef0123")),
        ("GET", PublicRoutes.TASK_STATUS.format(uid="0123456789abcdef0123")),
        ("DELETE", PublicRoutes.TASK.format(uid="0123456789abcdef0123")),
    ]:
        response = http.request(method, orphan_public_url + path)
        assert response.status_code == 503, (method, path, response.text)
        assert "unreachable" in response.json()["detail"]
    upload = http.post(
        orphan_public_url + PublicRoutes.TASKS,
        params={"model_human_readable_id": "some-model"},
        files={"zip_file": ("input.zip", make_zip({"a": b"a"}), "application/zip")},
    )
    assert upload.status_code == 503
    ready = http.get(orphan_public_url + PublicRoutes.HEALTH_READY)
    assert ready.status_code == 503
    report = HealthReport.model_validate(ready.json())
    assert report.status != "ok"
    assert "unreachable" in report.checks["private_api"]
    assert http.get(orphan_public_url + PublicRoutes.HEALTH_LIVE).status_code == 200


def test_wrong_service_token_is_a_502_with_a_clear_detail(
    http: httpx.Client, private_api: PrivateStack
) -> None:
    from public_api.config import PublicSettings
    from public_api.main import create_app

    settings = PublicSettings(
        private_api_url=private_api.url, service_token="not-the-right-token-at-all", **ANONYMOUS_ALLOWED
    )
    server = ServerThread(create_app(settings)).start()
    try:
        response = http.get(server.url + PublicRoutes.MODELS)
        assert response.status_code == 502
        assert "service token" in response.json()["detail"]
        ready = http.get(server.url + PublicRoutes.HEALTH_READY)
        assert ready.status_code == 503
    finally:
        server.stop()


def test_health(http: httpx.Client, public_url: str) -> None:
    live = http.get(public_url + PublicRoutes.HEALTH_LIVE)
    assert live.status_code == 200
    assert live.json() == {"status": "ok", "checks": {}}
    ready = http.get(public_url + PublicRoutes.HEALTH_READY)
    assert ready.status_code == 200, ready.text
    report = HealthReport.model_validate(ready.json())
    assert report.status == "ok"
    assert report.checks["private_api"] == "ok"
    assert len(report.checks) > 1  # the private API's own checks (database, RabbitMQ) come along


def test_metrics_count_requests_by_route_template(http: httpx.Client, public_url: str) -> None:
    for uid in ("0123456789abcdef0001", "0123456789abcdef0002"):
        assert http.get(public_url + PublicRoutes.TASK.format(uid=uid)).status_code == 554
    response = http.get(public_url + PublicRoutes.METRICS, headers=METRICS_HEADERS)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    poll = [
        line
        for line in lines
        if line.startswith("public_api_requests_total{")
        and 'route="/api/tasks/{uid}"' in line
        and 'status="554"' in line
    ]
    assert poll and float(poll[0].rsplit(" ", 1)[1]) >= 2
    assert any(line.startswith("public_api_request_duration_seconds_bucket{") for line in lines)
    assert not any("0123456789abcdef0001" in line for line in lines)


def test_openapi_documents_the_v12_routes_and_their_uploads(http: httpx.Client, public_url: str) -> None:
    schema = http.get(public_url + "/openapi.json").json()
    paths = schema["paths"]
    for path in (PublicRoutes.TASKS, PublicRoutes.TASK, PublicRoutes.MODELS):
        assert path in paths
    assert {"post"} <= paths[PublicRoutes.TASKS].keys()
    assert {"get", "delete"} <= paths[PublicRoutes.TASK].keys()
    assert {"get", "post"} <= paths[PublicRoutes.MODELS].keys()
    for path, required in ((PublicRoutes.TASKS, True), (PublicRoutes.MODELS, False)):
        body = paths[path]["post"]["requestBody"]
        assert body["required"] is required
        form = body["content"]["multipart/form-data"]["schema"]
        assert form["properties"]["zip_file"]["format"] == "binary"
    poll_codes = set(paths[PublicRoutes.TASK]["get"]["responses"])
    assert {"200", "551", "552", "553", "554"} <= poll_codes
    for extra in (PublicRoutes.TASK_STATUS, PublicRoutes.TASK_LOGS, PublicRoutes.TASK_CANCEL):
        assert extra in paths
    assert not [
        path for path in paths if path.endswith(("/claim", "/heartbeat", "/fail", "/release", "/input"))
    ]
    docs = http.get(public_url + "/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
