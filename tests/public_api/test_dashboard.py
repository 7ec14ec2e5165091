"""The dashboard over plain HTTP against a real private API: login and its failure budget, the
session cookie's attributes, CSRF on every action, logout, who sees which page, the security
headers, and that Traefik's check lets every dashboard route through to its own cookie check."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator

import httpx
import pytest

from inference_server.contract import (
    DASHBOARD_CSRF_FIELD,
    DASHBOARD_CSRF_HEADER,
    DASHBOARD_SESSION_COOKIE,
    ApiKeyRole,
    ConsumerHeartbeat,
    GpuReading,
    PrivateRoutes,
    PublicRoutes,
)
from public_api.config import PublicSettings
from public_api.dashboard.routes import router as dashboard_router
from public_api.deps import Access, access_for
from public_api.main import create_app
from tests.helpers import make_zip
from tests.public_api.stack import ConsumerDriver, PrivateStack, register_model, start_public_api

DASHBOARD = PublicRoutes.DASHBOARD
CSRF_INPUT = re.compile(rf'name="{DASHBOARD_CSRF_FIELD}" value="([^"]+)"')
LOGIN_FAILURES_ALLOWED = 3


@pytest.fixture(scope="module")
def base_url(private_api: PrivateStack) -> Iterator[str]:
    """A public API with the anonymous switches off and a small budget of failed key checks."""
    server = start_public_api(
        private_api.url,
        anonymous_tasks=False,
        anonymous_models=False,
        unauthenticated_rate_per_minute=LOGIN_FAILURES_ALLOWED,
    )
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keys(private_api: PrivateStack) -> dict[str, str]:
    suffix = secrets.token_hex(3)
    return {
        "operator": private_api.create_key(f"dash-operator-{suffix}", ApiKeyRole.OPERATOR),
        "alice": private_api.create_key(f"dash-alice-{suffix}"),
        "bob": private_api.create_key(f"dash-bob-{suffix}"),
    }


@pytest.fixture(scope="module")
def dashboard_model(base_url: str, keys: dict[str, str]) -> str:
    return register_model(base_url, headers={"Authorization": f"Bearer {keys['operator']}"})


def browser_client(base_url: str, forwarded_for: str | None = None) -> httpx.Client:
    # Each test's failed logins come "from" an address of its own (X-Forwarded-For from the
    # trusted 127.0.0.1), so one test's failures never spend another's budget.
    headers = {"X-Forwarded-For": forwarded_for or f"10.9.{secrets.randbelow(250)}.{secrets.randbelow(250)}"}
    return httpx.Client(base_url=base_url, headers=headers, timeout=30)


def log_in(client: httpx.Client, key: str) -> str:
    """Logs `client` in; returns the session's CSRF token as the overview page shows it."""
    response = client.post(f"{DASHBOARD}/login", data={"key": key})
    assert response.status_code == 303, response.text
    assert response.headers["location"] == f"{DASHBOARD}/overview"
    page = client.get(f"{DASHBOARD}/overview")
    assert page.status_code == 200, page.text
    match = CSRF_INPUT.search(page.text)
    assert match is not None, page.text
    return match.group(1)


def submit_task(base_url: str, model: str, key: str) -> str:
    response = httpx.post(
        base_url + PublicRoutes.TASKS,
        params={"model_human_readable_id": model},
        files={"zip_file": ("input.zip", make_zip({"x.txt": b"x"}), "application/zip")},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return str(response.json())


def test_the_login_page_carries_the_security_headers(base_url: str) -> None:
    with browser_client(base_url) as client:
        response = client.get(f"{DASHBOARD}/login")

    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cache-control"] == "no-store"
    # No inline script: every <script> loads a file (the policy would block any other).
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", response.text) == []


def test_a_wrong_key_is_refused_and_spends_the_addresss_budget_of_failures(base_url: str) -> None:
    with browser_client(base_url) as client:
        answers = [
            client.post(f"{DASHBOARD}/login", data={"key": f"isk_wrong_{i}"})
            for i in range(LOGIN_FAILURES_ALLOWED + 1)
        ]

    assert [answer.status_code for answer in answers] == [401] * LOGIN_FAILURES_ALLOWED + [429]
    assert "unknown or was revoked" in answers[0].text
    assert int(answers[-1].headers["retry-after"]) >= 1
    assert all(DASHBOARD_SESSION_COOKIE not in answer.cookies for answer in answers)


def test_the_session_cookie_is_httponly_strict_and_secure_only_over_https(
    base_url: str, keys: dict[str, str]
) -> None:
    with browser_client(base_url) as client:
        plain = client.post(f"{DASHBOARD}/login", data={"key": keys["alice"]})
    with browser_client(base_url) as client:
        # What Traefik says of a browser that came over HTTPS (trusted from 127.0.0.1 only).
        client.headers["X-Forwarded-Proto"] = "https"
        behind_tls = client.post(f"{DASHBOARD}/login", data={"key": keys["alice"]})

    cookie = plain.headers["set-cookie"]
    assert cookie.startswith(f"{DASHBOARD_SESSION_COOKIE}=")
    attributes = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "samesite=strict", f"path={DASHBOARD}"} <= attributes
    assert "secure" not in attributes
    assert "secure" in {part.strip().lower() for part in behind_tls.headers["set-cookie"].split(";")}


def test_without_a_session_pages_lead_to_the_login_and_fragments_answer_401(base_url: str) -> None:
    with browser_client(base_url) as client:
        page = client.get(f"{DASHBOARD}/tasks")
        fragment = client.get(f"{DASHBOARD}/fragments/overview")
        client.cookies.set(DASHBOARD_SESSION_COOKIE, "not-a-session")
        forged = client.get(f"{DASHBOARD}/overview")

    assert page.status_code == 303 and page.headers["location"] == f"{DASHBOARD}/login"
    assert fragment.status_code == 401
    assert forged.status_code == 303


def test_an_action_without_the_csrf_token_is_refused(
    base_url: str, keys: dict[str, str], dashboard_model: str
) -> None:
    uid = submit_task(base_url, dashboard_model, keys["alice"])
    with browser_client(base_url) as client:
        csrf = log_in(client, keys["alice"])
        missing = client.post(f"{DASHBOARD}/tasks/{uid}/cancel", data={})
        wrong = client.post(f"{DASHBOARD}/tasks/{uid}/cancel", data={DASHBOARD_CSRF_FIELD: "x" * len(csrf)})
        still = client.get(f"{DASHBOARD}/fragments/tasks/{uid}")
        by_header = client.post(f"{DASHBOARD}/tasks/{uid}/cancel", headers={DASHBOARD_CSRF_HEADER: csrf})
        done = client.get(f"{DASHBOARD}/fragments/tasks/{uid}")

    assert missing.status_code == 403 and "CSRF" in missing.text
    assert wrong.status_code == 403
    assert 'id="task-status">pending<' in still.text
    assert by_header.status_code == 303
    assert 'id="task-status">cancelled<' in done.text


def test_logout_ends_the_session_server_side(base_url: str, keys: dict[str, str]) -> None:
    with browser_client(base_url) as client:
        csrf = log_in(client, keys["alice"])
        cookie = client.cookies[DASHBOARD_SESSION_COOKIE]
        refused = client.post(f"{DASHBOARD}/logout", data={})
        assert refused.status_code == 403
        logged_out = client.post(f"{DASHBOARD}/logout", data={DASHBOARD_CSRF_FIELD: csrf})

    assert logged_out.status_code == 303 and logged_out.headers["location"] == f"{DASHBOARD}/login"
    assert "max-age=0" in logged_out.headers["set-cookie"].lower()
    with browser_client(base_url) as replay:
        # The old cookie, sent again as if never cleared: the session is gone on the server.
        replay.cookies.set(DASHBOARD_SESSION_COOKIE, cookie)
        again = replay.get(f"{DASHBOARD}/overview")
    assert again.status_code == 303 and again.headers["location"] == f"{DASHBOARD}/login"


def test_a_user_sees_only_their_own_tasks_and_no_operator_page(
    base_url: str, keys: dict[str, str], dashboard_model: str
) -> None:
    bobs = submit_task(base_url, dashboard_model, keys["bob"])
    alices = submit_task(base_url, dashboard_model, keys["alice"])
    unknown = "0" * 8 + bobs[8:][::-1]
    with browser_client(base_url) as client:
        log_in(client, keys["alice"])
        listing = client.get(f"{DASHBOARD}/tasks")
        own = client.get(f"{DASHBOARD}/tasks/{alices}")
        other = client.get(f"{DASHBOARD}/tasks/{bobs}")
        missing = client.get(f"{DASHBOARD}/tasks/{unknown}")
        consumers = client.get(f"{DASHBOARD}/consumers")
        audit = client.get(f"{DASHBOARD}/audit")

    assert alices in listing.text and bobs not in listing.text
    assert f"{DASHBOARD}/consumers" not in listing.text and f"{DASHBOARD}/audit" not in listing.text
    assert own.status_code == 200
    assert other.status_code == missing.status_code == 404
    assert other.text.replace(bobs, "UID") == missing.text.replace(unknown, "UID")
    assert consumers.status_code == 403 and audit.status_code == 403


def test_an_operator_registers_and_edits_a_model_from_the_models_page(
    base_url: str, keys: dict[str, str]
) -> None:
    model = f"dash-model-{secrets.token_hex(3)}"
    with browser_client(base_url) as client:
        csrf = log_in(client, keys["operator"])
        registered = client.post(
            f"{DASHBOARD}/models",
            data={
                DASHBOARD_CSRF_FIELD: csrf,
                "human_readable_id": model,
                "container_tag": "inference-server/base:bookworm",
                "memory_mb": "512",
                "cacheable": "on",
            },
            files={"zip_file": ("model.zip", make_zip({"weights.txt": b"w"}), "application/zip")},
        )
        edited = client.post(
            f"{DASHBOARD}/models/{model}",
            # The edit form sends the whole model: a box left unticked turns its switch off.
            data={
                DASHBOARD_CSRF_FIELD: csrf,
                "description": "edited here",
                "timeout_s": "120",
                "cacheable": "on",
            },
        )
        bad = client.post(f"{DASHBOARD}/models/{model}", data={DASHBOARD_CSRF_FIELD: csrf, "pids": "lots"})
    with browser_client(base_url) as user:
        user_csrf = log_in(user, keys["alice"])
        refused = user.post(f"{DASHBOARD}/models/{model}", data={DASHBOARD_CSRF_FIELD: user_csrf})

    assert registered.status_code == 303, registered.text
    assert edited.status_code == 303, edited.text
    assert bad.status_code == 422 and "pids" in bad.text
    assert refused.status_code == 403
    listed = httpx.get(
        base_url + PublicRoutes.MODELS, headers={"Authorization": f"Bearer {keys['operator']}"}, timeout=30
    ).json()
    (entry,) = [m for m in listed if m["human_readable_id"] == model]
    assert entry["model_available"] is True and entry["cacheable"] is True
    assert entry["memory_mb"] is None  # the edit sent it empty: back to the platform default
    assert entry["description"] == "edited here" and entry["timeout_s"] == 120


def test_traefiks_check_lets_every_dashboard_route_through_to_its_own_cookie_check() -> None:
    app = create_app(PublicSettings(service_token=secrets.token_urlsafe(24)))
    routes = app.state.access_routes
    paths = {(method, route.path) for route in dashboard_router.routes for method in route.methods}  # type: ignore[attr-defined]

    assert len(paths) > 10
    for method, path in paths:
        uri = path.replace("{uid}", "0123456789abcdef0123456789abcdef").replace("{name}", "dashboard.css")
        uri = uri.replace("{human_readable_id}", "m").replace("{consumer_id}", "c")
        assert access_for(routes, method, uri) is Access.OPEN, (method, uri)


def test_the_consumers_page_shows_a_gpus_memory_use_and_utilisation_from_its_heartbeat(
    base_url: str, private_api: PrivateStack, keys: dict[str, str]
) -> None:
    consumer_id = f"dash-gpu-{secrets.token_hex(3)}"
    driver = ConsumerDriver(private_api.url, consumer_id)
    try:
        registered = driver.http.put(
            PrivateRoutes.CONSUMER.format(consumer_id=consumer_id),
            json={
                "host": "gpu-host",
                "cpus": 16,
                "memory_mb": 65536,
                "gpus": [
                    {"index": 0, "uuid": "GPU-a", "name": "H200", "memory_total_mb": 143_771},
                    {"index": 1, "uuid": "GPU-b", "name": "H200", "memory_total_mb": 143_771},
                ],
                "takes_gpu_tasks": True,
            },
        )
        assert registered.status_code == 200, registered.text
        # NVML read GPU 0 only (GPU 1's figures are unknown).
        beat = ConsumerHeartbeat(
            gpu_readings=[GpuReading(index=0, memory_used_bytes=20 * 1024**3, utilization_ratio=0.42)]
        )
        answered = driver.http.post(
            PrivateRoutes.CONSUMER_HEARTBEAT.format(consumer_id=consumer_id), json=beat.model_dump()
        )
        assert answered.status_code == 200, answered.text
    finally:
        driver.close()

    with browser_client(base_url) as client:
        log_in(client, keys["operator"])
        fragment = client.get(f"{DASHBOARD}/fragments/consumers")

    assert fragment.status_code == 200
    row = fragment.text.split(f'data-consumer="{consumer_id}"')[1].split("</tr>")[0]
    gpus = re.findall(r'data-gpu="(\d)">(.*?)</div>', row, re.DOTALL)
    figures = {index: " ".join(text.split()) for index, text in gpus}
    assert figures["0"] == "#0 H200, 20.0 GiB of 140.4 GiB used, 42% busy"
    assert figures["1"] == "#1 H200, 140.4 GiB"
