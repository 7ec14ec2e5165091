"""The consumer in the private API's registry: registration, heartbeats, drain, re-registration,
an unreachable registry - against a stand-in registry, then against the real private API."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import httpx
import pytest

from inference_server.contract import (
    ConsumerPublic,
    ConsumerRegistration,
    ConsumerState,
    GpuInfo,
    PrivateRoutes,
)
from job_consumer.private_client import PrivateApiClient
from job_consumer.registry_presence import RegistryPresence
from tests.helpers import wait_until
from tests.job_consumer.helpers import ConsumerThread

REGISTRATION = ConsumerRegistration(
    host="test-host",
    version="1.2.3",
    gpus=[GpuInfo(index=0, uuid="GPU-simulated-x", memory_total_mb=24576, simulated=True)],
    cpus=4,
    memory_mb=8192,
    max_tasks=3,
    takes_gpu_tasks=True,
    takes_cpu_tasks=False,
)


class StandInRegistry:
    """The two consumer routes, as the private API answers them; `up` False: connection refused."""

    def __init__(self) -> None:
        self.known: dict[str, ConsumerRegistration] = {}
        self.draining = False
        self.up = True
        self.calls: list[tuple[str, object]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        consumer_id = request.url.path.split("/")[2]
        body = json.loads(request.content)
        if request.method == "PUT":
            self.known[consumer_id] = ConsumerRegistration.model_validate(body)
            self.calls.append(("register", body["host"]))
            now = datetime.now(UTC)
            public = ConsumerPublic(
                **body,
                id=consumer_id,
                state=ConsumerState.IDLE,
                draining=self.draining,
                running_tasks=[],
                registered_at=now,
                last_seen_at=now,
            )
            return httpx.Response(200, json=public.model_dump(mode="json"))
        assert request.url.path == PrivateRoutes.CONSUMER_HEARTBEAT.format(consumer_id=consumer_id)
        self.calls.append(("heartbeat", body["running_tasks"]))
        if consumer_id not in self.known:
            return httpx.Response(404, json={"detail": f"no consumer {consumer_id!r}"})
        return httpx.Response(200, json={"draining": self.draining})


@pytest.fixture
def registry() -> StandInRegistry:
    return StandInRegistry()


@pytest.fixture
def presence(registry: StandInRegistry) -> RegistryPresence:
    api = PrivateApiClient("http://private", "t", "consumer-7", transport=httpx.MockTransport(registry))
    return RegistryPresence(api, REGISTRATION, interval_s=60, backoff_max_s=60)


def test_registers_first_then_heartbeats_with_the_running_tasks(presence, registry):
    presence.beat([])
    assert registry.known["consumer-7"] == REGISTRATION
    assert registry.calls == [("register", "test-host"), ("heartbeat", [])]
    assert not presence.due  # the next beat comes after the interval

    presence.beat(["task-one-000000001", "task-two-000000002"])
    assert registry.calls[-1] == ("heartbeat", ["task-one-000000001", "task-two-000000002"])
    assert [call for call, _ in registry.calls].count("register") == 1


def test_a_registry_that_forgot_the_consumer_gets_it_registered_again(presence, registry, caplog):
    presence.beat([])
    registry.known.clear()  # the private API's database was reset, or the consumer was forgotten

    caplog.set_level(logging.WARNING, logger="job_consumer")
    presence.beat(["task-one-000000001"])

    assert "consumer-7" in registry.known
    assert registry.calls[-3:] == [
        ("heartbeat", ["task-one-000000001"]),
        ("register", "test-host"),
        ("heartbeat", ["task-one-000000001"]),
    ]
    assert "unknown to the registry; registering again" in caplog.text


def test_draining_follows_the_heartbeat_reply(presence, registry):
    presence.beat([])
    assert presence.draining is False
    registry.draining = True
    presence.beat(["task-one-000000001"])
    assert presence.draining is True
    registry.draining = False
    presence.beat([])
    assert presence.draining is False


def test_an_unreachable_registry_is_retried_with_backoff_and_never_raises(presence, registry, caplog):
    registry.up = False
    caplog.set_level(logging.WARNING, logger="job_consumer")

    presence.beat([])  # no exception: the consumer runs its tasks regardless

    assert not presence.registered
    assert "registry registration failed" in caplog.text
    assert 0 < presence.seconds_to_next_beat <= 1  # the first backoff step, not the interval
    registry.up = True
    presence.beat([])
    assert presence.registered
    assert presence.seconds_to_next_beat > 50


# --- against the real private API --------------------------------------------------------------


def listed(private_api, consumer_id: str) -> ConsumerPublic | None:
    response = private_api.http.get(PrivateRoutes.CONSUMERS)
    assert response.status_code == 200, response.text
    found = [ConsumerPublic.model_validate(entry) for entry in response.json() if entry["id"] == consumer_id]
    return found[0] if found else None


def test_a_consumer_registers_with_the_private_api_and_keeps_heartbeating(private_api, make_consumer):
    consumer = make_consumer(simulate_gpu_memory_mb=24576, capacity_cpus=3, capacity_memory_mb=4096)
    consumer_id = consumer.settings.consumer_id
    worker = ConsumerThread(consumer).start()

    entry = wait_until(lambda: listed(private_api, consumer_id), 20, "the consumer in the registry")
    [gpu] = entry.gpus
    assert (gpu.index, gpu.uuid, gpu.memory_total_mb, gpu.simulated) == (
        0,
        f"GPU-simulated-{consumer_id}",
        24576,
        True,
    )
    assert (entry.cpus, entry.memory_mb, entry.max_tasks) == (3, 4096, 8)
    assert (entry.takes_gpu_tasks, entry.takes_cpu_tasks, entry.runtime) == (True, False, "docker")
    assert entry.state == ConsumerState.IDLE and entry.running_tasks == []
    # Idle, it still heartbeats: the registry sees it again and again.
    wait_until(
        lambda: listed(private_api, consumer_id).last_seen_at > entry.last_seen_at, 10, "a later heartbeat"
    )

    consumer.request_stop()
    assert worker.join(20) == 0
