"""Dependencies the routes share: the private API client and who is calling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from public_api.config import PublicSettings
from public_api.errors import PublicAPIError
from public_api.upstream import PrivateAPI


@dataclass(frozen=True)
class Principal:
    """Whoever sent the request, as far as the public API knows."""

    name: str
    is_operator: bool


ANONYMOUS_OPERATOR = Principal(name="anonymous", is_operator=True)


async def current_principal(request: Request) -> Principal:
    """The single authentication seam: every /api route depends on it.

    There are no credentials yet, so everyone may do everything. API keys plug in here: read the
    `Authorization: Bearer` header of `request`, look the key up, and raise a 401 PublicAPIError
    for a missing or unknown one.
    """
    del request
    return ANONYMOUS_OPERATOR


async def require_operator(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
    if not principal.is_operator:
        raise PublicAPIError(403, "only operators may do this")
    return principal


def get_private_api(request: Request) -> PrivateAPI:
    return request.app.state.private_api


def get_settings(request: Request) -> PublicSettings:
    return request.app.state.settings


PrivateAPIDep = Annotated[PrivateAPI, Depends(get_private_api)]
SettingsDep = Annotated[PublicSettings, Depends(get_settings)]
