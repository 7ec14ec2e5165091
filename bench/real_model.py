"""A real model through the platform against the same container run bare: `real_model_ratio`.

The brain-mask example (models_examples/brain_mask) on one 128^3 NIfTI volume, made here the same
way every time (seeded noise, a bright ellipsoid "brain" with a dark core). Platform side: the
dispatch phase's v1.2 client (submit, poll every 25 ms, download), with the result cache off so
every task really runs. Raw side: exactly the dispatch phase's (`docker run --rm` with the
consumer's options, the unzip and the zip included). Interleaved, starting side alternated.
"""

from __future__ import annotations

import gzip
import json
import logging
import statistics
import time
import zipfile
from pathlib import Path
from typing import Any

import docker
import httpx
import nibabel as nib
import numpy as np

from bench.common import BenchContext, BenchPlatform, RawRunner, summary, try_download_v12
from bench.dispatch import POLL_INTERVAL_S
from inference_server.contract import ZIP_MEDIA_TYPE, PublicRoutes, TaskSubmitFields
from local_platform.examples import register_model
from models_examples.catalog import build_example_images, get_example

log = logging.getLogger("bench.real_model")

BRAIN_MASK = "brain-mask"
VOLUME_SHAPE = (128, 128, 128)
VOLUME_SEED = 14


def synthetic_head(shape: tuple[int, int, int] = VOLUME_SHAPE) -> nib.Nifti1Image:
    """Seeded noise, a bright ellipsoid with a dark core inside, 1 mm voxels: the same every call."""
    rng = np.random.default_rng(VOLUME_SEED)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    centre = [size / 2 for size in shape]
    radii = [size * 0.35 for size in shape]
    volume = rng.normal(10, 3, shape).astype(np.float32)
    brain = sum(((axis - c) / r) ** 2 for axis, c, r in zip((z, y, x), centre, radii, strict=True)) < 1
    volume[brain] += 100
    core = tuple(slice(int(c) - 4, int(c) + 4) for c in centre)
    volume[core] = 5
    return nib.Nifti1Image(volume, np.eye(4))


def write_input_zip(path: Path) -> Path:
    """One `head.nii.gz` in a stored zip, as a user would send a scan; byte for byte the same each run
    (the gzip member carries no time stamp)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = path.with_name("head.nii")
    nib.save(synthetic_head(), plain)
    compressed = gzip.compress(plain.read_bytes(), compresslevel=6, mtime=0)
    plain.unlink()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(zipfile.ZipInfo("head.nii.gz", date_time=(2020, 1, 1, 0, 0, 0)), compressed)
    return path


def _submit_uncached(client: httpx.Client, input_zip: Path) -> str:
    with input_zip.open("rb") as handle:
        response = client.post(
            PublicRoutes.TASKS,
            params={"model_human_readable_id": BRAIN_MASK, TaskSubmitFields.CACHE_QUERY: "false"},
            files={TaskSubmitFields.ZIP_FILE: (input_zip.name, handle, ZIP_MEDIA_TYPE)},
        )
    if response.status_code not in (httpx.codes.OK, httpx.codes.CREATED):
        raise RuntimeError(f"submit answered {response.status_code}: {response.text[:300]}")
    uid = json.loads(response.content)
    assert isinstance(uid, str)
    return uid


def _platform_once(client: httpx.Client, input_zip: Path, out: Path) -> float:
    started = time.perf_counter()
    uid = _submit_uncached(client, input_zip)
    while not try_download_v12(client, uid, out):
        time.sleep(POLL_INTERVAL_S)
    elapsed = time.perf_counter() - started
    with zipfile.ZipFile(out) as archive:
        if "head_mask.nii.gz" not in archive.namelist():
            raise RuntimeError(f"task {uid}: no mask in the output: {archive.namelist()}")
    out.unlink()
    return elapsed


def run_real_model(ctx: BenchContext, reps: int) -> dict[str, Any]:
    phase_dir = ctx.work_dir / "real_model"
    input_zip = write_input_zip(phase_dir / "input.zip")
    example = get_example(BRAIN_MASK)
    docker_client = docker.from_env()
    try:
        build_example_images(docker_client, ctx.base_image, [example])
    finally:
        docker_client.close()
    with BenchPlatform(ctx, "real_model", consumers=1) as bench_platform:
        register_model(bench_platform.private_url, bench_platform.platform.service_token, example)
        raw = RawRunner(bench_platform.model(BRAIN_MASK), phase_dir / "raw")
        try:
            with httpx.Client(base_url=bench_platform.public_url, timeout=300) as client:
                # Warm-up, not counted: the image into the page cache, first-use paths in the services.
                raw.run(input_zip, use_cli=True)
                _platform_once(client, input_zip, phase_dir / "out.zip")
                platform_s: list[float] = []
                raw_s: list[float] = []
                for rep in range(reps):
                    order = ("raw", "platform") if rep % 2 == 0 else ("platform", "raw")
                    for side in order:
                        if side == "raw":
                            raw_s.append(raw.run(input_zip, use_cli=True).total_s)
                        else:
                            platform_s.append(_platform_once(client, input_zip, phase_dir / "out.zip"))
                    log.info(
                        "[real_model] rep %d: raw %.2f s, platform %.2f s", rep + 1, raw_s[-1], platform_s[-1]
                    )
        finally:
            raw.close()
        rss = bench_platform.rss_mb()
    platform_summary = summary(platform_s)
    raw_summary = summary(raw_s)
    return {
        "model": BRAIN_MASK,
        "input": f"one {'x'.join(str(size) for size in VOLUME_SHAPE)} float32 NIfTI (.nii.gz)",
        "input_zip_bytes": input_zip.stat().st_size,
        "repetitions": reps,
        "platform_s": platform_summary,
        "raw_docker_run_cli_s": raw_summary,
        "ratio_platform_over_raw_cli": platform_summary["median"] / raw_summary["median"],
        "ratios_each_rep": [p / r for p, r in zip(platform_s, raw_s, strict=True)],
        "paired_ratio_median": statistics.median(p / r for p, r in zip(platform_s, raw_s, strict=True)),
        "peak_rss_mb": rss,
    }
