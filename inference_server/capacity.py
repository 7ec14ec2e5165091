"""What one task takes from a consumer, and whether it fits: one rule for the private API (can
any consumer ever run this task?) and the consumer (does it fit beside the tasks I run now?).

A model that declares none of gpu_memory_mb, cpus and memory_mb takes its consumer whole, so
it runs alone; declared needs let tasks share a consumer and its GPU while their sum fits. A
GPU model that declares no GPU memory takes the whole GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from inference_server.contract import ConsumerRegistration, TaskQueue

# AMQP headers of a task message: the needs travel with the id, so a consumer can tell whether
# a task fits before it claims it.
NEEDS_HEADER_GPU = "x-needs-gpu"
NEEDS_HEADER_GPU_MEMORY_MB = "x-needs-gpu-memory-mb"
NEEDS_HEADER_CPUS = "x-needs-cpus"
NEEDS_HEADER_MEMORY_MB = "x-needs-memory-mb"


@dataclass(frozen=True)
class TaskNeeds:
    """A model's declared needs for one task; None means not declared."""

    gpu: bool = False
    gpu_memory_mb: int | None = None
    cpus: float | None = None
    memory_mb: int | None = None

    @classmethod
    def of_model(cls, model: Any) -> TaskNeeds:
        """From anything with the model's fields (ModelPublic, the ORM row)."""
        return cls(
            gpu=bool(model.use_gpu),
            gpu_memory_mb=model.gpu_memory_mb,
            cpus=float(model.cpus) if model.cpus is not None else None,
            memory_mb=model.memory_mb,
        )

    @property
    def exclusive(self) -> bool:
        """Declares nothing: runs alone on its consumer."""
        return self.gpu_memory_mb is None and self.cpus is None and self.memory_mb is None

    @property
    def queue(self) -> TaskQueue:
        return TaskQueue.GPU if self.gpu else TaskQueue.CPU

    def to_headers(self) -> dict[str, Any]:
        headers: dict[str, Any] = {NEEDS_HEADER_GPU: int(self.gpu)}
        if self.gpu_memory_mb is not None:
            headers[NEEDS_HEADER_GPU_MEMORY_MB] = self.gpu_memory_mb
        if self.cpus is not None:
            # AMQP tables carry floats poorly across clients; a decimal string is exact.
            headers[NEEDS_HEADER_CPUS] = repr(self.cpus)
        if self.memory_mb is not None:
            headers[NEEDS_HEADER_MEMORY_MB] = self.memory_mb
        return headers

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any] | None) -> TaskNeeds | None:
        """None when the message carries no (readable) needs: the caller treats it as exclusive
        and learns the truth from the claim."""
        if not headers or NEEDS_HEADER_GPU not in headers:
            return None
        try:
            gpu_memory = headers.get(NEEDS_HEADER_GPU_MEMORY_MB)
            cpus = headers.get(NEEDS_HEADER_CPUS)
            memory = headers.get(NEEDS_HEADER_MEMORY_MB)
            return cls(
                gpu=bool(int(headers[NEEDS_HEADER_GPU])),
                gpu_memory_mb=int(gpu_memory) if gpu_memory is not None else None,
                cpus=float(cpus.decode() if isinstance(cpus, bytes) else cpus) if cpus is not None else None,
                memory_mb=int(memory) if memory is not None else None,
            )
        except (TypeError, ValueError):
            return None


@dataclass
class Capacity:
    """What a consumer has free (or in total): one GPU's memory, CPU cores, memory, task slots."""

    gpu_memory_mb: int  # 0 without a GPU
    cpus: float
    memory_mb: int
    tasks: int
    takes_gpu_tasks: bool = False
    takes_cpu_tasks: bool = True
    running: list[TaskNeeds] = field(default_factory=list)

    @classmethod
    def of_registration(cls, consumer: ConsumerRegistration) -> Capacity:
        """A consumer's total capacity. A consumer owns one GPU (one consumer per GPU); should it
        declare several, tasks are packed onto the largest."""
        gpu_memory = max((gpu.memory_total_mb for gpu in consumer.gpus), default=0)
        return cls(
            gpu_memory_mb=gpu_memory,
            cpus=consumer.cpus,
            memory_mb=consumer.memory_mb,
            tasks=consumer.max_tasks,
            takes_gpu_tasks=consumer.takes_gpu_tasks and gpu_memory > 0,
            takes_cpu_tasks=consumer.takes_cpu_tasks,
        )

    def takes(self, needs: TaskNeeds) -> bool:
        return self.takes_gpu_tasks if needs.gpu else self.takes_cpu_tasks

    def never_fits(self, needs: TaskNeeds) -> str | None:
        """Why this consumer could not run the task even when idle; None when it could."""
        if needs.gpu and not self.takes_gpu_tasks:
            return "needs a GPU"
        if not needs.gpu and not self.takes_cpu_tasks:
            return "is a CPU task"
        if needs.gpu and needs.gpu_memory_mb is not None and needs.gpu_memory_mb > self.gpu_memory_mb:
            return f"needs {needs.gpu_memory_mb} MiB of GPU memory; the GPU has {self.gpu_memory_mb} MiB"
        if needs.cpus is not None and needs.cpus > self.cpus:
            return f"needs {needs.cpus:g} CPUs; the consumer has {self.cpus:g}"
        if needs.memory_mb is not None and needs.memory_mb > self.memory_mb:
            return f"needs {needs.memory_mb} MiB of memory; the consumer has {self.memory_mb} MiB"
        return None

    def fits_now(self, needs: TaskNeeds) -> bool:
        """Whether the task fits beside the ones running (self.running), within the totals."""
        if self.never_fits(needs) is not None:
            return False
        running = self.running
        if not running:
            return True
        if needs.exclusive or any(other.exclusive for other in running) or len(running) >= self.tasks:
            return False
        if needs.gpu:
            used_gpu = sum(_gpu_share(other, self.gpu_memory_mb) for other in running)
            if used_gpu + _gpu_share(needs, self.gpu_memory_mb) > self.gpu_memory_mb:
                return False
        used_cpus = sum(other.cpus or 0.0 for other in running)
        if needs.cpus is not None and used_cpus + needs.cpus > self.cpus + 1e-9:
            return False
        used_memory = sum(other.memory_mb or 0 for other in running)
        return not (needs.memory_mb is not None and used_memory + needs.memory_mb > self.memory_mb)


def _gpu_share(needs: TaskNeeds, gpu_total_mb: int) -> int:
    if not needs.gpu:
        return 0
    return needs.gpu_memory_mb if needs.gpu_memory_mb is not None else gpu_total_mb
