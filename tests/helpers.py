"""Small helpers shared by every test package."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def make_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist() if not name.endswith("/")}


def wait_until(
    condition: Callable[[], T], timeout: float = 10.0, what: str = "a condition", interval: float = 0.1
) -> T:
    """Poll `condition` until it returns something truthy; fail the test with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def register_model_directly(
    platform,
    human_readable_id: str,
    container_tag: str,
    model_zip: bytes | None = None,
    **limits: str | int | float | bool,
) -> dict:
    """Register a model on a LocalPlatform's private API as an operator tool would."""
    import requests

    params = {
        "container_tag": container_tag,
        "human_readable_id": human_readable_id,
        "description": f"test model {human_readable_id}",
        "model_available": str(model_zip is not None).lower(),
        "use_gpu": "false",
        **{
            key: str(value).lower() if isinstance(value, bool) else str(value)
            for key, value in limits.items()
        },
    }
    files = {"zip_file": ("model.zip", model_zip, "application/zip")} if model_zip is not None else None
    response = requests.post(
        f"{platform.private_url}/models",
        params=params,
        files=files,
        headers={"X-Service-Token": platform.service_token},
        timeout=60,
    )
    assert response.status_code == 201, response.text
    return response.json()


def register_script_model(platform, human_readable_id: str, script: str, **limits) -> dict:
    """A model whose behaviour is the shell script in its model zip, run as /model/run.sh."""
    from tests.images import SCRIPT

    return register_model_directly(
        platform, human_readable_id, SCRIPT, make_zip({"run.sh": script.encode()}), **limits
    )
