"""What every benchmark phase shares: statistics, the machine, the platform harness, the raw runner."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform as py_platform
import secrets
import shutil
import statistics
import subprocess
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import httpx
import pika
import pika.exceptions

from inference_server.contract import (
    SERVICE_TOKEN_HEADER,
    ZIP_MEDIA_TYPE,
    ModelPublic,
    PrivateRoutes,
    PublicRoutes,
    TaskPublic,
    TaskQueue,
    V12Code,
    cancel_exchange_name,
)
from inference_server.file_trees import remove_tree
from inference_server.zipsafe import ZipLimits, extract_zip, zip_directory
from job_consumer.config import ConsumerSettings
from job_consumer.container_runtime import DockerRuntime
from job_consumer.runner import ModelRunner, task_of_container
from local_platform.examples import DEFAULT_BASE_IMAGE, register_model
from local_platform.launcher import LocalPlatform
from local_platform.ports import free_port
from models_examples.catalog import build_example_images, get_example

log = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
PASSTHROUGH = "passthrough"
MB = 1_000_000  # MB/s are decimal megabytes; RSS is reported in MiB (as the kernel counts pages)
MIB = 1024 * 1024


# --- statistics -------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": statistics.median(values) if values else math.nan,
        "p95": percentile(values, 95),
        "min": min(values) if values else math.nan,
        "max": max(values) if values else math.nan,
    }


def rounded(value: Any, digits: int = 3) -> Any:
    """Round floats deep inside a JSON-able structure, so results.json stays readable."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    if isinstance(value, dict):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(item, digits) for item in value]
    return value


# --- the machine ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_gib = math.nan
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = int(line.split()[1]) / 1024 / 1024
    docker_version = ""
    with contextlib.suppress(docker.errors.DockerException):
        client = docker.from_env()
        try:
            docker_version = str(client.version().get("Version", ""))
        finally:
            client.close()
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "cpu_model": cpu_model,
        "docker_version": docker_version,
        "kernel": py_platform.release(),
        "python": py_platform.python_version(),
        "load_average_at_start": list(os.getloadavg()),
    }


# --- zips on disk -------------------------------------------------------------------------------


def write_small_zip(path: Path, size: int = 1024, name: str = "payload.bin") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(name, os.urandom(size))
    return path


def write_random_stored_zip(path: Path, size: int, name: str = "data.bin") -> str:
    """A zip of `size` incompressible bytes, stored (not deflated), written chunk by chunk.

    Returns the sha256 of the member. Nothing of it is ever whole in memory.
    """
    import hashlib

    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    chunk = 4 * MIB
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
        archive.open(zipfile.ZipInfo(name), "w", force_zip64=True) as member,
    ):
        left = size
        while left > 0:
            block = os.urandom(min(chunk, left))
            digest.update(block)
            member.write(block)
            left -= len(block)
    return digest.hexdigest()


# --- RSS of the platform's processes ------------------------------------------------------------


def _proc_status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler:
    """Samples VmRSS and VmHWM of every child of a LocalPlatform, by service name.

    VmHWM is the kernel's own high-water mark, so a peak between two samples is not missed;
    it dies with the process, hence the periodic reads (the last one before an exit is kept).
    """

    def __init__(self, platform: LocalPlatform, interval_s: float = 0.2) -> None:
        self.platform = platform
        self.interval_s = interval_s
        self.peak_hwm_kib: dict[str, int] = {}
        self.peak_rss_kib: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def sample(self) -> None:
        for name, process in list(self.platform.processes.items()):
            if not process.running:
                continue
            for key, store in (("VmHWM", self.peak_hwm_kib), ("VmRSS", self.peak_rss_kib)):
                value = _proc_status_kib(process.pid, key)
                if value is not None and value > store.get(name, 0):
                    store[name] = value

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self.sample()
        self._stop.set()
        self._thread.join(5)

    def peaks_mb(self) -> dict[str, float]:
        """Peak resident memory per process in MiB (the larger of VmHWM and the sampled VmRSS)."""
        names = set(self.peak_hwm_kib) | set(self.peak_rss_kib)
        return {
            name: round(max(self.peak_hwm_kib.get(name, 0), self.peak_rss_kib.get(name, 0)) / 1024, 1)
            for name in sorted(names)
        }


# --- the platform under test ---------------------------------------------------------------------


@dataclass
class BenchContext:
    run_id: str
    work_dir: Path
    quick: bool
    rabbitmq_url: str
    base_image: str
    queues: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, quick: bool) -> BenchContext:
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
        work_dir = BENCH_DIR / "work" / run_id
        work_dir.mkdir(parents=True, exist_ok=True)
        return cls(
            run_id=run_id,
            work_dir=work_dir,
            quick=quick,
            rabbitmq_url=os.environ.get("IS_RABBITMQ_URL", DEFAULT_RABBITMQ_URL),
            base_image=os.environ.get("IS_BASE_IMAGE", DEFAULT_BASE_IMAGE),
        )

    def queue_name(self, phase: str) -> str:
        name = f"bench-{self.run_id}-{phase}"
        self.queues.append(name)
        return name

    def delete_queues(self) -> None:
        """Delete every queue this run declared (only ours: the names carry this run's id)."""
        if not self.queues:
            return
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self.rabbitmq_url))
        except pika.exceptions.AMQPError as exc:
            log.warning("could not connect to RabbitMQ to delete the bench queues: %r", exc)
            return
        try:
            for base in self.queues:
                # The platform's lanes (<base>.cpu, <base>.gpu) and its cancel exchange.
                for name in (base, *(lane.queue_name(base) for lane in TaskQueue)):
                    try:
                        channel = connection.channel()
                        channel.queue_delete(name)
                        channel.close()
                    except pika.exceptions.AMQPError as exc:
                        log.warning("could not delete queue %s: %r", name, exc)
                try:
                    channel = connection.channel()
                    channel.exchange_delete(cancel_exchange_name(base))
                    channel.close()
                except pika.exceptions.AMQPError as exc:
                    log.warning("could not delete exchange %s: %r", cancel_exchange_name(base), exc)
        finally:
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()
        self.queues.clear()


def queue_consumer_count(rabbitmq_url: str, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of a queue, by a passive declare."""
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        method = connection.channel().queue_declare(queue, passive=True)
        return method.method.message_count, method.method.consumer_count
    finally:
        with contextlib.suppress(pika.exceptions.AMQPError):
            connection.close()


def build_passthrough_image(ctx: BenchContext) -> None:
    client = docker.from_env()
    try:
        build_example_images(client, ctx.base_image, [get_example(PASSTHROUGH)])
    finally:
        client.close()


class BenchPlatform:
    """A LocalPlatform on this run's own queue and data folder, with the RSS sampler attached."""

    def __init__(self, ctx: BenchContext, phase: str, consumers: int) -> None:
        self.ctx = ctx
        self.phase = phase
        self.queue = ctx.queue_name(phase)
        self.platform = LocalPlatform(
            data_dir=ctx.work_dir / phase / "platform",
            public_port=free_port(),
            consumers=consumers,
            rabbitmq_url=ctx.rabbitmq_url,
            queue_name=self.queue,
            # The benchmarks measure delivery, not access: their plain HTTP clients send no key,
            # like v1.2 clients; the InferenceClient ones use the operator key (operator_key).
            create_operator_key=True,
            extra_env={"IS_ANONYMOUS_TASKS": "true", "IS_ANONYMOUS_MODELS": "true"},
        )
        self.sampler: RssSampler | None = None

    def __enter__(self) -> BenchPlatform:
        started = time.monotonic()
        self.platform.start()
        self.sampler = RssSampler(self.platform).start()
        register_model(self.platform.private_url, self.platform.service_token, get_example(PASSTHROUGH))
        if self.platform.consumers:
            self.wait_consumers(self.platform.consumers)
        log.info("[%s] platform up in %.1fs at %s", self.phase, time.monotonic() - started, self.public_url)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        self.platform.stop()

    @property
    def public_url(self) -> str:
        return self.platform.public_url

    @property
    def operator_key(self) -> str:
        return self.platform.operator_key_file.read_text().strip()

    @property
    def private_url(self) -> str:
        return self.platform.private_url

    def private_client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.private_url,
            headers={SERVICE_TOKEN_HEADER: self.platform.service_token},
            timeout=timeout,
        )

    def model(self, human_readable_id: str = PASSTHROUGH) -> ModelPublic:
        with self.private_client() as client:
            response = client.get(PrivateRoutes.MODEL.format(human_readable_id=human_readable_id))
            response.raise_for_status()
            return ModelPublic.model_validate(response.json())

    def add_consumers(self, total: int, *, wait: bool = True) -> None:
        """Start consumers until `total` run; wait until each listens on the queue (only
        meaningful with an empty queue: a consumer running a task stops listening meanwhile)."""
        running = sum(1 for name in self.platform.processes if name.startswith("consumer-"))
        for index in range(running, total):
            self.platform.start_consumer(index)
        self.platform.consumers = max(self.platform.consumers, total)
        if wait:
            self.wait_consumers(total)

    def wait_consumers(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            # Consumers listen on the per-class queues (TaskQueue); the bench's tasks are CPU tasks.
            _, consumers = queue_consumer_count(self.ctx.rabbitmq_url, TaskQueue.CPU.queue_name(self.queue))
            if consumers >= count:
                return
            for name, process in self.platform.processes.items():
                if name.startswith("consumer-") and not process.running:
                    raise RuntimeError(f"{name} exited:\n{process.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {consumers} of {count} consumers listen on {self.queue}")
            time.sleep(0.1)

    def rss_mb(self) -> dict[str, float]:
        assert self.sampler is not None
        self.sampler.sample()
        return self.sampler.peaks_mb()


def container_run_s(task: TaskPublic) -> float | None:
    """How long the task's model container ran inside its consumer, as the platform recorded it
    (consumer creating the container until it had exited and its log was read); None when no
    run was reported."""
    if task.run_started_at is None or task.run_finished_at is None:
        return None
    return (task.run_finished_at - task.run_started_at).total_seconds()


EVENTS_DRAIN_S = 1.0


class ContainerRuns:
    """Counts the model containers that ran for each task while open, by their exits in the
    engine's own event stream (the task label, or the task's name a prepared container takes,
    says whose): the engine's record of every run, where the platform keeps only each task's
    latest. Exits, not starts: a container started ahead is started before its task exists."""

    def __init__(self, docker_client: docker.DockerClient) -> None:
        self._docker = docker_client
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._events: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ContainerRuns:
        self._events = self._docker.events(decode=True, filters={"type": "container", "event": "die"})
        self._thread = threading.Thread(target=self._read, name="container-runs", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # The engine sends each event as it happens; this lets the last ones reach the reader
        # before closing the stream ends its iteration (with an error, ignored there).
        time.sleep(EVENTS_DRAIN_S)
        self._events.close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _read(self) -> None:
        # The stream ends by close() from another thread, which surfaces as any of several errors.
        with contextlib.suppress(Exception):
            self.count(self._events)

    def count(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            # A container prepared ahead has no task label; it carries its task's name instead.
            task_uid = task_of_container((event.get("Actor") or {}).get("Attributes") or {})
            if task_uid:
                with self._lock:
                    self._counts[task_uid] += 1

    def per_task(self, uids: Iterable[str]) -> Counter[str]:
        """Runs of these tasks' containers (others' on the same engine are not counted)."""
        wanted = set(uids)
        with self._lock:
            return Counter({uid: count for uid, count in self._counts.items() if uid in wanted})


# --- the raw baseline ---------------------------------------------------------------------------


class _BenchRunner(ModelRunner):
    """The consumer's own container code, with bench labels: other people's sweeps of
    `inference-server.managed` containers must neither see nor remove ours."""

    def labels_for(self, task_uid: str) -> dict[str, str]:
        return {"inference-server.bench": "raw", "inference-server.bench-task": task_uid}


def _cli_args(options: dict[str, Any]) -> list[str]:
    """`docker run --rm` flags equal to the consumer's `containers.create` options."""
    args = ["docker", "run", "--rm", "--name", options["name"]]
    handled = {"image", "name"}
    for key, value in options.get("labels", {}).items():
        args += ["--label", f"{key}={value}"]
    handled.add("labels")
    for host, spec in options.get("volumes", {}).items():
        args += ["-v", f"{host}:{spec['bind']}:{spec['mode']}"]
    handled.add("volumes")
    for key, value in options.get("environment", {}).items():
        args += ["--env", f"{key}={value}"]
    handled.add("environment")
    for cap in options.get("cap_drop", []):
        args += ["--cap-drop", cap]
    handled.add("cap_drop")
    for opt in options.get("security_opt", []):
        args += ["--security-opt", opt]
    handled.add("security_opt")
    simple = {
        "mem_limit": "--memory",
        "memswap_limit": "--memory-swap",
        "pids_limit": "--pids-limit",
        "network_mode": "--network",
        "user": "--user",
    }
    for key, flag in simple.items():
        if key in options:
            args += [flag, str(options[key])]
            handled.add(key)
    if "nano_cpus" in options:
        args += ["--cpus", f"{options['nano_cpus'] / 1e9:g}"]
        handled.add("nano_cpus")
    if options.get("read_only"):
        args.append("--read-only")
    handled.add("read_only")
    for mount_point, mount_options in options.get("tmpfs", {}).items():
        args += ["--tmpfs", f"{mount_point}:{mount_options}"]
    handled.add("tmpfs")
    if "log_config" in options:
        config = options["log_config"]
        args += ["--log-driver", config["Type"]]
        for key, value in (config.get("Config") or {}).items():
            args += ["--log-opt", f"{key}={value}"]
        handled.add("log_config")
    unknown = set(options) - handled
    if unknown:
        # A new consumer option the baseline would silently lack: refuse, the comparison would lie.
        raise RuntimeError(f"the raw baseline does not know the consumer options {sorted(unknown)}")
    return [*args, options["image"]]


@dataclass(frozen=True)
class RawTiming:
    total_s: float  # unzip + container + zip: what a user scripting `docker run` by hand waits for
    container_s: float  # the container alone (create/start/wait/remove)


class RawRunner:
    """Runs the model image without the platform, with exactly the consumer's container options."""

    def __init__(self, model: ModelPublic, scratch: Path) -> None:
        self.model = model
        self.scratch = scratch
        self.settings = ConsumerSettings(
            service_token="bench-raw-not-used",
            consumer_id="bench-raw",
            data_dir=scratch,
            work_dir=scratch,
        )
        self.docker = docker.from_env(timeout=300)
        self.runner = _BenchRunner(DockerRuntime(self.docker), self.settings)
        self.limits = ZipLimits(
            max_total_bytes=self.settings.zip_max_total_bytes,
            max_files=self.settings.zip_max_files,
            max_ratio=self.settings.zip_max_ratio,
        )

    def close(self) -> None:
        self.docker.close()

    def options(self, uid: str, input_dir: Path, output_dir: Path) -> dict[str, Any]:
        return self.runner.container_options(
            task_uid=uid, model=self.model, input_dir=input_dir, output_dir=output_dir, model_dir=None
        )

    @contextlib.contextmanager
    def _workspace(self) -> Iterator[tuple[str, Path]]:
        uid = secrets.token_hex(8)
        root = self.scratch / f"raw-{uid}"
        (root / "input").mkdir(parents=True)
        (root / "output").mkdir()
        os.chmod(root / "input", 0o755)
        os.chmod(root / "output", 0o777)
        try:
            yield uid, root
        finally:
            remove_tree(root)

    def run(self, input_zip: Path, *, use_cli: bool = True) -> RawTiming:
        """unzip -> container -> zip, as the consumer's work minus the platform around it."""
        with self._workspace() as (uid, root):
            started = time.perf_counter()
            extract_zip(input_zip, root / "input", self.limits)
            for folder, dirnames, _ in os.walk(root / "input"):
                for dirname in dirnames:
                    os.chmod(Path(folder) / dirname, 0o755)
            container_started = time.perf_counter()
            if use_cli:
                options = self.options(uid, root / "input", root / "output")
                completed = subprocess.run(_cli_args(options), capture_output=True, check=False)
                if completed.returncode != 0:
                    raise RuntimeError(
                        f"docker run failed ({completed.returncode}): {completed.stderr[-500:]!r}"
                    )
            else:
                result = self.runner.run(
                    task_uid=uid, model=self.model, input_dir=root / "input", output_dir=root / "output"
                )
                if not result.succeeded:
                    raise RuntimeError(f"container failed: exit {result.exit_code}: {result.logs[-500:]}")
            container_s = time.perf_counter() - container_started
            zip_directory(root / "output", root / "output.zip")
            return RawTiming(total_s=time.perf_counter() - started, container_s=container_s)


# --- the client side of the platform ------------------------------------------------------------


def submit_small(client: httpx.Client, zip_path: Path, model: str = PASSTHROUGH) -> str:
    with zip_path.open("rb") as handle:
        response = client.post(
            PublicRoutes.TASKS,
            params={"model_human_readable_id": model},
            files={"zip_file": (zip_path.name, handle, ZIP_MEDIA_TYPE)},
        )
    if response.status_code not in (httpx.codes.OK, httpx.codes.CREATED):
        raise RuntimeError(f"submit answered {response.status_code}: {response.text[:300]}")
    uid = json.loads(response.content)
    assert isinstance(uid, str)
    return uid


def try_download_v12(client: httpx.Client, uid: str, dest: Path) -> bool:
    """One v1.2 poll: False while pending or running; on 200 the output zip is streamed to `dest`."""
    with client.stream("GET", PublicRoutes.TASK.format(uid=uid)) as response:
        if response.status_code == V12Code.PENDING:
            response.read()
            return False
        if response.status_code != httpx.codes.OK:
            response.read()
            raise RuntimeError(f"task {uid}: poll answered {response.status_code}: {response.text[:300]}")
        with dest.open("wb") as sink:
            for chunk in response.iter_raw(1024 * 1024):
                sink.write(chunk)
    return True


def free_disk_gib(path: Path) -> float:
    return shutil.disk_usage(path).free / 1024**3


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the ")" of the command name (which may hold spaces): field 3 onwards."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of a process in seconds (from /proc/<pid>/stat)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # After the ")" of the command name: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The live children of a process, of all its threads (/proc/<pid>/task/<tid>/children)."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError):
                children += [int(child) for child in (task / "children").read_text().split()]
    return children


def process_tree_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of a process and every descendant: the live ones' own, and
    cutime + cstime, the children each has already waited for (a child that exits between two
    readings is counted there, the kernel adds its time to its parent's on reaping)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # utime, stime, cutime, cstime: fields 14 to 17 (1-based), 11 to 14 here.
    ticks = sum(int(value) for value in fields[11:15])
    total = ticks / os.sysconf("SC_CLK_TCK")
    for child in child_pids(pid):
        total += process_tree_cpu_s(child) or 0.0
    return total


def platform_cpu_s(bench_platform: BenchPlatform) -> dict[str, float]:
    """CPU seconds so far of each service process LocalPlatform started, its children included."""
    usage = {}
    for name, process in bench_platform.platform.processes.items():
        if process.running:
            value = process_tree_cpu_s(process.pid)
            if value is not None:
                usage[name] = value
    return usage


def services_cpu_delta_s(before: dict[str, float], after: dict[str, float]) -> float:
    """CPU the services spent between two platform_cpu_s readings; a service started in between
    (a consumer added) counts from zero, its start-up included."""
    return sum(value - before.get(name, 0.0) for name, value in after.items())


def machine_busy_cpu_s() -> float | None:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def cpu_pressure_total_us() -> int | None:
    """The kernel's cumulative time (us) some runnable task waited for a CPU (PSI), if available."""
    try:
        for line in Path("/proc/pressure/cpu").read_text().splitlines():
            if line.startswith("some"):
                return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
    return None
