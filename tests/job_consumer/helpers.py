"""Small builders shared by the consumer tests."""

from __future__ import annotations

import secrets
import threading
from datetime import UTC, datetime

from inference_server.contract import ModelPublic


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
