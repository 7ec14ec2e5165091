"""Who may do what on the public API: anonymous, user A, user B and an operator against every
endpoint, with the v1.2 compatibility switches (IS_ANONYMOUS_TASKS, IS_ANONYMOUS_MODELS) off and on.

Every refusal is also checked to have changed nothing.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from inference_server.contract import (
    ACTING_OWNER_HEADER,
    ACTING_ROLE_HEADER,
    ApiKeyRole,
    PublicRoutes,
    TaskPublic,
    TaskStatus,
)
from local_platform.ports import free_port
from private_api.db import make_engine, make_session_factory
from private_api.keys import revoke_key, set_limits
from public_api.auth import MISSING_KEY_DETAIL
from tests.helpers import register_model_public
from tests.public_api.stack import (
    BASE_IMAGE_TAG,
    METRICS_HEADERS,
    METRICS_TOKEN,
    ConsumerDriver,
    PrivateStack,
    make_zip,
    shared_http,
    start_public_api,
    unique_id,
    zip_members,
)

WHO = ("anonymous", "user_a", "user_b", "operator")
OUTPUT = {"result.txt": b"segmentation"}


@dataclass(frozen=True)
class Keys:
    user_a: str
    user_b: str
    operator: str
    names: dict[str, str]

    def headers(self, who: str) -> dict[str, str]:
        if who == "anonymous":
            return {}
        return {"Authorization": f"Bearer {getattr(self, who)}"}


@pytest.fixture(scope="module")
def keys(private_api: PrivateStack) -> Keys:
    suffix = secrets.token_hex(3)
    names = {who: f"{who.replace('_', '-')}-{suffix}" for who in ("user_a", "user_b", "operator")}
    return Keys(
        user_a=private_api.create_key(names["user_a"]),
        user_b=private_api.create_key(names["user_b"]),
        operator=private_api.create_key(names["operator"], ApiKeyRole.OPERATOR),
        names=names,
    )


@pytest.fixture(scope="module")
def strict_url(private_api: PrivateStack) -> Iterator[str]:
    """The default: both switches off."""
    server = start_public_api(private_api.url, anonymous_tasks=False, anonymous_models=False)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def open_url(private_api: PrivateStack) -> Iterator[str]:
    """Both v1.2 compatibility switches on."""
    server = start_public_api(private_api.url, anonymous_tasks=True, anonymous_models=True)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def model(strict_url: str, keys: Keys) -> str:
    return _register(strict_url, keys.headers("operator")).json()["human_readable_id"]


def _register(base: str, headers: dict[str, str], human_readable_id: str | None = None) -> httpx.Response:
    """The answer, whatever it is: these tests look at refusals as much as at registrations."""
    return register_model_public(
        shared_http(),
        human_readable_id or unique_id(),
        BASE_IMAGE_TAG,
        base_url=base,
        headers=headers,
        description="permission tests",
        check=False,
    )


def _submit(base: str, model: str, headers: dict[str, str]) -> httpx.Response:
    return shared_http().post(
        base + PublicRoutes.TASKS,
        params={"model_human_readable_id": model},
        files={"zip_file": ("input.zip", make_zip({"in.txt": b"scan"}), "application/zip")},
        headers=headers,
    )


def _finished_task(base: str, model: str, headers: dict[str, str], consumer: ConsumerDriver) -> str:
    response = _submit(base, model, headers)
    assert response.status_code == 200, response.text
    uid = response.json()
    consumer.run_to_finish(uid, make_zip(OUTPUT), logs="log line\n")
    return uid


def _status_as_operator(strict_url: str, keys: Keys, uid: str) -> TaskPublic | None:
    response = shared_http().get(
        strict_url + PublicRoutes.TASK_STATUS.format(uid=uid), headers=keys.headers("operator")
    )
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    return TaskPublic.model_validate(response.json())


def _model_as_operator(strict_url: str, keys: Keys, human_readable_id: str) -> dict | None:
    listed = shared_http().get(strict_url + PublicRoutes.MODELS, headers=keys.headers("operator")).json()
    return next((m for m in listed if m["human_readable_id"] == human_readable_id), None)


# --- the task routes ------------------------------------------------------------------------

TaskAction = Callable[[str, str, dict[str, str]], httpx.Response]
TASK_ACTIONS: dict[str, TaskAction] = {
    "poll": lambda base, uid, h: shared_http().get(base + PublicRoutes.TASK.format(uid=uid), headers=h),
    "status": lambda base, uid, h: shared_http().get(
        base + PublicRoutes.TASK_STATUS.format(uid=uid), headers=h
    ),
    "logs": lambda base, uid, h: shared_http().get(base + PublicRoutes.TASK_LOGS.format(uid=uid), headers=h),
    "cancel": lambda base, uid, h: shared_http().post(
        base + PublicRoutes.TASK_CANCEL.format(uid=uid), headers=h
    ),
    "delete": lambda base, uid, h: shared_http().delete(base + PublicRoutes.TASK.format(uid=uid), headers=h),
}
# What each caller gets on a finished task of user A's. The v1.2 routes say 554 where the
# others say 404: someone else's task is indistinguishable from an unknown one.
ON_USER_A_TASK_STRICT = {
    "poll": {"anonymous": 401, "user_a": 200, "user_b": 554, "operator": 200},
    "status": {"anonymous": 401, "user_a": 200, "user_b": 404, "operator": 200},
    "logs": {"anonymous": 401, "user_a": 200, "user_b": 404, "operator": 200},
    "cancel": {"anonymous": 401, "user_a": 200, "user_b": 404, "operator": 200},
    "delete": {"anonymous": 401, "user_a": 200, "user_b": 554, "operator": 200},
}
ON_USER_A_TASK_OPEN = {
    action: {**codes, "anonymous": codes["user_b"]} for action, codes in ON_USER_A_TASK_STRICT.items()
}
ON_ANONYMOUS_TASK_OPEN = {
    action: {"anonymous": 200, "user_a": codes["user_b"], "user_b": codes["user_b"], "operator": 200}
    for action, codes in ON_USER_A_TASK_STRICT.items()
}


def _check_task_action(
    action: str, expected: int, base: str, uid: str, who: str, keys: Keys, strict_url: str
) -> None:
    response = TASK_ACTIONS[action](base, uid, keys.headers(who))
    assert response.status_code == expected, (action, who, response.status_code, response.text)
    after = _status_as_operator(strict_url, keys, uid)
    if expected != 200:
        assert isinstance(response.json()["detail"], str)
        # Refused: the task is exactly as it was, output and all.
        assert after is not None and after.status == TaskStatus.FINISHED and after.output_present
        return
    if action == "poll":
        assert zip_members(response.content) == OUTPUT
    elif action == "logs":
        assert response.text == "log line\n"
    elif action == "delete":
        assert after is None
    else:
        assert TaskPublic.model_validate(response.json()).uid == uid


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("action", list(TASK_ACTIONS))
def test_task_routes_with_switches_off(
    action: str, who: str, strict_url: str, model: str, keys: Keys, consumer: ConsumerDriver
) -> None:
    uid = _finished_task(strict_url, model, keys.headers("user_a"), consumer)
    expected = ON_USER_A_TASK_STRICT[action][who]
    _check_task_action(action, expected, strict_url, uid, who, keys, strict_url)


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("action", list(TASK_ACTIONS))
def test_task_routes_with_switches_on(
    action: str,
    who: str,
    strict_url: str,
    open_url: str,
    model: str,
    keys: Keys,
    consumer: ConsumerDriver,
) -> None:
    users_task = _finished_task(open_url, model, keys.headers("user_a"), consumer)
    _check_task_action(action, ON_USER_A_TASK_OPEN[action][who], open_url, users_task, who, keys, strict_url)
    anonymous_task = _finished_task(open_url, model, {}, consumer)
    expected = ON_ANONYMOUS_TASK_OPEN[action][who]
    _check_task_action(action, expected, open_url, anonymous_task, who, keys, strict_url)


@pytest.mark.parametrize("who", WHO)
def test_submit(who: str, strict_url: str, open_url: str, model: str, keys: Keys) -> None:
    strict = _submit(strict_url, model, keys.headers(who))
    opened = _submit(open_url, model, keys.headers(who))
    assert strict.status_code == (401 if who == "anonymous" else 200), strict.text
    assert opened.status_code == 200, opened.text
    # The task is recorded under the key's owner: that owner (and operators) see it, others not.
    status = shared_http().get(
        open_url + PublicRoutes.TASK_STATUS.format(uid=opened.json()), headers=keys.headers(who)
    )
    assert status.status_code == 200
    assert _status_as_operator(strict_url, keys, opened.json()) is not None


def test_list_tasks(strict_url: str, open_url: str, model: str, keys: Keys) -> None:
    mine = {who: _submit(strict_url, model, keys.headers(who)).json() for who in ("user_a", "user_b")}
    anonymous_uid = _submit(open_url, model, {}).json()

    def listed(base: str, who: str) -> set[str]:
        response = shared_http().get(
            base + PublicRoutes.TASKS, headers=keys.headers(who), params={"limit": 1000}
        )
        assert response.status_code == 200, response.text
        return {task["uid"] for task in response.json()}

    assert shared_http().get(strict_url + PublicRoutes.TASKS).status_code == 401
    for who, uid in mine.items():
        other = mine["user_b" if who == "user_a" else "user_a"]
        seen = listed(strict_url, who)
        assert uid in seen and other not in seen and anonymous_uid not in seen
    assert set(mine.values()) | {anonymous_uid} <= listed(strict_url, "operator")
    # Anonymous tasks are reachable by uid only: listing them would hand out everyone's uids.
    assert listed(open_url, "anonymous") == set()


# --- the model routes -----------------------------------------------------------------------

MODEL_ADMIN_STRICT = {"anonymous": 401, "user_a": 403, "user_b": 403, "operator": 200}


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("switches", ["off", "on"])
def test_list_models(who: str, switches: str, strict_url: str, open_url: str, model: str, keys: Keys) -> None:
    base = strict_url if switches == "off" else open_url
    response = shared_http().get(base + PublicRoutes.MODELS, headers=keys.headers(who))
    expected = 401 if (who == "anonymous" and switches == "off") else 200
    assert response.status_code == expected
    if expected == 200:
        assert model in {m["human_readable_id"] for m in response.json()}


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("switches", ["off", "on"])
def test_register_update_delete_models(
    who: str, switches: str, strict_url: str, open_url: str, keys: Keys
) -> None:
    base = strict_url if switches == "off" else open_url
    expected = MODEL_ADMIN_STRICT[who] if switches == "off" else 200
    headers = keys.headers(who)

    new_id = unique_id()
    registered = _register(base, headers, new_id)
    assert registered.status_code == expected, registered.text
    assert (_model_as_operator(strict_url, keys, new_id) is not None) == (expected == 200)

    existing = _register(strict_url, keys.headers("operator")).json()["human_readable_id"]
    path = PublicRoutes.MODEL.format(human_readable_id=existing)
    updated = shared_http().patch(
        base + path, json={"description": "changed", "memory_mb": 256}, headers=headers
    )
    assert updated.status_code == expected, updated.text
    after = _model_as_operator(strict_url, keys, existing)
    assert after is not None
    assert (after["description"], after["memory_mb"]) == (
        ("changed", 256) if expected == 200 else ("permission tests", None)
    )

    deleted = shared_http().delete(base + path, headers=headers)
    assert deleted.status_code == expected, deleted.text
    assert (_model_as_operator(strict_url, keys, existing) is None) == (expected == 200)
    if expected == 403:
        assert deleted.json()["detail"] == "only operators may register, change or remove models"


def test_model_routes_answer_404_and_409_to_operators(
    strict_url: str, model: str, keys: Keys, consumer: ConsumerDriver
) -> None:
    headers = keys.headers("operator")
    missing = PublicRoutes.MODEL.format(human_readable_id="no-such-model")
    assert (
        shared_http().patch(strict_url + missing, json={"description": "x"}, headers=headers).status_code
        == 404
    )
    assert shared_http().delete(strict_url + missing, headers=headers).status_code == 404
    busy = _register(strict_url, headers).json()["human_readable_id"]
    uid = _submit(strict_url, busy, keys.headers("user_a")).json()
    path = PublicRoutes.MODEL.format(human_readable_id=busy)
    refused = shared_http().delete(strict_url + path, headers=headers)
    assert refused.status_code == 409
    assert "pending or running" in refused.json()["detail"]
    assert _status_as_operator(strict_url, keys, uid) is not None


# --- keys, headers and messages -------------------------------------------------------------


def test_missing_key_is_a_401_with_a_clear_message_and_a_bearer_challenge(strict_url: str) -> None:
    for method, path in [
        ("GET", PublicRoutes.MODELS),
        ("POST", PublicRoutes.MODELS),
        ("GET", PublicRoutes.TASKS),
        ("POST", PublicRoutes.TASKS),
        ("GET", PublicRoutes.TASK.format(uid="0" * 32)),
        ("PATCH", PublicRoutes.MODEL.format(human_readable_id="m")),
    ]:
        response = shared_http().request(method, strict_url + path)
        assert response.status_code == 401, (method, path)
        assert response.json() == {"detail": MISSING_KEY_DETAIL}
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer isk_00000000_" + "x" * 43},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"X-Token": "not-a-key"},
        {"X-Token": "k" * 600},
    ],
)
def test_a_wrong_key_is_a_401_even_where_anonymous_callers_are_let_in(
    headers: dict[str, str], strict_url: str, open_url: str, model: str
) -> None:
    for base in (strict_url, open_url):
        for response in (
            shared_http().get(base + PublicRoutes.MODELS, headers=headers),
            _submit(base, model, headers),
        ):
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["detail"]


def test_x_token_works_like_bearer(strict_url: str, model: str, keys: Keys, consumer: ConsumerDriver) -> None:
    uid = _finished_task(strict_url, model, {"X-Token": keys.user_a}, consumer)
    poll = shared_http().get(strict_url + PublicRoutes.TASK.format(uid=uid), headers={"X-Token": keys.user_a})
    assert poll.status_code == 200
    assert zip_members(poll.content) == OUTPUT
    other = shared_http().get(
        strict_url + PublicRoutes.TASK.format(uid=uid), headers={"X-Token": keys.user_b}
    )
    assert other.status_code == 554
    registered = _register(strict_url, {"X-Token": keys.operator})
    assert registered.status_code == 200


def test_someone_elses_task_looks_exactly_like_an_unknown_one(
    strict_url: str, model: str, keys: Keys, consumer: ConsumerDriver
) -> None:
    uid = _finished_task(strict_url, model, keys.headers("user_a"), consumer)
    unknown = secrets.token_urlsafe(24)
    for action in TASK_ACTIONS:
        if action == "delete":
            continue  # checked last, it would remove the task for the other actions
        theirs = TASK_ACTIONS[action](strict_url, uid, keys.headers("user_b"))
        nobodys = TASK_ACTIONS[action](strict_url, unknown, keys.headers("user_b"))
        assert theirs.status_code == nobodys.status_code
        assert theirs.json()["detail"].replace(uid, "UID") == nobodys.json()["detail"].replace(unknown, "UID")
    theirs = TASK_ACTIONS["delete"](strict_url, uid, keys.headers("user_b"))
    nobodys = TASK_ACTIONS["delete"](strict_url, unknown, keys.headers("user_b"))
    assert theirs.status_code == nobodys.status_code == 554
    assert theirs.json()["detail"].replace(uid, "UID") == nobodys.json()["detail"].replace(unknown, "UID")


def test_callers_cannot_claim_an_identity_through_the_acting_headers(
    strict_url: str, open_url: str, model: str, keys: Keys, consumer: ConsumerDriver
) -> None:
    uid = _finished_task(strict_url, model, keys.headers("user_a"), consumer)
    forged = {ACTING_OWNER_HEADER: keys.names["user_a"], ACTING_ROLE_HEADER: "operator"}
    as_b = shared_http().get(
        strict_url + PublicRoutes.TASK_STATUS.format(uid=uid), headers={**keys.headers("user_b"), **forged}
    )
    assert as_b.status_code == 404
    as_anonymous = shared_http().get(open_url + PublicRoutes.TASK_STATUS.format(uid=uid), headers=forged)
    assert as_anonymous.status_code == 404
    assert _status_as_operator(strict_url, keys, uid) is not None


def test_health_and_docs_need_no_key(strict_url: str) -> None:
    for path in (PublicRoutes.HEALTH_LIVE, PublicRoutes.HEALTH_READY, "/docs", "/openapi.json"):
        assert shared_http().get(strict_url + path).status_code == 200, path


@pytest.mark.parametrize("url_fixture", ["strict_url", "open_url"])
def test_metrics_are_for_operator_keys_and_the_metrics_token(
    request: pytest.FixtureRequest, url_fixture: str, keys: Keys
) -> None:
    """Whatever the anonymous switches say: the platform's figures name every model and consumer."""
    url = request.getfixturevalue(url_fixture) + PublicRoutes.METRICS
    anonymous = shared_http().get(url)
    assert anonymous.status_code == 401 and anonymous.json()["detail"]
    for who in ("user_a", "user_b"):
        refused = shared_http().get(url, headers=keys.headers(who))
        assert refused.status_code == 403, who
        assert "IS_METRICS_TOKEN" in refused.json()["detail"]
    wrong = shared_http().get(url, headers={"Authorization": "Bearer " + METRICS_TOKEN[::-1]})
    assert wrong.status_code == 401
    for headers in (keys.headers("operator"), METRICS_HEADERS):
        allowed = shared_http().get(url, headers=headers)
        assert allowed.status_code == 200, allowed.text
        assert "# TYPE inference_tasks_total counter" in allowed.text  # the platform's, fetched
        assert "inference_platform_metrics_up 1.0" in allowed.text
        assert "# TYPE public_api_requests_total counter" in allowed.text  # its own


def test_a_revoked_key_stops_working_within_the_cache_time(private_api: PrivateStack, model: str) -> None:
    ttl = 2.0
    server = start_public_api(
        private_api.url, anonymous_tasks=False, anonymous_models=False, key_cache_ttl_s=ttl
    )
    name = f"soon-revoked-{secrets.token_hex(3)}"
    headers = {"Authorization": f"Bearer {private_api.create_key(name)}"}
    url = server.url + PublicRoutes.TASKS
    try:
        # The server remembers the answer until (the moment it got this request) + ttl: no sooner
        # than asked_at + ttl, no later than answered_at + ttl. Both bounds below follow from that
        # alone, so they hold however slowly a loaded machine answers.
        asked_at = time.monotonic()
        assert shared_http().get(url, headers=headers).status_code == 200
        answered_at = time.monotonic()
        engine = make_engine(private_api.database_url)
        try:
            with make_session_factory(engine)() as session:
                revoke_key(session=session, name_or_id=name)
        finally:
            engine.dispose()
        # Within the cache time the remembered answer stands: no private API call per request.
        remembered = shared_http().get(url, headers=headers).status_code
        if time.monotonic() - asked_at < ttl:
            assert remembered == 200
        while True:
            sent_at = time.monotonic()
            status = shared_http().get(url, headers=headers).status_code
            if status != 200:
                break
            assert sent_at - answered_at < ttl, "the revoked key still works after the cache time"
            time.sleep(0.1)
        assert status == 401
        assert time.monotonic() - asked_at >= ttl  # it was the cache, and it expired
    finally:
        server.stop()


def test_a_keys_limits_reach_the_caller_through_the_public_api(
    private_api: PrivateStack, strict_url: str, model: str
) -> None:
    """Above the key's maximum priority: 403; at its limit of active tasks: 429 with Retry-After,
    passed through from the private API; neither stores anything."""
    name = f"limited-{secrets.token_hex(3)}"
    headers = {"Authorization": f"Bearer {private_api.create_key(name)}"}
    engine = make_engine(private_api.database_url)
    try:
        with make_session_factory(engine)() as session:
            set_limits(session=session, name_or_id=name, max_priority=2, max_active_tasks=1)
    finally:
        engine.dispose()
    http = shared_http()

    def submit(priority: int) -> httpx.Response:
        return http.post(
            strict_url + PublicRoutes.TASKS,
            params={"model_human_readable_id": model, "priority": priority},
            files={"zip_file": ("input.zip", make_zip({"in.txt": b"scan"}), "application/zip")},
            headers=headers,
        )

    def own_tasks() -> list[str]:
        listed = http.get(strict_url + PublicRoutes.TASKS, headers=headers)
        assert listed.status_code == 200
        return sorted(task["uid"] for task in listed.json())

    too_high = submit(3)
    assert too_high.status_code == 403
    assert f"maximum priority of key {name!r} (2)" in too_high.json()["detail"]
    assert own_tasks() == []
    first = submit(2)
    assert first.status_code == 200, first.text
    uid = first.json()
    refused = submit(0)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "10"
    assert "limit of active tasks (1)" in refused.json()["detail"]
    assert own_tasks() == [uid]
    cancelled = http.post(strict_url + PublicRoutes.TASK_CANCEL.format(uid=uid), headers=headers)
    assert cancelled.status_code == 200
    again = submit(0)
    assert again.status_code == 200, again.text
    assert own_tasks() == sorted([uid, again.json()])


def test_key_lookup_with_the_private_api_down_is_503_not_401(keys: Keys) -> None:
    server = start_public_api(f"http://127.0.0.1:{free_port()}", anonymous_tasks=False)
    try:
        response = shared_http().get(server.url + PublicRoutes.TASKS, headers=keys.headers("user_a"))
        assert response.status_code == 503
        assert "unreachable" in response.json()["detail"]
    finally:
        server.stop()


@pytest.mark.parametrize("who", ["anonymous", "user_a"])
@pytest.mark.parametrize("switch", ["run_as_root", "allow_network", "writable_rootfs"])
def test_anonymous_models_switch_does_not_open_the_host(
    who: str, switch: str, strict_url: str, open_url: str, keys: Keys
) -> None:
    """With IS_ANONYMOUS_MODELS on, callers without an operator key manage models, but cannot
    loosen their isolation; an operator can."""
    new_id = unique_id()
    refused = shared_http().post(
        open_url + PublicRoutes.MODELS,
        params={"container_tag": BASE_IMAGE_TAG, "human_readable_id": new_id, switch: True},
        headers=keys.headers(who),
    )
    assert refused.status_code == 403, refused.text
    assert switch in refused.json()["detail"]
    assert _model_as_operator(strict_url, keys, new_id) is None

    existing = _register(open_url, keys.headers(who)).json()["human_readable_id"]
    path = PublicRoutes.MODEL.format(human_readable_id=existing)
    patched = shared_http().patch(open_url + path, json={switch: True}, headers=keys.headers(who))
    assert patched.status_code == 403, patched.text
    assert _model_as_operator(strict_url, keys, existing)[switch] is False
    by_operator = shared_http().patch(open_url + path, json={switch: True}, headers=keys.headers("operator"))
    assert by_operator.status_code == 200 and by_operator.json()[switch] is True


def test_anonymous_callers_cannot_remove_a_model_with_other_owners_tasks(
    strict_url: str, open_url: str, keys: Keys, consumer: ConsumerDriver
) -> None:
    model = _register(open_url, {}).json()["human_readable_id"]
    _finished_task(open_url, model, keys.headers("user_a"), consumer)
    path = PublicRoutes.MODEL.format(human_readable_id=model)

    refused = shared_http().delete(open_url + path)
    assert refused.status_code == 403, refused.text
    assert "other owners" in refused.json()["detail"]
    assert _model_as_operator(strict_url, keys, model) is not None
    assert shared_http().delete(open_url + path, headers=keys.headers("operator")).status_code == 200
