"""A container started ahead of its task, held at a gate until the task is in its /input.

Creating a container ahead saves the create, but the engine's start (runtime, namespaces,
cgroups, mounts) is most of what a bare `docker run` of a small model costs. So a prepared
container is also started ahead: its command is put behind a gate, a static shell (Debian's
busybox-static, IS_GATE_SHELL) bound read-only into the container, that waits on a FIFO and,
once the consumer writes GATE_WORD into it, replaces itself with the image's own entrypoint and
command (`exec`). From then on the container runs exactly what a container created for the task
would run: same image, options, limits, user and working directory; the model is PID 1 as usual.

The gate is a folder of the slot, bound at GATE_MOUNT: the FIFO, which only the consumer can
write (the container sees it read-only), and a copy of the shell. A reader that sees anything
but GATE_WORD (an opener that closed at once, say) waits again, so only the consumer's word
opens it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

GATE_MOUNT = "/.inference-server-gate"
GATE_FOLDER = "gate"
FIFO_NAME = "go"
SHELL_NAME = "sh"  # busybox picks its applet by this name
GATE_WORD = "go"
# The consumer writes; the container's unprivileged user (an "other" here) reads.
FIFO_MODE = 0o604
SHELL_MODE = 0o555
# Blocks in `read` on the FIFO until a writer comes; anything but the word is ignored. As the
# container's PID 1 the shell would ignore SIGTERM (the kernel drops signals PID 1 has no handler
# for), so a `docker stop` of a waiting container would last its whole timeout: the trap ends it at
# once, and `exec` gives the model the default handling back. Once the word has come, it
# runs the image's command as the engine would: the program found on the image's PATH (busybox
# would otherwise run an applet of its own by that name, its `sh` or `date` for the image's),
# with the same argv[0], and with no SHLVL of its own left in the environment.
GATE_SCRIPT = "\n".join(
    [
        "trap 'exit 143' TERM",
        f'until read -r word < {GATE_MOUNT}/{FIFO_NAME} && [ "$word" = {GATE_WORD} ]; do :; done',
        "unset word SHLVL",
        "name=$1; prog=$1; shift",
        "case $prog in */*) ;; *)",
        '    found=""; IFS=:',
        "    for dir in $PATH; do",
        '        if [ -z "$found" ] && [ -f "$dir/$prog" ] && [ -x "$dir/$prog" ]; then found=$dir/$prog; fi',
        "    done",
        "    unset IFS",
        '    [ -n "$found" ] || { echo "$prog: not found on PATH" >&2; exit 127; }',
        "    prog=$found;;",
        "esac",
        'exec -a "$name" "$prog" "$@"',
    ]
)
# How long opening the gate waits for the container to be at it (it normally is, long since).
OPEN_WAIT_S = 2.0
OPEN_RETRY_S = 0.005


def usable_shell(path: Path | None) -> Path | None:
    """`path` when it is an executable, statically linked file (an image may have no C library
    to load a dynamic one with); else None, and containers are only created ahead."""
    if path is None:
        return None
    try:
        with path.open("rb") as binary:
            header = binary.read(64)
            if header[:4] != b"\x7fELF" or not os.access(path, os.X_OK):
                return None
            # A dynamically linked executable names its loader in a PT_INTERP program header.
            order: Literal["little", "big"] = "little" if header[5] == 1 else "big"
            wide = header[4] == 2  # ELFCLASS64
            phoff = int.from_bytes(header[32:40] if wide else header[28:32], order)
            entry_size = int.from_bytes(header[54:56] if wide else header[42:44], order)
            entries = int.from_bytes(header[56:58] if wide else header[44:46], order)
            binary.seek(phoff)
            table = binary.read(entry_size * entries)
    except OSError:
        return None
    for index in range(entries):
        kind = int.from_bytes(table[index * entry_size : index * entry_size + 4], order)
        if kind == 3:  # PT_INTERP
            log.info("%s is dynamically linked: containers are created ahead, not started", path)
            return None
    return path


def gated_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """(entrypoint, command) that wait at the gate, then run `argv` (the image's own)."""
    return [f"{GATE_MOUNT}/{SHELL_NAME}"], ["-c", GATE_SCRIPT, "inference-server-gate", *argv]


def image_argv(config: dict[str, object]) -> list[str] | None:
    """What a container of an image with this `Config` runs: its entrypoint, then its command.
    None when it names nothing (the engine would refuse to create it)."""
    argv = [*_strings(config.get("Entrypoint")), *_strings(config.get("Cmd"))]
    return argv or None


def _strings(value: object) -> list[str]:
    return [str(part) for part in value] if isinstance(value, list) else []


def make_gate(slot_root: Path, shell: Path) -> Path:
    """The slot's gate folder (the FIFO and the shell), to be bound read-only at GATE_MOUNT."""
    gate = slot_root / GATE_FOLDER
    gate.mkdir(mode=0o755)
    os.chmod(gate, 0o755)  # whatever the umask: the container's user lists it
    fifo = gate / FIFO_NAME
    os.mkfifo(fifo, FIFO_MODE)
    os.chmod(fifo, FIFO_MODE)
    # A copy (2 MB), never a hard link: that would share the system file's inode and its mode.
    shutil.copyfile(shell, gate / SHELL_NAME)
    os.chmod(gate / SHELL_NAME, SHELL_MODE)
    return gate


def open_gate(gate: Path, wait_s: float = OPEN_WAIT_S) -> bool:
    """Let the container behind `gate` run its command; False when nothing waits at the gate
    within `wait_s` (the container is gone or never got there)."""
    fifo = gate / FIFO_NAME
    deadline = time.monotonic() + wait_s
    while True:
        try:
            # Non-blocking: a FIFO opens for writing only while a reader has it open.
            descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() >= deadline:
                log.warning("gate %s could not be opened: %s", gate, exc)
                return False
            time.sleep(OPEN_RETRY_S)  # the reader is between two opens, or still starting
            continue
        try:
            os.write(descriptor, f"{GATE_WORD}\n".encode())
        except OSError as exc:
            log.warning("gate %s could not be opened: %s", gate, exc)
            return False
        finally:
            os.close(descriptor)
        return True
