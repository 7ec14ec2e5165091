"""A 1 GiB input up through the public API, a 1 GiB output down, and every service's peak RSS."""

from __future__ import annotations

import hashlib
import logging
import os
import statistics
import time
import zipfile
from pathlib import Path
from typing import Any

from bench.common import (
    MB,
    MIB,
    PASSTHROUGH,
    BenchContext,
    BenchPlatform,
    free_disk_gib,
    write_random_stored_zip,
)
from inference_client import InferenceClient
from inference_client.client import multipart_file_body
from inference_server.contract import PrivateRoutes, TaskStatus

log = logging.getLogger("bench.bigfiles")


def _member_sha256(zip_path: Path, name: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with zipfile.ZipFile(zip_path) as archive, archive.open(name) as member:
        while block := member.read(4 * MIB):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _direct_upload_mb_s(bench_platform: BenchPlatform, input_zip: Path) -> float:
    headers, body = multipart_file_body(input_zip, field="zip_file", on_chunk=lambda _n: None)
    with bench_platform.private_client(timeout=900) as client:
        started = time.perf_counter()
        response = client.post(
            PrivateRoutes.TASKS,
            params={"model_human_readable_id": PASSTHROUGH},
            headers=headers,
            content=body,
        )
        seconds = time.perf_counter() - started
        response.raise_for_status()
        client.delete(PrivateRoutes.TASK.format(uid=response.json()["uid"])).raise_for_status()
    return input_zip.stat().st_size / MB / seconds


def _disk_copy_mb_s(source: Path, dest: Path, *, durable: bool = False) -> float:
    """Read + sha256 + write of `source`; `durable`: and fsync, as the platform's blob store does
    before a blob counts (without it the copy may stay in the page cache)."""
    digest = hashlib.sha256()
    os.sync()  # no writeback of the uploads before it in its time
    started = time.perf_counter()
    with source.open("rb") as reader, dest.open("wb") as writer:
        while block := reader.read(MIB):
            digest.update(block)
            writer.write(block)
        writer.flush()
        if durable:
            os.fsync(writer.fileno())
    seconds = time.perf_counter() - started
    dest.unlink()
    return source.stat().st_size / MB / seconds


def run_bigfiles(ctx: BenchContext, size: int, reps: int) -> dict[str, Any]:
    phase_dir = ctx.work_dir / "bigfiles"
    phase_dir.mkdir(parents=True, exist_ok=True)
    # input + stored blobs + consumer work dir (zip, unpacked, output, output zip) + output blob + download
    needed_gib = (size * (reps + 8)) / 1024**3 + 1
    if free_disk_gib(phase_dir) < needed_gib:
        raise RuntimeError(f"big-file phase needs about {needed_gib:.0f} GiB free under {phase_dir}")
    input_zip = phase_dir / "input.zip"
    generated = time.perf_counter()
    input_sha = write_random_stored_zip(input_zip, size)
    log.info("[bigfiles] %d MiB input zip written in %.1fs", size // MIB, time.perf_counter() - generated)
    zip_bytes = input_zip.stat().st_size

    # No consumer yet: the repeated uploads must not each run 1 GiB through a container.
    with BenchPlatform(ctx, "bigfiles", consumers=0) as bench_platform:
        idle_rss = bench_platform.rss_mb()
        key = bench_platform.operator_key
        with InferenceClient(bench_platform.public_url, token=key, timeout=900) as client:
            upload_s: list[float] = []
            uids: list[str] = []
            for _ in range(reps):
                started = time.perf_counter()
                uids.append(client.submit(PASSTHROUGH, input_zip))
                upload_s.append(time.perf_counter() - started)
                log.info("[bigfiles] upload %.1f MB/s", zip_bytes / MB / upload_s[-1])
            uid, extra = uids[0], uids[1:]
            for other in extra:
                client.delete(other)
            # Attribution: the same upload straight to the private API (no public relay), and
            # what this disk does for a plain read + sha256 + write of the file (the ceiling).
            direct_mb_s = _direct_upload_mb_s(bench_platform, input_zip)
            disk_mb_s = _disk_copy_mb_s(input_zip, phase_dir / "copy.bin")
            durable_disk_mb_s = _disk_copy_mb_s(input_zip, phase_dir / "copy.bin", durable=True)
            rss_after_uploads = bench_platform.rss_mb()

            # No waiting for it to listen: it takes the queued task at once and stops listening.
            bench_platform.add_consumers(1, wait=False)
            started = time.perf_counter()
            task = client.wait(uid, poll_interval=0.5, timeout=1800)
            processing_s = time.perf_counter() - started
            if task.status != TaskStatus.FINISHED:
                raise RuntimeError(f"the big task ended {task.status}: {task.error}")

            download_s: list[float] = []
            out = phase_dir / "output.zip"
            verified: bool | None = None
            for rep in range(reps):
                started = time.perf_counter()
                client.download(uid, out)
                download_s.append(time.perf_counter() - started)
                log.info("[bigfiles] download %.1f MB/s", out.stat().st_size / MB / download_s[-1])
                if rep == 0:
                    out_size, out_sha = _member_sha256(out, "data.bin")
                    verified = out_size == size and out_sha == input_sha
                output_bytes = out.stat().st_size
                out.unlink()
        rss = bench_platform.rss_mb()
    input_zip.unlink()

    upload_mb_s = [zip_bytes / MB / seconds for seconds in upload_s]
    download_mb_s = [output_bytes / MB / seconds for seconds in download_s]
    return {
        "file_bytes": size,
        "input_zip_bytes": zip_bytes,
        "output_zip_bytes": output_bytes,
        "repetitions": reps,
        "upload_mb_s": statistics.median(upload_mb_s),
        "upload_mb_s_each": upload_mb_s,
        "download_mb_s": statistics.median(download_mb_s),
        "download_mb_s_each": download_mb_s,
        "upload_direct_to_private_api_mb_s": direct_mb_s,
        "disk_read_sha256_write_mb_s": disk_mb_s,
        "disk_read_sha256_write_fsync_mb_s": durable_disk_mb_s,
        "task_processing_s": processing_s,
        "output_matches_input": verified,
        "idle_rss_mb": idle_rss,
        "rss_after_uploads_mb": rss_after_uploads,
        "peak_rss_mb": rss,
    }
