"""How many tasks per second one private API serves to many consumers (docs/DEPLOYMENT.md, "At 10
and at 100 GPU hosts"): where it becomes the bottleneck of a large swarm.

No model runs: each simulated consumer registers like a real one, then makes exactly the private
API calls a real consumer makes per task (claim, input download, one heartbeat, the final log,
the output upload) as fast as it can, for a backlog submitted beforehand through the public API.
Uids go to the simulated consumers straight from the submissions (the broker only carries uids;
the private API still publishes every task to RabbitMQ, as in production). PostgreSQL, as
deployed.

    .venv/bin/python -m bench.private_api_consumers --tasks 400 --consumers 8 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import secrets
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pika
import psycopg

from bench.common import submit_small, write_small_zip
from inference_server.contract import ConsumerRegistration
from job_consumer.private_client import PrivateApiClient
from local_platform.examples import register_model
from local_platform.launcher import LocalPlatform
from local_platform.ports import free_port
from models_examples.catalog import get_example

DEFAULT_POSTGRES_ADMIN_DSN = "postgresql://inference_test:inference_test@127.0.0.1:5432/inference_test"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def _one_task(client: PrivateApiClient, uid: str, work: Path) -> bool:
    claim = client.claim(uid)
    if claim is None:
        return False
    input_zip = work / f"{uid}.zip"
    client.download_input(uid, input_zip)
    client.heartbeat(uid)
    client.upload_logs(uid, "simulated consumer\n")
    client.upload_output(uid, input_zip)
    input_zip.unlink()
    return True


def _consume(client: PrivateApiClient, uids: queue.Queue[str], work: Path, done: list[int]) -> None:
    while True:
        try:
            uid = uids.get_nowait()
        except queue.Empty:
            return
        if _one_task(client, uid, work):
            done.append(1)


def measure(
    platform: LocalPlatform, consumers: int, tasks: int, work: Path, public: httpx.Client
) -> dict[str, Any]:
    small_zip = write_small_zip(work / "input.zip")
    started = time.monotonic()
    uids = [submit_small(public, small_zip) for _ in range(tasks)]
    submit_s = time.monotonic() - started
    backlog: queue.Queue[str] = queue.Queue()
    for uid in uids:
        backlog.put(uid)
    clients = []
    for index in range(consumers):
        consumer_id = f"sim-{secrets.token_hex(3)}-{index}"
        client = PrivateApiClient(platform.private_url, platform.consumer_token, consumer_id)
        client.register(ConsumerRegistration(host="bench", cpus=64, memory_mb=65536, max_tasks=1))
        clients.append(client)
    done: list[int] = []
    started = time.monotonic()
    with ThreadPoolExecutor(consumers) as pool:
        for client in clients:
            pool.submit(_consume, client, backlog, work, done)
    run_s = time.monotonic() - started
    for client in clients:
        client.close()
    return {
        "consumers": consumers,
        "tasks": tasks,
        "submitted_per_s": round(tasks / submit_s, 1),
        "finished": len(done),
        "finished_per_s": round(len(done) / run_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--consumers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--postgres-admin-dsn", default=DEFAULT_POSTGRES_ADMIN_DSN)
    parser.add_argument("--rabbitmq-url", default=DEFAULT_RABBITMQ_URL)
    args = parser.parse_args()
    database = f"is_bench_{secrets.token_hex(6)}"
    with psycopg.connect(args.postgres_admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    base = args.postgres_admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    queue_name = f"bench_private_api_{secrets.token_hex(4)}"
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="is-bench-") as tmp:
            work = Path(tmp)
            platform = LocalPlatform(
                data_dir=work / "platform",
                public_port=free_port(),
                consumers=0,
                rabbitmq_url=args.rabbitmq_url,
                queue_name=queue_name,
                database_url=f"{base}/{database}",
                extra_env={"IS_ANONYMOUS_TASKS": "true", "IS_ANONYMOUS_MODELS": "true"},
            )
            platform.start()
            try:
                register_model(platform.private_url, platform.service_token, get_example("passthrough"))
                with httpx.Client(base_url=platform.public_url, timeout=60.0) as public:
                    for consumers in args.consumers:
                        result = measure(platform, consumers, args.tasks, work, public)
                        print(json.dumps(result), flush=True)
                        results.append(result)
            finally:
                platform.stop()
    finally:
        with psycopg.connect(args.postgres_admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection = pika.BlockingConnection(pika.URLParameters(args.rabbitmq_url))
            channel = connection.channel()
            for suffix in ("", ".cpu", ".gpu"):
                channel.queue_delete(queue_name + suffix)
            connection.close()


if __name__ == "__main__":
    main()
