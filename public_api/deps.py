"""Dependencies the routes share: the private API client and who is calling, with what rights.

The rules, in one place:
- task routes: any valid key, or anyone when IS_ANONYMOUS_TASKS is on; which tasks a caller
  sees is decided by the private API from the identity the relay passes on (own tasks; all for
  operators; anonymous ones for anonymous callers);
- listing models: any valid key, or anyone when either anonymous switch is on;
- registering, changing and removing models: operator keys, or anyone with IS_ANONYMOUS_MODELS;
- listing and draining consumers: operator keys only, whatever the anonymous switches say (the
  consumers' hosts are the operators' own);
- the overview (/api/overview): any valid key, whatever the anonymous switches say;
- /metrics: operator keys, or the metrics token (IS_METRICS_TOKEN, for Prometheus), whatever
  the anonymous switches say (the platform's figures name every model and consumer).
A key that is sent is always checked: a wrong or revoked one is a 401 even where anonymous
callers are let in, so a typo never silently turns into anonymous access.

These checks run before any route reads its request body: no route declares a body parameter
(FastAPI would read and parse it before the dependencies run), so a refused caller costs no
body. Each failed key check also spends the caller's address's budget (ratelimit.py).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from enum import Enum
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

from fastapi import Depends, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.routing import BaseRoute, Match

from inference_server.contract import API_KEY_HEADER, Principal
from inference_server.serving import app_state
from public_api.auth import KeyResolver, invalid_key, missing_key, presented_key
from public_api.config import PublicSettings
from public_api.errors import PublicAPIError, TooManyFailuresError
from public_api.ratelimit import FailureBudget, client_address, retry_after_s
from public_api.upstream import PrivateAPI

# Declared for the OpenAPI document (/docs shows an "Authorize" dialog for both); the header is
# read by presented_key, which also refuses schemes other than Bearer.
_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer isk_...`")
_x_token = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="The same key as `X-Token`.")


class Access(Enum):
    """What a route asks of its caller."""

    OPEN = "open"  # health, docs
    METRICS = "metrics"  # an operator key or IS_METRICS_TOKEN
    TASKS = "tasks"
    READ_MODELS = "read models"
    OPERATOR = "operator"
    OPERATOR_KEY = "operator key"
    # Any valid key: what a request no route serves needs to get past Traefik's check.
    KEY = "key"


PrivateAPIDep = Annotated[PrivateAPI, Depends(app_state("private_api"))]
SettingsDep = Annotated[PublicSettings, Depends(app_state("settings"))]
KeyResolverDep = Annotated[KeyResolver, Depends(app_state("key_resolver"))]


def refused(request: Request, error: PublicAPIError) -> PublicAPIError:
    """The answer to a failed key check: `error`, or a 429 once the caller's address is past its
    budget of failures."""
    budget: FailureBudget = request.app.state.failure_budget
    wait_s = budget.spend(client_address(request))
    return error if wait_s is None else TooManyFailuresError(retry_after_s(wait_s))


async def resolve_caller(request: Request, resolver: KeyResolver) -> Principal | None:
    """The owner of the key the request presents; None when it presents none (anonymous)."""
    try:
        key = presented_key(request)
    except PublicAPIError as exc:
        raise refused(request, exc) from None
    if key is None:
        return None
    principal = await resolver.resolve(key)
    if principal is None:
        raise refused(request, invalid_key())
    return principal


def is_metrics_token(key: str | None, settings: PublicSettings) -> bool:
    """Whether `key` is IS_METRICS_TOKEN (compared in constant time; never when it is unset)."""
    token = settings.metrics_token
    return (
        key is not None
        and token is not None
        and hmac.compare_digest(key.encode(), token.get_secret_value().encode())
    )


async def authorize_metrics(request: Request, resolver: KeyResolver, settings: PublicSettings) -> None:
    """Raises the refusal unless the request carries the metrics token or an operator's key. The
    token is looked at first, so it is never sent to the private API as a key to resolve."""
    try:
        key = presented_key(request)
    except PublicAPIError as exc:
        raise refused(request, exc) from None
    if is_metrics_token(key, settings):
        return
    principal = await resolve_caller(request, resolver)
    if principal is None:
        raise refused(request, missing_key())
    if not principal.is_operator:
        raise PublicAPIError(
            403, "only operator keys or the metrics token (IS_METRICS_TOKEN) may read /metrics"
        )


def authorize(
    request: Request, principal: Principal | None, access: Access, settings: PublicSettings
) -> None:
    """Raises the refusal when `principal` (None: no key) may not do what `access` names."""
    if access is Access.OPEN or (access is Access.OPERATOR and settings.anonymous_models):
        return
    if principal is None:
        anonymous_ok = (access is Access.TASKS and settings.anonymous_tasks) or (
            access is Access.READ_MODELS and (settings.anonymous_tasks or settings.anonymous_models)
        )
        if not anonymous_ok:
            raise refused(request, missing_key())
        return
    if access is Access.OPERATOR and not principal.is_operator:
        raise PublicAPIError(403, "only operators may register, change or remove models")
    if access is Access.OPERATOR_KEY and not principal.is_operator:
        raise PublicAPIError(403, "only operator keys may see and drain consumers or read the audit trail")


async def declared_key_headers(
    _bearer_key: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    _x_token_key: Annotated[str | None, Security(_x_token)],
) -> None:
    """Does nothing when run; puts the key headers of a route into the OpenAPI document."""


async def current_principal(
    request: Request,
    resolver: KeyResolverDep,
    _documented: Annotated[None, Depends(declared_key_headers)],
) -> Principal | None:
    return await resolve_caller(request, resolver)


PrincipalDep = Annotated[Principal | None, Depends(current_principal)]


async def metrics_reader(
    request: Request,
    resolver: KeyResolverDep,
    settings: SettingsDep,
    _documented: Annotated[None, Depends(declared_key_headers)],
) -> None:
    await authorize_metrics(request, resolver, settings)


MetricsReaderDep = Annotated[None, Depends(metrics_reader)]


# The Access each caller dependency enforces: how access_for reads a route's rule off the route.
_ACCESS_OF_DEPENDENCY: dict[Callable[..., Any], Access] = {}


def _caller_allowed(access: Access) -> Callable[..., Awaitable[Principal | None]]:
    """The dependency a route declares to let in only the callers `authorize` allows `access`."""

    async def allowed_caller(
        request: Request, principal: PrincipalDep, settings: SettingsDep
    ) -> Principal | None:
        authorize(request, principal, access, settings)
        return principal

    _ACCESS_OF_DEPENDENCY[allowed_caller] = access
    return allowed_caller


task_caller = _caller_allowed(Access.TASKS)
model_reader = _caller_allowed(Access.READ_MODELS)
require_operator = _caller_allowed(Access.OPERATOR)
require_operator_key = _caller_allowed(Access.OPERATOR_KEY)
# Any valid key, whatever the anonymous switches say (the dashboard's overview).
require_key = _caller_allowed(Access.KEY)
_ACCESS_OF_DEPENDENCY[metrics_reader] = Access.METRICS

TaskCallerDep = Annotated[Principal | None, Depends(task_caller)]
# An operator, or anyone when IS_ANONYMOUS_MODELS is on (None: anonymous).
ModelManagerDep = Annotated[Principal | None, Depends(require_operator)]
# Always an operator's key.
OperatorKeyDep = Annotated[Principal, Depends(require_operator_key)]
# Always a key, a user's or an operator's.
KeyHolderDep = Annotated[Principal, Depends(require_key)]


def _route_access(route: APIRoute) -> Access:
    for dependency in route.dependant.dependencies:
        if dependency.call in _ACCESS_OF_DEPENDENCY:
            return _ACCESS_OF_DEPENDENCY[dependency.call]
    return Access.OPEN


def access_for(routes: Sequence[BaseRoute], method: str, uri: str | None) -> Access:
    """What the request `method uri` needs, read from the dependencies of the route among `routes`
    that would serve it, so Traefik's check and the route itself never disagree. A request no
    route serves needs a valid key: Traefik would otherwise buffer its body only for a 404."""
    if uri is None:
        return Access.KEY
    # Matched as the route itself would see it: uvicorn hands Starlette the percent-decoded path.
    scope = {"type": "http", "method": method.upper(), "path": unquote(urlsplit(uri).path), "root_path": ""}
    for route in routes:
        if route.matches(scope)[0] == Match.FULL:
            return _route_access(route) if isinstance(route, APIRoute) else Access.OPEN
    return Access.KEY


async def check_forwarded_request(
    request: Request, resolver: KeyResolver, settings: PublicSettings, method: str, uri: str | None
) -> None:
    """Raises the refusal when the request Traefik describes (X-Forwarded-Method,
    X-Forwarded-Uri) may not pass. Only headers are looked at: the body stays with Traefik."""
    access = access_for(request.app.state.access_routes, method, uri)
    if access is Access.METRICS:
        await authorize_metrics(request, resolver, settings)
    elif access is not Access.OPEN:
        authorize(request, await resolve_caller(request, resolver), access, settings)
