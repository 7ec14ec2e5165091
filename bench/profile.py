"""`python -m bench.profile`: where the platform's services spend their CPU under the throughput load.

Starts the throughput phase's platform (LocalPlatform: private API, public API, consumers), attaches
`py-spy record` to every service process (children included), runs batches of trivial tasks the
way the throughput phase does, and stops the recorders. Each service's profile is written under
bench/work/profile/<run>/ (speedscope JSON: open it at speedscope.app or in any speedscope viewer,
offline) and its top functions are printed, by own samples and by samples spent inside them.
Nothing here is judged: it finds what to cut; `services_cpu_ms_per_task` measures the cut.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BENCH_DIR,
    BenchContext,
    BenchPlatform,
    build_passthrough_image,
    platform_cpu_s,
    services_cpu_delta_s,
    write_small_zip,
)
from bench.dispatch import platform_batch
from inference_server.file_trees import remove_tree

log = logging.getLogger("bench.profile")

PY_SPY_STOP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class FunctionShare:
    function: str
    own_pct: float  # samples where it was the running frame
    inside_pct: float  # samples where it was anywhere on the stack


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: `make setup` installs the dev dependencies")
    return found


def _frame_name(frame: dict[str, Any]) -> str:
    """`function (module/file.py:line)`, the path shortened to the repository or site-packages."""
    file = str(frame.get("file") or "")
    for marker in ("site-packages/", "/work/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    line = frame.get("line")
    return f"{frame.get('name')} ({file}{':' + str(line) if line else ''})"


def top_functions(speedscope: dict[str, Any], count: int = 15) -> tuple[float, list[FunctionShare]]:
    """Total samples of every thread, and the functions with the most own samples, with their
    inside share. The frame's line is dropped for the inside share, so recursion counts once."""
    frames = speedscope["shared"]["frames"]
    own: Counter[str] = Counter()
    inside: Counter[str] = Counter()
    total = 0.0
    for profile in speedscope["profiles"]:
        weights = profile.get("weights") or [1] * len(profile["samples"])
        for stack, weight in zip(profile["samples"], weights, strict=True):
            if not stack:
                continue
            total += weight
            own[_frame_name(frames[stack[-1]])] += weight
            for name in {_frame_name({**frames[index], "line": None}) for index in stack}:
                inside[name] += weight
    shares = []
    for name, samples in own.most_common(count):
        function_only = name.rsplit(":", 1)[0] + ")" if ":" in name else name
        shares.append(
            FunctionShare(
                function=name,
                own_pct=100 * samples / total if total else 0.0,
                inside_pct=100 * inside.get(function_only, samples) / total if total else 0.0,
            )
        )
    return total, shares


def top_inside(speedscope: dict[str, Any], count: int = 25) -> list[tuple[str, float]]:
    """The functions most often anywhere on the stack: what a cut should aim at."""
    frames = speedscope["shared"]["frames"]
    inside: Counter[str] = Counter()
    total = 0.0
    for profile in speedscope["profiles"]:
        weights = profile.get("weights") or [1] * len(profile["samples"])
        for stack, weight in zip(profile["samples"], weights, strict=True):
            if not stack:
                continue
            total += weight
            for name in {_frame_name({**frames[index], "line": None}) for index in stack}:
                inside[name] += weight
    return [(name, 100 * samples / total) for name, samples in inside.most_common(count)] if total else []


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--consumers", type=int, default=2, help="consumers running (default 2)")
    parser.add_argument("--tasks", type=int, default=30, help="tasks per batch (default 30)")
    parser.add_argument("--batches", type=int, default=1, help="batches recorded (default 1)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    parser.add_argument("--top", type=int, default=15, help="functions listed per service (default 15)")
    parser.add_argument(
        "--idle-s",
        type=float,
        default=10.0,
        help="CPU of the idle services measured this long first (default 10)",
    )
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="sample every thread, not only the one holding the GIL (waits then count as time spent)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("pika", "httpx", "job_consumer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    py_spy = _py_spy()
    ctx = BenchContext.create(quick=True)
    out_dir = BENCH_DIR / "work" / "profile" / ctx.run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    build_passthrough_image(ctx)
    input_zip = write_small_zip(ctx.work_dir / "profile" / "input.zip", size=1024)
    recorders: dict[str, subprocess.Popen[bytes]] = {}
    try:
        with (
            BenchPlatform(ctx, "profile", consumers=args.consumers) as bench_platform,
            httpx.Client(base_url=bench_platform.public_url, timeout=60) as client,
        ):
            # One batch unrecorded: first-use paths (imports, caches, pools) are not the per-task cost.
            platform_batch(client, input_zip, max(4, args.consumers), ctx.work_dir / "profile" / "out")
            # With nothing to do, what each service spends anyway (its timers and polling loops).
            idle_before = platform_cpu_s(bench_platform)
            time.sleep(args.idle_s)
            idle = services_cpu_delta_s(idle_before, platform_cpu_s(bench_platform))
            idle_each = {
                name: value - idle_before.get(name, 0.0)
                for name, value in platform_cpu_s(bench_platform).items()
            }
            for name, process in bench_platform.platform.processes.items():
                recorders[name] = subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "--pid",
                        str(process.pid),
                        "--subprocesses",
                        "--nonblocking",
                        # The GIL holder is the thread running Python: waits in C (epoll, locks,
                        # queues) are not mistaken for work, which py-spy's idle check lets through.
                        *([] if args.all_threads else ["--gil"]),
                        "--rate",
                        str(args.rate),
                        "--format",
                        "speedscope",
                        "--output",
                        str(out_dir / f"{name}.speedscope.json"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=(out_dir / f"{name}.py-spy.log").open("wb"),
                )
            time.sleep(1.0)  # py-spy attaches asynchronously; a batch started before it is half-seen
            before = platform_cpu_s(bench_platform)
            started = time.perf_counter()
            for _ in range(args.batches):
                platform_batch(client, input_zip, args.tasks, ctx.work_dir / "profile" / "out")
            wall = time.perf_counter() - started
            after = platform_cpu_s(bench_platform)
            for recorder in recorders.values():
                recorder.send_signal(signal.SIGINT)
            for name, recorder in recorders.items():
                try:
                    recorder.wait(PY_SPY_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log.warning("py-spy of %s did not stop; killed", name)
                    recorder.kill()
    finally:
        for recorder in recorders.values():
            if recorder.poll() is None:
                recorder.kill()
        ctx.delete_queues()
        remove_tree(ctx.work_dir)
    tasks = args.tasks * args.batches
    print(
        f"\n{tasks} tasks in {wall:.1f} s with {args.consumers} consumer(s); services' CPU per task: "
        f"{services_cpu_delta_s(before, after) / tasks * 1000:.1f} ms"
    )
    for name in sorted(after):
        print(
            f"  {name}: {(after[name] - before.get(name, 0.0)) / tasks * 1000:.1f} ms per task; "
            f"idle {idle_each.get(name, 0.0) / args.idle_s * 1000:.1f} ms per s"
        )
    print(f"  all services idle: {idle / args.idle_s * 1000:.1f} ms of CPU per s")
    for name in sorted(recorders):
        path = out_dir / f"{name}.speedscope.json"
        if not path.exists():
            print(f"\n{name}: no profile ({(out_dir / f'{name}.py-spy.log').read_text()[-300:]})")
            continue
        speedscope = json.loads(path.read_text())
        total, shares = top_functions(speedscope, args.top)
        print(f"\n{name}: {total:.2f} s sampled ({path})")
        print("  own %  inside %  function")
        for share in shares:
            print(f"  {share.own_pct:5.1f}  {share.inside_pct:8.1f}  {share.function}")
        print("  most often on the stack:")
        for function, pct in top_inside(speedscope, args.top):
            print(f"         {pct:8.1f}  {function}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
