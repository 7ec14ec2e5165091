"""This consumer in the private API's registry of consumers: registered at start-up, then
heartbeated every IS_HEARTBEAT_INTERVAL_S with the tasks it runs, idle or not. The reply says
whether an operator drains it (take no new task, finish the running ones).

The registry serves operators and placement, not the tasks: while the private API cannot be
reached, the consumer keeps running what it has and tries again with backoff.
"""

from __future__ import annotations

import logging
import time

from inference_server.backoff import Backoff
from inference_server.contract import ConsumerHeartbeatReply, ConsumerRegistration
from job_consumer.gpu_readings import read_gpu_readings
from job_consumer.private_client import PrivateApiClient, PrivateApiHttpError, PrivateApiUnavailable

log = logging.getLogger(__name__)


class RegistryPresence:
    """Called from the consumer's connection thread: `beat` when `due`; never raises."""

    def __init__(
        self,
        api: PrivateApiClient,
        registration: ConsumerRegistration,
        *,
        interval_s: float,
        backoff_max_s: float,
    ) -> None:
        self.api = api
        self.registration = registration
        self.interval_s = interval_s
        self.draining = False
        self.registered = False
        self._next_beat = 0.0
        self._backoff = Backoff(backoff_max_s)

    @property
    def due(self) -> bool:
        return time.monotonic() >= self._next_beat

    @property
    def seconds_to_next_beat(self) -> float:
        return max(0.0, self._next_beat - time.monotonic())

    def beat(self, running_tasks: list[str]) -> None:
        """Register if not registered (yet, or any more), then heartbeat."""
        try:
            reply = self._heartbeat(running_tasks)
        except (PrivateApiUnavailable, PrivateApiHttpError) as exc:
            self._failed(exc)
            return
        except Exception as exc:
            log.exception("consumer %s: registry heartbeat failed unexpectedly", self.api.consumer_id)
            self._failed(exc)
            return
        self._backoff.reset()
        self._next_beat = time.monotonic() + self.interval_s
        self._follow(reply)

    def _heartbeat(self, running_tasks: list[str]) -> ConsumerHeartbeatReply:
        readings = read_gpu_readings(self.registration.gpus)
        if not self.registered:
            self._register()
            return self.api.consumer_heartbeat(running_tasks, readings)
        try:
            return self.api.consumer_heartbeat(running_tasks, readings)
        except PrivateApiHttpError as exc:
            if exc.status_code != 404:
                raise
            # Forgotten by the registry (its database was reset, or it dropped us as lost).
            log.warning("consumer %s: unknown to the registry; registering again", self.api.consumer_id)
            self.registered = False
            self._register()
            return self.api.consumer_heartbeat(running_tasks, readings)

    def _register(self) -> None:
        self.api.register(self.registration)
        self.registered = True
        log.info(
            "consumer %s registered: %d GPU(s)%s, %g CPUs, %d MiB, up to %d task(s), %s",
            self.api.consumer_id,
            len(self.registration.gpus),
            "".join(
                f" [{gpu.index} {gpu.uuid} {gpu.memory_total_mb} MiB{' simulated' if gpu.simulated else ''}]"
                for gpu in self.registration.gpus
            ),
            self.registration.cpus,
            self.registration.memory_mb,
            self.registration.max_tasks,
            "+".join(
                kind
                for kind, taken in (
                    ("GPU tasks", self.registration.takes_gpu_tasks),
                    ("CPU tasks", self.registration.takes_cpu_tasks),
                )
                if taken
            ),
        )

    def follow_drain(self) -> None:
        """The private API refused a claim because this consumer drains: take it as the reply
        of a heartbeat, which the next real one confirms or undoes."""
        self._follow(ConsumerHeartbeatReply(draining=True))

    def _follow(self, reply: ConsumerHeartbeatReply) -> None:
        if reply.draining and not self.draining:
            log.warning("consumer %s: draining - no new tasks; the running ones finish", self.api.consumer_id)
        elif self.draining and not reply.draining:
            log.info("consumer %s: no longer draining; taking tasks again", self.api.consumer_id)
        self.draining = reply.draining

    def _failed(self, exc: Exception) -> None:
        delay = self._backoff.next()
        self._next_beat = time.monotonic() + delay
        log.warning(
            "consumer %s: registry %s failed (%s); tasks run on, next try in %.1fs",
            self.api.consumer_id,
            "heartbeat" if self.registered else "registration",
            exc,
            delay,
        )
