"""Runs one model container for one task: sibling container, locked down, always removed."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests
from docker.models.containers import Container
from docker.types import LogConfig
from pydantic import ConfigDict

from inference_server.contract import (
    MODEL_NUMERIC_LIMITS,
    MODEL_SWITCHES,
    ModelLimits,
    ModelPublic,
    RunTimes,
)
from inference_server.file_trees import directory_size
from job_consumer.config import ConsumerSettings
from job_consumer.container_gate import open_gate
from job_consumer.container_runtime import ContainerRuntime

log = logging.getLogger(__name__)

LABEL_MANAGED = "inference-server.managed"
LABEL_CONSUMER = "inference-server.consumer"
LABEL_TASK = "inference-server.task"
# A container created ahead of its task (job_consumer/prepared_containers.py): no task label, as
# labels are fixed at create; this one names its slot, and LABEL_PROCESS the consumer process
# that made it, so a sweep on the same host knows it from a dead consumer's.
LABEL_PREPARED = "inference-server.prepared"
LABEL_PROCESS = "inference-server.process"
# A task's container is named is-task-<uid>-<random>, a prepared one too once a task has it.
TASK_CONTAINER_PREFIX = "is-task-"
UNPRIVILEGED_USER = "65534:65534"  # nobody:nogroup
# Where a task's params are, in its container; absent when the task has none.
PARAMS_PATH = "/params.json"
POLL_S = 1.0
# How long the run waits, after the exit, for the live output stream to deliver its last bytes.
OUTPUT_READER_JOIN_S = 5.0
# Docker's own copy of the logs is capped too, so a model printing without end cannot fill
# the disk; the newest part is what survives rotation, and that is what users need.
CONTAINER_LOG_CONFIG = LogConfig(type=LogConfig.types.JSON, config={"max-size": "10m", "max-file": "2"})


NVIDIA_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


def gpu_environment(gpu: str) -> dict[str, str]:
    """What a GPU task's container is told about its GPU, simulated or not: the NVIDIA runtime
    exposes the consumer's one GPU (host index or UUID), which CUDA inside then numbers 0."""
    return {NVIDIA_VISIBLE_DEVICES: gpu, CUDA_VISIBLE_DEVICES: "0"}


class ModelRunError(Exception):
    """The container could not be run at all (not a model failure); `retryable`: may another try work."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


# The limits every container runs under, the model's or the consumer's default; the others
# (gpu_memory_mb) place tasks and bound nothing in the container.
CONTAINER_LIMITS = ("timeout_s", "memory_mb", "cpus", "pids", "tmp_mb")


class RunLimits(ModelLimits):
    """A model's limits as its container runs under them: every platform default filled in."""

    model_config = ConfigDict(frozen=True)

    # Narrowed from the contract's "None means the platform default"; bounds are the settings'.
    timeout_s: int
    memory_mb: int
    cpus: float
    pids: int
    tmp_mb: int

    @classmethod
    def of(cls, model: ModelPublic, settings: ConsumerSettings, *, engine_cpus: float) -> RunLimits:
        """The model's own limits, else the consumer's IS_DEFAULT_<LIMIT> settings."""
        values = {name: getattr(model, name) for name in (*MODEL_SWITCHES, *MODEL_NUMERIC_LIMITS)}
        values |= {
            name: getattr(settings, f"default_{name}") for name in CONTAINER_LIMITS if values[name] is None
        }
        limits = cls.model_validate(values)
        # Docker refuses a CPU quota above the engine's core count; a smaller host still runs it.
        return limits.model_copy(update={"cpus": min(limits.cpus, engine_cpus)})


@dataclass(frozen=True)
class RunResult:
    exit_code: int | None
    timed_out: bool
    oom_killed: bool
    cancelled: bool
    logs: str
    duration_s: float
    limits: RunLimits
    output_too_large: bool = False
    # Wall-clock UTC ends of the span duration_s measures (None when no container was created):
    # what the consumer reports to the platform as the task's run times.
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def run_times(self) -> RunTimes:
        return RunTimes(run_started_at=self.started_at, run_finished_at=self.finished_at)

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not (
            self.timed_out or self.oom_killed or self.cancelled or self.output_too_large
        )


def _never() -> bool:
    return False


def _never_str(_: str) -> bool:
    return False


def task_of_container(attributes: Mapping[str, str]) -> str | None:
    """The task a container ran for, from its labels or engine event attributes: its task label,
    or, for one prepared ahead (no task label), the name it took when the task took it."""
    labelled = attributes.get(LABEL_TASK)
    if labelled:
        return labelled
    name = attributes.get("name", "").lstrip("/")
    if name.startswith(TASK_CONTAINER_PREFIX) and "-" in name[len(TASK_CONTAINER_PREFIX) :]:
        return name[len(TASK_CONTAINER_PREFIX) :].rsplit("-", 1)[0]
    return None


def this_process() -> str:
    """This consumer process as LABEL_PROCESS names it: host, pid and the pid's start time (a
    reused pid is another process)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def process_is_dead(label: str) -> bool:
    """Whether the process LABEL_PROCESS names is known to be gone: on this host only (another
    host's, or a label that is not one, is never judged dead)."""
    host, _, rest = label.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return _start_time(int(pid)) != started


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); "" if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: count from its closing one.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


class ModelRunner:
    """Starts the model image with /input, /output and /model bind-mounted, and waits for it."""

    def __init__(
        self,
        runtime: ContainerRuntime,
        settings: ConsumerSettings,
        *,
        remove_in_background: bool = False,
    ) -> None:
        self.runtime = runtime
        self.docker = runtime.client
        self.settings = settings
        self._host_cpus: float | None = None
        # Removing a container takes tens of milliseconds the task's answer need not wait for;
        # the consumer hands it to this thread and drains it on shutdown (close).
        self._removals = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="container-removal")
            if remove_in_background
            else None
        )

    def close(self) -> None:
        """Wait until every container handed over for removal is gone."""
        if self._removals is not None:
            self._removals.shutdown(wait=True)

    def limits_for(self, model: ModelPublic) -> RunLimits:
        return RunLimits.of(model, self.settings, engine_cpus=self._engine_cpus())

    def _engine_cpus(self) -> float:
        if self._host_cpus is None:
            try:
                self._host_cpus = float(self.docker.info().get("NCPU") or 1)
            except (docker.errors.APIError, requests.exceptions.RequestException):
                return self.settings.default_cpus
        return self._host_cpus

    def labels_for(self, task_uid: str) -> dict[str, str]:
        return {
            LABEL_MANAGED: "true",
            LABEL_CONSUMER: self.settings.consumer_id,
            LABEL_TASK: task_uid,
        }

    @staticmethod
    def container_name(task_uid: str) -> str:
        return f"{TASK_CONTAINER_PREFIX}{task_uid}-{secrets.token_hex(3)}"

    def image_id(self, container_tag: str) -> str | None:
        """The ID of the image the tag names now; None when the engine has no such image or
        cannot say (the run by tag then reports what is wrong)."""
        return self.runtime.image_id(container_tag)

    def container_options(
        self,
        *,
        task_uid: str,
        model: ModelPublic,
        input_dir: Path,
        output_dir: Path,
        model_dir: Path | None,
        params_file: Path | None = None,
        image: str | None = None,
    ) -> dict[str, Any]:
        """Everything passed to `containers.create`, kept apart so it can be inspected.

        `image`: what to run, when not the model's tag (an image ID, so that what runs is what
        the result cache was asked about, whatever the tag names meanwhile)."""
        limits = self.limits_for(model)
        # Same absolute path inside and outside: a consumer that itself runs in a container,
        # with the engine's socket and the work dir mounted at the same path, still works.
        # Absolute, symlinks kept: a prepared container's folders are bound through a link that
        # is pointed at its task's workspace when the task comes (the engine follows it at start).
        volumes = {
            os.path.abspath(input_dir): {"bind": "/input", "mode": "ro"},
            os.path.abspath(output_dir): {"bind": "/output", "mode": "rw"},
        }
        if model_dir is not None:
            volumes[str(model_dir.resolve())] = {"bind": "/model", "mode": "ro"}
        if params_file is not None:
            volumes[str(params_file.resolve())] = {"bind": PARAMS_PATH, "mode": "ro"}
        options: dict[str, Any] = {
            "image": image or model.container_tag,
            "name": self.container_name(task_uid),
            "labels": self.labels_for(task_uid),
            "volumes": volumes,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "mem_limit": f"{limits.memory_mb}m",
            # Equal to mem_limit: no swap on top, so the memory limit is the real limit.
            "memswap_limit": f"{limits.memory_mb}m",
            "nano_cpus": int(limits.cpus * 1e9),
            "pids_limit": limits.pids,
            "log_config": CONTAINER_LOG_CONFIG,
            # A model writes /output (bounded by IS_MAX_OUTPUT_BYTES) and /tmp (a tmpfs bounded
            # by its size, in the container's memory); a writable root filesystem would be disk
            # outside every limit, so it is for models an operator registered that way.
            "read_only": not limits.writable_rootfs,
            "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={limits.tmp_mb}m"},
            **self.runtime.container_options(),
        }
        if options["read_only"]:
            options["tmpfs"] |= self.runtime.read_only_rootfs_tmpfs()
        if not limits.allow_network:
            options["network_mode"] = "none"
        if not limits.run_as_root:
            options["user"] = UNPRIVILEGED_USER
        gpu = self.settings.gpu
        if model.use_gpu and gpu is None:
            # Never quietly on the CPU: the consumer only takes GPU tasks when it owns a GPU.
            raise ModelRunError(
                f"model {model.human_readable_id!r} needs a GPU; "
                f"consumer {self.settings.consumer_id} has none",
                retryable=True,
            )
        if model.use_gpu and gpu is not None:
            options["environment"] = gpu_environment(gpu)
            if not self.settings.simulates_gpu:
                options |= self.runtime.gpu_options(gpu)
        else:
            # An image may ask the NVIDIA runtime for every GPU itself (CUDA images set
            # NVIDIA_VISIBLE_DEVICES=all); a CPU task gets none of the consumer's.
            options["environment"] = {NVIDIA_VISIBLE_DEVICES: "void"}
        return options

    def run(
        self,
        *,
        task_uid: str,
        model: ModelPublic,
        input_dir: Path,
        output_dir: Path,
        model_dir: Path | None = None,
        params_file: Path | None = None,
        image: str | None = None,
        should_stop: Callable[[], bool] = _never,
        on_output: Callable[[bytes], None] | None = None,
        prepared: Container | None = None,
        gate: Path | None = None,
    ) -> RunResult:
        """Run the model to its end. `on_output` gets the container's output as it comes, from a
        thread of its own, for the live log. `prepared`: a container created ahead with exactly
        these options (bar its name and labels), started instead of creating one, or, when it was
        started ahead, let through its `gate` (container_gate); should that fail, one is created
        as usual (it is removed all the same)."""
        try:
            options = self.container_options(
                task_uid=task_uid,
                model=model,
                input_dir=input_dir,
                output_dir=output_dir,
                model_dir=model_dir,
                params_file=params_file,
                image=image,
            )
        except BaseException:
            if prepared is not None:
                self._dispose(prepared)
            raise
        limits = self.limits_for(model)
        started = time.monotonic()
        # The monotonic clock measures the run; the wall clock only places its start, so the
        # reported end minus start is exactly duration_s whatever the wall clock does meanwhile.
        started_at = datetime.now(UTC)
        if should_stop():
            if prepared is not None:
                self._dispose(prepared)
            return RunResult(None, False, False, True, "", 0.0, limits)
        container: Container | None = None
        output_reader: threading.Thread | None = None
        try:
            # create + start rather than run(): run() pulls on a missing image and, if start
            # fails, leaves a created container behind without returning a handle to it.
            try:
                container = self._start_prepared(prepared, task_uid, gate) if prepared is not None else None
                if container is None:
                    container = self.docker.containers.create(**options)
                    container.start()
            except docker.errors.ImageNotFound as exc:
                if image is not None and image != model.container_tag:
                    # The image the cache was asked about was removed since (its tag rebuilt
                    # and the old one pruned): another attempt resolves the tag anew.
                    raise ModelRunError(
                        f"image {image} (tag {model.container_tag!r}) of model "
                        f"{model.human_readable_id!r} was removed before it could run",
                        retryable=True,
                    ) from exc
                # No image lookup beforehand: create says so itself, one Docker call fewer per task.
                raise ModelRunError(
                    f"image {model.container_tag!r} of model {model.human_readable_id!r} is not present "
                    f"on the {self.runtime.name} engine of consumer {self.settings.consumer_id}",
                    retryable=False,
                ) from exc
            except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
                raise ModelRunError(f"could not start the model container: {exc}", retryable=True) from exc
            log.info(
                "task %s: container %s started (%s, image %s)",
                task_uid,
                container.short_id,
                model.container_tag,
                options["image"],
            )
            if on_output is not None:
                output_reader = self._read_output(container, on_output)
            exit_code, timed_out, cancelled, output_too_large = self._wait(
                container, limits, started, should_stop, output_dir
            )
            container.reload()
            oom_killed = self.runtime.oom_killed(
                container.attrs.get("State", {}),
                killed_by_consumer=timed_out or cancelled or output_too_large,
            )
            logs = container.logs(stdout=True, stderr=True).decode("utf-8", errors="replace")
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            raise ModelRunError(f"lost the model container: {exc}", retryable=True) from exc
        finally:
            if output_reader is not None:
                # The stream ends with the container; bounded in case the engine never closes it.
                output_reader.join(timeout=OUTPUT_READER_JOIN_S)
            if container is not None:
                self._dispose(container)
        duration_s = time.monotonic() - started
        return RunResult(
            exit_code=exit_code,
            timed_out=timed_out,
            oom_killed=oom_killed,
            cancelled=cancelled,
            logs=logs,
            duration_s=duration_s,
            limits=limits,
            output_too_large=output_too_large,
            started_at=started_at,
            finished_at=started_at + timedelta(seconds=duration_s),
        )

    def _start_prepared(self, prepared: Container, task_uid: str, gate: Path | None) -> Container | None:
        """The prepared container, started (or let through its gate); None (and it removed) when
        it would not start."""
        if gate is not None:
            if open_gate(gate):
                return prepared
            log.warning(
                "task %s: prepared container %s was not at its gate; creating one",
                task_uid,
                prepared.short_id,
            )
            self._dispose(prepared)
            return None
        try:
            prepared.start()
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            log.warning(
                "task %s: prepared container %s did not start (%s); creating one",
                task_uid,
                prepared.short_id,
                exc,
            )
            self._dispose(prepared)
            return None
        return prepared

    def remove_now(self, container: Container) -> None:
        """Remove a container that will not run, before returning."""
        self._remove(container)

    def _read_output(self, container: Container, on_output: Callable[[bytes], None]) -> threading.Thread:
        """Follow the container's output (stdout and stderr, as `logs` reads them) until it exits."""

        def follow() -> None:
            try:
                for chunk in container.logs(stdout=True, stderr=True, stream=True, follow=True):
                    on_output(chunk)
            except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
                # The live log only; the full log is read after the exit all the same.
                log.info("container %s: output stream ended: %r", container.short_id, exc)

        reader = threading.Thread(target=follow, name=f"output-{container.short_id}", daemon=True)
        reader.start()
        return reader

    def _wait(
        self,
        container: Container,
        limits: RunLimits,
        started: float,
        should_stop: Callable[[], bool],
        output_dir: Path,
    ) -> tuple[int | None, bool, bool, bool]:
        """Wait for the exit, killing it at the deadline or when /output grows past the limit,
        stopping it when asked to. Returns (exit code, timed out, cancelled, output too large)."""
        deadline = started + limits.timeout_s
        max_output = self.settings.max_output_bytes
        timed_out = cancelled = output_too_large = False
        while True:
            wait_s = max(0.05, min(POLL_S, deadline - time.monotonic()))
            try:
                status = container.wait(timeout=wait_s)
                return status.get("StatusCode"), timed_out, cancelled, output_too_large
            except requests.exceptions.RequestException:
                # docker-py reports the wait's read timeout as a connection error; a reload
                # tells "still running" (succeeds) from "engine gone" (raises) apart.
                container.reload()
                if container.status not in ("created", "running", "restarting", "paused"):
                    continue
            if timed_out or cancelled or output_too_large:
                continue
            try:
                written = directory_size(output_dir, stop_above=max_output)
            except OSError as exc:
                # A model moving folders about while they are measured; the check after it
                # exits measures a tree that no longer changes.
                log.info("container %s: /output not measured this time (%r)", container.short_id, exc)
                written = 0
            try:
                if written > max_output:
                    log.warning(
                        "container %s wrote more than %d bytes to /output; killing it",
                        container.short_id,
                        max_output,
                    )
                    output_too_large = True
                    container.kill()
                elif time.monotonic() >= deadline:
                    log.warning(
                        "container %s ran past its %ss timeout; killing it",
                        container.short_id,
                        limits.timeout_s,
                    )
                    timed_out = True
                    container.kill()
                elif should_stop():
                    log.info("container %s: stop requested", container.short_id)
                    cancelled = True
                    container.stop(timeout=self.settings.stop_grace_s)
            except docker.errors.APIError as exc:
                # Most likely it exited on its own in the meantime; the next wait says so.
                log.info("container %s: %s", container.short_id, exc)

    def _dispose(self, container: Container) -> None:
        if self._removals is None:
            self._remove(container)
            return
        try:
            self._removals.submit(self._remove, container)
        except RuntimeError:
            # Shut down already (a task outliving close): remove it here instead.
            self._remove(container)

    def _remove(self, container: Container) -> None:
        try:
            container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            # The periodic sweep of labelled containers will find it again.
            log.warning("could not remove container %s: %s", container.short_id, exc)

    def remove_leftovers(
        self, keep_task_uids: Collection[str] = (), keep_prepared: Callable[[str], bool] = _never_str
    ) -> int:
        """Remove this consumer's labelled containers except the running tasks' and the prepared
        ones `keep_prepared` (asked by slot) still holds (crash leftovers), and the prepared
        containers of dead consumer processes on this host, whatever their consumer id."""
        filters: dict[str, str | list[str] | bool] = {
            "label": [f"{LABEL_MANAGED}=true", f"{LABEL_CONSUMER}={self.settings.consumer_id}"]
        }
        removed = 0
        # sparse: no inspect per container, so one vanishing meanwhile cannot fail the listing.
        for container in self.docker.containers.list(all=True, sparse=True, filters=filters):
            labels = container.attrs.get("Labels") or {}
            slot = labels.get(LABEL_PREPARED)
            if slot is not None:
                if keep_prepared(slot):
                    continue
                log.info("removing leftover prepared container %s (slot %s)", container.short_id, slot)
            else:
                task_uid = labels.get(LABEL_TASK)
                if task_uid in keep_task_uids:
                    continue
                log.info("removing leftover container %s of task %s", container.short_id, task_uid)
            self._remove(container)
            removed += 1
        return removed + self._remove_dead_processes_prepared()

    def _remove_dead_processes_prepared(self) -> int:
        """Prepared containers whose consumer process on this host is gone (SIGKILLed)."""
        filters: dict[str, str | list[str] | bool] = {"label": [f"{LABEL_MANAGED}=true", LABEL_PREPARED]}
        removed = 0
        for container in self.docker.containers.list(all=True, sparse=True, filters=filters):
            labels = container.attrs.get("Labels") or {}
            if labels.get(LABEL_CONSUMER) == self.settings.consumer_id:
                continue  # this consumer's own: the sweep above decided
            if not process_is_dead(labels.get(LABEL_PROCESS, "")):
                continue
            log.info(
                "removing prepared container %s of dead consumer %s",
                container.short_id,
                labels.get(LABEL_CONSUMER),
            )
            self._remove(container)
            removed += 1
        return removed
