"""GET /auth/check: Traefik's forwardAuth asks here before it buffers an upload to disk."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response

from inference_server.contract import PublicRoutes
from public_api.deps import KeyResolverDep, SettingsDep, check_forwarded_request, declared_key_headers
from public_api.routes._docs import UPSTREAM_FAILURES, error

router = APIRouter(tags=["access"])


@router.get(
    PublicRoutes.AUTH_CHECK,
    summary="Whether a request may pass (Traefik's forwardAuth)",
    description=(
        "Answers for the request named by `X-Forwarded-Method` and `X-Forwarded-Uri` (Traefik sets "
        "both) with the key this request carries, exactly as the route serving it would: 200 when "
        "it may pass, 401, 403 or 429 otherwise. Without `X-Forwarded-Uri` it answers whether the "
        "key is valid. No body is ever read."
    ),
    response_class=Response,
    responses={
        200: {"description": "The request may pass."},
        401: error("No API key where one is needed, or the key is unknown or revoked."),
        403: error("The key is valid but lacks the right (model changes need an operator key)."),
        429: error("Too many requests without a valid key from this address; see Retry-After."),
        **UPSTREAM_FAILURES,
    },
    # The key is resolved by the check itself, once it knows the forwarded request needs one.
    dependencies=[Depends(declared_key_headers)],
)
async def check(
    request: Request,
    resolver: KeyResolverDep,
    settings: SettingsDep,
    x_forwarded_method: Annotated[
        str | None, Header(description="The method of the request to check.")
    ] = None,
    x_forwarded_uri: Annotated[str | None, Header(description="Its path and query.")] = None,
) -> Response:
    await check_forwarded_request(
        request, resolver, settings, x_forwarded_method or request.method, x_forwarded_uri
    )
    return Response(status_code=200)
