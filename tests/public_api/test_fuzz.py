"""Schemathesis fuzzes every operation of the public API's OpenAPI document against a real stack
(private API, SQLite, RabbitMQ), with an operator key and without one: no answer may be a server
error, and every answer must match the document (status codes, content types, bodies).

The v1.2 task routes answer 551-554 on purpose (pending, failed, output missing, unknown): they
are declared in the document, and the server-error check below lets exactly those through on
exactly those routes instead of Schemathesis' built-in `not_a_server_error`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from inference_server.contract import ApiKeyRole, PublicRoutes, V12Code
from public_api.config import PublicSettings
from public_api.main import create_app
from tests.public_api.stack import PrivateStack, start_public_api

# The document straight from the app factory: what /openapi.json serves, without a server.
SCHEMA = schemathesis.openapi.from_dict(
    create_app(PublicSettings(service_token="fuzz-" + "x" * 20)).openapi()
)

V12_CODES = {code.value for code in V12Code}
V12_TASK_ROUTES = {("GET", PublicRoutes.TASK), ("DELETE", PublicRoutes.TASK)}
# Whether an upload is a valid, safe zip is content the document cannot express (`format:
# binary`): the fuzzer's random bytes get the documented 400, which is no rejected valid request.
ZIP_UPLOAD_ROUTES = {("POST", PublicRoutes.TASKS), ("POST", PublicRoutes.MODELS)}
MAX_EXAMPLES = 25


def no_server_error(_ctx: object, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Like not_a_server_error, except for the documented 551-554 of the v1.2 task routes."""
    status = response.status_code
    if status < 500:
        return
    if status in V12_CODES and (case.method.upper(), case.path) in V12_TASK_ROUTES:
        return
    raise AssertionError(f"{case.method} {case.formatted_path} answered {status}: {response.text[:500]}")


def refused_by_the_http_parser(response: schemathesis.Response) -> bool:
    """uvicorn's own answer to bytes that are no valid HTTP request (a generated header value with
    control characters, say): plain text, before any route runs. Traefik refuses them alike."""
    return response.status_code == 400 and response.text == "Invalid HTTP request received."


@pytest.fixture(scope="module")
def fuzz_target(private_api: PrivateStack) -> Iterator[tuple[str, str]]:
    """A public API with production access rules (no anonymous callers) and an operator key."""
    server = start_public_api(private_api.url, anonymous_tasks=False, anonymous_models=False)
    key = private_api.create_key(f"fuzzer-{secrets.token_hex(3)}", ApiKeyRole.OPERATOR)
    try:
        yield server.url, key
    finally:
        server.stop()


@pytest.mark.parametrize("with_key", [True, False], ids=["operator", "anonymous"])
@SCHEMA.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_public_api_conforms_to_its_openapi_document(
    case: schemathesis.Case, with_key: bool, fuzz_target: tuple[str, str]
) -> None:
    base_url, key = fuzz_target
    headers = {"Authorization": f"Bearer {key}"} if with_key else None
    excluded = [not_a_server_error]
    if (case.method.upper(), case.path) in ZIP_UPLOAD_ROUTES:
        excluded.append(positive_data_acceptance)
    response = case.call(base_url=base_url, headers=headers, timeout=30)
    if refused_by_the_http_parser(response):
        return  # the app never saw it: no answer of the app's to hold to its document
    case.validate_response(response, excluded_checks=excluded, additional_checks=[no_server_error])
