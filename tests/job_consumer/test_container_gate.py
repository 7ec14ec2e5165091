"""The gate that holds a container started ahead (job_consumer/container_gate.py), on the host:
which shells it takes, the FIFO it waits on, and the command it runs. A real container behind it
is in test_prepared_containers.py."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import docker
import pytest

from job_consumer.container_gate import (
    FIFO_NAME,
    GATE_MOUNT,
    GATE_SCRIPT,
    SHELL_NAME,
    gated_command,
    image_argv,
    make_gate,
    open_gate,
    usable_shell,
)

STATIC_BUSYBOX = Path("/bin/busybox")


def test_only_a_static_executable_is_taken_as_the_gate_shell(tmp_path: Path) -> None:
    assert usable_shell(STATIC_BUSYBOX) == STATIC_BUSYBOX  # busybox-static, installed by make setup
    # The interpreter running this test needs its C library: an image may have none.
    assert usable_shell(Path(sys.executable).resolve()) is None
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert usable_shell(script) is None
    assert usable_shell(tmp_path / "missing") is None
    assert usable_shell(None) is None
    unexecutable = tmp_path / "busybox"
    shutil.copyfile(STATIC_BUSYBOX, unexecutable)
    unexecutable.chmod(0o644)
    assert usable_shell(unexecutable) is None


def test_the_gate_folder_holds_a_fifo_only_its_owner_writes_and_the_shell(tmp_path: Path) -> None:
    mode_before = stat.S_IMODE(os.stat(STATIC_BUSYBOX).st_mode)
    gate = make_gate(tmp_path, STATIC_BUSYBOX)
    fifo = os.stat(gate / FIFO_NAME)
    assert stat.S_ISFIFO(fifo.st_mode)
    assert stat.S_IMODE(fifo.st_mode) == 0o604
    shell = gate / SHELL_NAME
    assert shell.read_bytes() == STATIC_BUSYBOX.read_bytes()
    assert os.access(shell, os.X_OK)
    # Its own file: the system's shell keeps its inode and its mode.
    assert os.stat(shell).st_ino != os.stat(STATIC_BUSYBOX).st_ino
    assert stat.S_IMODE(os.stat(STATIC_BUSYBOX).st_mode) == mode_before


def test_the_image_command_is_its_entrypoint_then_its_cmd() -> None:
    assert image_argv({"Entrypoint": ["/bin/tool", "--flag"], "Cmd": ["run"]}) == [
        "/bin/tool",
        "--flag",
        "run",
    ]
    assert image_argv({"Entrypoint": None, "Cmd": ["sh", "/opt/model/run.sh"]}) == ["sh", "/opt/model/run.sh"]
    assert image_argv({"Entrypoint": None, "Cmd": None}) is None
    entrypoint, command = gated_command(["sh", "run.sh"])
    assert entrypoint == [f"{GATE_MOUNT}/{SHELL_NAME}"]
    assert command[:2] == ["-c", GATE_SCRIPT] and command[-2:] == ["sh", "run.sh"]


def test_nobody_at_the_gate_is_reported_not_waited_for(tmp_path: Path) -> None:
    gate = make_gate(tmp_path, STATIC_BUSYBOX)
    assert open_gate(gate, wait_s=0.2) is False
    assert open_gate(tmp_path / "no-gate", wait_s=0.2) is False


def run_gate_script(gate: Path, argv: list[str], path: str | None = None) -> subprocess.Popen[str]:
    """The gate's own script under the real shell, with the gate folder where a container has it."""
    script = GATE_SCRIPT.replace(GATE_MOUNT, str(gate))
    return subprocess.Popen(
        [str(gate / SHELL_NAME), "-c", script, "gate", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"PATH": os.environ["PATH"] if path is None else path},
    )


def through_the_gate(
    folder: Path, argv: list[str], path: str | None = None
) -> subprocess.CompletedProcess[str]:
    folder.mkdir(exist_ok=True)
    gate = make_gate(folder, STATIC_BUSYBOX)
    waiting = run_gate_script(gate, argv, path)
    assert open_gate(gate)
    out, err = waiting.communicate(timeout=10)
    return subprocess.CompletedProcess(argv, waiting.returncode, out, err)


def test_the_shell_waits_at_the_gate_and_runs_the_command_once_it_opens(tmp_path: Path) -> None:
    gate = make_gate(tmp_path, STATIC_BUSYBOX)
    waiting = run_gate_script(gate, ["echo", "ran", "with args"])
    with pytest.raises(subprocess.TimeoutExpired):
        waiting.wait(timeout=0.5)  # held: nothing ran yet
    assert open_gate(gate)
    out, _ = waiting.communicate(timeout=10)
    assert waiting.returncode == 0
    assert out == "ran with args\n"


def test_only_the_word_opens_the_gate(tmp_path: Path) -> None:
    gate = make_gate(tmp_path, STATIC_BUSYBOX)
    waiting = run_gate_script(gate, ["echo", "ran"])
    # Openers that write something else, or nothing, leave it waiting.
    for stray in (b"", b"stop\n"):
        opened = threading.Event()

        def write(data: bytes = stray, opened: threading.Event = opened) -> None:
            with open(gate / FIFO_NAME, "wb") as fifo:
                opened.set()
                fifo.write(data)

        writer = threading.Thread(target=write)
        writer.start()
        writer.join(timeout=10)
        assert opened.is_set()
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=0.3)
    assert open_gate(gate)
    out, _ = waiting.communicate(timeout=10)
    assert out == "ran\n"


def test_the_command_runs_as_the_engine_would_run_it(tmp_path: Path) -> None:
    # The image's own programs, found on its PATH: busybox's `date` would print "%N" as is.
    ran = through_the_gate(tmp_path / "a", ["date", "+%N"])
    assert ran.returncode == 0 and ran.stdout.strip().isdigit(), ran
    # argv[0] as given, and the gate's shell leaves nothing of its own in the environment.
    ran = through_the_gate(tmp_path / "b", ["sh", "-c", 'echo "$0"; env'])
    lines = ran.stdout.splitlines()
    assert lines[0] == "sh"
    assert sorted(line.split("=", 1)[0] for line in lines[1:]) == ["PATH", "PWD"]


def test_a_command_not_on_the_path_fails_like_a_missing_executable(tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    # Busybox has a `date` of its own; it must not stand in for the image's.
    missing = through_the_gate(tmp_path / "gate", ["date"], path=str(empty))
    assert missing.returncode == 127
    assert missing.stdout == ""
    assert "date: not found on PATH" in missing.stderr


@pytest.mark.docker
def test_a_container_waiting_at_the_gate_stops_at_once_on_sigterm(
    tmp_path: Path, docker_client: docker.DockerClient, base_image: str
) -> None:
    # PID 1 without a handler ignores SIGTERM: without the gate's trap this stop would wait out
    # its timeout and end in SIGKILL (137).
    gate = make_gate(tmp_path, STATIC_BUSYBOX)
    entrypoint, command = gated_command(["sleep", "300"])
    container = docker_client.containers.run(
        base_image,
        command=command,
        entrypoint=entrypoint,
        volumes={str(gate): {"bind": GATE_MOUNT, "mode": "ro"}},
        labels={"inference-server.test": "container-gate"},
        detach=True,
    )
    try:
        container.stop(timeout=60)
        container.reload()
        assert container.attrs["State"]["ExitCode"] == 143
    finally:
        container.remove(force=True)
