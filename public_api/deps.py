"""Dependencies the routes share: the private API client and who is calling, with what rights.

The rules, in one place:
- task routes: any valid key, or anyone when IS_ANONYMOUS_TASKS is on; which tasks a caller
  sees is decided by the private API from the identity the relay passes on (own tasks; all for
  operators; anonymous ones for anonymous callers);
- listing models: any valid key, or anyone when either anonymous switch is on;
- registering, changing and removing models: operator keys, or anyone with IS_ANONYMOUS_MODELS.
A key that is sent is always checked: a wrong or revoked one is a 401 even where anonymous
callers are let in, so a typo never silently turns into anonymous access.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from inference_server.contract import API_KEY_HEADER, Principal
from public_api.auth import KeyResolver, invalid_key, missing_key, presented_key
from public_api.config import PublicSettings
from public_api.errors import PublicAPIError
from public_api.upstream import PrivateAPI

# Declared for the OpenAPI document (/docs shows an "Authorize" dialog for both); the header is
# read by presented_key, which also refuses schemes other than Bearer.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer isk_...`")
_x_token = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="The same key as `X-Token`.")


async def get_private_api(request: Request) -> PrivateAPI:
    return request.app.state.private_api


async def get_settings(request: Request) -> PublicSettings:
    return request.app.state.settings


async def get_key_resolver(request: Request) -> KeyResolver:
    return request.app.state.key_resolver


PrivateAPIDep = Annotated[PrivateAPI, Depends(get_private_api)]
SettingsDep = Annotated[PublicSettings, Depends(get_settings)]


async def current_principal(
    request: Request,
    resolver: Annotated[KeyResolver, Depends(get_key_resolver)],
    _bearer_key: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    _x_token_key: Annotated[str | None, Security(_x_token)],
) -> Principal | None:
    """The owner of the key the request presents; None when it presents none (anonymous)."""
    key = presented_key(request)
    if key is None:
        return None
    principal = await resolver.resolve(key)
    if principal is None:
        raise invalid_key()
    return principal


PrincipalDep = Annotated[Principal | None, Depends(current_principal)]


async def task_caller(principal: PrincipalDep, settings: SettingsDep) -> Principal | None:
    if principal is None and not settings.anonymous_tasks:
        raise missing_key()
    return principal


async def model_reader(principal: PrincipalDep, settings: SettingsDep) -> Principal | None:
    if principal is None and not (settings.anonymous_tasks or settings.anonymous_models):
        raise missing_key()
    return principal


async def require_operator(principal: PrincipalDep, settings: SettingsDep) -> Principal | None:
    if settings.anonymous_models:
        return principal
    if principal is None:
        raise missing_key()
    if not principal.is_operator:
        raise PublicAPIError(403, "only operators may register, change or remove models")
    return principal


TaskCallerDep = Annotated[Principal | None, Depends(task_caller)]
