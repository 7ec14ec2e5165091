"""Nothing a caller sends takes the public API down: no body is read before the caller is known,
every JSON body has a size limit (both APIs), and an address that keeps failing the key check
is slowed down with 429s while valid keys keep working."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.requests import Request

from inference_server.contract import SERVICE_TOKEN_HEADER, ApiKeyRole, PrivateRoutes, PublicRoutes
from inference_server.serving import DEFAULT_MAX_JSON_BYTES
from public_api.auth import MISSING_KEY_DETAIL
from public_api.config import PublicSettings
from public_api.main import create_app
from public_api.ratelimit import FailureBudget, client_address
from tests.public_api.hostile import HUGE, MIB, MULTIPART, json_body, multipart_body, send
from tests.public_api.stack import (
    METRICS_HEADERS,
    SERVICE_TOKEN,
    PrivateStack,
    PublicProcess,
    register_model,
    shared_http,
    start_public_api,
    start_public_api_process,
)

# What the public API process may grow by, at its peak, while refusing every request below.
# Before the fix, the six requests below at once took its peak from 71 MiB to 1.24 GiB.
PEAK_GROWTH_LIMIT_KIB = 48 * 1024

# (method, path, content type, body factory): every public route that takes a body, the v1.2
# spellings without the trailing slash included.
BODY_ROUTES = [
    ("PATCH", PublicRoutes.MODEL.format(human_readable_id="passthrough"), "application/json", json_body),
    ("POST", PublicRoutes.TASKS + "?model_human_readable_id=passthrough", MULTIPART, multipart_body),
    (
        "POST",
        PublicRoutes.TASKS.rstrip("/") + "?model_human_readable_id=passthrough",
        MULTIPART,
        multipart_body,
    ),
    (
        "POST",
        PublicRoutes.MODELS + "?container_tag=a/b:1&human_readable_id=hostile",
        MULTIPART,
        multipart_body,
    ),
    (
        "POST",
        PublicRoutes.MODELS.rstrip("/") + "?container_tag=a/b:1&human_readable_id=hostile",
        MULTIPART,
        multipart_body,
    ),
    ("POST", PublicRoutes.TASK_CANCEL.format(uid="0" * 32), "application/json", json_body),
]
OPERATOR_ROUTES = [route for route in BODY_ROUTES if route[1].startswith(PublicRoutes.MODELS.rstrip("/"))]


def test_no_public_route_declares_a_body_that_fastapi_would_read_before_the_key_check() -> None:
    app = create_app(PublicSettings(service_token="hostile-" + "x" * 20))
    routes = [route for route in app.state.access_routes if isinstance(route, APIRoute)]
    assert len(routes) >= 15
    assert [(route.methods, route.path) for route in routes if route.body_field is not None] == []
    # Still documented for /docs and the fuzz tests.
    patch = app.openapi()["paths"][PublicRoutes.MODEL]["patch"]
    assert "application/json" in patch["requestBody"]["content"]


@pytest.fixture(scope="module")
def public_process(
    private_api: PrivateStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PublicProcess]:
    """The public API as deployed: its own process, production access rules."""
    process = start_public_api_process(
        private_api.url,
        tmp_path_factory.mktemp("public-process"),
        IS_UNAUTHENTICATED_RATE_PER_MINUTE="1000000",
    )
    try:
        yield process
    finally:
        process.stop()


def _refuse_all_at_once(
    process: PublicProcess, routes: list, headers: dict[str, str]
) -> list[tuple[str, int, bytes, int]]:
    def one(route: tuple) -> tuple[str, int, bytes, int]:
        method, path, content_type, body = route
        answer = send(
            process.url,
            method,
            path,
            body(HUGE),
            length=HUGE,
            headers={"Content-Type": content_type, **headers},
        )
        return f"{method} {path}", answer.status, answer.body, answer.sent

    # At once, as the attack that killed the process sent them.
    with ThreadPoolExecutor(max_workers=len(routes)) as pool:
        return list(pool.map(one, routes))


def test_400_mb_bodies_without_a_key_are_refused_unread(public_process: PublicProcess) -> None:
    before = public_process.memory_kib()
    answers = _refuse_all_at_once(public_process, BODY_ROUTES, {})
    after = public_process.memory_kib()
    print(
        f"public API memory before {before} after {after} (KiB); answers {[a[:2] + a[3:] for a in answers]}"
    )
    for what, status, body, sent in answers:
        assert status == 401, (what, status, body[:300])
        assert httpx.Response(status, content=body).json() == {"detail": MISSING_KEY_DETAIL}
        assert sent < HUGE // 10, f"{what}: the client could send {sent} bytes before the answer"
    assert after["VmHWM"] - before["VmHWM"] < PEAK_GROWTH_LIMIT_KIB, (before, after)
    assert shared_http().get(public_process.url + PublicRoutes.HEALTH_LIVE).status_code == 200


def test_400_mb_bodies_with_a_user_key_on_operator_routes_are_refused_unread(
    public_process: PublicProcess, private_api: PrivateStack
) -> None:
    key = private_api.create_key(f"hostile-user-{secrets.token_hex(3)}", ApiKeyRole.USER)
    before = public_process.memory_kib()
    answers = _refuse_all_at_once(public_process, OPERATOR_ROUTES, {"Authorization": f"Bearer {key}"})
    after = public_process.memory_kib()
    print(
        f"public API memory before {before} after {after} (KiB); answers {[a[:2] + a[3:] for a in answers]}"
    )
    for what, status, body, sent in answers:
        assert status == 403, (what, status, body[:300])
        assert sent < HUGE // 10, f"{what}: the client could send {sent} bytes before the answer"
    assert after["VmHWM"] - before["VmHWM"] < PEAK_GROWTH_LIMIT_KIB, (before, after)


def test_a_huge_json_body_from_an_operator_is_a_413_and_never_held(
    public_process: PublicProcess, private_api: PrivateStack
) -> None:
    key = private_api.create_key(f"hostile-operator-{secrets.token_hex(3)}", ApiKeyRole.OPERATOR)
    path = PublicRoutes.MODEL.format(human_readable_id="passthrough")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    before = public_process.memory_kib()
    declared = send(public_process.url, "PATCH", path, json_body(HUGE), length=HUGE, headers=headers)
    chunked = send(public_process.url, "PATCH", path, json_body(HUGE), length=None, headers=headers)
    after = public_process.memory_kib()
    print(f"public API memory before {before} after {after} (KiB); sent {declared.sent}, {chunked.sent}")
    for answer in (declared, chunked):
        assert answer.status == 413, answer.body[:300]
        assert (
            f"limit of {DEFAULT_MAX_JSON_BYTES} bytes"
            in httpx.Response(413, content=answer.body).json()["detail"]
        )
        assert answer.sent < 16 * MIB
    assert after["VmHWM"] - before["VmHWM"] < PEAK_GROWTH_LIMIT_KIB, (before, after)


def test_json_bodies_under_the_limit_are_read_and_other_media_types_refused(
    public_process: PublicProcess, private_api: PrivateStack
) -> None:
    key = private_api.create_key(f"json-operator-{secrets.token_hex(3)}", ApiKeyRole.OPERATOR)
    model = register_model(public_process.url, headers={"Authorization": f"Bearer {key}"})
    url = public_process.url + PublicRoutes.MODEL.format(human_readable_id=model)
    auth = {"Authorization": f"Bearer {key}"}
    # 900 KiB: under the limit, so read, parsed and validated (the description is too long).
    near_limit = shared_http().patch(url, json={"description": "d" * (900 * 1024)}, headers=auth)
    assert near_limit.status_code == 422, near_limit.text
    assert "body description" in near_limit.json()["detail"]
    changed = shared_http().patch(url, json={"description": "changed", "memory_mb": 256}, headers=auth)
    assert changed.status_code == 200, changed.text
    assert (changed.json()["description"], changed.json()["memory_mb"]) == ("changed", 256)
    as_text = shared_http().patch(
        url, content=b'{"description": "x"}', headers={**auth, "Content-Type": "text/plain"}
    )
    assert as_text.status_code == 415
    assert "application/json" in as_text.json()["detail"]
    not_json = shared_http().patch(
        url, content=b"{nope", headers={**auth, "Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    assert "not valid JSON" in not_json.json()["detail"]
    empty = shared_http().patch(url, headers={**auth, "Content-Type": "application/json"})
    assert empty.status_code == 422
    assert empty.json()["detail"] == "body: Field required"


@pytest.mark.parametrize("token", ["service", "none"])
def test_the_private_api_refuses_a_huge_json_body_with_413(private_api: PrivateStack, token: str) -> None:
    """Its routes do take declared JSON bodies, read before the token check: the limit bounds them."""
    headers = {"Content-Type": "application/json"}
    if token == "service":
        headers[SERVICE_TOKEN_HEADER] = SERVICE_TOKEN
    path = PrivateRoutes.TASK_FAIL.format(uid="0" * 32)
    declared = send(private_api.url, "POST", path, json_body(HUGE), length=HUGE, headers=headers)
    chunked = send(private_api.url, "POST", path, json_body(HUGE), length=None, headers=headers)
    for answer in (declared, chunked):
        assert answer.status == 413, answer.body[:300]
        detail = httpx.Response(413, content=answer.body).json()["detail"]
        assert f"limit of {DEFAULT_MAX_JSON_BYTES} bytes" in detail
        assert answer.sent < 16 * MIB


# --- failed key checks per address -------------------------------------------------------------

RATE = 3


@pytest.fixture(scope="module")
def limited_url(private_api: PrivateStack) -> Iterator[str]:
    server = start_public_api(
        private_api.url, anonymous_tasks=False, anonymous_models=False, unauthenticated_rate_per_minute=RATE
    )
    try:
        yield server.url
    finally:
        server.stop()


def test_an_address_failing_the_key_check_gets_429_while_valid_keys_work(
    limited_url: str, private_api: PrivateStack
) -> None:
    key = private_api.create_key(f"limited-{secrets.token_hex(3)}")
    client = {"X-Forwarded-For": "198.51.100.7"}  # from 127.0.0.1, which uvicorn trusts by default
    url = limited_url + PublicRoutes.TASKS
    refusals = [shared_http().get(url, headers=client).status_code for _ in range(RATE)]
    assert refusals == [401] * RATE
    limited = shared_http().get(url, headers=client)
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert "too many requests without a valid API key" in limited.json()["detail"]
    wrong_key = shared_http().get(url, headers={**client, "Authorization": "Bearer isk_00000000_" + "x" * 43})
    assert wrong_key.status_code == 429
    # An upload from the limited address is refused the same way, before its body is read.
    upload = send(
        limited_url,
        "POST",
        PublicRoutes.TASKS,
        multipart_body(HUGE),
        length=HUGE,
        headers={**client, "Content-Type": MULTIPART},
    )
    assert upload.status == 429
    assert upload.sent < HUGE // 10

    # Meanwhile a valid key from the same address works, and so does every other address.
    mine = shared_http().get(url, headers={**client, "Authorization": f"Bearer {key}"})
    assert mine.status_code == 200, mine.text
    elsewhere = shared_http().get(url, headers={"X-Forwarded-For": "198.51.100.8"})
    assert elsewhere.status_code == 401
    assert shared_http().get(limited_url + PublicRoutes.HEALTH_LIVE, headers=client).status_code == 200


def test_a_forwarded_address_counts_only_from_a_trusted_proxy(private_api: PrivateStack) -> None:
    # 127.0.0.1 is not the trusted proxy here: X-Forwarded-For is the caller's own claim, and
    # changing it buys no fresh budget.
    server = start_public_api(
        private_api.url,
        anonymous_tasks=False,
        unauthenticated_rate_per_minute=RATE,
        forwarded_allow_ips="192.0.2.1",
    )
    try:
        statuses = [
            shared_http()
            .get(server.url + PublicRoutes.TASKS, headers={"X-Forwarded-For": f"203.0.113.{n}"})
            .status_code
            for n in range(RATE + 1)
        ]
    finally:
        server.stop()
    assert statuses == [401] * RATE + [429]


def test_the_budget_refills_and_its_table_stays_bounded() -> None:
    now = [0.0]
    budget = FailureBudget(per_minute=6, max_clients=100, clock=lambda: now[0])
    assert [budget.spend("a") for _ in range(6)] == [None] * 6
    wait = budget.spend("a")
    assert wait is not None and wait == pytest.approx(10.0)
    now[0] += 10.0  # one failure's worth of refill (6 a minute)
    assert budget.spend("a") is None
    assert budget.spend("a") is not None
    for n in range(1000):
        budget.spend(f"flood-{n}")
        assert len(budget) <= 100


@pytest.mark.parametrize(
    ("peer", "counted_as"),
    [
        ("203.0.113.5", "203.0.113.5"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::99", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.5", "203.0.113.5"),
    ],
)
def test_ipv6_clients_are_counted_per_64(peer: str, counted_as: str) -> None:
    request = Request({"type": "http", "client": (peer, 1234), "headers": []})
    assert client_address(request) == counted_as


# --- the check Traefik asks before buffering ----------------------------------------------------


@pytest.fixture(scope="module")
def check_urls(private_api: PrivateStack) -> Iterator[dict[str, str]]:
    strict = start_public_api(private_api.url, anonymous_tasks=False, anonymous_models=False)
    tasks_open = start_public_api(private_api.url, anonymous_tasks=True, anonymous_models=False)
    try:
        yield {"strict": strict.url, "anonymous tasks": tasks_open.url}
    finally:
        strict.stop()
        tasks_open.stop()


AUTH_CHECK_CASES = [
    # (forwarded method, forwarded uri, who, switches, expected)
    ("POST", "/api/tasks/?model_human_readable_id=m", "anonymous", "strict", 401),
    ("POST", "/api/tasks?model_human_readable_id=m", "anonymous", "anonymous tasks", 200),
    ("POST", "/api/tasks/?model_human_readable_id=m", "user", "strict", 200),
    ("POST", "/api/%74asks/", "anonymous", "strict", 401),
    ("POST", "/api/models/?container_tag=a", "anonymous", "anonymous tasks", 401),
    ("POST", "/api/models/?container_tag=a", "user", "strict", 403),
    ("PATCH", "/api/models/m", "user", "strict", 403),
    ("PATCH", "/api/models/m", "operator", "strict", 200),
    ("POST", "/api/models", "operator", "strict", 200),
    ("POST", "/api/tasks/abc/cancel", "anonymous", "anonymous tasks", 200),
    # No route serves these: a key is needed, or Traefik would spool a body for a 404.
    ("POST", "/no/such/route", "anonymous", "anonymous tasks", 401),
    ("PUT", "/api/tasks/", "anonymous", "anonymous tasks", 401),
    ("POST", "/no/such/route", "user", "strict", 200),
    ("GET", "/health/live", "anonymous", "strict", 200),
    ("POST", "/api/tasks/", "wrong key", "anonymous tasks", 401),
    # /metrics: the metrics token or an operator key, whatever the switches say.
    ("GET", "/metrics", "anonymous", "anonymous tasks", 401),
    ("GET", "/metrics", "user", "strict", 403),
    ("GET", "/metrics", "operator", "strict", 200),
    ("GET", "/metrics", "metrics token", "strict", 200),
]


@pytest.mark.parametrize(("method", "uri", "who", "switches", "expected"), AUTH_CHECK_CASES)
def test_auth_check_answers_as_the_route_would(
    method: str,
    uri: str,
    who: str,
    switches: str,
    expected: int,
    check_urls: dict[str, str],
    private_api: PrivateStack,
    check_keys: dict[str, dict[str, str]],
) -> None:
    headers = {"X-Forwarded-Method": method, "X-Forwarded-Uri": uri, **check_keys[who]}
    response = shared_http().get(check_urls[switches] + PublicRoutes.AUTH_CHECK, headers=headers)
    assert response.status_code == expected, response.text
    if expected != 200:
        assert response.json()["detail"]


@pytest.fixture(scope="module")
def check_keys(private_api: PrivateStack) -> dict[str, dict[str, str]]:
    suffix = secrets.token_hex(3)
    user = private_api.create_key(f"check-user-{suffix}")
    operator = private_api.create_key(f"check-operator-{suffix}", ApiKeyRole.OPERATOR)
    return {
        "anonymous": {},
        "user": {"Authorization": f"Bearer {user}"},
        "operator": {"X-Token": operator},
        "wrong key": {"Authorization": "Bearer isk_00000000_" + "x" * 43},
        "metrics token": METRICS_HEADERS,
    }


def test_auth_check_without_a_forwarded_request_says_whether_the_key_is_valid(
    check_urls: dict[str, str], check_keys: dict[str, dict[str, str]]
) -> None:
    url = check_urls["anonymous tasks"] + PublicRoutes.AUTH_CHECK
    assert shared_http().get(url, headers=check_keys["user"]).status_code == 200
    assert shared_http().get(url).status_code == 401
    assert shared_http().get(url, headers=check_keys["wrong key"]).status_code == 401
