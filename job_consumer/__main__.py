"""`python -m job_consumer [--runtime docker|podman] [--gpu ID] [--simulate-gpu-memory-mb M]
[--consumer-id NAME] [--max-tasks N]`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType
from typing import Any

import docker.errors
from pydantic import ValidationError

from inference_server.settings import refuse_to_start
from job_consumer.capacity_probe import CapacityProbeError
from job_consumer.config import ConsumerSettings
from job_consumer.consumer import Consumer, ConsumerConfigError
from job_consumer.container_runtime import RUNTIME_NAMES, ContainerRuntimeError

log = logging.getLogger("job_consumer")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m job_consumer",
        description=(
            "Run inference tasks from RabbitMQ in Docker or Podman containers, several at once while their "
            "declared needs fit this consumer's GPU, CPUs and memory."
        ),
    )
    parser.add_argument("--gpu", help="GPU id this consumer owns (overrides IS_GPU; empty = CPU only)")
    parser.add_argument(
        "--simulate-gpu-memory-mb",
        type=int,
        metavar="M",
        help="own a simulated GPU of M MiB instead of a real one (overrides IS_SIMULATE_GPU_MEMORY_MB)",
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIME_NAMES,
        help="container engine its tasks run on (overrides IS_CONTAINER_RUNTIME; default docker)",
    )
    parser.add_argument("--consumer-id", help="stable name of this consumer (overrides IS_CONSUMER_ID)")
    parser.add_argument(
        "--max-tasks", type=int, default=None, metavar="N", help="exit after running N tasks (default: never)"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    if args.max_tasks is not None and args.max_tasks < 1:
        parser.error("--max-tasks must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
    )
    overrides: dict[str, Any] = {}
    if args.gpu is not None:
        overrides["gpu"] = args.gpu
    if args.simulate_gpu_memory_mb is not None:
        overrides["simulate_gpu_memory_mb"] = str(args.simulate_gpu_memory_mb)
    if args.runtime is not None:
        overrides["container_runtime"] = args.runtime
    if args.consumer_id is not None:
        overrides["consumer_id"] = args.consumer_id
    try:
        settings = ConsumerSettings(**overrides)
    except ValidationError as exc:
        return refuse_to_start("job_consumer", exc)

    try:
        consumer = Consumer(settings, max_tasks=args.max_tasks)
    except CapacityProbeError as exc:
        log.error("refusing to start: %s", exc)
        return 2
    except (docker.errors.DockerException, ContainerRuntimeError) as exc:
        log.error("cannot reach the %s engine: %s", settings.container_runtime, exc)
        return 2

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        # First signal: finish the running tasks, then exit. Second: stop them now and release them.
        now = consumer.stop_requested
        log.info(
            "%s received: %s",
            signal.Signals(signum).name,
            "stopping now" if now else "finishing the current tasks",
        )
        consumer.request_stop(now=now)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        consumer.run()
    except ConsumerConfigError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
