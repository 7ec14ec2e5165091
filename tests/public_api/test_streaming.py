"""200 MB through the relay both ways while the public API process's memory stays flat.

This checks that bodies really stream: a relay that buffered either the upload or the download
would grow by at least the zip's size.
"""

from __future__ import annotations

import filecmp
import hashlib
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inference_client.client import multipart_file_body
from inference_server.contract import PublicRoutes, TaskStatus
from local_platform.ports import free_port
from tests.public_api.stack import SERVICE_TOKEN, ConsumerDriver, PrivateStack, register_model

SIZE = 200 * 1024**2
MAX_GROWTH = 100 * 1024**2


def _status_field(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} missing from /proc/{pid}/status")


class PeakRss:
    """Samples a process's resident memory in the background and remembers the highest."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_field(self.pid, "VmRSS"))
            self._stop.wait(0.02)

    def __enter__(self) -> PeakRss:
        # Reset the kernel's own high-water mark too, so short spikes between samples count.
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_field(self.pid, "VmHWM"))


@pytest.fixture(scope="module")
def big_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 200 MB zip that passes the ratio check: stored, not compressed."""
    path = tmp_path_factory.mktemp("big") / "big.zip"
    block = hashlib.sha256(b"seed").digest() * (1024 * 1024 // 32)
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive,
        archive.open("volume.bin", "w", force_zip64=True) as member,
    ):
        for _ in range(SIZE // len(block)):
            member.write(block)
    return path


@pytest.fixture(scope="module")
def public_process(private_api: PrivateStack) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {
        **os.environ,
        "IS_PRIVATE_API_URL": private_api.url,
        "IS_SERVICE_TOKEN": SERVICE_TOKEN,
        # About memory while streaming, not access (see stack.ANONYMOUS_ALLOWED).
        "IS_ANONYMOUS_TASKS": "true",
        "IS_ANONYMOUS_MODELS": "true",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "public_api",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            assert process.poll() is None, "public API process exited during start-up"
            try:
                if httpx.get(url + PublicRoutes.HEALTH_LIVE, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "public API process did not start in 30 s"
            time.sleep(0.1)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_200mb_upload_and_download_keep_memory_bounded(
    public_process: tuple[str, int], big_zip: Path, private_api: PrivateStack, tmp_path: Path
) -> None:
    url, pid = public_process
    model_id = register_model(url)
    warm_up = httpx.get(url + PublicRoutes.MODELS)  # import and initialise everything first
    assert warm_up.status_code == 200
    baseline = _status_field(pid, "VmRSS")

    with PeakRss(pid) as upload_peak:
        headers, body = multipart_file_body(big_zip, field="zip_file", on_chunk=lambda _n: None)
        response = httpx.post(
            url + PublicRoutes.TASKS,
            params={"model_human_readable_id": model_id},
            headers=headers,
            content=body,
            timeout=300,
        )
    assert response.status_code == 200, response.text
    uid = response.json()
    assert upload_peak.peak - baseline < MAX_GROWTH, (
        f"upload grew RSS by {(upload_peak.peak - baseline) >> 20} MB"
    )

    consumer = ConsumerDriver(private_api.url)
    try:
        task = consumer.run_to_finish(uid, big_zip)
    finally:
        consumer.close()
    assert task.status == TaskStatus.FINISHED

    downloaded = tmp_path / "downloaded.zip"
    baseline = _status_field(pid, "VmRSS")
    with (
        PeakRss(pid) as download_peak,
        httpx.stream("GET", url + PublicRoutes.TASK.format(uid=uid), timeout=300) as r,
    ):
        assert r.status_code == 200
        with downloaded.open("wb") as sink:
            for chunk in r.iter_raw():
                sink.write(chunk)
    growth = download_peak.peak - baseline
    assert growth < MAX_GROWTH, f"download grew RSS by {growth >> 20} MB"
    assert downloaded.stat().st_size == big_zip.stat().st_size
    assert filecmp.cmp(downloaded, big_zip, shallow=False)
