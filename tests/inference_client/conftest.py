import secrets

import pytest

from inference_server.contract import ApiKeyRole
from tests.public_api.stack import (
    PrivateStack,
    consumer,
    http,
    model_id,
    private_api,
    public_url,
)

__all__ = ["consumer", "http", "model_id", "private_api", "public_url"]


@pytest.fixture(scope="module")
def operator_key(private_api: PrivateStack) -> str:
    return private_api.create_key(f"client-tests-{secrets.token_hex(3)}", ApiKeyRole.OPERATOR)


@pytest.fixture(autouse=True)
def _api_token_in_env(monkeypatch: pytest.MonkeyPatch, operator_key: str) -> None:
    """The client and `infer` find their key where users' scripts put it, IS_API_TOKEN, so every
    request here carries a real key (and a stray ./data/operator.key is never read)."""
    monkeypatch.setenv("IS_API_TOKEN", operator_key)
