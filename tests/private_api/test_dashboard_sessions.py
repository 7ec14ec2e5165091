"""Dashboard sessions in the private API: log in with a key, resolve the session, log out; expiry,
key revocation and the service tokens that may call these routes."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from inference_server.contract import (
    DASHBOARD_TOKEN_MAX_LENGTH,
    SERVICE_TOKEN_HEADER,
    ApiKeyRole,
    DashboardSession,
    DashboardSessionCreated,
    PrivateRoutes,
)
from private_api import keys
from private_api.config import PrivateSettings
from private_api.models import DashboardSessionRecord, utcnow

PUBLIC_API_TOKEN = "public-api-token-0123456789"
CONSUMER_TOKEN = "consumer-token-0123456789ab"


@pytest.fixture
def settings(make_settings) -> PrivateSettings:
    return make_settings(public_api_token=PUBLIC_API_TOKEN, consumer_token=CONSUMER_TOKEN)


@pytest.fixture
def public_api(client: TestClient) -> TestClient:
    """The same app, called as the public API is: with its own service token."""
    return TestClient(client.app, headers={SERVICE_TOKEN_HEADER: PUBLIC_API_TOKEN})


def _create_key(client: TestClient, name: str, role: ApiKeyRole = ApiKeyRole.USER) -> str:
    with client.app.state.session_factory() as session:
        key, _ = keys.create_key(session=session, name=name, role=role)
    return key


def _login(api: TestClient, key: str) -> DashboardSessionCreated:
    response = api.post(PrivateRoutes.SESSIONS, json={"key": key})
    assert response.status_code == 201, response.text
    return DashboardSessionCreated.model_validate(response.json())


def _resolve(api: TestClient, token: str) -> DashboardSession | None:
    response = api.post(PrivateRoutes.SESSION_RESOLVE, json={"token": token})
    if response.status_code == 401:
        # The Bearer challenge tells "no such session" from a refused service token.
        assert response.headers["www-authenticate"].startswith("Bearer"), response.headers
        assert response.json()["detail"]
        return None
    assert response.status_code == 200, response.text
    return DashboardSession.model_validate(response.json())


def _session_rows(client: TestClient) -> list[DashboardSessionRecord]:
    with client.app.state.session_factory() as session:
        return list(session.scalars(select(DashboardSessionRecord)))


def test_login_resolve_and_logout(
    client: TestClient, public_api: TestClient, settings: PrivateSettings
) -> None:
    key = _create_key(client, "alice")
    before = utcnow()
    created = _login(public_api, key)
    assert created.principal.name == "alice" and created.principal.role == ApiKeyRole.USER
    lifetime = timedelta(hours=settings.dashboard_session_hours)
    assert before + lifetime <= created.expires_at <= utcnow() + lifetime
    assert len(created.token) <= DASHBOARD_TOKEN_MAX_LENGTH and created.csrf_token != created.token

    # Stored only as its SHA-256.
    (row,) = _session_rows(client)
    assert row.token_sha256 == hashlib.sha256(created.token.encode()).hexdigest()
    assert created.token not in (row.token_sha256, row.csrf_token)

    resolved = _resolve(public_api, created.token)
    assert resolved == DashboardSession(
        principal=created.principal, csrf_token=created.csrf_token, expires_at=created.expires_at
    )

    # A second login is a session of its own: logging one out leaves the other.
    other = _login(public_api, key)
    assert other.token != created.token and other.csrf_token != created.csrf_token

    ended = public_api.post(PrivateRoutes.SESSION_END, json={"token": created.token})
    assert ended.status_code == 204 and ended.content == b""
    assert _resolve(public_api, created.token) is None
    assert _resolve(public_api, other.token) is not None
    # Logging out again, or a session that never existed, is no error.
    assert public_api.post(PrivateRoutes.SESSION_END, json={"token": created.token}).status_code == 204
    assert public_api.post(PrivateRoutes.SESSION_END, json={"token": "never-issued"}).status_code == 204
    assert len(_session_rows(client)) == 1


def test_operator_login_names_the_operator(client: TestClient, public_api: TestClient) -> None:
    created = _login(public_api, _create_key(client, "root", ApiKeyRole.OPERATOR))
    resolved = _resolve(public_api, created.token)
    assert resolved is not None and resolved.principal.is_operator and resolved.principal.name == "root"


@pytest.mark.parametrize(
    "key",
    [
        "isk_00000000_" + "a" * 43,  # well formed, unknown
        "not-a-key",
        "isk_",
    ],
)
def test_unknown_or_malformed_key_gets_a_bearer_challenge(
    client: TestClient, public_api: TestClient, key: str
) -> None:
    _create_key(client, "alice")
    response = public_api.post(PrivateRoutes.SESSIONS, json={"key": key})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["detail"] == "unknown or revoked API key"
    assert _session_rows(client) == []


def test_a_wrong_secret_for_a_real_key_id_is_refused(client: TestClient, public_api: TestClient) -> None:
    key = _create_key(client, "alice")
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    assert public_api.post(PrivateRoutes.SESSIONS, json={"key": forged}).status_code == 401


def test_unknown_token_resolves_to_nothing(client: TestClient, public_api: TestClient) -> None:
    _login(public_api, _create_key(client, "alice"))
    assert _resolve(public_api, "x" * DASHBOARD_TOKEN_MAX_LENGTH) is None


def test_expired_session_resolves_to_nothing_and_maintenance_deletes_it(
    client: TestClient, public_api: TestClient
) -> None:
    key = _create_key(client, "alice")
    expired, live = _login(public_api, key), _login(public_api, key)
    with client.app.state.session_factory() as session:
        session.execute(
            update(DashboardSessionRecord)
            .where(DashboardSessionRecord.token_sha256 == hashlib.sha256(expired.token.encode()).hexdigest())
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
    assert _resolve(public_api, expired.token) is None
    assert _resolve(public_api, live.token) is not None
    assert len(_session_rows(client)) == 2

    client.app.state.maintenance.sweep_once()
    (remaining,) = _session_rows(client)
    assert remaining.token_sha256 == hashlib.sha256(live.token.encode()).hexdigest()
    assert _resolve(public_api, live.token) is not None


def test_session_lifetime_follows_the_setting(make_settings, start_app) -> None:
    client = start_app(make_settings(dashboard_session_hours=0.5))
    before = utcnow()
    created = _login(client, _create_key(client, "alice"))
    assert before + timedelta(minutes=30) <= created.expires_at <= utcnow() + timedelta(minutes=30)


def test_revoking_the_key_ends_its_sessions(client: TestClient, public_api: TestClient) -> None:
    alice, bob = _create_key(client, "alice"), _create_key(client, "bob")
    alice_session, bob_session = _login(public_api, alice), _login(public_api, bob)
    with client.app.state.session_factory() as session:
        keys.revoke_key(session=session, name_or_id="alice")
    assert _resolve(public_api, alice_session.token) is None
    assert _resolve(public_api, bob_session.token) is not None
    # Nor can the revoked key log in again.
    assert public_api.post(PrivateRoutes.SESSIONS, json={"key": alice}).status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", PrivateRoutes.SESSIONS, {"key": "isk_00000000_" + "a" * 43}),
        ("POST", PrivateRoutes.SESSION_RESOLVE, {"token": "some-token"}),
        ("POST", PrivateRoutes.SESSION_END, {"token": "some-token"}),
    ],
)
def test_only_the_public_api_and_full_access_tokens_may_call(
    client: TestClient, method: str, path: str, body: dict[str, str]
) -> None:
    for token, expected in [
        ("not-a-token-of-this-platform", 401),
        (CONSUMER_TOKEN, 403),
    ]:
        response = TestClient(client.app, headers={SERVICE_TOKEN_HEADER: token}).request(
            method, path, json=body
        )
        assert response.status_code == expected, (token, response.text)
        # A refused service token carries no Bearer challenge: the public API must not read it as
        # "no such key or session".
        assert "www-authenticate" not in response.headers
        assert (
            SERVICE_TOKEN_HEADER in response.json()["detail"] or "may not call" in response.json()["detail"]
        )
    missing = TestClient(client.app).request(method, path, json=body)
    assert missing.status_code == 401 and "www-authenticate" not in missing.headers
    # The full-access token passes the guard (and gets the route's own answer).
    assert client.request(method, path, json=body).status_code in (204, 401)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (PrivateRoutes.SESSIONS, {}),
        (PrivateRoutes.SESSIONS, {"key": ""}),
        (PrivateRoutes.SESSIONS, {"key": 12}),
        (PrivateRoutes.SESSIONS, {"key": "k" * 10_000}),
        (PrivateRoutes.SESSIONS, {"key": "isk_x", "role": "operator"}),
        (PrivateRoutes.SESSIONS, [1, 2]),
        (PrivateRoutes.SESSION_RESOLVE, {}),
        (PrivateRoutes.SESSION_RESOLVE, {"token": ""}),
        (PrivateRoutes.SESSION_RESOLVE, {"token": "t" * (DASHBOARD_TOKEN_MAX_LENGTH + 1)}),
        (PrivateRoutes.SESSION_RESOLVE, {"token": None}),
        (PrivateRoutes.SESSION_END, {"token": ["a"]}),
        (PrivateRoutes.SESSION_END, "token"),
    ],
)
def test_bad_bodies_are_422_with_a_detail(public_api: TestClient, path: str, body: object) -> None:
    response = public_api.post(path, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


def test_a_body_that_is_not_json_is_a_4xx_with_a_detail(public_api: TestClient) -> None:
    for path in (PrivateRoutes.SESSIONS, PrivateRoutes.SESSION_RESOLVE, PrivateRoutes.SESSION_END):
        for body, expected in [(b"{not json", 422), (b"\xff{", 400)]:
            response = public_api.post(path, content=body, headers={"content-type": "application/json"})
            assert response.status_code == expected, (path, body, response.text)
            assert response.json()["detail"]
