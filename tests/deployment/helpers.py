"""Running the docker CLI and Compose from the deployment tests."""

from __future__ import annotations

import os
import subprocess

from tests.traefik.helpers import REPO_ROOT


def run(
    argv: list[str], *, env: dict[str, str] | None = None, timeout: float = 120.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Runs a command, keeping its output for the failure message."""
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


def base_process_env() -> dict[str, str]:
    """Only what the docker CLI needs: IS_* or image variables from the developer's shell must
    not leak into the deployment under test (they would override its own values)."""
    keep = (
        "PATH",
        "HOME",
        "DOCKER_HOST",
        "DOCKER_CONFIG",
        "DOCKER_CONTEXT",
        "DOCKER_CERT_PATH",
        "DOCKER_TLS_VERIFY",
    )
    return {name: os.environ[name] for name in keep if name in os.environ}
