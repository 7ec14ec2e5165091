"""GET /api/overview through the public API: any valid key (a user's task figures are their own,
an operator's the platform's); callers without a key are refused with 401 even where anonymous
tasks are allowed, by the route and by Traefik's check alike."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from inference_server.contract import (
    OVERVIEW_HOURS_MAX,
    ApiKeyRole,
    PlatformOverview,
    PublicRoutes,
    TaskQueue,
)
from tests.helpers import make_zip
from tests.public_api.stack import PrivateStack, register_model, shared_http, start_public_api


@pytest.fixture(scope="module")
def base(private_api: PrivateStack) -> Iterator[str]:
    # Anonymous tasks allowed: the overview still needs a key.
    server = start_public_api(private_api.url, anonymous_tasks=True, anonymous_models=True)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keys(private_api: PrivateStack) -> dict[str, dict[str, str]]:
    suffix = secrets.token_hex(3)
    operator = private_api.create_key(f"operator-{suffix}", ApiKeyRole.OPERATOR)
    user = private_api.create_key(f"user-{suffix}")
    other = private_api.create_key(f"other-{suffix}")
    return {
        name: {"Authorization": f"Bearer {key}"}
        for name, key in [("operator", operator), ("user", user), ("other", other)]
    }


@pytest.fixture(scope="module")
def submitted(base: str, keys: dict[str, dict[str, str]]) -> None:
    """Pending CPU tasks: two of the user's, one of the other user's (no consumer runs them)."""
    model = register_model(base, headers=keys["operator"])
    for name in ("user", "user", "other"):
        response = shared_http().post(
            base + PublicRoutes.TASKS,
            params={"model_human_readable_id": model},
            files={"zip_file": ("input.zip", make_zip({"input.txt": b"hello"}), "application/zip")},
            headers=keys[name],
        )
        assert response.status_code == 200, response.text


def _get(base: str, headers: dict[str, str], **params: Any) -> httpx.Response:
    return shared_http().get(base + PublicRoutes.OVERVIEW, headers=headers, params=params)


def _overview(base: str, headers: dict[str, str], **params: Any) -> PlatformOverview:
    response = _get(base, headers, **params)
    assert response.status_code == 200, response.text
    return PlatformOverview.model_validate(response.json())


def test_anonymous_callers_are_refused_even_with_anonymous_tasks_on(base: str) -> None:
    response = _get(base, {})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["detail"]
    # Traefik's forwardAuth check answers the same, before any request reaches the route.
    check = shared_http().get(
        base + PublicRoutes.AUTH_CHECK,
        headers={"X-Forwarded-Method": "GET", "X-Forwarded-Uri": PublicRoutes.OVERVIEW + "?hours=2"},
    )
    assert check.status_code == 401


def test_a_wrong_key_is_refused(base: str) -> None:
    response = _get(base, {"Authorization": "Bearer isk_00000000_" + "a" * 43})
    assert response.status_code == 401 and response.json()["detail"]


def test_a_user_sees_their_own_tasks_and_the_platforms_queue(
    base: str, keys: dict[str, dict[str, str]], submitted: None
) -> None:
    overview = _overview(base, keys["user"])
    assert overview.scope == "own"
    assert (overview.pending, overview.running) == (2, 0)
    assert overview.queue_depth[TaskQueue.CPU.value] == 3
    assert overview.queue_depth[TaskQueue.GPU.value] == 0
    assert len(overview.history) == 24 and overview.history[-1].queue_depth == 3
    other = _overview(base, keys["other"])
    assert (other.scope, other.pending) == ("own", 1)
    check = shared_http().get(
        base + PublicRoutes.AUTH_CHECK,
        headers={"X-Forwarded-Method": "GET", "X-Forwarded-Uri": PublicRoutes.OVERVIEW, **keys["user"]},
    )
    assert check.status_code == 200


def test_an_operator_sees_every_task(base: str, keys: dict[str, dict[str, str]], submitted: None) -> None:
    overview = _overview(base, keys["operator"], hours=2)
    assert overview.scope == "all"
    assert overview.pending == 3
    assert overview.history_bucket_s == 2 * 3600 // 24


@pytest.mark.parametrize("hours", ["0", str(OVERVIEW_HOURS_MAX + 1), "soon"])
def test_hours_out_of_range_is_422(base: str, keys: dict[str, dict[str, str]], hours: str) -> None:
    response = _get(base, keys["user"], hours=hours)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]
