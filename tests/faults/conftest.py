"""A RabbitMQ node of the test's own, so a test can stop and restart the broker without touching
the shared one that the rest of the suite (and other sessions) use."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest

from local_platform.ports import free_port
from tests.helpers import wait_until


class PrivateBroker:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.node = f"is-fault-{root.name}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_PID_FILE": str(root / "node.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
        }

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            ["rabbitmqctl", "-n", self.node, *args],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=120,
        )

    def accepts_connections(self) -> bool:
        try:
            pika.BlockingConnection(pika.URLParameters(self.url + "?connection_attempts=1")).close()
        except pika.exceptions.AMQPError:
            return False
        return True

    def start(self) -> None:
        (self.root / "enabled_plugins").write_text("[].\n")
        rabbit = pwd.getpwnam("rabbitmq")
        for path in [self.root, self.root / "enabled_plugins"]:
            os.chown(path, rabbit.pw_uid, rabbit.pw_gid)
        subprocess.run(
            ["rabbitmq-server", "-detached"], env=self.env, check=True, timeout=60, capture_output=True
        )
        wait_until(self.accepts_connections, 120, f"RabbitMQ node {self.node}", interval=0.5)

    def stop_app(self) -> None:
        """The broker stops serving (connections drop), as in a restart; durable data stays on disk."""
        self._ctl("stop_app")

    def start_app(self) -> None:
        self._ctl("start_app")
        wait_until(self.accepts_connections, 60, f"RabbitMQ node {self.node} to come back", interval=0.2)

    def shutdown(self) -> None:
        subprocess.run(
            ["rabbitmqctl", "-n", self.node, "stop"], env=self.env, capture_output=True, timeout=120
        )


@pytest.fixture
def private_broker() -> Iterator[PrivateBroker]:
    root = Path(tempfile.mkdtemp(prefix="isrmq", dir="/tmp"))
    os.chmod(root, 0o755)
    broker = PrivateBroker(root)
    try:
        broker.start()
        yield broker
    finally:
        broker.shutdown()
        shutil.rmtree(root, ignore_errors=True)
