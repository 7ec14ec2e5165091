"""One multi-node swarm and one deployed stack, shared by every test of this package (building
them is most of the time these tests take).

Two dind workers, both labelled gpu=true with a simulated GPU each (this machine has none: the
consumers' IS_SIMULATE_GPU_MEMORY_MB), so docker-stack.yaml's consumer_gpu0 runs once on each
and never on the manager. The app image and the test models are pushed to the stack's registry
and the workers pull them from there: nothing is loaded onto a worker by hand.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest
import yaml  # type: ignore[import-untyped]

from inference_server.contract import PublicRoutes
from local_platform.ports import free_port

# The images build_images.sh makes, built once per session with the deployment tests'.
from tests.deployment import conftest as deployment_fixtures
from tests.deployment.helpers import base_process_env, run
from tests.helpers import register_model_public, wait_until
from tests.multinode.swarm import MultiNodeSwarm, kernel_has_ipsec_esp, multi_node_swarm, unique_prefix
from tests.traefik.helpers import REPO_ROOT, FrontDoor, answers, make_cert

STACK_FILE = REPO_ROOT / "docker-stack.yaml"
WORK_DIR = "/var/lib/inference-server/work"
REGISTRY_USER = "lab"
# Model images for these tests: each sleeps, then writes its output (no RUN layer: only the base
# image's layers and a config to pull, which every worker shares with the app image).
NAP_SHORT = "inference-server/test-nap-short:1"
NAP_LONG = "inference-server/test-nap-long:1"
NAP_COMMANDS = {
    NAP_SHORT: '["sh", "-c", "sleep 2; cp -r /input/. /output/"]',
    NAP_LONG: '["sh", "-c", "sleep 20; cp -r /input/. /output/"]',
}
deployment_images = deployment_fixtures.deployment_images

WORKERS = {"w1": {"gpu": "true"}, "w2": {"gpu": "true"}}


@dataclasses.dataclass
class MultiNodeStack:
    swarm: MultiNodeSwarm
    name: str
    settings: dict[str, str]
    door: FrontDoor
    registry: str  # as the workers' engines reach it
    models: dict[str, str]  # container tag -> human-readable id
    encrypted_overlay: bool

    def consumer_id(self, worker_name: str) -> str:
        return f"{worker_name}-gpu0"

    def client(self) -> httpx.Client:
        return self.door.client()


def _build_nap_images(client: docker.DockerClient, base_image: str) -> None:
    for tag, command in NAP_COMMANDS.items():
        dockerfile = (
            f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nLABEL inference-server.test-image=true\nCMD {command}\n"
        )
        client.images.build(
            fileobj=io.BytesIO(dockerfile.encode()), tag=tag, buildargs={"BASE_IMAGE": base_image}, pull=False
        )


def _stack_file(tmp_dir: Path, encrypted: bool) -> Path:
    """docker-stack.yaml as it is, or, where this kernel cannot encrypt an overlay between nodes
    (no ESP), the same stack with plain overlays: the workers could not reach the manager at all
    otherwise. Relative file paths are made absolute for the copy."""
    if encrypted:
        return STACK_FILE
    stack: dict[str, Any] = yaml.safe_load(STACK_FILE.read_text())
    for network in stack["networks"].values():
        network.get("driver_opts", {}).pop("encrypted", None)
    for section in ("configs", "secrets"):
        for entry in stack[section].values():
            if entry["file"].startswith("./"):
                entry["file"] = str(REPO_ROOT / entry["file"][2:])
    copy = tmp_dir / "docker-stack.plain-overlay.yaml"
    copy.write_text(yaml.safe_dump(stack, sort_keys=False))
    return copy


def _docker_config(directory: Path, registries: list[str], password: str) -> Path:
    """A docker CLI configuration holding the registry login (what `docker login` would store),
    for pushing and for --with-registry-auth; the host's engine is never told to trust a
    plain-HTTP registry beyond loopback, so `docker login` to the workers' address would fail."""
    directory.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{REGISTRY_USER}:{password}".encode()).decode()
    (directory / "config.json").write_text(
        json.dumps({"auths": {name: {"auth": auth} for name in registries}})
    )
    return directory


def _consumers(client: httpx.Client) -> dict[str, dict[str, Any]]:
    response = client.get(PublicRoutes.CONSUMERS)
    if response.status_code != 200:
        return {}
    return {consumer["id"]: consumer for consumer in response.json()}


def wait_for_consumers(stack: MultiNodeStack, worker_names: list[str], timeout: float) -> None:
    """Until the consumer of each named worker is registered and not lost."""
    wanted = {stack.consumer_id(name) for name in worker_names}
    with stack.client() as client:

        def all_up() -> bool:
            consumers = _consumers(client)
            return all(consumers.get(cid, {}).get("state") in ("idle", "busy") for cid in wanted)

        wait_until(all_up, timeout, f"consumers {sorted(wanted)} registered", 2.0)


def _remove_stack(client: docker.DockerClient, stack: str, env: dict[str, str]) -> None:
    run(["docker", "stack", "rm", stack], env=env, check=False)
    label: dict[str, str | list[str] | bool] = {"label": f"com.docker.stack.namespace={stack}"}
    wait_until(
        lambda: not client.containers.list(all=True, sparse=True, filters=label),
        120,
        f"{stack}'s containers",
        1.0,
    )

    def removed(kind: str) -> bool:
        collection = client.networks if kind == "networks" else client.volumes
        for item in collection.list(filters=label):
            try:
                item.remove()
            except docker.errors.APIError:
                return False
        return True

    wait_until(lambda: removed("networks"), 60, f"removal of {stack}'s networks", 1.0)
    wait_until(lambda: removed("volumes"), 60, f"removal of {stack}'s volumes", 1.0)


def _push(image: str, target: str, env: dict[str, str]) -> None:
    run(["docker", "tag", image, target], env=env)
    run(["docker", "push", target], env=env, timeout=600)


@pytest.fixture(scope="module")
def multinode_stack(
    docker_client: docker.DockerClient,
    base_image: str,
    deployment_images: dict[str, str],
    test_session_id: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MultiNodeStack]:
    started = time.monotonic()
    run(
        ["bash", str(REPO_ROOT / "scripts" / "build_images.sh"), "dind"],
        env={
            **base_process_env(),
            "IS_BASE_IMAGE": base_image,
            "IS_VENV": str(Path(sys.executable).parent.parent),
        },
        timeout=900,
    )
    _build_nap_images(docker_client, base_image)
    tmp_dir = tmp_path_factory.mktemp("multinode")
    prefix = unique_prefix(test_session_id)
    stack_name = prefix.replace("-", "")
    encrypted = kernel_has_ipsec_esp()
    local_tags: list[str] = []
    with multi_node_swarm(docker_client, prefix, WORKERS, WORK_DIR) as swarm:
        port = free_port()
        registry = f"{swarm.manager_address}:{port}"
        local_registry = f"127.0.0.1:{port}"
        password = secrets.token_urlsafe(18)
        (tmp_dir / "registry_password").write_text(password)
        cert_dir = tmp_dir / "certs"
        make_cert("inference.test", cert_dir)
        app_image = f"{registry}/inference-server/app:latest"
        settings = {
            **deployment_images,
            "APP_IMAGE": app_image,
            "IS_STACK_NAME": stack_name,
            "IS_SERVICE_TOKEN": secrets.token_urlsafe(32),
            "IS_PUBLIC_API_TOKEN": secrets.token_urlsafe(32),
            "IS_CONSUMER_TOKEN": secrets.token_urlsafe(32),
            "POSTGRES_PASSWORD": secrets.token_urlsafe(24),
            "RABBITMQ_PASSWORD": secrets.token_urlsafe(24),
            "IS_TLS_CERT_DIR": str(cert_dir),
            "IS_HOST_WORK_DIR": WORK_DIR,
            "IS_HTTP_PORT": str(free_port()),
            "IS_HTTPS_PORT": str(free_port()),
            "IS_REGISTRY_PORT": str(port),
            "IS_REGISTRY_SECRET_FILE": str(tmp_dir / "registry_password"),
            "REGISTRY_USER": REGISTRY_USER,
            "IS_MODEL_REGISTRY": registry,
            # Simulated GPUs (none here); the tests' models are CPU models the GPU consumers take.
            "IS_SIMULATE_GPU_MEMORY_MB": "16384",
            "IS_GPU_CONSUMERS_TAKE_CPU_TASKS": "true",
            # The test models declare no resources, so each consumer runs them one at a time and
            # a batch spreads over both workers.
            "IS_MAX_CONCURRENT_TASKS": "2",
            # A lost worker's tasks come back after one lease: short, so the test does not idle.
            "IS_LEASE_SECONDS": "15",
            "IS_CONSUMER_LOST_AFTER_S": "20",
            "IS_HEALTHCHECK_INTERVAL": "2s",
            # Long enough for a consumer being updated to finish a 20 s task.
            "IS_CONSUMER_STOP_GRACE": "90s",
            "IS_ENDPOINT_MODE": "vip" if Path("/proc/net/ip_vs").exists() else "dnsrr",
        }
        # The manager runs the app image by the name the workers pull it by, without a pull.
        for tag in (app_image, f"{local_registry}/inference-server/app:latest"):
            docker_client.images.get(deployment_images["APP_IMAGE"]).tag(tag)
            local_tags.append(tag)
        docker_config = _docker_config(tmp_dir / "docker-config", [registry, local_registry], password)
        env = {**base_process_env(), **settings, "DOCKER_CONFIG": str(docker_config)}
        try:
            run(
                [
                    "docker",
                    "stack",
                    "deploy",
                    "--with-registry-auth",
                    "--resolve-image",
                    "never",
                    "-c",
                    str(_stack_file(tmp_dir, encrypted)),
                    stack_name,
                ],
                env=env,
            )

            def registry_answers() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return httpx.get(f"http://{local_registry}/v2/", timeout=5).status_code == 401
                return False

            wait_until(registry_answers, 120, "the stack's registry", 1.0)
            _push(deployment_images["APP_IMAGE"], f"{local_registry}/inference-server/app:latest", env)
            for tag in NAP_COMMANDS:
                _push(tag, f"{local_registry}/{tag}", env)
                local_tags.append(f"{local_registry}/{tag}")
            door = FrontDoor(
                https_url=f"https://127.0.0.1:{settings['IS_HTTPS_PORT']}",
                http_url=f"http://127.0.0.1:{settings['IS_HTTP_PORT']}",
                ca_file=cert_dir / "cert.pem",
            )
            with door.client() as client:
                wait_until(
                    answers(client, PublicRoutes.HEALTH_READY), 300, "the platform ready behind Traefik", 2.0
                )
            door = dataclasses.replace(door, api_key=_operator_key(docker_client, stack_name))
            models = {tag: tag.split("/")[-1].split(":")[0] for tag in NAP_COMMANDS}
            with door.client() as client:
                for tag, human_readable_id in models.items():
                    register_model_public(client, human_readable_id, tag)
            stack = MultiNodeStack(swarm, stack_name, settings, door, registry, models, encrypted)
            wait_for_consumers(stack, [worker.name for worker in swarm.workers], 420)
            print(
                f"multi-node stack up in {time.monotonic() - started:.0f}s (encrypted overlay: {encrypted})"
            )
            yield stack
        finally:
            try:
                _remove_stack(docker_client, stack_name, env)
            finally:
                for tag in local_tags:
                    with contextlib.suppress(docker.errors.APIError):
                        docker_client.images.remove(tag)


def _operator_key(client: docker.DockerClient, stack: str) -> str:
    labels = [f"com.docker.swarm.service.name={stack}_private_api"]
    containers = client.containers.list(filters={"label": labels, "status": "running"})
    assert containers, "no running private API container"
    result = containers[0].exec_run(
        ["inference-server", "keys", "create", f"multinode-{secrets.token_hex(3)}", "--operator"], demux=True
    )
    stdout, stderr = result.output
    assert result.exit_code == 0, bytes(stderr or b"").decode()
    return bytes(stdout).decode().strip()
