"""Small helpers shared by every test package: zips, waiting on a condition, an app served in a
thread, and registering a model through each interface a test can reach the platform by."""

from __future__ import annotations

import io
import os
import threading
import time
import zipfile
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import uvicorn

from inference_server.contract import SERVICE_TOKEN_HEADER, ZIP_MEDIA_TYPE, PrivateRoutes, PublicRoutes

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from local_platform.launcher import LocalPlatform

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


class ServerThread:
    """An ASGI app served by a real uvicorn in a background thread, on a port the kernel picks.

    For tests that need the app behind a socket (a real HTTP client, another service calling it)
    without a process of its own. Port 0 lets the kernel choose, so no other test can take the
    port between choosing and binding it; `url` is known once `start()` has returned.
    """

    def __init__(
        self, app: ASGIApp, *, name: str = "uvicorn", forwarded_allow_ips: str | None = None
    ) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="on",
            forwarded_allow_ips=forwarded_allow_ips,
        )
        self.name = name
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=name, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError(f"{self.name} has no address before start()")
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"{self.name} died during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not start within {timeout} s")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


# --- registering a model -------------------------------------------------------------------------
# One helper per interface: register_model_private for the private API (in-process or over HTTP),
# register_model_public for a running public API (the v1.2 route users and operators call).


def register_model_private(
    client: httpx.Client,
    human_readable_id: str,
    container_tag: str,
    *,
    model_zip: bytes | None = None,
    description: str | None = None,
    **params: Any,
) -> dict[str, Any]:
    """Register a model through the private API, as operator tools and the launcher do.

    `client` is either a FastAPI TestClient of the private app (the private API tests: no server,
    no socket) or an httpx.Client whose base URL is a running private API and whose headers carry
    the service token (the consumer, fault and end-to-end tests). `params` are the model's further
    query parameters (limits, switches); they override the defaults here. Asserts the 201.
    """
    query: dict[str, Any] = {
        "human_readable_id": human_readable_id,
        "container_tag": container_tag,
        "description": description if description is not None else f"test model {human_readable_id}",
        "model_available": model_zip is not None,
        "use_gpu": False,
        **params,
    }
    files = {"zip_file": ("model.zip", model_zip, ZIP_MEDIA_TYPE)} if model_zip is not None else None
    response = client.post(PrivateRoutes.MODELS, params=query, files=files)
    assert response.status_code == HTTPStatus.CREATED, response.text
    return response.json()


def register_model_public(
    client: httpx.Client,
    human_readable_id: str,
    container_tag: str,
    *,
    base_url: str = "",
    headers: dict[str, str] | None = None,
    description: str = "test model",
    check: bool = True,
) -> httpx.Response:
    """Register a model through a running public API (a uvicorn thread, `python -m public_api`, or
    Traefik's front door), by the v1.2 POST a client sends, without a model zip.

    `base_url` goes before the path when `client` has none of its own; `headers` carry the caller's
    API key. With `check` the v1.2 answer (200) is asserted; the permission tests turn it off to
    look at refusals. Returns the response (its JSON is the model).
    """
    response = client.post(
        base_url + PublicRoutes.MODELS,
        params={
            "container_tag": container_tag,
            "human_readable_id": human_readable_id,
            "description": description,
            "model_available": False,
            "use_gpu": False,
        },
        headers=headers,
    )
    if check:
        assert response.status_code == HTTPStatus.OK, response.text
    return response


def register_model_directly(
    platform: LocalPlatform,
    human_readable_id: str,
    container_tag: str,
    model_zip: bytes | None = None,
    **limits: str | int | float | bool,
) -> dict[str, Any]:
    """Register a model on a running LocalPlatform's private API (register_model_private over HTTP)."""
    with httpx.Client(
        base_url=platform.private_url, headers={SERVICE_TOKEN_HEADER: platform.service_token}, timeout=60
    ) as client:
        return register_model_private(client, human_readable_id, container_tag, model_zip=model_zip, **limits)


def register_script_model(
    platform: LocalPlatform, human_readable_id: str, script: str, **limits: str | int | float | bool
) -> dict[str, Any]:
    """A model whose behaviour is the shell script in its model zip, run as /model/run.sh."""
    from tests.images import SCRIPT

    return register_model_directly(
        platform, human_readable_id, SCRIPT, make_zip({"run.sh": script.encode()}), **limits
    )


def nest_new_folders(root: Path, levels: int, name: str = "d") -> int:
    """Make `levels` folders each inside the last under the existing `root`, through folder
    descriptors (a path would pass PATH_MAX long before the bottom); returns an open descriptor
    of the deepest one, which the caller closes."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir(name, dir_fd=fd)
            below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd
