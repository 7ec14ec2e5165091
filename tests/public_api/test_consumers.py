"""The consumer routes of the public API: operator keys list, drain and resume consumers; user
keys are refused (403) and callers without a key too (401), whatever the anonymous switches say."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest

from inference_server.contract import ApiKeyRole, ConsumerPublic, PrivateRoutes, PublicRoutes
from tests.public_api.stack import ConsumerDriver, PrivateStack, shared_http, start_public_api


@pytest.fixture(scope="module")
def urls(private_api: PrivateStack) -> Iterator[dict[str, str]]:
    """A public API with the anonymous switches off and one with both on."""
    strict = start_public_api(private_api.url, anonymous_tasks=False, anonymous_models=False)
    open_ = start_public_api(private_api.url, anonymous_tasks=True, anonymous_models=True)
    try:
        yield {"strict": strict.url, "open": open_.url}
    finally:
        strict.stop()
        open_.stop()


@pytest.fixture(scope="module")
def keys(private_api: PrivateStack) -> dict[str, dict[str, str]]:
    suffix = secrets.token_hex(3)
    operator = private_api.create_key(f"operator-{suffix}", ApiKeyRole.OPERATOR)
    user = private_api.create_key(f"user-{suffix}")
    return {
        "operator": {"Authorization": f"Bearer {operator}"},
        "user": {"Authorization": f"Bearer {user}"},
        "anonymous": {},
    }


@pytest.fixture
def consumer_id(private_api: PrivateStack) -> str:
    """A consumer registered on the private API, as a job consumer registers itself."""
    consumer_id = f"gpu-host-{secrets.token_hex(3)}"
    driver = ConsumerDriver(private_api.url, consumer_id)
    try:
        response = driver.http.put(
            PrivateRoutes.CONSUMER.format(consumer_id=consumer_id),
            json={
                "host": "gpu-host",
                "cpus": 16,
                "memory_mb": 65536,
                "gpus": [{"index": 0, "uuid": "GPU-1", "memory_total_mb": 81920}],
                "takes_gpu_tasks": True,
            },
        )
        assert response.status_code == 200, response.text
    finally:
        driver.close()
    return consumer_id


def _drain(base: str, consumer_id: str, headers: dict[str, str], *, resume: bool = False) -> httpx.Response:
    url = base + PublicRoutes.CONSUMER_DRAIN.format(consumer_id=consumer_id)
    return shared_http().request("DELETE" if resume else "POST", url, headers=headers)


def test_operators_list_drain_and_resume(urls: dict[str, str], keys: dict, consumer_id: str) -> None:
    base, operator = urls["strict"], keys["operator"]
    listed = shared_http().get(base + PublicRoutes.CONSUMERS, headers=operator)
    assert listed.status_code == 200, listed.text
    mine = {consumer["id"]: ConsumerPublic.model_validate(consumer) for consumer in listed.json()}[
        consumer_id
    ]
    assert mine.state == "idle" and mine.gpus[0].memory_total_mb == 81920 and mine.takes_gpu_tasks

    drained = _drain(base, consumer_id, operator)
    assert drained.status_code == 200, drained.text
    assert drained.json()["state"] == "draining" and drained.json()["draining"] is True
    resumed = _drain(base, consumer_id, operator, resume=True)
    assert resumed.status_code == 200 and resumed.json()["state"] == "idle"

    unknown = _drain(base, "no-such-consumer", operator)
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == "consumer 'no-such-consumer' is not registered"
    bad = _drain(base, "-not-an-id", operator)
    assert bad.status_code == 422 and "consumer_id" in bad.json()["detail"]


@pytest.mark.parametrize("switches", ["strict", "open"])
@pytest.mark.parametrize(("who", "status"), [("user", 403), ("anonymous", 401)])
def test_others_are_refused(
    urls: dict[str, str], keys: dict, consumer_id: str, switches: str, who: str, status: int
) -> None:
    base, headers = urls[switches], keys[who]
    answers = [
        shared_http().get(base + PublicRoutes.CONSUMERS, headers=headers),
        _drain(base, consumer_id, headers),
        _drain(base, consumer_id, headers, resume=True),
    ]
    for answer in answers:
        assert answer.status_code == status, answer.text
        assert isinstance(answer.json()["detail"], str)
    if status == 403:
        assert answers[0].json()["detail"] == (
            "only operator keys may see and drain consumers or read the audit trail"
        )
    listed = shared_http().get(urls["strict"] + PublicRoutes.CONSUMERS, headers=keys["operator"]).json()
    assert {consumer["id"]: consumer["draining"] for consumer in listed}[consumer_id] is False
