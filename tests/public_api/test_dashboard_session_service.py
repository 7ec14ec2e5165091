"""The public API's dashboard session functions (public_api/service.py), which the dashboard's
pages call, against a real private API: login, resolve, logout, revocation, refusals told apart
from a refused service token, and the overview for a principal."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from inference_server.contract import ApiKeyRole, DashboardSession, Principal
from private_api import keys
from private_api.db import make_engine, make_session_factory
from public_api import service
from public_api.config import PublicSettings
from public_api.errors import UpstreamHTTPError
from public_api.upstream import PrivateAPI
from tests.public_api.stack import SERVICE_TOKEN, PrivateStack

ResultT = TypeVar("ResultT")


def _with_api(
    private_api: PrivateStack, use: Callable[[PrivateAPI], Awaitable[ResultT]], *, token: str = SERVICE_TOKEN
) -> ResultT:
    async def run() -> ResultT:
        api = PrivateAPI(PublicSettings(private_api_url=private_api.url, service_token=token))
        try:
            return await use(api)
        finally:
            await api.aclose()

    return asyncio.run(run())


def _revoke(private_api: PrivateStack, name: str) -> None:
    engine = make_engine(private_api.database_url)
    try:
        with make_session_factory(engine)() as session:
            keys.revoke_key(session=session, name_or_id=name)
    finally:
        engine.dispose()


@pytest.fixture
def user(private_api: PrivateStack) -> tuple[str, str]:
    name = f"dashboard-user-{secrets.token_hex(3)}"
    return name, private_api.create_key(name)


def test_login_resolve_logout(private_api: PrivateStack, user: tuple[str, str]) -> None:
    name, key = user

    async def scenario(api: PrivateAPI) -> None:
        created = await service.create_dashboard_session(api, key)
        assert created is not None
        assert created.principal == Principal(name=name, role=ApiKeyRole.USER)
        resolved = await service.resolve_dashboard_session(api, created.token)
        assert resolved == DashboardSession(
            principal=created.principal, csrf_token=created.csrf_token, expires_at=created.expires_at
        )
        await service.end_dashboard_session(api, created.token)
        assert await service.resolve_dashboard_session(api, created.token) is None
        await service.end_dashboard_session(api, created.token)  # logging out twice is no error

    _with_api(private_api, scenario)


@pytest.mark.parametrize("key", ["isk_00000000_" + "a" * 43, "", "   ", "isk_\u00e9", "k" * 600, "a\nb"])
def test_unknown_or_malformed_keys_get_no_session(private_api: PrivateStack, key: str) -> None:
    assert _with_api(private_api, lambda api: service.create_dashboard_session(api, key)) is None


@pytest.mark.parametrize("token", ["no-such-session", "", "t" * 129, "caf\u00e9", "a\x00b"])
def test_unknown_or_malformed_tokens_resolve_to_nothing(private_api: PrivateStack, token: str) -> None:
    async def scenario(api: PrivateAPI) -> None:
        assert await service.resolve_dashboard_session(api, token) is None
        await service.end_dashboard_session(api, token)

    _with_api(private_api, scenario)


def test_revoking_the_key_ends_the_session(private_api: PrivateStack, user: tuple[str, str]) -> None:
    name, key = user
    created = _with_api(private_api, lambda api: service.create_dashboard_session(api, key))
    assert created is not None
    _revoke(private_api, name)
    assert _with_api(private_api, lambda api: service.resolve_dashboard_session(api, created.token)) is None
    assert _with_api(private_api, lambda api: service.create_dashboard_session(api, key)) is None


def test_a_refused_service_token_is_an_error_not_a_logged_out_user(
    private_api: PrivateStack, user: tuple[str, str]
) -> None:
    _, key = user
    wrong = "not-the-service-token-0123456789"
    with pytest.raises(UpstreamHTTPError) as refused:
        _with_api(private_api, lambda api: service.create_dashboard_session(api, key), token=wrong)
    assert refused.value.status_code == 502
    with pytest.raises(UpstreamHTTPError):
        _with_api(private_api, lambda api: service.resolve_dashboard_session(api, "some-token"), token=wrong)


def test_overview_for_a_principal(private_api: PrivateStack, user: tuple[str, str]) -> None:
    name, _ = user
    caller = Principal(name=name, role=ApiKeyRole.USER)
    overview = _with_api(private_api, lambda api: service.overview(api, caller=caller, hours=3))
    assert overview.scope == "own" and overview.pending == 0
    assert overview.history_bucket_s == 3 * 3600 // 24 and len(overview.history) == 24
