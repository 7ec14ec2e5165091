"""Resolving a user's API key for the public API, which asks on behalf of each caller."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from inference_server.contract import ErrorBody, KeyResolveRequest, Principal, PrivateRoutes
from private_api import keys
from private_api.deps import SessionDep, require_service_token

router = APIRouter(tags=["auth"], dependencies=[Depends(require_service_token)])

# The WWW-Authenticate header is what tells this "unknown key" 401 apart from the 401 of a
# missing or wrong service token, which has none.
UNKNOWN_KEY_HEADERS = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


@router.post(
    PrivateRoutes.AUTH_RESOLVE,
    response_model=Principal,
    responses={401: {"model": ErrorBody, "description": "Unknown, revoked or malformed key."}},
)
def resolve_key(body: KeyResolveRequest, session: SessionDep) -> Principal | JSONResponse:
    principal = keys.resolve_key(session=session, key=body.key)
    if principal is None:
        return JSONResponse(
            status_code=401, content={"detail": "unknown or revoked API key"}, headers=UNKNOWN_KEY_HEADERS
        )
    return principal
