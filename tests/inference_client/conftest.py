import secrets
from collections.abc import Callable

import pytest

from inference_server.contract import (
    ApiKeyRole,
    ConsumerHeartbeat,
    ConsumerRegistration,
    GpuInfo,
    PrivateRoutes,
)
from tests.public_api.stack import (
    ConsumerDriver,
    PrivateStack,
    consumer,
    http,
    model_id,
    private_api,
    public_url,
)

__all__ = ["consumer", "http", "model_id", "private_api", "public_url"]

# Registers a consumer on the private API; returns its id.
RegisterConsumer = Callable[..., str]


@pytest.fixture(scope="module")
def operator_key(private_api: PrivateStack) -> str:
    return private_api.create_key(f"client-tests-{secrets.token_hex(3)}", ApiKeyRole.OPERATOR)


@pytest.fixture(scope="module")
def user_key(private_api: PrivateStack) -> str:
    return private_api.create_key(f"client-tests-user-{secrets.token_hex(3)}", ApiKeyRole.USER)


@pytest.fixture(autouse=True)
def _api_token_in_env(monkeypatch: pytest.MonkeyPatch, operator_key: str) -> None:
    """The client and `infer` find their key where users' scripts put it, IS_API_TOKEN, so every
    request here carries a real key (and a stray ./data/operator.key is never read)."""
    monkeypatch.setenv("IS_API_TOKEN", operator_key)


@pytest.fixture
def register_consumer(private_api: PrivateStack) -> RegisterConsumer:
    """Register a consumer as a job consumer registers itself at start-up, on the private API.

    `gpu_memory_mb` gives it one simulated GPU of that size (taking GPU tasks only); without it,
    it is a CPU-only consumer. `running_tasks` are then reported in a heartbeat. A consumer not
    heard from for IS_CONSUMER_LOST_AFTER_S (30 s) is lost, so tests register their own.
    """

    def register(
        *,
        gpu_memory_mb: int | None = None,
        running_tasks: tuple[str, ...] = (),
        host: str = "test-host",
        runtime: str = "docker",
    ) -> str:
        consumer_id = f"{host}-{secrets.token_hex(3)}"
        gpus = (
            []
            if gpu_memory_mb is None
            else [GpuInfo(index=0, uuid=f"GPU-{consumer_id}", memory_total_mb=gpu_memory_mb, simulated=True)]
        )
        registration = ConsumerRegistration(
            host=host,
            runtime=runtime,
            cpus=4,
            memory_mb=8192,
            gpus=gpus,
            takes_gpu_tasks=bool(gpus),
            takes_cpu_tasks=not gpus,
        )
        driver = ConsumerDriver(private_api.url, consumer_id)
        try:
            registered = driver.http.put(
                PrivateRoutes.CONSUMER.format(consumer_id=consumer_id), json=registration.model_dump()
            )
            assert registered.status_code == 200, registered.text
            if running_tasks:
                beat = ConsumerHeartbeat(running_tasks=list(running_tasks))
                answer = driver.http.post(
                    PrivateRoutes.CONSUMER_HEARTBEAT.format(consumer_id=consumer_id), json=beat.model_dump()
                )
                assert answer.status_code == 200, answer.text
        finally:
            driver.close()
        return consumer_id

    return register
