"""Containers prepared ahead of their task: the next container of each model a consumer expects,
created in a slot folder of its own and, where a static gate shell is at hand, started too and
held at a gate (container_gate) until a task of that model has moved its input into the slot.
Without the gate, the container is only created, and a task points the slot at its workspace
and starts it.

Which models: the last IS_PREPARED_RECENT_MODELS distinct models this consumer ran, and those
an operator marked `warm` (read from the private API's model list at start and every
IS_PREPARED_CHECK_INTERVAL_S).

A prepared container's /input and /output are bound through a link in its slot (BOUND_LINK),
pointing at the slot until a task comes. The engines (Docker and Podman alike) follow a bind's
source when the container starts: a container started ahead sees the slot's own folders, so its
task's input is moved in there (renames within the work dir) and its output moved back into the
task's workspace after the run; for one only created, the link is pointed at the task's
workspace before the start, so nothing moves.

Isolation does not change: a prepared container is created by `ModelRunner.container_options`,
the very options of a per-task container, and serves one task only; a fresh one is prepared in
the background once the task's answer has gone out (earlier, it slowed the running task down),
and a task of a model whose container is being prepared waits for that one rather than creating
its own. What is fixed at create time and cannot be a task's:
- its labels: a prepared container has no task label (LABEL_TASK) but LABEL_PREPARED (its slot)
  and LABEL_PROCESS (the consumer process), by which the sweeps know it; it takes the task's
  container name (is-task-<uid>-...) when the task takes it, before it starts;
- the task's own mounts: a task with params (/params.json) or a model_from upstream (/model)
  does not use a container created ahead;
- the image, by ID: a task uses it only when its model's tag still names that image, and only
  when the options it would get now equal the prepared ones (limits changed meanwhile, another
  model zip): otherwise the container is dropped.

A task without a usable prepared container gets its own container (its labels and name
included) created in the background while its input downloads, so the create overlaps the
download; only a /model this host has not unpacked yet (or a model_from task) leaves the create
to the runner, after the download, as before. A prepared container unused for
IS_PREPARED_IDLE_S is removed (a warm model's is created anew), so is one whose model's tag now
names another image or whose model changed, and every one at shutdown; the sweep removes those
of consumer processes that died. IS_PREPARE_CONTAINERS=false turns all of it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.errors
import requests
from docker.models.containers import Container

from inference_server.contract import ModelPublic
from job_consumer.config import ConsumerSettings
from job_consumer.container_gate import GATE_MOUNT, gated_command, image_argv, make_gate, usable_shell
from job_consumer.runner import (
    LABEL_CONSUMER,
    LABEL_MANAGED,
    LABEL_PREPARED,
    LABEL_PROCESS,
    ModelRunError,
    ModelRunner,
    this_process,
)
from job_consumer.workspace import ModelCache, TaskWorkspace

log = logging.getLogger(__name__)

# A slot folder is a task work folder in shape (input/, output/, owner file, and the link) named
# prepared-<random>-a0-<random>; the sweep of stale work folders leaves the ones held here.
SLOT_PREFIX = "prepared-"
# The symlink in a slot that a prepared container's /input and /output are bound through: it
# points at the slot itself until a task comes, then at the task's workspace. The engines
# resolve a bind's source when the container starts, so the task's input is not moved and its
# output lands in its own workspace, as in a container created for it.
BOUND_LINK = "bound"
# How long a task waits for its model's container being prepared before creating its own.
PREPARING_WAIT_S = 30.0
# How long shutdown waits for the checker to end its turn.
CHECKER_JOIN_S = 10.0
# What a prepared container's options may differ in from a task's own: fixed at create.
_PER_CONTAINER_OPTIONS = ("name", "labels")


def _signature(options: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in options.items() if key not in _PER_CONTAINER_OPTIONS}


@dataclass
class PreparedContainer:
    """A container of `model` prepared ahead (created, and started if `gate`), its /input and
    /output in `slot`."""

    container: Container
    model: ModelPublic
    image_id: str
    slot: TaskWorkspace
    signature: dict[str, Any]
    # Created ahead, bound through the slot's link; else created for one task, bound to that
    # task's workspace itself (`slot` is the workspace then).
    ahead: bool = True
    # Started ahead too, waiting at this gate (container_gate): its binds were resolved at its
    # start, so its task's input moves into the slot and its output is collected from there.
    gate: Path | None = None
    created_at: float = field(default_factory=time.monotonic)

    @property
    def slot_key(self) -> str:
        return self.slot.root.name

    @property
    def bound(self) -> Path:
        """What /input and /output are bound below: the link, for one created ahead."""
        return self.slot.root / BOUND_LINK if self.ahead else self.slot.root

    @property
    def input_dir(self) -> Path:
        return self.bound / self.slot.input_dir.name

    @property
    def output_dir(self) -> Path:
        return self.bound / self.slot.output_dir.name

    @property
    def run_input_dir(self) -> Path | None:
        """Where the task's input must be for this container to see it, if not in its workspace."""
        return self.slot.input_dir if self.gate is not None else None

    @property
    def run_output_dir(self) -> Path | None:
        """Where this container writes its output, if not in its task's workspace."""
        return self.slot.output_dir if self.gate is not None else None


def _not_handed_over(prepared: PreparedContainer, task_uid: str, error: Exception) -> None:
    log.warning(
        "task %s: prepared container %s not handed over (%s)", task_uid, prepared.container.short_id, error
    )


class PreparedContainers:
    """One consumer's prepared containers, at most one ready per model."""

    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        runner: ModelRunner,
        models: ModelCache,
        list_models: Callable[[], list[ModelPublic]] | None = None,
        runs: Callable[[ModelPublic], bool] = lambda model: True,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.models = models
        self._list_models = list_models
        self._runs = runs
        self._stopping = stopping
        self._lock = threading.Lock()
        self._ready: dict[str, PreparedContainer] = {}
        # Models by human_readable_id, the last ran last.
        self._recent: OrderedDict[str, ModelPublic] = OrderedDict()
        self._warm: dict[str, ModelPublic] = {}
        # Slots in this process's hands, from before their folder exists until it is removed:
        # the sweeps keep their folders and containers.
        self._slots: set[str] = set()
        # Models a container is being prepared for in the background: set when that ends.
        self._preparing: dict[str, threading.Event] = {}
        self._closed = False
        self._wake = threading.Event()
        self._workers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prepare")
        # Creates for tasks waiting on them, never queued behind the background's.
        self._for_tasks = ThreadPoolExecutor(
            max_workers=min(8, settings.max_concurrent_tasks), thread_name_prefix="create"
        )
        self._checker: threading.Thread | None = None
        self._gate_shell = usable_shell(settings.gate_shell) if settings.prepared_start_ahead else None
        if settings.prepared_start_ahead and self._gate_shell is None:
            log.info(
                "no static gate shell at %s (Debian's busybox-static): containers are only created ahead",
                settings.gate_shell,
            )
        # Counted for tests and logs: tasks that started a container prepared before they came.
        self.used_ready = 0

    # --- life ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Read the warm models and prepare theirs, then check every IS_PREPARED_CHECK_INTERVAL_S."""
        self._checker = threading.Thread(target=self._check_loop, name="prepared-containers", daemon=True)
        self._checker.start()

    def close(self) -> None:
        """Prepare nothing more and remove every prepared container (those in a task's hands are
        the task's to remove)."""
        with self._lock:
            self._closed = True
            waiting = list(self._preparing.values())
        for preparing in waiting:  # tasks waiting on one go on (and create their own)
            preparing.set()
        self._wake.set()
        if self._checker is not None:
            # Bounded: it may be waiting on the private API's model list; closed, it prepares nothing.
            self._checker.join(timeout=CHECKER_JOIN_S)
        self._workers.shutdown(wait=True, cancel_futures=True)
        self._for_tasks.shutdown(wait=True)
        with self._lock:
            doomed = list(self._ready.values())
            self._ready.clear()
        for prepared in doomed:
            self._remove(prepared)

    def holds(self, slot_key: str) -> bool:
        """Whether a slot (folder name, LABEL_PREPARED) is this process's: the sweeps keep it."""
        with self._lock:
            return slot_key in self._slots

    def ready_for(self, human_readable_id: str) -> PreparedContainer | None:
        with self._lock:
            return self._ready.get(human_readable_id)

    # --- a task ---------------------------------------------------------------------------------

    def reserve(
        self,
        task_uid: str,
        model: ModelPublic,
        image_id: str | None,
        workspace: TaskWorkspace,
        params_file: Path | None,
    ) -> Future[PreparedContainer | None] | None:
        """A container for a task about to download its input: the model's prepared one when it is
        still right (and the task has no params), else the task's own, created now in the
        background so that the create overlaps the download. None when the task creates its
        container the old way (no image by that tag, a /model not unpacked on this host yet)."""
        image_id = image_id or self.runner.image_id(model.container_tag)
        if image_id is None:
            return None
        mountable, model_dir = self._model_mount(model)
        if not mountable:
            return None
        with self._lock:
            if self._closed:
                return None
            ready = None if params_file is not None else self._ready.pop(model.human_readable_id, None)
            # Back-to-back tasks of a model: the container being prepared is ready sooner than
            # one created from scratch now.
            preparing = None if params_file is not None else self._preparing.get(model.human_readable_id)
        if ready is not None:
            if self._usable(ready, task_uid, model, image_id, model_dir):
                done: Future[PreparedContainer | None] = Future()
                done.set_result(ready)
                return done
            self._submit(self._remove, ready)
        try:
            if ready is None and preparing is not None:
                return self._for_tasks.submit(
                    self._take_when_prepared, preparing, task_uid, model, image_id, workspace, model_dir
                )
            return self._for_tasks.submit(
                self._create_for_task, task_uid, model, image_id, workspace, model_dir, params_file
            )
        except RuntimeError:  # shut down meanwhile
            return None

    def _usable(
        self,
        ready: PreparedContainer,
        task_uid: str,
        model: ModelPublic,
        image_id: str,
        model_dir: Path | None,
    ) -> bool:
        """Whether a task (without params) may take this prepared container; counted when so."""
        if ready.image_id == image_id and self.fits(ready, task_uid, model, model_dir, None):
            with self._lock:
                self.used_ready += 1
            return True
        log.info(
            "prepared container %s of %s is out of date; dropped",
            ready.container.short_id,
            model.human_readable_id,
        )
        return False

    def _take_when_prepared(
        self,
        preparing: threading.Event,
        task_uid: str,
        model: ModelPublic,
        image_id: str,
        workspace: TaskWorkspace,
        model_dir: Path | None,
    ) -> PreparedContainer | None:
        """The container being prepared for the task's model once it is ready (if no other task
        took it first), else the task's own."""
        preparing.wait(PREPARING_WAIT_S)
        with self._lock:
            ready = None if self._closed else self._ready.pop(model.human_readable_id, None)
        if ready is not None:
            if self._usable(ready, task_uid, model, image_id, model_dir):
                return ready
            self._remove(ready)
        return self._create_for_task(task_uid, model, image_id, workspace, model_dir, None)

    def fits(
        self,
        prepared: PreparedContainer,
        task_uid: str,
        model: ModelPublic,
        model_dir: Path | None,
        params_file: Path | None,
    ) -> bool:
        """Whether the options the task gets now (its /model and /params.json as resolved now) equal
        those the container was created with, bar its name and labels."""
        try:
            options = self.runner.container_options(
                task_uid=task_uid,
                model=model,
                input_dir=prepared.input_dir,
                output_dir=prepared.output_dir,
                model_dir=model_dir,
                params_file=params_file,
                image=prepared.image_id,
            )
        except ModelRunError:
            return False
        return _signature(options) == prepared.signature

    def discard(self, prepared: PreparedContainer) -> None:
        """A reserved container the task will not start: removed, with its slot."""
        if prepared.ahead:
            self._remove(prepared)
        else:
            self.runner.remove_now(prepared.container)

    def hand_over(self, prepared: PreparedContainer, task_uid: str, workspace: TaskWorkspace) -> bool:
        """Bind a container created ahead to the task's workspace (its link retargeted, atomically)
        and give it the task's container name; False when that failed (then discard it)."""
        if not prepared.ahead:
            return True
        if prepared.gate is not None:
            return self._hand_over_started(prepared, task_uid, workspace)
        return self._hand_over_created(prepared, task_uid, workspace)

    def _hand_over_created(
        self, prepared: PreparedContainer, task_uid: str, workspace: TaskWorkspace
    ) -> bool:
        link = prepared.bound
        retargeted = link.with_name(f"{BOUND_LINK}.{secrets.token_hex(4)}")
        try:
            os.symlink(workspace.root.resolve(), retargeted)
            os.replace(retargeted, link)
            prepared.container.rename(self.runner.container_name(task_uid))
        except (OSError, docker.errors.APIError, requests.exceptions.RequestException) as exc:
            _not_handed_over(prepared, task_uid, exc)
            with contextlib.suppress(OSError):
                retargeted.unlink()
            return False
        return True

    def _hand_over_started(
        self, prepared: PreparedContainer, task_uid: str, workspace: TaskWorkspace
    ) -> bool:
        """A started container sees its slot's folders: the task's input moves in there (renames
        within the work dir) and the container takes the task's name."""
        moved: list[Path] = []
        try:
            prepared.container.rename(self.runner.container_name(task_uid))
            for entry in sorted(workspace.input_dir.iterdir()):
                target = prepared.slot.input_dir / entry.name
                os.rename(entry, target)
                moved.append(target)
        except (OSError, docker.errors.APIError, requests.exceptions.RequestException) as exc:
            _not_handed_over(prepared, task_uid, exc)
            # The task runs in a container of its own then, on its workspace as it was.
            for target in moved:
                with contextlib.suppress(OSError):
                    os.rename(target, workspace.input_dir / target.name)
            return False
        return True

    @staticmethod
    def collect_output(prepared: PreparedContainer, workspace: TaskWorkspace) -> None:
        """After a started container's run: its output, moved into the task's workspace."""
        if prepared.run_output_dir is None:
            return
        try:
            for entry in sorted(prepared.run_output_dir.iterdir()):
                os.rename(entry, workspace.output_dir / entry.name)
        except OSError as exc:
            raise ModelRunError(f"could not collect the model's output: {exc}", retryable=True) from exc

    def release_slot(self, prepared: PreparedContainer) -> None:
        """After the run (the runner removed the container): a slot folder goes."""
        if prepared.ahead:
            self._remove_slot(prepared.slot)

    def task_done(self, model: ModelPublic) -> None:
        """A task of `model` has been answered: it is among the recent models now, and gets its
        next container, in the background."""
        with self._lock:
            self._recent.pop(model.human_readable_id, None)
            self._recent[model.human_readable_id] = model
            dropped = []
            while len(self._recent) > self.settings.prepared_recent_models:
                old_id, _ = self._recent.popitem(last=False)
                if old_id not in self._warm and old_id in self._ready:
                    dropped.append(self._ready.pop(old_id))
        for prepared in dropped:
            self._submit(self._remove, prepared)
        self._prepare_soon(model)

    # --- the background ---------------------------------------------------------------------------

    def _check_loop(self) -> None:
        next_models_read = 0.0
        while True:
            with self._lock:
                if self._closed:
                    return
            if self._list_models is not None and time.monotonic() >= next_models_read:
                next_models_read = time.monotonic() + self.settings.prepared_check_interval_s
                self._read_models()
            try:
                self.check()
            except Exception:
                log.exception("checking the prepared containers failed; tried again later")
            self._wake.wait(min(self.settings.prepared_check_interval_s, self.settings.prepared_idle_s))
            self._wake.clear()

    def _read_models(self) -> None:
        assert self._list_models is not None
        try:
            listed = {model.human_readable_id: model for model in self._list_models()}
        except Exception as exc:
            log.warning("could not read the model list for warm models (%r); tried again later", exc)
            return
        with self._lock:
            self._warm = {hrid: model for hrid, model in listed.items() if model.warm and self._runs(model)}
            # A recent model's settings as they are now; a deleted one is forgotten.
            for hrid in list(self._recent):
                if hrid in listed:
                    self._recent[hrid] = listed[hrid]
                else:
                    del self._recent[hrid]
        for model in list(self._warm.values()):
            self._prepare_soon(model)

    def check(self) -> None:
        """Drop what is idle too long, of a changed image or model, or no longer expected; prepare
        what is expected and missing."""
        now = time.monotonic()
        with self._lock:
            expected = {**self._recent, **self._warm}
            ready = dict(self._ready)
        for hrid, prepared in ready.items():
            model = expected.get(hrid)
            reason = None
            if model is None:
                reason = "its model is no longer expected"
            elif now - prepared.created_at >= self.settings.prepared_idle_s:
                reason = f"unused for {self.settings.prepared_idle_s:g} s"
            elif self.runner.image_id(model.container_tag) != prepared.image_id:
                reason = f"{model.container_tag} names another image now"
            elif not self.fits(prepared, prepared.slot_key, model, *self._mount_of(model)):
                # Only what shapes the container counts (limits, switches, model zip), not its
                # description, so a model read from the list again does not churn containers.
                reason = "its model's settings changed"
            if reason is None:
                continue
            with self._lock:
                if self._ready.get(hrid) is not prepared:
                    continue  # taken by a task meanwhile
                del self._ready[hrid]
                if reason.startswith("unused") and hrid not in self._warm:
                    self._recent.pop(hrid, None)
            log.info("prepared container %s of %s removed: %s", prepared.container.short_id, hrid, reason)
            self._remove(prepared)
        with self._lock:
            missing = [
                model for hrid, model in {**self._recent, **self._warm}.items() if hrid not in self._ready
            ]
        for model in missing:
            self._prepare_soon(model)

    def _prepare_soon(self, model: ModelPublic) -> None:
        with self._lock:
            if (
                self._closed
                or model.human_readable_id in self._preparing
                or model.human_readable_id in self._ready
            ):
                return
            self._preparing[model.human_readable_id] = threading.Event()
        if not self._submit(self._prepare, model):
            self._prepared(model)

    def _submit(self, call: Callable[..., Any], *args: Any) -> bool:
        try:
            self._workers.submit(call, *args)
        except RuntimeError:  # shut down: close() removes what is ready
            return False
        return True

    def _prepare(self, model: ModelPublic) -> None:
        try:
            if self._stopping():
                return
            image_id = self.runner.image_id(model.container_tag)
            mountable, model_dir = self._model_mount(model)
            if image_id is None or not mountable:
                return
            prepared = self._create(model, image_id, model_dir)
            if prepared is None:
                return
            with self._lock:
                keep = not self._closed and model.human_readable_id not in self._ready
                if keep:
                    self._ready[model.human_readable_id] = prepared
            if not keep:
                self._remove(prepared)
            else:
                log.info(
                    "container %s prepared for model %s", prepared.container.short_id, model.human_readable_id
                )
        except Exception:
            log.exception("could not prepare a container for %s", model.human_readable_id)
        finally:
            self._prepared(model)

    def _prepared(self, model: ModelPublic) -> None:
        """The preparation for `model` is over (successful or not): tasks waiting on it go on."""
        with self._lock:
            done = self._preparing.pop(model.human_readable_id, None)
        if done is not None:
            done.set()

    # --- containers ---------------------------------------------------------------------------------

    def _mount_of(self, model: ModelPublic) -> tuple[Path | None, None]:
        """fits()'s /model and /params.json for a model's next task (no params)."""
        return self._model_mount(model)[1], None

    def _model_mount(self, model: ModelPublic) -> tuple[bool, Path | None]:
        """Whether /model can be bound before the task unpacks anything, and what: nothing for a
        model without a zip, the unpacked zip when this host has it (not yet: the first task
        unpacks it, and a zip without a known digest is unpacked per task)."""
        if not model.model_available:
            return True, None
        if not model.model_zip_sha256:
            return False, None
        unpacked = self.models.path_for(model.model_zip_sha256)
        return (True, unpacked) if unpacked.is_dir() else (False, None)

    def _create(self, model: ModelPublic, image_id: str, model_dir: Path | None) -> PreparedContainer | None:
        slot_key_prefix = f"{SLOT_PREFIX}{secrets.token_hex(4)}"
        slot: TaskWorkspace | None = None
        try:
            slot = TaskWorkspace.create(
                self.runner.settings.resolved_work_dir, slot_key_prefix, self.settings.consumer_id
            )
            with self._lock:
                self._slots.add(slot.root.name)
            os.symlink(slot.root.resolve(), slot.root / BOUND_LINK)
            bound = slot.root / BOUND_LINK
            options = self.runner.container_options(
                task_uid=slot.root.name,
                model=model,
                input_dir=bound / slot.input_dir.name,
                output_dir=bound / slot.output_dir.name,
                model_dir=model_dir,
                image=image_id,
            )
            options["name"] = f"is-{slot_key_prefix}"
            options["labels"] = {
                LABEL_MANAGED: "true",
                LABEL_CONSUMER: self.settings.consumer_id,
                LABEL_PREPARED: slot.root.name,
                LABEL_PROCESS: this_process(),
            }
            signature = _signature(options)
            gate, gated = self._gated(options, image_id, slot)
            container = self.runner.docker.containers.create(**gated)
            if gate is not None:
                try:
                    container.start()
                except BaseException:
                    self.runner.remove_now(container)
                    raise
        except (ModelRunError, docker.errors.APIError, requests.exceptions.RequestException, OSError) as exc:
            log.info("no container prepared for %s: %s", model.human_readable_id, exc)
            if slot is not None:
                self._remove_slot(slot)
            return None
        return PreparedContainer(container, model, image_id, slot, signature, gate=gate)

    def _gated(
        self, options: dict[str, Any], image_id: str, slot: TaskWorkspace
    ) -> tuple[Path | None, dict[str, Any]]:
        """`options` put behind a gate in the slot, when containers are started ahead (the image's
        own command, read from the image, runs once the gate opens); else as they are."""
        if self._gate_shell is None:
            return None, options
        argv = image_argv(self.runner.docker.images.get(image_id).attrs.get("Config") or {})
        if argv is None:
            return None, options
        gate = make_gate(slot.root, self._gate_shell)
        entrypoint, command = gated_command(argv)
        volumes = {**options["volumes"], os.path.abspath(gate): {"bind": GATE_MOUNT, "mode": "ro"}}
        return gate, {**options, "volumes": volumes, "entrypoint": entrypoint, "command": command}

    def _create_for_task(
        self,
        task_uid: str,
        model: ModelPublic,
        image_id: str,
        workspace: TaskWorkspace,
        model_dir: Path | None,
        params_file: Path | None,
    ) -> PreparedContainer | None:
        """The task's own container, exactly as the runner would create it (its name and labels
        included), while the input downloads into the workspace it binds."""
        try:
            options = self.runner.container_options(
                task_uid=task_uid,
                model=model,
                input_dir=workspace.input_dir,
                output_dir=workspace.output_dir,
                model_dir=model_dir,
                params_file=params_file,
                image=image_id,
            )
            container = self.runner.docker.containers.create(**options)
        except (ModelRunError, docker.errors.APIError, requests.exceptions.RequestException) as exc:
            log.info("task %s: no container created ahead of its input (%s)", task_uid, exc)
            return None
        return PreparedContainer(container, model, image_id, workspace, _signature(options), ahead=False)

    def _remove(self, prepared: PreparedContainer) -> None:
        self.runner.remove_now(prepared.container)
        self._remove_slot(prepared.slot)

    def _remove_slot(self, slot: TaskWorkspace) -> None:
        try:
            slot.remove()
        except Exception as exc:  # owned, not held any more: the periodic sweep tries again
            log.warning("could not remove slot %s yet: %r", slot.root.name, exc)
        with self._lock:
            self._slots.discard(slot.root.name)
