"""A Docker Swarm of several engines on one machine, for the multi-node tests.

The host's engine is the manager. Each worker is a Docker engine in a container
(docker-images/dind: Debian's docker.io on the local base image), on a bridge network the
harness creates; the workers join the swarm over the host's address on that network. This
machine refuses `--privileged` and `--cap-add ALL` (the host itself lacks CAP_SYS_RESOURCE), so
a worker gets an explicit capability list, seccomp and AppArmor unconfined and the host's cgroup
tree; its engine stores images with vfs (overlayfs on overlayfs is refused).

Everything made here is removed again and the host leaves the swarm: the host is left as found.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

import docker
import docker.errors
from docker.models.containers import Container
from docker.models.networks import Network

from tests.deployment.helpers import remove_created_gwbridge, run
from tests.helpers import wait_until

DIND_IMAGE = "inference-server/dind:latest"
# On what the harness makes (workers, their network, the manager node): an interrupted run's
# leftovers are recognised by it.
HARNESS_LABEL = "inference-server.multinode"
WORKER_PREFIX = "is-mn-"
# Every capability this host may hand out except SYS_RESOURCE (which it lacks itself, so asking
# for it, as --privileged does, fails the container's start).
WORKER_CAPABILITIES = [
    "SYS_ADMIN",
    "NET_ADMIN",
    "NET_RAW",
    "MKNOD",
    "SYS_CHROOT",
    "SETUID",
    "SETGID",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETPCAP",
    "SETFCAP",
    "AUDIT_WRITE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "SYS_PTRACE",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_NICE",
    "LINUX_IMMUTABLE",
]
ENGINE_START_TIMEOUT_S = 90.0


def kernel_has_ipsec_esp() -> bool:
    """Whether this kernel can carry Docker's encrypted overlay between nodes: an ESP transport
    state with AES-GCM, the one Docker programs, added in a network namespace of our own."""
    probe = (
        "ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode transport "
        "aead 'rfc4106(gcm(aes))' 0x0102030405060708090a0b0c0d0e0f1011121314 64"
    )
    try:
        result = subprocess.run(["unshare", "-n", "sh", "-c", probe], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@dataclass
class Worker:
    """One worker node: a Docker engine in a container."""

    name: str
    labels: dict[str, str]
    container: Container
    node_id: str = ""

    def docker(
        self, *argv: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """The docker CLI inside the worker, against the worker's own engine."""
        return run(["docker", "exec", self.name, "docker", *argv], timeout=timeout, check=check)

    def engine_answers(self) -> bool:
        return self.docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False).returncode == 0

    def kill(self) -> None:
        """The whole engine stopped hard: dockerd and every container in it get SIGKILL."""
        self.container.kill()

    def start(self) -> None:
        self.container.start()
        wait_until(self.engine_answers, ENGINE_START_TIMEOUT_S, f"the engine of {self.name} to answer", 1.0)


@dataclass
class MultiNodeSwarm:
    """The manager (this host's engine) and its workers, with the address workers reach it at."""

    client: docker.DockerClient
    network: Network
    manager_address: str
    workers: list[Worker] = field(default_factory=list)

    def worker(self, name: str) -> Worker:
        return next(worker for worker in self.workers if worker.name == name)

    def node_state(self, worker: Worker) -> str:
        node = self.client.nodes.get(worker.node_id)
        return str(node.attrs["Status"]["State"])


def _start_worker(client: docker.DockerClient, network: Network, name: str) -> Container:
    return client.containers.run(
        DIND_IMAGE,
        detach=True,
        name=name,
        hostname=name,
        network=network.name,
        cap_add=WORKER_CAPABILITIES,
        security_opt=["seccomp=unconfined", "apparmor=unconfined"],
        volumes={"/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}},
        labels={HARNESS_LABEL: name},
    )


WORKER_REMOVE_TIMEOUT_S = 600


def _remove_quietly(remove: object) -> None:
    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        remove()  # type: ignore[operator]


def _is_leftover_harness_swarm(client: docker.DockerClient) -> bool:
    """Whether the swarm this engine manages is one this harness made and, interrupted, never
    left: its manager node carries HARNESS_LABEL, or (harnesses before that label) every other
    node is one of its dind workers."""
    info = client.info()["Swarm"]
    if info["LocalNodeState"] != "active" or not info.get("ControlAvailable"):
        return False
    nodes = client.nodes.list()
    local = [node for node in nodes if node.id == info["NodeID"]]
    if local and HARNESS_LABEL in local[0].attrs["Spec"].get("Labels", {}):
        return True
    others = [node for node in nodes if node.id != info["NodeID"]]
    return bool(others) and all(
        str(node.attrs["Description"]["Hostname"]).startswith(WORKER_PREFIX) for node in others
    )


def _remove_leftovers(client: docker.DockerClient) -> None:
    """An interrupted run's workers, network and swarm."""
    with _worker_remove_timeout(client):
        for container in client.containers.list(all=True, filters={"label": HARNESS_LABEL}):
            _remove_quietly(lambda c=container: c.remove(force=True, v=True))
    run(["docker", "swarm", "leave", "--force"], check=False)
    for network in client.networks.list(filters={"label": HARNESS_LABEL}):
        _remove_quietly(network.remove)


@contextlib.contextmanager
def _worker_remove_timeout(client: docker.DockerClient) -> Iterator[None]:
    # A worker's engine keeps a full copy of every image and container layer (vfs): deleting
    # them can outlast the client's usual 60 s under load.
    usual_timeout, client.api.timeout = client.api.timeout, WORKER_REMOVE_TIMEOUT_S
    try:
        yield
    finally:
        client.api.timeout = usual_timeout


def _remove_workers(client: docker.DockerClient, workers: list[Worker]) -> None:
    with _worker_remove_timeout(client):
        for worker in workers:
            _remove_quietly(lambda w=worker: w.container.remove(force=True, v=True))


@contextlib.contextmanager
def multi_node_swarm(
    client: docker.DockerClient, prefix: str, worker_labels: dict[str, dict[str, str]], work_dir: str
) -> Iterator[MultiNodeSwarm]:
    """A swarm of this host's engine (manager) and one dind worker per entry of `worker_labels`
    (its node labels), each with `work_dir` made on it; everything is removed afterwards, each
    step even where an earlier one failed. What an interrupted earlier run left is removed first."""
    if _is_leftover_harness_swarm(client):
        _remove_leftovers(client)
    swarm_state = client.info()["Swarm"]["LocalNodeState"]
    if swarm_state != "inactive":
        raise AssertionError(
            f"this engine's swarm state is {swarm_state!r}: the harness needs it out of any swarm"
        )
    had_gwbridge = bool(client.networks.list(names=["docker_gwbridge"]))
    network = client.networks.create(f"{prefix}-net", driver="bridge", labels={HARNESS_LABEL: prefix})
    workers: list[Worker] = []
    with contextlib.ExitStack() as teardown:
        # Run last to first, every one even if one before it raised.
        teardown.callback(_remove_quietly, network.remove)
        teardown.callback(remove_created_gwbridge, client, had_gwbridge=had_gwbridge)
        teardown.callback(_remove_workers, client, workers)
        for name, labels in worker_labels.items():
            workers.append(
                Worker(f"{prefix}-{name}", labels, _start_worker(client, network, f"{prefix}-{name}"))
            )
        network.reload()
        manager_address = network.attrs["IPAM"]["Config"][0]["Gateway"]
        for worker in workers:
            wait_until(worker.engine_answers, ENGINE_START_TIMEOUT_S, f"the engine of {worker.name}", 1.0)
            worker.docker("info")  # a failure here says why the engine is unwell
            run(["docker", "exec", worker.name, "mkdir", "-p", work_dir])
        teardown.callback(run, ["docker", "swarm", "leave", "--force"], check=False)
        run(["docker", "swarm", "init", "--advertise-addr", manager_address])
        manager_id = client.info()["Swarm"]["NodeID"]
        run(["docker", "node", "update", "--label-add", f"{HARNESS_LABEL}={prefix}", manager_id])
        token = run(["docker", "swarm", "join-token", "-q", "worker"]).stdout.strip()
        for worker in workers:
            worker.docker("swarm", "join", "--token", token, f"{manager_address}:2377")
            worker.node_id = worker.docker("info", "--format", "{{.Swarm.NodeID}}").stdout.strip()
            label_args = [
                arg for key, value in worker.labels.items() for arg in ("--label-add", f"{key}={value}")
            ]
            run(["docker", "node", "update", *label_args, worker.node_id])
        swarm = MultiNodeSwarm(client, network, manager_address, workers)
        for worker in workers:
            wait_until(lambda w=worker: swarm.node_state(w) == "ready", 60, f"node {worker.name} ready", 1.0)  # type: ignore[misc]
        yield swarm


def unique_prefix(test_session_id: str) -> str:
    return f"{WORKER_PREFIX}{test_session_id}-{secrets.token_hex(2)}".lower()
