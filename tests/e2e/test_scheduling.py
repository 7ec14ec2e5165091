"""Scheduling by what a task needs, end to end (issue 13): GPU and CPU tasks kept apart, tasks
packed onto a simulated GPU by their declared memory, waiting reasons, priority and FIFO with
retries, fair share between owners, the limit on active tasks, draining, a consumer killed
while it holds three tasks, and the optional timeout that fails a task no consumer could run.

Real RabbitMQ, real consumer processes, real containers; GPUs are simulated. Two platforms are
shared by the module's tests (starting one costs seconds, the suite has a budget): one with a
single CPU consumer, one with a single consumer owning a simulated 24576 MiB GPU (the timeout
test has a third, without consumers, since its setting would end the others' waiting tasks). Each
test starts from an idle platform; what it leaves pending or running is cancelled after it.

A test holds a task running through a gate: the model waits until a file named after the task's
gate appears in its unpacked model folder, which the test writes on the host (the container sees
it under /model), so "running" lasts exactly until the test has looked. Each test prints one line
of what went in and what came out.
"""

from __future__ import annotations

import hashlib
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import pika
import pytest
import requests

from inference_server.contract import PublicRoutes, TaskQueue
from job_consumer.runner import LABEL_MANAGED, LABEL_TASK
from job_consumer.workspace import MODELS_DIR
from local_platform.launcher import ConsumerCapacity, LocalPlatform, SchedulingSettings
from local_platform.ports import free_port
from tests.helpers import make_zip, register_model_directly, wait_until, zip_members
from tests.images import SCRIPT

pytestmark = [pytest.mark.docker, pytest.mark.slow]

GPU_MIB = 24576
TASK_GPU_MIB = 8000
LEASE_S = 3
BIN = Path(sys.executable).parent
# Long enough for a container start on a busy 2-core machine, short against the module's budget.
RUN_TIMEOUT_S = 180

GATED_SCRIPT = """\
if [ -f /input/gate.txt ]; then
  gate="/model/open-$(cat /input/gate.txt)"
  while [ ! -e "$gate" ]; do sleep 0.1; done
fi
cp -r /input/. /output/
printf '%s' "${CUDA_VISIBLE_DEVICES-unset}" > /output/cuda_visible_devices.txt
"""
# Every gated model of a platform shares this zip, so they share one unpacked folder.
GATED_MODEL_ZIP = make_zip({"run.sh": GATED_SCRIPT.encode()})


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


@dataclass
class Driver:
    """A running platform and how the tests use it: an operator key, gated models, statuses."""

    platform: LocalPlatform
    operator: dict[str, str] = field(default_factory=dict)
    # Every gate a task was submitted behind, so none is left closed when the platform stops.
    gates: set[str] = field(default_factory=set)

    @property
    def url(self) -> str:
        return self.platform.public_url

    @property
    def gate_folder(self) -> Path:
        # Where consumers unpack a model zip (job_consumer/workspace.py, ModelCache): one folder
        # per zip sha256, shared by every consumer of the data folder.
        sha256 = hashlib.sha256(GATED_MODEL_ZIP).hexdigest()
        return self.platform.data_dir / "work" / MODELS_DIR / sha256

    def register(self, model: str, **limits: str | int | float | bool) -> dict[str, Any]:
        registered = register_model_directly(self.platform, model, SCRIPT, GATED_MODEL_ZIP, **limits)
        assert registered["model_zip_sha256"] == self.gate_folder.name
        return registered

    def submit_response(
        self,
        model: str,
        *,
        payload: str,
        gate: str | None = None,
        priority: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        files = {"payload.txt": payload.encode()}
        if gate is not None:
            files["gate.txt"] = gate.encode()
            self.gates.add(gate)
        params: dict[str, str | int] = {"model_human_readable_id": model}
        if priority is not None:
            params["priority"] = priority
        return requests.post(
            f"{self.url}{PublicRoutes.TASKS}",
            params=params,
            files={"zip_file": ("in.zip", make_zip(files), "application/zip")},
            headers=self.operator if headers is None else headers,
            timeout=60,
        )

    def submit(self, model: str, **options: Any) -> str:
        response = self.submit_response(model, **options)
        assert response.status_code == 200, response.text
        return str(response.json())

    def status(self, uid: str) -> dict[str, Any]:
        response = requests.get(f"{self.url}/api/tasks/{uid}/status", headers=self.operator, timeout=30)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def statuses(self, uids: list[str]) -> dict[str, dict[str, Any]]:
        return {uid: self.status(uid) for uid in uids}

    def open_gate(self, gate: str) -> None:
        """Lets the task waiting on `gate` finish; its model must have been unpacked (it ran)."""
        assert self.gate_folder.is_dir(), f"no consumer has unpacked the gated model in {self.gate_folder}"
        (self.gate_folder / f"open-{gate}").touch()

    def open_every_gate(self) -> None:
        """After a failed test: its held tasks end, so stopping the consumers leaves no container."""
        if self.gate_folder.is_dir():
            for gate in self.gates:
                (self.gate_folder / f"open-{gate}").touch()

    def settle(self) -> None:
        """After a test: whatever it left held or waiting ends, so the next test starts from rest
        even when this one failed half-way."""
        self.open_every_gate()
        response = requests.get(f"{self.url}{PublicRoutes.TASKS}", headers=self.operator, timeout=30)
        assert response.status_code == 200, response.text
        for task in response.json():
            if task["status"] in ("pending", "running"):
                # Not checked: the task may have ended since the listing.
                requests.post(f"{self.url}/api/tasks/{task['uid']}/cancel", headers=self.operator, timeout=30)

    def wait_for_status(self, uid: str, status: str, what: str) -> dict[str, Any]:
        return wait_until(
            lambda: (state := self.status(uid))["status"] == status and state, RUN_TIMEOUT_S, what
        )

    def wait_all_ended(self, uids: list[str]) -> dict[str, dict[str, Any]]:
        def ended() -> dict[str, dict[str, Any]] | None:
            states = self.statuses(uids)
            done = all(state["status"] not in ("pending", "running") for state in states.values())
            return states if done else None

        return wait_until(ended, RUN_TIMEOUT_S, f"{len(uids)} tasks to end")

    def output(self, uid: str) -> dict[str, bytes]:
        response = requests.get(f"{self.url}/api/tasks/{uid}", headers=self.operator, timeout=60)
        assert response.status_code == 200, f"{uid}: {response.status_code} {response.text}"
        return zip_members(response.content)

    def consumers(self) -> dict[str, dict[str, Any]]:
        response = requests.get(f"{self.url}{PublicRoutes.CONSUMERS}", headers=self.operator, timeout=30)
        assert response.status_code == 200, response.text
        return {consumer["id"]: consumer for consumer in response.json()}

    def drain(self, consumer_id: str, *, resume: bool = False) -> requests.Response:
        path = PublicRoutes.CONSUMER_DRAIN.format(consumer_id=consumer_id)
        send = requests.delete if resume else requests.post
        return send(f"{self.url}{path}", headers=self.operator, timeout=30)

    def wait_idle(self) -> None:
        """No task of an earlier test is left pending or running: each test starts from rest."""

        def idle() -> bool:
            response = requests.get(f"{self.url}{PublicRoutes.TASKS}", headers=self.operator, timeout=30)
            assert response.status_code == 200, response.text
            return not [task for task in response.json() if task["status"] in ("pending", "running")]

        wait_until(idle, RUN_TIMEOUT_S, "the tasks of earlier tests to end")

    def create_key(self, name: str, *limits: str) -> dict[str, str]:
        """A user key made by the operator's command, on the platform's database."""
        completed = subprocess.run(
            [
                str(BIN / "inference-server"),
                "keys",
                "create",
                name,
                *limits,
                "--database-url",
                self.platform.resolved_database_url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.returncode == 0, completed.stderr
        return {"Authorization": f"Bearer {completed.stdout.strip()}"}


def run_order(states: dict[str, dict[str, Any]]) -> list[str]:
    """The uids by when their (last) container started."""
    return sorted(states, key=lambda uid: moment(states[uid]["run_started_at"]))


def new_gate() -> str:
    return secrets.token_hex(8)


def gated_tasks(driver: Driver, model: str, payloads: list[str]) -> dict[str, str]:
    """One task per payload, each behind a gate of its own, submitted in order: uid -> gate."""
    gates = {}
    for payload in payloads:
        gate = new_gate()
        gates[driver.submit(model, payload=payload, gate=gate)] = gate
    return gates


def _delete_queues(rabbitmq_url: str, base: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    try:
        channel = connection.channel()
        for queue in (base, *(task_queue.queue_name(base) for task_queue in TaskQueue)):
            channel.queue_delete(queue)
    finally:
        connection.close()


@pytest.fixture(scope="module")
def start_platform(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq_url: str, test_session_id: str, test_images: dict
) -> Iterator[Callable[..., Driver]]:
    """Starts platforms shared by this module's tests, each on queues of its own; all are stopped
    (and their queues deleted) after the module."""
    started: list[tuple[Driver, str]] = []

    def start(label: str, **options: Any) -> Driver:
        queue = f"is-test-{test_session_id}-{label}-{secrets.token_hex(4)}"
        platform = LocalPlatform(
            data_dir=tmp_path_factory.mktemp(label),
            public_port=free_port(),
            rabbitmq_url=rabbitmq_url,
            queue_name=queue,
            create_operator_key=True,
            extra_env={"IS_REAPER_INTERVAL_S": "0.5", "IS_HEARTBEAT_INTERVAL_S": "1"},
            **options,
        )
        driver = Driver(platform)
        started.append((driver, queue))
        platform.start()
        key = platform.operator_key_file.read_text().strip()
        driver.operator = {"Authorization": f"Bearer {key}"}
        return driver

    yield start
    for driver, queue in started:
        driver.open_every_gate()
        driver.platform.stop()
        _delete_queues(rabbitmq_url, queue)


@pytest.fixture(scope="module")
def shared_cpu_platform(start_platform: Callable[..., Driver]) -> Driver:
    """One CPU consumer; a short lease so a killed consumer's task comes back within seconds."""
    driver = start_platform("cpu", consumers=1, scheduling=SchedulingSettings(lease_seconds=LEASE_S))
    driver.register("cpu-gated")
    driver.register("gpu-any", use_gpu=True)
    return driver


@pytest.fixture(scope="module")
def shared_gpu_platform(start_platform: Callable[..., Driver]) -> Driver:
    """One consumer owning a simulated 24576 MiB GPU, no CPU consumer. Its capacity is set so that
    GPU memory, not cores, memory or task slots, is what limits the packing."""
    driver = start_platform(
        "gpu",
        consumers=0,
        simulate_gpus=1,
        simulated_gpu_memory_mb=GPU_MIB,
        consumer_capacity=ConsumerCapacity(capacity_cpus=4, capacity_memory_mb=4096, max_concurrent_tasks=8),
        scheduling=SchedulingSettings(lease_seconds=LEASE_S, consumer_lost_after_s=LEASE_S),
    )
    driver.register("gpu-8000", use_gpu=True, gpu_memory_mb=TASK_GPU_MIB, cpus=0.5, memory_mb=512, tmp_mb=64)
    driver.register("gpu-30000", use_gpu=True, gpu_memory_mb=30000, cpus=0.5, memory_mb=512, tmp_mb=64)
    return driver


@pytest.fixture
def cpu_platform(shared_cpu_platform: Driver) -> Iterator[Driver]:
    yield shared_cpu_platform
    shared_cpu_platform.settle()


@pytest.fixture
def gpu_platform(shared_gpu_platform: Driver) -> Iterator[Driver]:
    yield shared_gpu_platform
    shared_gpu_platform.settle()


# --- a. GPU and CPU work kept apart -------------------------------------------------------------


def test_a_gpu_task_waits_for_a_gpu_while_a_later_cpu_task_finishes(cpu_platform: Driver) -> None:
    driver = cpu_platform
    driver.wait_idle()
    gpu_task = driver.submit("gpu-any", payload="gpu")
    cpu_task = driver.submit("cpu-gated", payload="cpu")

    finished = driver.wait_for_status(cpu_task, "finished", "the CPU task to finish")
    waiting = wait_until(
        lambda: (state := driver.status(gpu_task))["waiting_reason"] and state,
        60,
        "the GPU task to say why it waits",
    )
    print(
        f"(a) in: a GPU task, then a CPU task, one CPU consumer; out: CPU task {finished['status']}, "
        f"GPU task {waiting['status']} with waiting_reason {waiting['waiting_reason']!r}"
    )
    assert driver.output(cpu_task)["payload.txt"] == b"cpu"
    assert waiting["status"] == "pending"
    assert waiting["consumer_id"] is None  # no CPU consumer ever claimed it
    assert "needs a GPU" in waiting["waiting_reason"]
    assert "no GPU consumer is registered" in waiting["waiting_reason"]


# --- b, c. A simulated GPU -------------------------------------------------------------------


def test_b_three_8000_mib_tasks_share_a_24576_mib_gpu_while_a_fourth_waits(gpu_platform: Driver) -> None:
    driver = gpu_platform
    driver.wait_idle()
    gates = gated_tasks(driver, "gpu-8000", [f"packed {index}" for index in range(4)])
    uids = list(gates)

    def three_running_one_pending() -> dict[str, dict[str, Any]] | None:
        states = driver.statuses(uids)
        by_status = sorted(state["status"] for state in states.values())
        return states if by_status == ["pending", "running", "running", "running"] else None

    states = wait_until(three_running_one_pending, RUN_TIMEOUT_S, "three tasks running and one pending")
    running = [uid for uid in uids if states[uid]["status"] == "running"]
    (waiting,) = (uid for uid in uids if states[uid]["status"] == "pending")
    (consumer_id,) = {states[uid]["consumer_id"] for uid in running}
    reason = wait_until(
        lambda: driver.status(waiting)["waiting_reason"], 60, "the fourth task to say why it waits"
    )
    # The registry learns what a consumer runs from its heartbeats.
    registry = wait_until(
        lambda: (
            (consumer := driver.consumers()[consumer_id])
            and sorted(consumer["running_tasks"]) == sorted(running)
            and consumer
        ),
        60,
        "the registry to list the three running tasks",
    )
    # All three are still held at their gates: they run at the same time.
    assert all(state["status"] == "running" for state in driver.statuses(running).values())
    assert driver.status(waiting)["status"] == "pending"

    first = running[0]
    driver.open_gate(gates[first])
    first_done = driver.wait_for_status(first, "finished", "the first packed task to finish")
    fourth = driver.wait_for_status(waiting, "running", "the fourth task to run once there is room")
    for uid in uids:
        driver.open_gate(gates[uid])
    ended = driver.wait_all_ended(uids)
    outputs = {uid: driver.output(uid) for uid in uids}
    print(
        f"(b) in: 4 tasks of {TASK_GPU_MIB} MiB, one simulated {GPU_MIB} MiB GPU; out: 3 running at "
        f"once on {consumer_id} (registry: {registry['state']}, {len(registry['running_tasks'])} running), "
        f"4th pending with {reason!r}, started "
        f"{(moment(fourth['started_at']) - moment(first_done['finished_at'])).total_seconds():.1f}s "
        f"after the first ended; final {sorted(state['status'] for state in ended.values())}"
    )
    assert registry["state"] == "busy"
    assert moment(fourth["started_at"]) >= moment(first_done["finished_at"])
    assert {state["status"] for state in ended.values()} == {"finished"}
    assert {state["consumer_id"] for state in ended.values()} == {consumer_id}
    for index, uid in enumerate(uids):
        assert outputs[uid]["payload.txt"] == f"packed {index}".encode()
        # The environment a real GPU consumer gives a container: the GPU it owns.
        assert outputs[uid]["cuda_visible_devices.txt"] == b"0"


def test_c_a_task_needing_more_gpu_memory_than_any_gpu_has_says_so(gpu_platform: Driver) -> None:
    driver = gpu_platform
    driver.wait_idle()
    uid = driver.submit("gpu-30000", payload="too big")
    reason = wait_until(
        lambda: driver.status(uid)["waiting_reason"], 60, "the oversized task to say why it waits"
    )
    state = driver.status(uid)
    print(
        f"(c) in: a task of 30000 MiB, one simulated {GPU_MIB} MiB GPU; out: {state['status']}, "
        f"waiting_reason {reason!r}"
    )
    assert state["status"] == "pending"
    assert "30000 MiB" in reason
    assert str(GPU_MIB) in reason


# --- d. Priority, FIFO within a level, retries ----------------------------------------------------


def test_d_priority_order_and_fifo_within_a_level_with_a_retry_ahead_of_its_level(
    cpu_platform: Driver,
) -> None:
    driver = cpu_platform
    driver.wait_idle()
    platform = driver.platform
    retried_gate = new_gate()
    retried = driver.submit("cpu-gated", payload="retried", gate=retried_gate, priority=5)
    running = driver.wait_for_status(retried, "running", "the first task to run")
    # Queued behind it while the only consumer is busy, in this order.
    later = {
        "level 5, first": driver.submit("cpu-gated", payload="5a", priority=5),
        "level 5, second": driver.submit("cpu-gated", payload="5b", priority=5),
        "level 7": driver.submit("cpu-gated", payload="7", priority=7),
        "level 2": driver.submit("cpu-gated", payload="2", priority=2),
    }
    consumer = platform.consumer_process(running["consumer_id"])
    consumer.send(signal.SIGKILL)
    assert consumer.wait(10) == -signal.SIGKILL
    driver.open_gate(retried_gate)  # the orphaned container ends; the next attempt passes
    driver.wait_for_status(retried, "pending", "the lease to run out and the task to wait again")
    consumer.start()  # back under its id: it removes its orphan, then takes tasks again

    names = {uid: name for name, uid in later.items()} | {retried: "retried (level 5)"}
    states = driver.wait_all_ended(list(names))
    order = [names[uid] for uid in run_order(states)]
    print(
        f"(d) in: one busy consumer, then levels 5, 5, 7, 2 queued; the running level-5 task's consumer "
        f"SIGKILLed; out: ran {order}, retried task attempts {states[retried]['attempts']}"
    )
    assert {state["status"] for state in states.values()} == {"finished"}, states
    assert states[retried]["attempts"] == 2
    assert order == ["level 7", "retried (level 5)", "level 5, first", "level 5, second", "level 2"]


# --- e. Fair share ------------------------------------------------------------------------------


def test_e_one_users_backlog_does_not_hold_back_another_users_task(cpu_platform: Driver) -> None:
    driver = cpu_platform
    driver.wait_idle()
    alice = driver.create_key(f"alice-{secrets.token_hex(3)}")
    bob = driver.create_key(f"bob-{secrets.token_hex(3)}")
    gate = new_gate()
    # Alice's first task holds the only consumer until her backlog and Bob's task are in.
    alice_tasks = [driver.submit("cpu-gated", payload="a0", gate=gate, headers=alice)]
    driver.wait_for_status(alice_tasks[0], "running", "alice's first task to run")
    alice_tasks += [driver.submit("cpu-gated", payload=f"a{index}", headers=alice) for index in range(1, 8)]
    bob_task = driver.submit("cpu-gated", payload="b0", headers=bob)
    bob_submitted = moment(driver.status(bob_task)["created_at"])
    driver.open_gate(gate)

    states = driver.wait_all_ended([*alice_tasks, bob_task])
    order = ["bob" if uid == bob_task else "alice" for uid in run_order(states)]
    # Tasks that started after Bob submitted, up to and including his.
    after_bob = [
        owner
        for uid, owner in zip(run_order(states), order, strict=True)
        if moment(states[uid]["run_started_at"]) > bob_submitted
    ]
    bob_turn = after_bob.index("bob") + 1
    print(
        f"(e) in: alice 8 tasks (first running), then bob 1, one consumer, 2 queued per owner; out: "
        f"ran {order}; bob's task was number {bob_turn} of those that started after he submitted"
    )
    assert {state["status"] for state in states.values()} == {"finished"}
    # Without fair share Bob's task would wait for all 7 of Alice's queued ones.
    assert bob_turn <= 3


# --- f. The limit on active tasks ---------------------------------------------------------------
# The 403/429 rules are tested in depth in tests/private_api/test_key_limits.py and
# tests/public_api/test_permissions.py; this is the same limit through the running platform.


def test_f_a_key_at_its_limit_of_active_tasks_gets_429_with_retry_after(cpu_platform: Driver) -> None:
    driver = cpu_platform
    driver.wait_idle()
    carol = driver.create_key(f"carol-{secrets.token_hex(3)}", "--max-active-tasks", "2")
    gate = new_gate()
    active = [driver.submit("cpu-gated", payload=f"c{index}", gate=gate, headers=carol) for index in range(2)]
    refused = driver.submit_response("cpu-gated", payload="c2", headers=carol)
    driver.wait_for_status(active[0], "running", "carol's first task to run")
    driver.open_gate(gate)
    driver.wait_all_ended(active)
    accepted_again = driver.submit("cpu-gated", payload="c3", headers=carol)
    final = driver.wait_all_ended([accepted_again])
    print(
        f"(f) in: key with max_active_tasks=2, 3 submissions while 2 are active, 1 after they end; "
        f"out: third {refused.status_code} Retry-After {refused.headers.get('Retry-After')!r} "
        f"({refused.json().get('detail')!r}); after: {final[accepted_again]['status']}"
    )
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) > 0
    assert final[accepted_again]["status"] == "finished"


# --- g. Draining --------------------------------------------------------------------------------


def test_g_a_drained_consumer_finishes_its_task_takes_no_more_and_resumes(cpu_platform: Driver) -> None:
    driver = cpu_platform
    driver.wait_idle()
    gate = new_gate()
    running_task = driver.submit("cpu-gated", payload="before drain", gate=gate)
    running = driver.wait_for_status(running_task, "running", "the task to run")
    consumer_id = running["consumer_id"]

    drained = driver.drain(consumer_id)
    assert drained.status_code == 200, drained.text
    # Waiting when the running task ends: once the drain is answered, the consumer takes no more.
    held_task = driver.submit("cpu-gated", payload="while drained")
    submitted = moment(driver.status(held_task)["created_at"])
    listed = driver.consumers()[consumer_id]
    assert listed["draining"] is True and listed["state"] == "draining", listed

    driver.open_gate(gate)
    finished = driver.wait_for_status(running_task, "finished", "the running task to finish while draining")
    # Two heartbeats after the submission the consumer is alive and has had every chance to take it.
    wait_until(
        lambda: (moment(driver.consumers()[consumer_id]["last_seen_at"]) - submitted).total_seconds() > 2,
        60,
        "two heartbeats of the drained consumer",
    )
    held = driver.status(held_task)
    still_draining = driver.consumers()[consumer_id]

    resumed = driver.drain(consumer_id, resume=True)
    assert resumed.status_code == 200, resumed.text
    after = driver.wait_all_ended([held_task])[held_task]
    listed_after = driver.consumers()[consumer_id]
    print(
        f"(g) in: drain the only consumer while it runs a task, submit another, resume; out: running "
        f"task {finished['status']}, consumer {listed['state']}, new task {held['status']} "
        f"({held['waiting_reason']!r}) while drained, {after['status']} after resume "
        f"(consumer {listed_after['state']})"
    )
    assert held["status"] == "pending"
    assert still_draining["draining"] is True
    assert after["status"] == "finished" and after["consumer_id"] == consumer_id
    assert listed_after["draining"] is False and listed_after["state"] != "draining"


# --- h. A consumer killed while it holds three tasks ------------------------------------------


def test_h_a_consumer_killed_holding_three_tasks_all_three_run_again_once_each(
    gpu_platform: Driver, docker_client: docker.DockerClient
) -> None:
    driver = gpu_platform
    driver.wait_idle()
    platform = driver.platform
    gates = gated_tasks(driver, "gpu-8000", [f"held {index}" for index in range(3)])
    uids = list(gates)

    def all_running() -> dict[str, dict[str, Any]] | None:
        states = driver.statuses(uids)
        return states if all(state["status"] == "running" for state in states.values()) else None

    states = wait_until(all_running, RUN_TIMEOUT_S, "the three tasks to run on the one GPU")
    (victim_id,) = {state["consumer_id"] for state in states.values()}
    victim = platform.consumer_process(victim_id)

    # A second simulated GPU takes over; it registers before the first is killed.
    rescuer_spec = platform.gpu_consumer_spec("1", GPU_MIB)
    platform.start_consumer_spec(rescuer_spec)
    wait_until(lambda: rescuer_spec.consumer_id in driver.consumers(), 60, "the second consumer to register")

    victim.send(signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    for gate in gates.values():
        driver.open_gate(gate)  # the attempts to come pass through; the orphaned ones end too
    ended = driver.wait_all_ended(uids)
    lost = wait_until(
        lambda: (consumer := driver.consumers()[victim_id])["state"] == "lost" and consumer,
        60,
        "the killed consumer to be listed as lost",
    )
    outputs = {uid: driver.output(uid) for uid in uids}
    print(
        f"(h) in: 3 tasks of {TASK_GPU_MIB} MiB packed on {victim_id}, SIGKILLed; out: "
        f"{[(state['status'], state['attempts'], state['consumer_id']) for state in ended.values()]}, "
        f"killed consumer listed {lost['state']}"
    )
    for index, uid in enumerate(uids):
        assert ended[uid]["status"] == "finished"
        assert ended[uid]["attempts"] == 2  # run again once: not zero times, not twice
        assert ended[uid]["consumer_id"] == rescuer_spec.consumer_id
        assert ended[uid]["output_present"] is True
        assert outputs[uid]["payload.txt"] == f"held {index}".encode()

    # The killed consumer, back under its id, removes the containers it left behind.
    victim.start()

    def orphans() -> list[Any]:
        # Label filters are all required at once: one listing per task.
        return [
            container
            for uid in uids
            for container in docker_client.containers.list(
                all=True, sparse=True, filters={"label": [f"{LABEL_MANAGED}=true", f"{LABEL_TASK}={uid}"]}
            )
        ]

    wait_until(lambda: not orphans(), 120, "the killed consumer's containers to be removed")


# --- The optional end of waiting: IS_UNRUNNABLE_TIMEOUT_S ------------------------------------------


def test_a_task_no_consumer_could_run_fails_after_the_unrunnable_timeout(
    start_platform: Callable[..., Driver],
) -> None:
    # A platform of its own: the timeout would end the waiting tasks the other tests look at.
    driver = start_platform("unrunnable", consumers=0, scheduling=SchedulingSettings(unrunnable_timeout_s=2))
    driver.register("gpu-any", use_gpu=True)
    uid = driver.submit("gpu-any", payload="never placed")
    waiting = driver.status(uid)
    failed = driver.wait_all_ended([uid])[uid]
    waited_s = (moment(failed["finished_at"]) - moment(failed["created_at"])).total_seconds()
    print(
        f"(unrunnable timeout) in: a GPU task, no consumer, IS_UNRUNNABLE_TIMEOUT_S=2; out: "
        f"{waiting['status']} ({waiting['waiting_reason']!r}), then {failed['status']} after {waited_s:.1f}s "
        f"with error {failed['error']!r}, attempts {failed['attempts']}"
    )
    assert waiting["status"] == "pending"
    assert failed["status"] == "failed"
    assert "needs a GPU" in failed["error"]
    assert waited_s >= 2
    assert failed["attempts"] == 0  # it never ran
