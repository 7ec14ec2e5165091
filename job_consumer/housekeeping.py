"""The periodic sweep: what a crash of this consumer left behind, and models nobody uses."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from job_consumer.config import ConsumerSettings
from job_consumer.prepared_containers import PreparedContainers
from job_consumer.runner import ModelRunner
from job_consumer.workspace import ModelCache, owned_task_dirs, remove_owned, task_of_folder

log = logging.getLogger(__name__)


class Housekeeper:
    """Sweeps at start-up and then every IS_CLEANUP_INTERVAL_S, between tasks or beside them."""

    def __init__(
        self,
        settings: ConsumerSettings,
        *,
        runner: ModelRunner,
        models: ModelCache,
        prepared: PreparedContainers | None = None,
    ) -> None:
        self.settings = settings
        self.prepared = prepared
        self.work_dir = settings.resolved_work_dir
        self.runner = runner
        self.models = models
        self._next_sweep = 0.0

    def _holds_slot(self, slot_key: str) -> bool:
        return self.prepared is not None and self.prepared.holds(slot_key)

    @property
    def due(self) -> bool:
        return time.monotonic() >= self._next_sweep

    def sweep(self, *, keep_task_uids: Collection[str]) -> None:
        """Remove what a crash of this consumer left: labelled containers, work dirs, temp dirs.

        The containers and folders of the tasks in `keep_task_uids` (those it runs) are kept, and
        half-unpacked models only go while no task runs, as a running task may be unpacking one.
        Never fatal, at start-up neither: whatever cannot be removed now is logged and tried
        again at the next sweep, and the consumer goes on serving tasks meanwhile."""
        self._next_sweep = time.monotonic() + self.settings.cleanup_interval_s
        try:
            removed = self.runner.remove_leftovers(
                keep_task_uids=keep_task_uids, keep_prepared=self._holds_slot
            )
            if removed:
                log.info("removed %d leftover container(s)", removed)
        except Exception as exc:
            log.warning("could not remove leftover containers: %r", exc)
        try:
            folders = owned_task_dirs(self.work_dir, self.settings.consumer_id)
        except Exception as exc:
            log.warning("could not list the work dir %s: %r", self.work_dir, exc)
            folders = []
        for folder in folders:
            if task_of_folder(folder) in keep_task_uids or self._holds_slot(folder.name):
                continue
            try:
                remove_owned(folder)
                log.info("removed stale work dir %s", folder)
            except Exception as exc:
                log.warning("could not remove stale work dir %s yet: %r", folder, exc)
        try:
            dead = self.runner.runtime.remove_dead_services(self.work_dir)
            if dead:
                log.info("removed %d socket folder(s) of dead Podman services", dead)
        except Exception as exc:
            log.warning("could not sweep dead Podman socket folders: %r", exc)
        if not keep_task_uids:
            try:
                self.models.remove_own_temp_dirs()
            except Exception as exc:
                log.warning("could not remove stale model temp dirs yet: %r", exc)
        idle_days = self.settings.model_cache_max_idle_days
        if idle_days > 0:
            try:
                pruned = self.models.prune(idle_days * 86400)
                if pruned:
                    log.info("removed %d unpacked model(s) unused for %g days", pruned, idle_days)
            except Exception as exc:
                log.warning("could not prune the model cache yet: %r", exc)
