"""The consumer registry: registration, heartbeats, states (lost included), draining, who may do
what, and the answers to bad requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from inference_server.contract import (
    ACTOR_REFUSED_HEADER,
    CLAIM_REFUSED_DRAINING,
    CONSUMER_ID_HEADER,
    SERVICE_TOKEN_HEADER,
    ApiKeyRole,
)
from private_api.config import PrivateSettings
from tests.private_api.helpers import (
    acting_as,
    age_consumer,
    claim,
    consumer_body,
    gpu,
    register_consumer,
    register_model,
    submit_ok,
)

PUBLIC_API_TOKEN = "public-api-token-0123456789"
CONSUMER_TOKEN = "consumer-token-0123456789ab"


@pytest.fixture
def settings(make_settings) -> PrivateSettings:
    return make_settings(public_api_token=PUBLIC_API_TOKEN, consumer_token=CONSUMER_TOKEN)


def _with_token(client: TestClient, token: str) -> TestClient:
    return TestClient(client.app, headers={SERVICE_TOKEN_HEADER: token})


def _listed(client: TestClient) -> dict[str, dict]:
    response = client.get("/consumers")
    assert response.status_code == 200, response.text
    return {consumer["id"]: consumer for consumer in response.json()}


def test_register_list_and_register_again(client: TestClient) -> None:
    registered = register_consumer(client, "gpu-host-1.0", gpu_memory_mb=24576, runtime="docker")

    assert registered["id"] == "gpu-host-1.0"
    assert registered["state"] == "idle"
    assert registered["draining"] is False
    assert registered["running_tasks"] == []
    assert registered["gpus"][0]["memory_total_mb"] == 24576 and registered["gpus"][0]["simulated"] is True
    assert registered["takes_gpu_tasks"] is True and registered["takes_cpu_tasks"] is False
    assert registered["registered_at"] == registered["last_seen_at"]

    assert client.post("/consumers/gpu-host-1.0/drain").json()["state"] == "draining"
    # A restart registers again: what it declares is replaced, the operator's drain is kept.
    again = register_consumer(client, "gpu-host-1.0", gpu_memory_mb=81920, cpus=16)
    assert again["gpus"][0]["memory_total_mb"] == 81920 and again["cpus"] == 16
    assert again["draining"] is True and again["state"] == "draining"
    assert again["last_seen_at"] > registered["last_seen_at"]

    register_consumer(client, "cpu-host-2")
    assert list(_listed(client)) == ["cpu-host-2", "gpu-host-1.0"]  # newest registration first


def test_heartbeats_make_a_consumer_busy_and_tell_it_to_drain(client: TestClient) -> None:
    register_consumer(client, "c1")
    beat = client.post("/consumers/c1/heartbeat", json={"running_tasks": ["uid-a", "uid-b"]})
    assert beat.status_code == 200, beat.text
    assert beat.json() == {"draining": False}
    listed = _listed(client)["c1"]
    assert listed["state"] == "busy" and listed["running_tasks"] == ["uid-a", "uid-b"]

    drained = client.post("/consumers/c1/drain")
    assert drained.status_code == 200 and drained.json()["state"] == "draining"
    assert client.post("/consumers/c1/heartbeat", json={"running_tasks": []}).json() == {"draining": True}

    resumed = client.delete("/consumers/c1/drain")
    assert resumed.status_code == 200 and resumed.json()["draining"] is False
    assert resumed.json()["state"] == "idle"  # its last heartbeat listed nothing running
    assert client.post("/consumers/c1/heartbeat", json={}).json() == {"draining": False}


def test_a_consumer_not_heard_from_is_lost_and_forgotten_after_a_day(client: TestClient) -> None:
    client.app.state.maintenance.stop()  # this test runs the sweep itself
    register_consumer(client, "gone")
    register_consumer(client, "long-gone")
    register_consumer(client, "alive")
    client.post("/consumers/gone/drain")
    age_consumer(client, "gone", 31)  # IS_CONSUMER_LOST_AFTER_S defaults to 30
    age_consumer(client, "long-gone", 25 * 3600)

    states = {consumer_id: consumer["state"] for consumer_id, consumer in _listed(client).items()}
    assert states == {"gone": "lost", "long-gone": "lost", "alive": "idle"}  # lost before draining

    assert client.app.state.maintenance.sweep_once() == 1
    assert set(_listed(client)) == {"gone", "alive"}
    # A heartbeat brings a lost consumer back.
    assert client.post("/consumers/gone/heartbeat", json={}).status_code == 200
    assert _listed(client)["gone"]["state"] == "draining"


def test_unknown_consumers_are_404_with_a_detail(client: TestClient) -> None:
    for method, path in [
        ("POST", "/consumers/nobody/heartbeat"),
        ("POST", "/consumers/nobody/drain"),
        ("DELETE", "/consumers/nobody/drain"),
    ]:
        response = client.request(method, path, json={} if path.endswith("heartbeat") else None)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["detail"] == "consumer 'nobody' is not registered"


@pytest.mark.parametrize(
    ("path", "body", "headers", "mentions"),
    [
        ("/consumers/-starts-with-dash", consumer_body(), {}, "consumer_id"),
        ("/consumers/" + "x" * 129, consumer_body(), {}, "consumer_id"),
        ("/consumers/c1", consumer_body(), {CONSUMER_ID_HEADER: "c2"}, "X-Consumer-Id 'c2'"),
        ("/consumers/c1", {"cpus": 1, "memory_mb": 1024}, {}, "host"),
        ("/consumers/c1", consumer_body(cpus=0), {}, "cpus"),
        ("/consumers/c1", consumer_body(memory_mb="lots"), {}, "memory_mb"),
        ("/consumers/c1", consumer_body(max_tasks=0), {}, "max_tasks"),
        ("/consumers/c1", consumer_body(gpus=[gpu(0)]), {}, "memory_total_mb"),
        ("/consumers/c1", consumer_body(gpus="one"), {}, "gpus"),
        ("/consumers/c1", consumer_body(colour="blue"), {}, "colour"),
        ("/consumers/c1", [1, 2], {}, "body"),
    ],
)
def test_bad_registrations_are_422_with_a_detail(
    client: TestClient, path: str, body: object, headers: dict[str, str], mentions: str
) -> None:
    response = client.put(path, json=body, headers=headers)
    assert response.status_code == 422, response.text
    assert mentions in str(response.json()["detail"])
    assert _listed(client) == {}


def test_bad_heartbeats_are_4xx_never_5xx(client: TestClient) -> None:
    register_consumer(client, "c1")
    for content, content_type in [
        (b"not json", "application/json"),
        (b'{"running_tasks": "uid"}', "application/json"),
        (b'{"running_tasks": [], "extra": 1}', "application/json"),
        (b"\xff\xfe", "application/json"),
    ]:
        response = client.post(
            "/consumers/c1/heartbeat", content=content, headers={"content-type": content_type}
        )
        assert response.status_code == 422, (content, response.text)
        assert response.json()["detail"]


def test_who_may_register_list_and_drain(client: TestClient) -> None:
    consumer = _with_token(client, CONSUMER_TOKEN)
    public = _with_token(client, PUBLIC_API_TOKEN)

    # A consumer registers and heartbeats itself, under its own id.
    registered = consumer.put("/consumers/c1", json=consumer_body(), headers={CONSUMER_ID_HEADER: "c1"})
    assert registered.status_code == 200, registered.text
    assert consumer.post("/consumers/c1/heartbeat", json={}).status_code == 200
    # It may not look at the others or drain anyone.
    assert consumer.get("/consumers").status_code == 403
    assert consumer.post("/consumers/c1/drain").status_code == 403

    # The public API may, for an operator key only.
    operator = acting_as("root", ApiKeyRole.OPERATOR)
    assert public.get("/consumers", headers=operator).status_code == 200
    assert public.post("/consumers/c1/drain", headers=operator).json()["state"] == "draining"
    assert public.delete("/consumers/c1/drain", headers=operator).json()["state"] == "idle"
    for user in (acting_as("alice"), acting_as(None)):
        for method, path in [
            ("GET", "/consumers"),
            ("POST", "/consumers/c1/drain"),
            ("DELETE", "/consumers/c1/drain"),
        ]:
            refused = public.request(method, path, headers=user)
            assert refused.status_code == 403, (method, path, refused.text)
            assert refused.headers[ACTOR_REFUSED_HEADER] == "true"
            assert refused.json()["detail"] == "only operator keys may see and drain consumers"
    # The public API registers no consumers.
    assert public.put("/consumers/c2", json=consumer_body()).status_code == 403
    assert _listed(client)["c1"]["draining"] is False


def test_consumers_by_state_in_metrics(client: TestClient) -> None:
    register_consumer(client, "idle-one")
    register_consumer(client, "busy-one")
    client.post("/consumers/busy-one/heartbeat", json={"running_tasks": ["uid"]})
    register_consumer(client, "lost-one")
    age_consumer(client, "lost-one", 3600)

    text = client.get("/metrics").text
    assert 'inference_consumers{state="idle"} 1.0' in text
    assert 'inference_consumers{state="busy"} 1.0' in text
    assert 'inference_consumers{state="lost"} 1.0' in text
    assert 'inference_consumers{state="draining"} 0.0' in text


def test_simultaneous_first_registrations_of_one_id_all_succeed(client: TestClient) -> None:
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _n: client.put("/consumers/c1", json=consumer_body()), range(8)))
    assert [answer.status_code for answer in answers] == [200] * 8, [a.text for a in answers]
    assert list(_listed(client)) == ["c1"]


def test_a_draining_consumer_is_refused_new_claims_but_keeps_its_own(client: TestClient) -> None:
    register_model(client)
    held, waiting = submit_ok(client)["uid"], submit_ok(client)["uid"]
    register_consumer(client, "c1")
    assert claim(client, held, consumer="c1").status_code == 200
    assert client.post("/consumers/c1/drain").status_code == 200

    # Before its next heartbeat tells it, the drained consumer may still ask for a new task.
    refused = claim(client, waiting, consumer="c1")
    assert refused.status_code == CLAIM_REFUSED_DRAINING
    assert "draining" in refused.json()["detail"]
    assert client.get(f"/tasks/{waiting}").json()["status"] == "pending"
    # Its own task it may claim again (a retried request), and another consumer takes the new one.
    assert claim(client, held, consumer="c1").status_code == 200
    assert claim(client, waiting, consumer="c2").status_code == 200

    third = submit_ok(client)["uid"]
    assert client.delete("/consumers/c1/drain").status_code == 200
    assert claim(client, third, consumer="c1").status_code == 200
