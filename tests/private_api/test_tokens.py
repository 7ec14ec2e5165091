"""Least privilege between the services: which service token opens which private API route.

Every route of the app is called with each kind of caller (the full-access token, the public
API's, the consumers', a wrong one, none) and must answer as the table below says. The table is
written out here, not taken from the code: a route added without a rule, or a rule changed by
accident, makes the matrix test fail.
"""

from __future__ import annotations

import os
import re
import stat

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import ValidationError

from inference_server.api_docs import ASSETS_PATH, DOCS_PATH, REDOC_PATH
from inference_server.contract import CONSUMER_ID_HEADER, SERVICE_TOKEN_HEADER, TaskStatus
from local_platform.launcher import (
    CONSUMER_TOKEN_FILE,
    PUBLIC_API_TOKEN_FILE,
    SERVICE_TOKEN_FILE,
    LocalPlatform,
)
from local_platform.ports import free_port
from private_api.config import PrivateSettings
from tests.private_api.conftest import SERVICE_TOKEN
from tests.private_api.helpers import as_consumer, make_zip, register_model, submit_ok

PUBLIC_API_TOKEN = "public-api-token-0123456789"
CONSUMER_TOKEN = "consumer-token-0123456789ab"

PUBLIC = "public-api"
CONSUMER = "consumer"

# (method, path) -> the roles besides the full-access token that may call it.
EXPECTED: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/health/ready"): frozenset({PUBLIC}),
    ("GET", "/metrics"): frozenset({PUBLIC}),
    ("POST", "/auth/resolve"): frozenset({PUBLIC}),
    ("GET", "/models"): frozenset({PUBLIC, CONSUMER}),
    ("POST", "/models"): frozenset({PUBLIC}),
    ("GET", "/models/{human_readable_id}"): frozenset({PUBLIC}),
    ("PATCH", "/models/{human_readable_id}"): frozenset({PUBLIC}),
    ("DELETE", "/models/{human_readable_id}"): frozenset({PUBLIC}),
    ("GET", "/models/{human_readable_id}/zip"): frozenset({CONSUMER}),
    ("GET", "/tasks"): frozenset({PUBLIC}),
    ("POST", "/tasks"): frozenset({PUBLIC}),
    ("GET", "/tasks/{uid}"): frozenset({PUBLIC}),
    ("DELETE", "/tasks/{uid}"): frozenset({PUBLIC}),
    ("POST", "/tasks/{uid}/cancel"): frozenset({PUBLIC}),
    ("POST", "/tasks/wait"): frozenset({PUBLIC}),
    ("GET", "/tasks/{uid}/output"): frozenset({PUBLIC}),
    ("GET", "/tasks/{uid}/logs"): frozenset({PUBLIC}),
    ("GET", "/tasks/{uid}/input"): frozenset({CONSUMER}),
    ("GET", "/tasks/{uid}/model-from"): frozenset({CONSUMER}),
    ("POST", "/tasks/{uid}/claim"): frozenset({CONSUMER}),
    ("POST", "/tasks/{uid}/heartbeat"): frozenset({CONSUMER}),
    ("POST", "/tasks/{uid}/output"): frozenset({CONSUMER}),
    ("PUT", "/tasks/{uid}/logs"): frozenset({CONSUMER}),
    ("POST", "/tasks/{uid}/fail"): frozenset({CONSUMER}),
    ("POST", "/tasks/{uid}/release"): frozenset({CONSUMER}),
    ("POST", "/tasks/{uid}/cache-lookup"): frozenset({CONSUMER}),
    ("PUT", "/consumers/{consumer_id}"): frozenset({CONSUMER}),
    ("POST", "/consumers/{consumer_id}/heartbeat"): frozenset({CONSUMER}),
    # Relayed for operator keys only (tests/private_api/test_consumer_registry.py).
    ("GET", "/consumers"): frozenset({PUBLIC}),
    ("POST", "/consumers/{consumer_id}/drain"): frozenset({PUBLIC}),
    ("DELETE", "/consumers/{consumer_id}/drain"): frozenset({PUBLIC}),
    # Relayed for operator keys only (tests/private_api/test_audit.py).
    ("GET", "/audit"): frozenset({PUBLIC}),
    # The dashboard's sessions and overview (tests/private_api/test_dashboard_sessions.py).
    ("POST", "/sessions"): frozenset({PUBLIC}),
    ("POST", "/sessions/resolve"): frozenset({PUBLIC}),
    ("POST", "/sessions/end"): frozenset({PUBLIC}),
    ("GET", "/overview"): frozenset({PUBLIC}),
}
# Open to anyone: orchestrators probe liveness without a secret.
OPEN = {("GET", "/health/live")}

CALLERS: dict[str, dict[str, str]] = {
    "admin": {SERVICE_TOKEN_HEADER: SERVICE_TOKEN},
    PUBLIC: {SERVICE_TOKEN_HEADER: PUBLIC_API_TOKEN},
    CONSUMER: {SERVICE_TOKEN_HEADER: CONSUMER_TOKEN},
    "wrong": {SERVICE_TOKEN_HEADER: "not-a-token-of-this-platform"},
    "missing": {},
}


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    # Access is decided before the database is asked; one database is enough.
    return sqlite_url


@pytest.fixture
def settings(make_settings) -> PrivateSettings:
    return make_settings(public_api_token=PUBLIC_API_TOKEN, consumer_token=CONSUMER_TOKEN)


def as_caller(client: TestClient, caller: str) -> TestClient:
    """A client on the same running app that sends only `caller`'s token (the fixture's client
    sends the full-access one on every request)."""
    return TestClient(client.app, headers=CALLERS[caller])


def app_routes(client: TestClient) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves, however its routers are nested."""
    app = client.app
    try:
        # FastAPI 0.16x keeps included routers as one entry each and resolves them lazily.
        from fastapi.routing import iter_route_contexts

        entries: list = list(iter_route_contexts(app.routes))
    except ImportError:
        entries = list(app.routes)
    docs = {app.openapi_url, DOCS_PATH, REDOC_PATH, ASSETS_PATH, app.swagger_ui_oauth2_redirect_url}
    routes: set[tuple[str, str]] = set()
    for entry in entries:
        if isinstance(getattr(entry, "original_route", entry), APIRoute):
            routes.update((method, entry.path) for method in entry.methods)
        else:
            # The documentation pages and their assets: they describe the routes and hold no data.
            assert entry.path in docs, f"{entry.path}: a route that is not an APIRoute has no rule here"
    return routes


def test_every_route_of_the_app_has_a_rule(client: TestClient) -> None:
    routes = app_routes(client)
    assert routes - set(EXPECTED) - OPEN == set(), "routes without a rule in EXPECTED"
    assert (set(EXPECTED) | OPEN) - routes == set(), "rules for routes the app does not have"


def test_each_token_opens_exactly_its_routes(client: TestClient) -> None:
    wrong: list[str] = []
    for method, path in sorted(app_routes(client)):
        # Placeholders that name nothing: the guard answers before anything is looked up, and
        # an allowed call gets as far as a 404 or 422.
        url = re.sub(r"\{[^}]+\}", "no-such-thing", path)
        for caller in CALLERS:
            response = as_caller(client, caller).request(
                method, url, headers={CONSUMER_ID_HEADER: "consumer-a"}
            )
            status = response.status_code
            body = response.json() if "json" in response.headers.get("content-type", "") else None
            detail = str(body.get("detail", "")) if isinstance(body, dict) else ""
            if (method, path) in OPEN:
                allowed = True
            elif caller in ("wrong", "missing"):
                if status != 401 or SERVICE_TOKEN_HEADER not in detail:
                    wrong.append(f"{caller} {method} {path}: {status} {detail!r}, expected 401")
                continue
            else:
                allowed = caller == "admin" or caller in EXPECTED[(method, path)]
            if allowed and status in (401, 403):
                wrong.append(f"{caller} {method} {path}: {status} {detail!r}, expected to be let through")
            if not allowed and (status != 403 or f"the {caller} service token may not call" not in detail):
                wrong.append(f"{caller} {method} {path}: {status} {detail!r}, expected 403")
    assert not wrong, "\n".join(wrong)


def test_consumer_token_runs_the_task_it_holds_and_reads_no_other(client: TestClient) -> None:
    register_model(client, zip_bytes=make_zip({"weights.bin": b"w" * 64}))
    uid = submit_ok(client)["uid"]
    other_uid = submit_ok(client)["uid"]
    consumer = as_caller(client, CONSUMER)
    holder, other = as_consumer("consumer-a"), as_consumer("consumer-b")

    # Not claimed yet: nobody holds it, so its input (a patient's data) stays closed.
    assert consumer.get(f"/tasks/{uid}/input", headers=holder).status_code == 409
    assert consumer.post(f"/tasks/{uid}/claim", headers=holder).status_code == 200
    assert consumer.post(f"/tasks/{uid}/heartbeat", headers=holder).status_code == 200
    assert consumer.get(f"/tasks/{uid}/input", headers=holder).status_code == 200
    assert consumer.get("/models/seg-model/zip", headers=holder).status_code == 200
    refused = consumer.get(f"/tasks/{uid}/input", headers=other)
    assert refused.status_code == 409 and "does not hold" in refused.json()["detail"]
    assert consumer.get(f"/tasks/{uid}/input").status_code == 422  # who is asking?
    assert consumer.put(f"/tasks/{uid}/logs", content=b"done\n", headers=holder).status_code == 204
    finished = consumer.post(
        f"/tasks/{uid}/output", files={"zip_file": ("output.zip", make_zip())}, headers=holder
    )
    assert finished.status_code == 200 and finished.json()["status"] == TaskStatus.FINISHED
    # Done: the input is nobody's to read any more.
    assert consumer.get(f"/tasks/{uid}/input", headers=holder).status_code == 409

    # The same token cannot look around: no task lists, no status, no outputs, no models.
    for method, url in [
        ("GET", "/tasks"),
        ("GET", f"/tasks/{other_uid}"),
        ("GET", f"/tasks/{uid}/output"),
        ("DELETE", f"/tasks/{other_uid}"),
        ("DELETE", "/models/seg-model"),
        ("GET", "/metrics"),
    ]:
        assert consumer.request(method, url, headers=holder).status_code == 403, (method, url)
    assert client.get(f"/tasks/{other_uid}").json()["status"] == TaskStatus.PENDING


def test_public_api_token_relays_users_but_runs_nothing(client: TestClient) -> None:
    public = as_caller(client, PUBLIC)
    response = public.post(
        "/models",
        params={
            "human_readable_id": "seg-model",
            "container_tag": "inference-server/test-script:1",
            "description": "a test model",
            "use_gpu": False,
            "model_available": False,
        },
    )
    assert response.status_code == 201, response.text
    submitted = public.post(
        "/tasks", params={"model_human_readable_id": "seg-model"}, files={"zip_file": ("in.zip", make_zip())}
    )
    assert submitted.status_code == 201, submitted.text
    uid = submitted.json()["uid"]
    assert public.get(f"/tasks/{uid}").json()["status"] == TaskStatus.PENDING
    assert public.get("/health/ready").status_code == 200

    claim = public.post(f"/tasks/{uid}/claim", headers=as_consumer("consumer-a"))
    assert claim.status_code == 403
    assert claim.json()["detail"] == "the public-api service token may not call POST /tasks/{uid}/claim"
    assert public.get(f"/tasks/{uid}/input").status_code == 403
    assert client.get(f"/tasks/{uid}").json()["status"] == TaskStatus.PENDING


def test_a_role_without_its_token_configured_does_not_exist(make_settings, start_app) -> None:
    client = start_app(make_settings())  # only IS_SERVICE_TOKEN, as before the roles existed
    assert client.get("/models").status_code == 200
    for caller in (PUBLIC, CONSUMER):
        response = as_caller(client, caller).get("/health/ready")
        assert response.status_code == 401, caller


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"public_api_token": SERVICE_TOKEN}, "public_api_token"),
        ({"consumer_token": SERVICE_TOKEN}, "consumer_token"),
        ({"public_api_token": PUBLIC_API_TOKEN, "consumer_token": PUBLIC_API_TOKEN}, "consumer_token"),
        ({"consumer_token": "short"}, "consumer_token"),
        ({"public_api_token": ""}, "public_api_token"),
    ],
)
def test_settings_refuse_short_or_shared_tokens(values: dict[str, str], problem: str) -> None:
    with pytest.raises(ValidationError) as raised:
        PrivateSettings(service_token=SERVICE_TOKEN, **values)
    assert [error["loc"] for error in raised.value.errors()] == [(problem,)]


def test_launcher_hands_each_service_only_its_own_token(tmp_path, monkeypatch) -> None:
    for name in ("IS_SERVICE_TOKEN", "IS_PUBLIC_API_TOKEN", "IS_CONSUMER_TOKEN", "IS_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("IS_RABBITMQ_URL", "amqp://user:secret@broker:5672/%2F")
    platform = LocalPlatform(data_dir=tmp_path / "data", public_port=free_port())

    tokens = {platform.service_token, platform.public_api_token, platform.consumer_token}
    assert len(tokens) == 3 and all(len(token) >= 16 for token in tokens)
    for name in (SERVICE_TOKEN_FILE, PUBLIC_API_TOKEN_FILE, CONSUMER_TOKEN_FILE):
        assert stat.S_IMODE(os.stat(platform.data_dir / name).st_mode) == 0o600, name

    private = platform.service_env("private_api")
    assert private["IS_SERVICE_TOKEN"] == platform.service_token
    assert private["IS_PUBLIC_API_TOKEN"] == platform.public_api_token
    assert private["IS_CONSUMER_TOKEN"] == platform.consumer_token
    assert "IS_DATABASE_URL" in private and "IS_RABBITMQ_URL" in private

    public = platform.service_env("public_api")
    assert public["IS_SERVICE_TOKEN"] == platform.public_api_token
    withheld = {"IS_PUBLIC_API_TOKEN", "IS_CONSUMER_TOKEN", "IS_DATABASE_URL", "IS_RABBITMQ_URL"}
    assert withheld.isdisjoint(public)
    assert not any("secret@broker" in value for value in public.values())

    consumer = platform.service_env("job_consumer")
    assert consumer["IS_SERVICE_TOKEN"] == platform.consumer_token
    assert {"IS_PUBLIC_API_TOKEN", "IS_CONSUMER_TOKEN", "IS_DATABASE_URL"}.isdisjoint(consumer)
    assert consumer["IS_RABBITMQ_URL"] == "amqp://user:secret@broker:5672/%2F"

    # A restart on the same data folder keeps the same tokens.
    again = LocalPlatform(data_dir=tmp_path / "data", public_port=free_port())
    assert (again.service_token, again.public_api_token, again.consumer_token) == (
        platform.service_token,
        platform.public_api_token,
        platform.consumer_token,
    )
