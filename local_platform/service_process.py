"""One service as a child process: started, signalled, stopped, its log kept in a file."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _detach_and_die_with_parent() -> None:
    """Runs in the child: own process group (a terminal's Ctrl-C reaches only the launcher, which
    then stops the children in order), and SIGTERM if the launcher itself dies."""
    os.setsid()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class ServiceProcess:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        try:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_detach_and_die_with_parent,
            )
        finally:
            log_file.close()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def send(self, signum: int) -> None:
        if self.running:
            assert self.popen is not None
            self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        if self.popen is None:
            return None
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 20.0) -> None:
        if not self.running:
            return
        self.send(signal.SIGTERM)
        if self.wait(timeout) is None:
            log.warning("%s did not stop within %.0fs after SIGTERM; killing it", self.name, timeout)
            self.send(signal.SIGKILL)
            self.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""
