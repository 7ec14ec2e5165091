"""A task through a consumer that runs as an unprivileged user on rootless Podman.

The consumer process runs as the user ROOTLESS_USER (created here if missing, with the
/etc/subuid and /etc/subgid ranges useradd gives it) and starts its own rootless Podman service;
the model container lives in that user's namespace and store. The rest of the platform runs as
root as usual.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from job_consumer.runner import LABEL_TASK
from local_platform.examples import copy_images_to_podman, register_model
from local_platform.launcher import LocalPlatform
from local_platform.ports import free_port
from models_examples.catalog import get_example
from tests.e2e.test_podman import NO_DOCKER_ENGINE, registered_consumers
from tests.helpers import make_zip, register_script_model, wait_until, zip_members
from tests.images import SCRIPT

pytestmark = [pytest.mark.docker, pytest.mark.slow]

ROOTLESS_USER = "is-rootless"
REPO_ROOT = Path(__file__).resolve().parents[2]


def as_user(user: str, *command: str, input_bytes: bytes | None = None) -> str:
    """Run `command` as `user` with a login-like environment (its HOME, its runtime dir)."""
    entry = pwd.getpwnam(user)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": entry.pw_dir,
        "USER": user,
        "XDG_RUNTIME_DIR": f"/run/user/{entry.pw_uid}",
    }
    completed = subprocess.run(
        ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", *command],
        input=input_bytes,
        capture_output=True,
        env=env,
        cwd="/",
        timeout=300,
    )
    assert completed.returncode == 0, f"{command} as {user}: {completed.stderr.decode(errors='replace')}"
    return completed.stdout.decode()


def has_subordinate_ids(user: str) -> bool:
    """Whether /etc/subuid and /etc/subgid both give `user` a range (rootless Podman needs both)."""
    for path in (Path("/etc/subuid"), Path("/etc/subgid")):
        lines = path.read_text().splitlines() if path.exists() else []
        if not any(line.split(":")[0] == user for line in lines):
            return False
    return True


@pytest.fixture(scope="session")
def rootless_user() -> Iterator[pwd.struct_passwd]:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: scripts/setup.sh installs it")
    if os.geteuid() != 0:
        pytest.skip("creating the unprivileged user needs root")
    try:
        entry = pwd.getpwnam(ROOTLESS_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", ROOTLESS_USER], check=True)
        entry = pwd.getpwnam(ROOTLESS_USER)
    if not has_subordinate_ids(ROOTLESS_USER):
        # useradd gives ranges only where /etc/login.defs asks; give one high above any other's.
        for path in ("/etc/subuid", "/etc/subgid"):
            with open(path, "a") as ids:
                ids.write(f"{ROOTLESS_USER}:{1_000_000 + 65536 * entry.pw_uid}:65536\n")
    # What logind would make at login (`loginctl enable-linger` keeps it): the user's runtime
    # folder, where rootless Podman keeps its state and its service socket.
    runtime_dir = Path(f"/run/user/{entry.pw_uid}")
    runtime_dir.mkdir(parents=True, exist_ok=True)
    os.chown(runtime_dir, entry.pw_uid, entry.pw_gid)
    runtime_dir.chmod(0o700)
    yield entry
    # Rootless Podman leaves a pause process holding the user's namespace for its next call;
    # nothing of the tests should outlive them.
    pause_pid_file = runtime_dir / "libpod" / "tmp" / "pause.pid"
    if pause_pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pause_pid_file.read_text().strip()), signal.SIGTERM)


def load_into_rootless_store(user: pwd.struct_passwd, docker_client: docker.DockerClient, tag: str) -> None:
    """The image `tag` names in Docker, in the user's own Podman store (through root's)."""
    copy_images_to_podman(docker_client, [tag])
    saved = subprocess.run(["podman", "save", tag], capture_output=True, timeout=300, check=True).stdout
    as_user(user.pw_name, "podman", "load", input_bytes=saved)


@pytest.fixture(scope="session")
def passthrough_in_rootless_store(
    rootless_user: pwd.struct_passwd, example_images: list[str], docker_client: docker.DockerClient
) -> str:
    tag = get_example("passthrough").container_tag
    load_into_rootless_store(rootless_user, docker_client, tag)
    return tag


@pytest.fixture(scope="session")
def script_image_in_rootless_store(
    rootless_user: pwd.struct_passwd, test_images: dict[str, str], docker_client: docker.DockerClient
) -> str:
    load_into_rootless_store(rootless_user, docker_client, SCRIPT)
    return SCRIPT


def cgroup_version() -> str | None:
    """The host's cgroup version as Podman sees it ("v1", "v2"); None without a working Podman
    (asked while the tests are collected, where a failure must not stop the collection)."""
    if shutil.which("podman") is None:
        return None
    completed = subprocess.run(
        ["podman", "info", "--format", "{{.Host.CgroupsVersion}}"], capture_output=True, text=True, timeout=60
    )
    return completed.stdout.strip() if completed.returncode == 0 else None


@pytest.fixture
def rootless_work_dir(rootless_user: pwd.struct_passwd) -> Iterator[Path]:
    """A work folder the user owns, outside root's private temporary folders."""
    base = Path(rootless_user.pw_dir) / "work"
    as_user(rootless_user.pw_name, "mkdir", "-p", str(base))
    work = Path(as_user(rootless_user.pw_name, "mktemp", "-d", "-p", str(base)).strip())
    yield work
    # Files the model wrote belong to the user's subordinate ids: only inside its namespace
    # can they be removed.
    as_user(rootless_user.pw_name, "podman", "unshare", "rm", "-rf", str(work))


@pytest.fixture
def rootless_platform(
    tmp_path: Path,
    rabbitmq_url: str,
    queue_name: str,
    rootless_user: pwd.struct_passwd,
    rootless_work_dir: Path,
    passthrough_in_rootless_store: str,
) -> Iterator[LocalPlatform]:
    """A platform whose one consumer runs as the unprivileged user, on its rootless Podman."""
    user = rootless_user
    # The consumer runs with the system's Python 3.11 on the project's installed packages: the
    # virtualenv's own interpreter may live where the user cannot read (root's home).
    system_python = "/usr/bin/python3"
    if sys.version_info[:2] != (3, 11) or not Path(system_python).exists():
        pytest.skip("the project's packages are for Python 3.11: the system's is needed as 3.11")
    as_user_prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
    platform = LocalPlatform(
        data_dir=tmp_path / "platform",
        public_port=free_port(),
        consumers=1,
        rabbitmq_url=rabbitmq_url,
        queue_name=queue_name,
        create_operator_key=True,
        container_runtime="podman",
        extra_env={"IS_ANONYMOUS_TASKS": "true", "IS_ANONYMOUS_MODELS": "true"},
        consumer_interpreter=[*as_user_prefix, system_python],
        consumer_extra_env={
            "DOCKER_HOST": NO_DOCKER_ENGINE,
            "HOME": user.pw_dir,
            "USER": user.pw_name,
            "XDG_RUNTIME_DIR": f"/run/user/{user.pw_uid}",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), sysconfig.get_paths()["purelib"]]),
            "IS_WORK_DIR": str(rootless_work_dir),
            # On cgroup v1 a rootless consumer refuses to start without this (its models would
            # run unlimited; tests/job_consumer/test_container_runtime.py checks the refusal).
            "IS_ALLOW_UNENFORCED_LIMITS": "true",
        },
    )
    try:
        platform.start()
        register_model(platform.private_url, platform.service_token, get_example("passthrough"))
        consumers = wait_until(
            lambda: registered_consumers(platform), 90, "the rootless consumer to register"
        )
        assert [consumer["runtime"] for consumer in consumers] == ["podman"]
        consumer = platform.processes["consumer-0"].popen
        assert consumer is not None
        # setpriv executes the interpreter in its own process: the consumer is that user's.
        assert Path(f"/proc/{consumer.pid}").stat().st_uid == user.pw_uid
        yield platform
    finally:
        platform.stop()


def run_passthrough(platform: LocalPlatform, files: dict[str, bytes]) -> tuple[str, requests.Response]:
    response = requests.post(
        f"{platform.public_url}/api/tasks/",
        params={"model_human_readable_id": "passthrough"},
        files={"zip_file": ("input.zip", make_zip(files), "application/zip")},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    uid = json.loads(response.content)

    def answer() -> list[requests.Response]:
        # A list, because a Response with an error code is itself falsy.
        polled = requests.get(f"{platform.public_url}/api/tasks/{uid}", timeout=60)
        return [] if polled.status_code == 551 else [polled]

    (result,) = wait_until(answer, 180, f"task {uid} to leave pending")
    return uid, result


def test_a_task_runs_through_a_consumer_on_rootless_podman(
    rootless_platform: LocalPlatform, rootless_user: pwd.struct_passwd
) -> None:
    files = {"scans/patient 01/image.dat": b"\x00\x01 image bytes", "notes.txt": b"rootless\n"}
    uid, result = run_passthrough(rootless_platform, files)
    consumer_log = rootless_platform.processes["consumer-0"].log_tail(40)
    assert result.status_code == 200, (result.status_code, result.text, consumer_log)
    assert zip_members(result.content) == files
    # The container was the user's: its rootless store's event log has it.
    events = as_user(
        rootless_user.pw_name,
        "podman",
        "events",
        "--stream=false",
        "--filter",
        f"label={LABEL_TASK}={uid}",
        "--format",
        "{{.Status}}",
    ).split()
    assert {"create", "start", "died"} <= set(events), events


@pytest.mark.xfail(
    strict=True,
    reason="rootless: the model's files in /output belong to the user's subordinate ids, so the "
    "consumer (the user itself) cannot remove the task's folder; needs --userns=keep-id or "
    "removal through `podman unshare` in job_consumer",
)
def test_a_rootless_consumer_removes_the_task_folder_after_the_task(
    rootless_platform: LocalPlatform, rootless_work_dir: Path
) -> None:
    uid, result = run_passthrough(rootless_platform, {"a/b/c.txt": b"nested\n"})
    assert result.status_code == 200, result.text

    def task_folders() -> list[Path]:
        return [path for path in rootless_work_dir.rglob(f"{uid}-a*") if path.is_dir()]

    wait_until(lambda: not task_folders(), 30, f"the consumer to remove {uid}'s folder")


@pytest.mark.xfail(
    condition=cgroup_version() == "v1",
    strict=True,
    reason="rootless Podman on cgroup v1 applies no memory, CPU or PID limit: 'Resource limits are "
    "not supported and ignored on cgroups V1 rootless systems'",
)
def test_a_rootless_model_over_its_memory_limit_is_stopped(
    rootless_platform: LocalPlatform, script_image_in_rootless_store: str
) -> None:
    # tail keeps the whole last "line" in memory: 400 MB of zeros without a newline.
    register_script_model(
        rootless_platform,
        "memory-hog",
        "head -c 400000000 /dev/zero | tail > /dev/null\necho survived > /output/survived\n",
        memory_mb=64,
    )
    response = requests.post(
        f"{rootless_platform.public_url}/api/tasks/",
        params={"model_human_readable_id": "memory-hog"},
        files={"zip_file": ("input.zip", make_zip({"in.txt": b"1"}), "application/zip")},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    uid = json.loads(response.content)

    def ended() -> dict[str, Any] | None:
        status: dict[str, Any] = requests.get(
            f"{rootless_platform.public_url}/api/tasks/{uid}/status", timeout=30
        ).json()
        return status if status["status"] in ("finished", "failed") else None

    status = wait_until(ended, 180, f"task {uid} to end")
    assert status["status"] == "failed" and "out of memory" in (status["error"] or ""), status
