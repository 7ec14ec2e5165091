"""The production deployment, for real: images built from the local base, docker-compose.yaml and
docker-stack.yaml validated, then each brought up (Compose; a single-node Swarm) and one task
pushed through Traefik over HTTPS to a consumer container that runs the model as a sibling
container through the mounted Docker socket."""

from __future__ import annotations

import dataclasses
import functools
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import docker
import docker.errors
import httpx
import pytest
import yaml

from inference_server.contract import SERVICE_TOKEN_HEADER, PrivateRoutes, PublicRoutes
from tests.deployment.helpers import (
    assert_prometheus_scrapes_the_platform,
    base_process_env,
    leave_swarm,
    run,
)
from tests.helpers import register_model_public, wait_until
from tests.traefik.helpers import REPO_ROOT, FrontDoor, answers, run_task

pytestmark = [pytest.mark.docker, pytest.mark.slow]

COMPOSE_FILE = REPO_ROOT / "docker-compose.yaml"
STACK_FILE = REPO_ROOT / "docker-stack.yaml"
APP_SERVICES = {"public_api", "private_api", "consumer_gpu0", "consumer_cpu"}
TOKEN_VARIABLES = ("IS_SERVICE_TOKEN", "IS_PUBLIC_API_TOKEN", "IS_CONSUMER_TOKEN")
# Run inside a service's container: what its own token (IS_SERVICE_TOKEN there) opens on the
# private API, and which secrets it was handed. Prints JSON.
PROBE_SCRIPT = """
import json, os, urllib.error, urllib.request
def call(method, path):
    request = urllib.request.Request(
        os.environ["IS_PRIVATE_API_URL"] + path, method=method,
        headers={"X-Service-Token": os.environ["IS_SERVICE_TOKEN"], "X-Consumer-Id": "probe"})
    try:
        return urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as error:
        return error.code
print(json.dumps({
    "env": sorted(name for name in os.environ if name.startswith("IS_")),
    "ready": call("GET", "/health/ready"),
    "claim": call("POST", "/tasks/no-such-task/claim"),
    "tasks": call("GET", "/tasks"),
    "metrics": call("GET", "/metrics"),
}))
"""


@functools.cache
def docker_cli_has(*command: str, flag: str | None = None) -> bool:
    """Whether this docker CLI knows a subcommand (and flag): 20.10 lacks some that 25+ has."""
    result = run(["docker", *command, "--help"], check=False)
    # An unknown subcommand prints its parent's help, so look for its own usage line.
    known = f"docker {' '.join(command)} " in result.stdout
    return result.returncode == 0 and known and (flag is None or flag in result.stdout)


def write_env_file(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path


def assert_tokens_wired(services: dict, settings: dict[str, str]) -> None:
    """Each service presents its own token (as IS_SERVICE_TOKEN); only the private API knows all
    three and the database's password; the public API has no broker credentials."""
    private = services["private_api"]["environment"]
    assert {name: private[name] for name in TOKEN_VARIABLES} == {
        name: settings[name] for name in TOKEN_VARIABLES
    }
    public = services["public_api"]["environment"]
    assert public["IS_SERVICE_TOKEN"] == settings["IS_PUBLIC_API_TOKEN"]
    consumers = [name for name in services if name.startswith("consumer_")]
    assert consumers
    for name in consumers:
        assert services[name]["environment"]["IS_SERVICE_TOKEN"] == settings["IS_CONSUMER_TOKEN"], name
    for name in ["public_api", *consumers]:
        environment = services[name]["environment"]
        values = " ".join(str(value) for value in environment.values())
        assert {"IS_PUBLIC_API_TOKEN", "IS_CONSUMER_TOKEN", "IS_DATABASE_URL"}.isdisjoint(environment), name
        assert settings["IS_SERVICE_TOKEN"] not in values, name
        assert settings["POSTGRES_PASSWORD"] not in values, name
    assert "IS_RABBITMQ_URL" not in public
    assert settings["RABBITMQ_PASSWORD"] not in " ".join(str(value) for value in public.values())


def front_door(settings: dict[str, str]) -> FrontDoor:
    return FrontDoor(
        https_url=f"https://127.0.0.1:{settings['IS_HTTPS_PORT']}",
        http_url=f"http://127.0.0.1:{settings['IS_HTTP_PORT']}",
        ca_file=Path(settings["IS_TLS_CERT_DIR"]) / "cert.pem",
    )


def create_operator_key(docker_client: docker.DockerClient, private_api_labels: list[str]) -> str:
    """`inference-server keys create` inside the private API's container, as README tells operators."""
    containers = docker_client.containers.list(filters={"label": private_api_labels, "status": "running"})
    assert containers, f"no running private API container labelled {private_api_labels}"
    name = f"deploy-test-{secrets.token_hex(3)}"
    result = containers[0].exec_run(["inference-server", "keys", "create", name, "--operator"], demux=True)
    stdout, stderr = result.output
    assert result.exit_code == 0, (stderr or b"").decode()
    return stdout.decode().strip()


def exercise_front_door(
    door: FrontDoor,
    settings: dict[str, str],
    model: tuple[str, str],
    docker_client: docker.DockerClient,
    private_api_labels: list[str],
) -> str:
    """What a user sees of a fresh deployment: HTTPS only, the public API, keys required, a task
    that runs."""
    container_tag, human_readable_id = model
    with door.client() as client:
        # Ready means the private API has migrated the database: keys can be made now.
        wait_until(answers(client, PublicRoutes.HEALTH_READY), 180, "the platform ready behind Traefik", 1.0)
        assert client.get(PublicRoutes.MODELS).status_code == 401  # no anonymous access by default
    door = dataclasses.replace(door, api_key=create_operator_key(docker_client, private_api_labels))
    with door.client() as client:
        register_model_public(client, human_readable_id, container_tag)
        uid, _ = run_task(client, human_readable_id, timeout=180)
        private = client.get(
            PrivateRoutes.TASKS, headers={SERVICE_TOKEN_HEADER: settings["IS_SERVICE_TOKEN"]}
        )
        assert private.status_code in (404, 405)
    with httpx.Client(base_url=door.http_url, timeout=10.0) as plain:
        assert plain.get(PublicRoutes.MODELS).status_code in (301, 308)
    return uid


def probe_service(docker_client: docker.DockerClient, labels: list[str]) -> dict:
    containers = docker_client.containers.list(filters={"label": labels, "status": "running"})
    assert containers, f"no running container labelled {labels}"
    result = containers[0].exec_run(["python", "-c", PROBE_SCRIPT], demux=True)
    stdout, stderr = result.output
    assert result.exit_code == 0, (stderr or b"").decode()
    return json.loads(stdout)


def assert_least_privilege(
    docker_client: docker.DockerClient, public_api_labels: list[str], consumer_labels: list[str]
) -> None:
    """As deployed: each service's token opens only its own routes, and the public API holds no
    broker or database secret."""
    public = probe_service(docker_client, public_api_labels)
    assert {"IS_RABBITMQ_URL", "IS_DATABASE_URL", "IS_PUBLIC_API_TOKEN", "IS_CONSUMER_TOKEN"}.isdisjoint(
        public["env"]
    )
    # /metrics: the public API serves the platform's metrics (to operators and the metrics
    # token only), read from the private API with its own token.
    assert (public["ready"], public["claim"], public["tasks"], public["metrics"]) == (200, 403, 200, 200)
    consumer = probe_service(docker_client, consumer_labels)
    assert {"IS_DATABASE_URL", "IS_PUBLIC_API_TOKEN", "IS_CONSUMER_TOKEN"}.isdisjoint(consumer["env"])
    assert "IS_RABBITMQ_URL" in consumer["env"]
    # 404: let through to the lookup, which finds no such task.
    assert (consumer["ready"], consumer["claim"], consumer["tasks"], consumer["metrics"]) == (
        403,
        404,
        403,
        403,
    )


def assert_model_container_removed(docker_client: docker.DockerClient, uid: str) -> None:
    def gone() -> bool:
        return not docker_client.containers.list(
            all=True, sparse=True, filters={"label": f"inference-server.task={uid}"}
        )

    wait_until(gone, 30, f"removal of the model container of task {uid}")


# --- images and configuration -----------------------------------------------------------


def test_images_build_from_the_local_base(
    docker_client: docker.DockerClient, deployment_images: dict[str, str]
) -> None:
    app = docker_client.images.get(deployment_images["APP_IMAGE"])
    assert app.attrs["Config"]["User"] == "app"
    script = (
        "id -u; python -c 'import private_api, public_api, job_consumer; print(\"imports\")'; ls -A /src /tmp"
    )
    output = docker_client.containers.run(
        deployment_images["APP_IMAGE"], ["sh", "-c", f"{script} 2>&1 || true"], remove=True
    ).decode()
    uid, rest = output.split("\n", 1)
    assert uid != "0", "the APIs must not run as root"
    assert "imports" in rest
    # Only the installed packages: the build stage's source tree and wheels stayed behind.
    assert "/src" in rest and "No such file" in rest
    assert "whl" not in rest


def test_compose_file_is_valid_and_wired_as_designed(
    compose: list[str], deployment_settings: dict[str, str], tmp_path: Path
) -> None:
    env_file = write_env_file(tmp_path / "compose.env", deployment_settings)
    rendered = run(
        [
            *compose,
            "-f",
            str(COMPOSE_FILE),
            "--env-file",
            str(env_file),
            "--profile",
            "gpu",
            "--profile",
            "cpu",
            "config",
            "--format",
            "json",
        ],
        env=base_process_env(),
    )
    config = json.loads(rendered.stdout)
    services = config["services"]
    assert set(services) == {"traefik", "rabbitmq", "postgres"} | APP_SERVICES

    # Traefik is the only door; the private API is not on its network.
    assert [name for name, service in services.items() if service.get("ports")] == ["traefik"]
    assert set(services["traefik"]["networks"]) == {"front"}
    assert set(services["public_api"]["networks"]) == {"front", "back"}
    for name in ("private_api", "postgres", "rabbitmq", "consumer_gpu0", "consumer_cpu"):
        assert set(services[name]["networks"]) == {"back"}, name
    assert config["networks"]["back"]["internal"] is True

    # One consumer per GPU, pinned; the CPU one only on request.
    device = services["consumer_gpu0"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert (
        device["driver"] == "nvidia" and device["device_ids"] == ["0"] and device["capabilities"] == ["gpu"]
    )
    assert "--gpu" in services["consumer_gpu0"]["command"]
    assert services["consumer_cpu"]["profiles"] == ["cpu"]
    for name in ("consumer_gpu0", "consumer_cpu"):
        mounts = {(m["source"], m["target"]) for m in services[name]["volumes"]}
        work = deployment_settings["IS_HOST_WORK_DIR"]
        assert ("/var/run/docker.sock", "/var/run/docker.sock") in mounts
        assert (work, work) in mounts, "the work dir must have the same path on host and in container"
        assert services[name]["environment"]["IS_WORK_DIR"] == work

    assert {m["target"] for m in services["rabbitmq"]["volumes"]} == {"/var/lib/rabbitmq"}
    assert {m["target"] for m in services["postgres"]["volumes"]} == {"/var/lib/postgresql/data"}
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name
        assert "healthcheck" in service, name
    assert_tokens_wired(services, deployment_settings)
    # Callers without a key are refused unless the operator opts in.
    public_env = services["public_api"]["environment"]
    assert (public_env["IS_ANONYMOUS_TASKS"], public_env["IS_ANONYMOUS_MODELS"]) == ("false", "false")


@pytest.mark.parametrize("missing", TOKEN_VARIABLES)
def test_compose_refuses_to_start_without_secrets(
    compose: list[str], deployment_settings: dict[str, str], tmp_path: Path, missing: str
) -> None:
    settings = {k: v for k, v in deployment_settings.items() if k != missing}
    env_file = write_env_file(tmp_path / "compose.env", settings)
    result = run(
        [*compose, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), "config", "--quiet"],
        env=base_process_env(),
        check=False,
    )
    assert result.returncode != 0
    assert missing in result.stderr


def test_stack_file_is_valid_and_wired_as_designed(
    compose: list[str], deployment_settings: dict[str, str]
) -> None:
    env = {**base_process_env(), **deployment_settings}
    if docker_cli_has("stack", "config"):
        # The docker CLI's own loader, with the Swarm schema `docker stack deploy` applies.
        config = yaml.safe_load(run(["docker", "stack", "config", "-c", str(STACK_FILE)], env=env).stdout)
    else:
        # An older CLI (Debian's 20.10) has no `stack config`: the Compose loader still checks
        # the file against the compose specification, deploy sections included.
        rendered = run([*compose, "-f", str(STACK_FILE), "config", "--format", "json"], env=env)
        config = json.loads(rendered.stdout)
    services = config["services"]
    assert {
        "traefik",
        "public_api",
        "private_api",
        "postgres",
        "rabbitmq",
        "consumer_gpu0",
        "consumer_cpu",
    } <= set(services)
    # The registry alone is on the node's own network (`hostnet`, external: the engines pull).
    overlays = {name: network for name, network in config["networks"].items() if not network.get("external")}
    assert set(overlays) == {"front", "back"}
    assert all(network["driver"] == "overlay" for network in overlays.values())
    # Tokens, API keys and patients' zips cross between hosts on these: IPsec-encrypted.
    for name, network in overlays.items():
        assert network.get("driver_opts", {}).get("encrypted") == "true", name
    assert config["networks"]["back"]["internal"] is True
    for name in ("private_api", "postgres", "rabbitmq"):
        assert "node.role == manager" in services[name]["deploy"]["placement"]["constraints"], name
    for name in ("public_api", "private_api"):
        assert services[name]["deploy"]["update_config"]["order"] == "start-first", name
        assert services[name]["deploy"]["update_config"]["parallelism"] == 1, name
    for name in ("consumer_gpu0", "consumer_gpu1"):
        deploy = services[name]["deploy"]
        assert deploy["mode"] == "global"
        assert "node.labels.gpu == true" in deploy["placement"]["constraints"]
        assert deploy["update_config"]["order"] == "stop-first"
        assert services[name]["stop_grace_period"] == "30s"  # IS_CONSUMER_STOP_GRACE
    assert [name for name, service in services.items() if service.get("ports")] == ["traefik"]
    assert_tokens_wired(services, deployment_settings)


# --- the real thing -----------------------------------------------------------------------


def test_compose_deployment_runs_a_task_over_https(
    compose: list[str],
    deployment_settings: dict[str, str],
    passthrough_image: tuple[str, str],
    docker_client: docker.DockerClient,
    tmp_path: Path,
    test_session_id: str,
) -> None:
    project = f"is{test_session_id}c".lower()
    # With the monitoring profile: its Prometheus scrapes this deployment (Grafana's profile
    # stays off, its image cannot be had here).
    settings = {
        **deployment_settings,
        "COMPOSE_PROFILES": "cpu,monitoring",
        "IS_CONSUMER_PREFIX": project,
    }
    env_file = write_env_file(tmp_path / "compose.env", settings)
    base = [*compose, "-p", project, "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]
    label = {"label": f"com.docker.compose.project={project}"}
    try:
        run([*base, "up", "-d", "--wait", "--wait-timeout", "240"], env=base_process_env(), timeout=300)
        published = {
            container.labels["com.docker.compose.service"]
            for container in docker_client.containers.list(filters=label)
            if any(container.ports.values())
        }
        # Traefik for everyone; Prometheus's UI on loopback (IS_MONITORING_BIND_ADDRESS unset) only.
        assert published == {"traefik", "prometheus"}
        private_api_labels = [label["label"], "com.docker.compose.service=private_api"]
        uid = exercise_front_door(
            front_door(settings), settings, passthrough_image, docker_client, private_api_labels
        )
        assert_model_container_removed(docker_client, uid)
        assert_least_privilege(
            docker_client,
            [label["label"], "com.docker.compose.service=public_api"],
            [label["label"], "com.docker.compose.service=consumer_cpu"],
        )
        assert_prometheus_scrapes_the_platform(f"http://127.0.0.1:{settings['IS_PROMETHEUS_PORT']}")
    finally:
        run(
            [*base, "down", "--volumes", "--remove-orphans", "--timeout", "30"],
            env=base_process_env(),
            timeout=180,
            check=False,
        )
    assert not docker_client.containers.list(all=True, sparse=True, filters=label)
    assert not docker_client.volumes.list(filters=label)
    assert not docker_client.networks.list(filters=label)


@contextmanager
def single_node_swarm(docker_client: docker.DockerClient) -> Iterator[None]:
    """The engine's swarm if it is already a manager of one; otherwise a one-node swarm made for
    this test and left again afterwards, with the bridge network Swarm adds removed."""
    swarm = docker_client.info()["Swarm"]
    if swarm["LocalNodeState"] == "active":
        if not swarm.get("ControlAvailable"):
            pytest.fail("this engine is a swarm worker; deploying a stack needs a manager")
        yield
        return
    if swarm["LocalNodeState"] != "inactive":
        pytest.fail(f"swarm state {swarm['LocalNodeState']!r}: neither usable nor safe to initialise")
    had_gwbridge = bool(docker_client.networks.list(names=["docker_gwbridge"]))
    run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"])
    try:
        yield
    finally:
        leave_swarm(docker_client, had_gwbridge=had_gwbridge)


def remove_stack(docker_client: docker.DockerClient, stack: str) -> None:
    run(["docker", "stack", "rm", stack], check=False)
    label = {"label": f"com.docker.stack.namespace={stack}"}
    wait_until(
        lambda: not docker_client.containers.list(all=True, sparse=True, filters=label),
        120,
        f"{stack}'s containers",
        1.0,
    )

    def networks_removed() -> bool:
        for network in docker_client.networks.list(filters=label):
            try:
                network.remove()
            except docker.errors.APIError:
                return False
        return True

    def volumes_removed() -> bool:
        for volume in docker_client.volumes.list(filters=label):
            try:
                volume.remove()
            except docker.errors.APIError:
                return False
        return True

    wait_until(networks_removed, 60, f"removal of {stack}'s networks", 1.0)
    wait_until(volumes_removed, 60, f"removal of {stack}'s volumes", 1.0)


def test_swarm_stack_runs_a_task_over_https(
    deployment_settings: dict[str, str],
    passthrough_image: tuple[str, str],
    docker_client: docker.DockerClient,
    test_session_id: str,
) -> None:
    stack = f"is{test_session_id}{secrets.token_hex(2)}".lower()
    settings = {
        **deployment_settings,
        "IS_STACK_NAME": stack,
        "IS_CPU_CONSUMERS": "1",
        # VIP load balancing needs the kernel's IPVS; where it is missing (this CI kernel), DNS
        # round robin does the same job for single-replica services.
        "IS_ENDPOINT_MODE": "vip" if Path("/proc/net/ip_vs").exists() else "dnsrr",
    }
    with single_node_swarm(docker_client):
        try:
            run(
                [
                    "docker",
                    "stack",
                    "deploy",
                    # Newer CLIs wait for convergence unless told not to; 20.10 has no such flag.
                    *(["--detach=true"] if docker_cli_has("stack", "deploy", flag="--detach") else []),
                    "--resolve-image",
                    "never",
                    "-c",
                    str(STACK_FILE),
                    stack,
                ],
                env={**base_process_env(), **settings},
            )
            private_api_labels = [f"com.docker.swarm.service.name={stack}_private_api"]
            uid = exercise_front_door(
                front_door(settings), settings, passthrough_image, docker_client, private_api_labels
            )
            assert_model_container_removed(docker_client, uid)
            assert_least_privilege(
                docker_client,
                [f"com.docker.swarm.service.name={stack}_public_api"],
                [f"com.docker.swarm.service.name={stack}_consumer_cpu"],
            )
            # The task above crossed them: Docker accepted and runs the encrypted overlays.
            networks = docker_client.networks.list(filters={"label": f"com.docker.stack.namespace={stack}"})
            assert {network.name for network in networks} == {f"{stack}_front", f"{stack}_back"}
            for network in networks:
                network.reload()
                assert network.attrs["Driver"] == "overlay", network.name
                assert network.attrs["Options"].get("encrypted") == "true", network.name
            services = {
                service.name: service
                for service in docker_client.services.list(
                    filters={"label": f"com.docker.stack.namespace={stack}"}
                )
            }
            published = {
                name for name, service in services.items() if service.attrs.get("Endpoint", {}).get("Ports")
            }
            assert published == {f"{stack}_traefik"}
        finally:
            remove_stack(docker_client, stack)
        label = {"label": f"com.docker.stack.namespace={stack}"}
        assert not docker_client.services.list(filters=label)
        assert not docker_client.configs.list(filters=label)
        assert not docker_client.secrets.list(filters=label)
