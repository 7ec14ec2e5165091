"""What one task costs in requests to the private API: counted at the consumer's HTTP client,
against a real private API, RabbitMQ and Docker. The final log goes up with the output (one
request fewer than a log upload and an output upload), and every request goes over the
consumer's pooled, kept-alive connections."""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from job_consumer import task_execution
from job_consumer.consumer import Consumer
from job_consumer.container_runtime import ContainerRuntime, DockerRuntime
from job_consumer.private_client import PrivateApiClient
from tests import images
from tests.job_consumer.helpers import ConsumerThread
from tests.job_consumer.stack import CONSUMER_TOKEN, PrivateApiServer, make_zip

pytestmark = pytest.mark.docker

# Prints nothing, so no live log goes up: what is counted is what every task costs.
SILENT_COPY = b"cp -R /input/. /output/\n"
TASKS = 3


class CountingTransport(httpx.HTTPTransport):
    """Records each request's method and path, and the local port of the connection it used."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str]] = []
        self.local_ports: set[int] = set()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.requests.append((request.method, request.url.path))
        stream = response.extensions.get("network_stream")
        if stream is not None:
            self.local_ports.add(stream.get_extra_info("client_addr")[1])
        return response


def run_tasks(
    private_api: PrivateApiServer,
    make_settings: Callable[..., object],
    runtime: ContainerRuntime,
    rabbitmq_url: str,
    queue_name: str,
) -> tuple[list[Counter[str]], CountingTransport]:
    model_id = f"silent-{secrets.token_hex(4)}"
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": SILENT_COPY}))
    uids = [private_api.submit(model_id, {f"{n}.txt": b"x"}).uid for n in range(TASKS)]
    settings = make_settings(
        private_api_url=private_api.url,
        rabbitmq_url=rabbitmq_url,
        queue_name=queue_name,
        service_token=CONSUMER_TOKEN,
        max_concurrent_tasks=1,
    )
    transport = CountingTransport()
    api = PrivateApiClient(private_api.url, CONSUMER_TOKEN, settings.consumer_id, transport=transport)
    consumer = Consumer(settings, max_tasks=TASKS, runtime=runtime, api=api)
    try:
        assert ConsumerThread(consumer).start().join(120) == TASKS
    finally:
        api.close()
    for uid in uids:
        assert private_api.task(uid).status == "finished"
        assert "[inference-server] exit code 0" in private_api.logs(uid)
    per_task = [
        Counter(f"{method} {path.rsplit('/', 1)[-1]}" for method, path in transport.requests if uid in path)
        for uid in uids
    ]
    return per_task, transport


def test_a_task_costs_three_requests_with_the_log_carried_by_the_output(
    private_api, make_settings, rabbitmq_url, queue_name, docker_client, monkeypatch, capsys
):
    runtime = DockerRuntime(docker_client)
    # Before: the final log on its own (a log too large for the output's form goes so still).
    monkeypatch.setattr(task_execution, "OUTPUT_LOG_MAX_BYTES", -1)
    before, _ = run_tasks(private_api, make_settings, runtime, rabbitmq_url, queue_name)
    monkeypatch.undo()
    after, transport = run_tasks(private_api, make_settings, runtime, rabbitmq_url, queue_name)

    before_counts = [without_beats(task) for task in before]
    after_counts = [without_beats(task) for task in after]
    with capsys.disabled():
        print(
            f"\nrequests per task (heartbeats aside): before {[sum(t.values()) for t in before_counts]}, "
            f"after {[sum(t.values()) for t in after_counts]}; one task after: {dict(after_counts[-1])}; "
            f"{len(transport.requests)} requests over {len(transport.local_ports)} connection(s)"
        )
    assert (
        before_counts == [Counter({"POST claim": 1, "GET input": 1, "PUT logs": 1, "POST output": 1})] * TASKS
    )
    assert after_counts == [Counter({"POST claim": 1, "GET input": 1, "POST output": 1})] * TASKS
    # Kept alive: far fewer connections than requests (the registry's beats run beside the tasks').
    assert len(transport.local_ports) <= 3 < len(transport.requests)


def without_beats(task: Counter[str]) -> Counter[str]:
    return Counter({name: count for name, count in task.items() if not name.endswith("heartbeat")})
