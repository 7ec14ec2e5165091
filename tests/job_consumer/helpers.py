"""Small builders shared by the consumer tests."""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from datetime import UTC, datetime

import docker

from inference_server.contract import ModelPublic
from job_consumer.runner import LABEL_CONSUMER
from tests.helpers import wait_until

# A model that copies what it is given at /model to /output (model_from's tests).
COPY_MODEL_COMMAND = '["sh", "-c", "cp -R /model/. /output/"]'
# Copies /params.json to /output when there is one, else says it is absent.
PARAMS_SCRIPT = (
    b"if [ -e /params.json ]; then cp /params.json /output/params.json;"
    b" else echo absent > /output/no-params.txt; fi\n"
)


def make_model(container_tag: str, **overrides) -> ModelPublic:
    values = {
        "id": 1,
        "human_readable_id": f"test-{secrets.token_hex(4)}",
        "container_tag": container_tag,
        "description": "test model",
        "use_gpu": False,
        "model_available": False,
        "created_at": datetime.now(UTC),
    }
    values.update(overrides)
    return ModelPublic(**values)


class ConsumerThread:
    """Runs Consumer.run() in a thread so the test can act while it works."""

    def __init__(self, consumer) -> None:
        self.consumer = consumer
        self.result: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="consumer-under-test", daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.consumer.run()
        except BaseException as exc:
            self.error = exc

    def start(self) -> ConsumerThread:
        self.thread.start()
        return self

    def join(self, timeout_s: float) -> int | None:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"consumer still running after {timeout_s}s"
        if self.error is not None:
            raise self.error
        return self.result


def generation_command(generation: int) -> str:
    """An image's command that says which build it is: two builds under one tag differ."""
    return f'["sh", "-c", "echo generation {generation} > /output/generation.txt"]'


def unique_tag(name: str) -> str:
    """A tag of one test's own, so concurrent test sessions never rebuild each other's images."""
    return f"inference-server/test-{name}-{secrets.token_hex(4)}:1"


def containers_created(
    docker_client: docker.DockerClient, consumer_id: str, since: float, expected: int
) -> int:
    """Containers this consumer created since then, by the engine's own event log. Podman writes
    its log a moment after answering, so the count is read until it reaches `expected` (or 10 s
    pass); more than expected is still returned as such, for the caller to fail on."""

    def count() -> int:
        # The log is read up to a second from now, so every event of the work done so far is in it.
        events = docker_client.events(
            since=int(since),
            until=int(time.time()) + 1,
            filters={"type": "container", "event": "create", "label": f"{LABEL_CONSUMER}={consumer_id}"},
            decode=True,
        )
        return sum(1 for _ in events)

    with contextlib.suppress(AssertionError):
        wait_until(lambda: count() >= expected, 10, f"{expected} container(s) created by {consumer_id}")
    return count()
