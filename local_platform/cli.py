"""`inference-server`: the operator's command line.

inference-server standalone --port 8000 --data-dir ./data --consumers 1
    [--gpus all|ID,ID | --simulate-gpus N --gpu-memory-mb M] [--[no-]cpu-tasks-on-gpus]
    [--runtime docker|podman]
inference-server private-api|public-api [--host H --port P]
inference-server consumer [--gpu ID]
inference-server db upgrade
inference-server keys create NAME [--operator] | keys list | keys revoke NAME_OR_ID
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from local_platform.examples import register_examples
from local_platform.gpus import detect_gpus
from local_platform.launcher import CONTAINER_RUNTIMES, DEFAULT_SIMULATED_GPU_MEMORY_MB, LocalPlatform
from private_api.operator_cli import add_operator_commands, quiet_database_logs

log = logging.getLogger(__name__)


def _exec_module(module: str, args: list[str]) -> int:
    os.execv(sys.executable, [sys.executable, "-m", module, *args])
    return 0  # not reached: execv replaces this process


def _parse_gpus(value: str | None) -> list[str]:
    """--gpus: "all" (every GPU NVML finds) or comma-separated GPU ids; none without the flag."""
    if value is None:
        return []
    if value.strip().lower() == "all":
        return detect_gpus()
    gpus = [gpu.strip() for gpu in value.split(",") if gpu.strip()]
    if not gpus:
        raise ValueError(f"--gpus {value!r} names no GPU; give 'all' or ids such as 0,1")
    return gpus


def _platform_of(args: argparse.Namespace) -> LocalPlatform:
    """The platform the standalone flags describe (GPUs detected here, before anything starts)."""
    if args.gpu_memory_mb is not None and not args.simulate_gpus:
        raise ValueError("--gpu-memory-mb sizes simulated GPUs: give it with --simulate-gpus N")
    gpus = _parse_gpus(args.gpus)
    # --gpus used to replace --consumers; it still does unless CPU consumers are asked for.
    default_cpu_consumers = 0 if gpus else 1
    return LocalPlatform(
        data_dir=Path(args.data_dir),
        public_port=args.port,
        consumers=default_cpu_consumers if args.consumers is None else args.consumers,
        gpus=gpus,
        simulate_gpus=args.simulate_gpus,
        simulated_gpu_memory_mb=args.gpu_memory_mb or DEFAULT_SIMULATED_GPU_MEMORY_MB,
        gpu_consumers_take_cpu_tasks=args.cpu_tasks_on_gpus,
        container_runtime=args.runtime,
        host=args.host,
        # One person on one machine: they get the operator key, kept where `infer` finds it.
        create_operator_key=True,
    )


def _describe_consumers(platform: LocalPlatform) -> str:
    parts = [f"{platform.consumers} CPU consumer(s)"]
    if platform.gpus:
        parts.append(f"{len(platform.gpus)} GPU consumer(s) (GPUs {','.join(platform.gpus)})")
    if platform.simulate_gpus:
        parts.append(
            f"{platform.simulate_gpus} consumer(s) with a simulated GPU of "
            f"{platform.simulated_gpu_memory_mb} MiB"
        )
    described = ", ".join(parts)
    if platform.container_runtime is not None:
        described += f" running models on {platform.container_runtime}"
    return described


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a count (0 or more)")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


def _cmd_standalone(args: argparse.Namespace) -> int:
    platform = _platform_of(args)
    quiet_database_logs(args.verbose)  # the operator key is made in this process, migrations first
    stop_requested = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping every service", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    platform.start()
    try:
        if args.register_examples:
            registered = register_examples(
                platform.private_url,
                platform.service_token,
                # Without --runtime the consumers take IS_CONTAINER_RUNTIME from this environment.
                platform.container_runtime or os.environ.get("IS_CONTAINER_RUNTIME"),
            )
            print(f"example models ready: {', '.join(registered)}")
        print(
            f"InferenceServer is up at {platform.public_url} (API docs: {platform.public_url}/docs); "
            f"{_describe_consumers(platform)}; data in {platform.data_dir}; "
            f"logs in {platform.data_dir / 'logs'}"
        )
        key_file = platform.operator_key_file
        if platform.operator_key_created:
            print(
                f"Operator key {platform.operator_key_created!r} created, stored in {key_file} (mode 0600)."
            )
        else:
            print(f"Operator key: {key_file} (from an earlier start).")
        # infer reads <IS_DATA_DIR or ./data>/operator.key by itself when run from here.
        env_hint = "" if platform.data_dir == Path("data").resolve() else f"IS_DATA_DIR={platform.data_dir} "
        print(
            f"Submit a task:  {env_hint}.venv/bin/infer --url {platform.public_url} submit passthrough "
            f"./some-folder --wait -o result/"
        )
        print("More keys:  .venv/bin/inference-server keys create NAME [--operator]")
        print("Press Ctrl-C to stop.", flush=True)
        while not stop_requested.wait(1.0):
            platform.supervise_once()
    finally:
        platform.stop()
        print("all services stopped", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inference-server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    standalone = commands.add_parser("standalone", help="all services as local processes (embedded default)")
    standalone.add_argument("--host", default="127.0.0.1")
    standalone.add_argument("--port", type=int, default=8000, help="public API port")
    standalone.add_argument("--data-dir", default="./data")
    standalone.add_argument(
        "--consumers",
        type=_count,
        metavar="N",
        help="CPU-only consumers (default 1, or 0 with --gpus)",
    )
    gpu_kind = standalone.add_mutually_exclusive_group()
    gpu_kind.add_argument(
        "--gpus",
        metavar="all|ID,ID",
        help="one consumer per GPU: 'all' the GPUs NVML reports, or comma-separated GPU ids",
    )
    gpu_kind.add_argument(
        "--simulate-gpus",
        type=_count,
        default=0,
        metavar="N",
        help="N more consumers, each owning one simulated GPU (for machines without one)",
    )
    standalone.add_argument(
        "--gpu-memory-mb",
        type=_positive,
        metavar="M",
        help=f"memory of each simulated GPU in MiB (default {DEFAULT_SIMULATED_GPU_MEMORY_MB})",
    )
    standalone.add_argument(
        "--cpu-tasks-on-gpus",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether GPU consumers also take CPU tasks (default: the consumer's IS_TAKE_CPU_TASKS)",
    )
    standalone.add_argument(
        "--runtime",
        choices=CONTAINER_RUNTIMES,
        help="the engine every consumer runs model containers on (IS_CONTAINER_RUNTIME; "
        "default: the consumer's, docker). podman needs no Docker daemon",
    )
    standalone.add_argument(
        "--register-examples",
        action="store_true",
        help="build the images in models_examples/ and register them",
    )
    standalone.set_defaults(handler=_cmd_standalone)

    for name, module in (
        ("private-api", "private_api"),
        ("public-api", "public_api"),
        ("consumer", "job_consumer"),
    ):
        sub = commands.add_parser(name, help=f"run the {name} service in the foreground", add_help=False)
        sub.set_defaults(handler=None, module=module)

    add_operator_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per HTTP request to our own services is noise in the operator's terminal.
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    if args.handler is None:
        return _exec_module(args.module, rest)
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        status: int = args.handler(args)
        return status
    except Exception as exc:  # one clear line for the operator; details are in the service logs
        log.debug("command failed", exc_info=True)
        print(f"inference-server: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
