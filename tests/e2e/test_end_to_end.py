"""The whole job, for real: user -> public API -> private API -> RabbitMQ -> consumer -> container.

The client side uses `requests` exactly as an InferenceServer v1.2 client does, so these tests
also prove that existing clients keep working unchanged.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from local_platform.examples import register_model
from models_examples.catalog import get_example
from tests.helpers import make_zip, register_script_model, wait_until, zip_members
from tests.images import FAIL, SLEEP
from tests.platform_fixtures import register_examples_on

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def submit(base_url: str, model: str, zip_bytes: bytes) -> str:
    response = requests.post(
        f"{base_url}/api/tasks/",
        params={"model_human_readable_id": model},
        files={"zip_file": ("input.zip", zip_bytes, "application/zip")},
        timeout=60,
    )
    assert response.status_code in (200, 201), response.text
    uid = json.loads(response.content)
    assert isinstance(uid, str)
    return uid


def poll_until_done(base_url: str, uid: str, timeout: float = 120) -> requests.Response:
    """Poll as a v1.2 client does; returns the first answer that is not 551 (pending)."""
    seen: list[int] = []

    def answer() -> list[requests.Response]:
        # A list, because a Response with an error code is itself falsy.
        response = requests.get(f"{base_url}/api/tasks/{uid}", timeout=60)
        seen.append(response.status_code)
        return [] if response.status_code == 551 else [response]

    (response,) = wait_until(answer, timeout, f"task {uid} to leave pending")
    assert set(seen[:-1]) <= {551}, f"unexpected codes while pending: {seen}"
    return response


def status_of(base_url: str, uid: str) -> dict:
    response = requests.get(f"{base_url}/api/tasks/{uid}/status", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def register_image(platform, human_readable_id: str, image: str) -> None:
    response = requests.post(
        f"{platform.public_url}/api/models/",
        params={
            "container_tag": image,
            "human_readable_id": human_readable_id,
            "description": "test image",
            "model_available": "false",
            "use_gpu": "false",
        },
        timeout=60,
    )
    assert response.status_code in (200, 201), response.text


def stored_rows(platform, table: str) -> int:
    with sqlite3.connect(platform.data_dir / "inference.db") as db:
        return db.execute(f"select count(*) from {table}").fetchone()[0]


def blob_files(platform) -> list[Path]:
    root = platform.data_dir / "blobs"
    return [p for p in root.rglob("*") if p.is_file() and ".tmp" not in p.parts] if root.exists() else []


def test_nested_folders_come_back_byte_for_byte(platform_factory, example_images):
    platform = platform_factory(consumers=1)
    register_examples_on(platform)
    files = {
        "top.bin": os.urandom(200_000),
        "a/b/c/deep.txt": b"deep inside\n",
        "scans/patient 01/t1 ünïcode.nii": os.urandom(5_000),
        "empty.txt": b"",
        "/".join(["level"] * 40) + "/leaf.txt": b"forty folders down",
    }
    uid = submit(platform.public_url, "passthrough", make_zip(files))
    response = poll_until_done(platform.public_url, uid)
    assert response.status_code == 200, response.text
    assert zip_members(response.content) == files
    status = status_of(platform.public_url, uid)
    assert status["status"] == "finished"
    assert status["output_present"] is True


def test_each_v12_status_code_is_reached(platform_factory, test_images, tmp_path):
    platform = platform_factory(consumers=1)
    base = platform.public_url
    register_image(platform, "sleeper", SLEEP)
    register_image(platform, "failer", FAIL)
    register_script_model(platform, "copier", "cp -r /input/. /output/ && echo copied\n")

    # 554: a uid nobody ever issued.
    assert requests.get(f"{base}/api/tasks/{'x' * 32}", timeout=30).status_code == 554

    # 551 while the model runs; DELETE cancels it and the task is then 554.
    sleeping = submit(base, "sleeper", make_zip({"in.txt": b"1"}))
    assert requests.get(f"{base}/api/tasks/{sleeping}", timeout=30).status_code == 551
    wait_until(lambda: status_of(base, sleeping)["status"] == "running", 60, "the sleeper to start")
    assert requests.get(f"{base}/api/tasks/{sleeping}", timeout=30).status_code == 551
    deleted = requests.delete(f"{base}/api/tasks/{sleeping}", timeout=30)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["uid"] == sleeping
    assert requests.get(f"{base}/api/tasks/{sleeping}", timeout=30).status_code == 554

    # 552 for a model that exits non-zero, with its log kept.
    failing = submit(base, "failer", make_zip({"in.txt": b"1"}))
    assert poll_until_done(base, failing).status_code == 552
    failed = status_of(base, failing)
    assert failed["status"] == "failed"
    assert failed["exit_code"] == 3
    assert failed["failure"] == "model_exit_code"  # decided by the consumer's verdict, kept
    assert "synthetic failure" in failed["error"]
    logs = requests.get(f"{base}/api/tasks/{failing}/logs", timeout=30)
    assert logs.status_code == 200
    assert "working on it" in logs.text and "fatal: synthetic failure" in logs.text

    # 553: the task finished but its output zip is gone from storage (a lost disk, a manual purge).
    finished = submit(base, "copier", make_zip({"in.txt": b"1"}))
    assert poll_until_done(base, finished).status_code == 200
    with sqlite3.connect(platform.data_dir / "inference.db") as db:
        (output_key,) = db.execute("select output_blob_key from tasks where uid = ?", (finished,)).fetchone()
    (platform.data_dir / "blobs" / output_key).unlink()
    missing = requests.get(f"{base}/api/tasks/{finished}", timeout=30)
    assert missing.status_code == 553
    assert missing.json()["detail"]


def test_model_zip_is_visible_under_model(platform_factory, example_images):
    platform = platform_factory(consumers=1)
    register_model(platform.private_url, platform.service_token, get_example("weights-reader"))
    uid = submit(platform.public_url, "weights-reader", make_zip({"set/values.txt": b"1 2\n4\n"}))
    response = poll_until_done(platform.public_url, uid)
    assert response.status_code == 200, response.text
    outputs = zip_members(response.content)
    # weights.json in the model zip says scale 2.5, offset -1.0.
    assert [float(x) for x in outputs["set/values.txt"].split()] == [1.5, 4.0, 9.0]
    assert json.loads(outputs["summary.json"])["weights"]["scale"] == 2.5


def test_two_consumers_run_two_tasks_at_the_same_time(platform_factory, test_images, tmp_path):
    platform = platform_factory(consumers=2)
    register_script_model(
        platform,
        "slow-copy",
        "date +%s.%N > /output/start\nsleep 4\ndate +%s.%N > /output/end\nhostname > /output/host\n",
    )
    uids = [submit(platform.public_url, "slow-copy", make_zip({"n.txt": str(i).encode()})) for i in range(2)]
    windows = []
    consumers = set()
    for uid in uids:
        response = poll_until_done(platform.public_url, uid)
        assert response.status_code == 200, response.text
        outputs = zip_members(response.content)
        windows.append((float(outputs["start"]), float(outputs["end"])))
        consumers.add(status_of(platform.public_url, uid)["consumer_id"])
    (start_a, end_a), (start_b, end_b) = windows
    assert start_a < end_b and start_b < end_a, f"the two runs did not overlap: {windows}"
    assert len(consumers) == 2


def test_cli_submits_a_folder_waits_and_writes_the_output(platform_factory, example_images, tmp_path):
    platform = platform_factory(consumers=1)
    register_examples_on(platform)
    source = tmp_path / "scans"
    (source / "series 1").mkdir(parents=True)
    (source / "series 1" / "image.dat").write_bytes(b"\x00\x01 image bytes")
    (source / "notes.txt").write_text("hello")
    out = tmp_path / "result"
    infer = Path(sys.executable).with_name("infer")
    completed = subprocess.run(
        [
            str(infer),
            "--url",
            platform.public_url,
            "submit",
            "passthrough",
            str(source),
            "--wait",
            "-o",
            f"{out}/",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, completed.stderr
    assert (out / "series 1" / "image.dat").read_bytes() == b"\x00\x01 image bytes"
    assert (out / "notes.txt").read_text() == "hello"

    unknown = subprocess.run(
        [str(infer), "--url", platform.public_url, "submit", "no-such-model", str(source)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode != 0
    assert unknown.stderr.strip().count("\n") == 0, unknown.stderr
    assert "no-such-model" in unknown.stderr


def test_bad_input_gets_a_clear_4xx_and_stores_nothing(platform_factory, example_images):
    platform = platform_factory(consumers=0)
    register_examples_on(platform)
    base = f"{platform.public_url}/api/tasks/"
    cases = [
        (
            "not a zip",
            {"model_human_readable_id": "passthrough"},
            {"zip_file": ("in.zip", b"this is not a zip", "application/zip")},
            400,
        ),
        (
            "unknown model",
            {"model_human_readable_id": "nope"},
            {"zip_file": ("in.zip", make_zip({"a": b"1"}), "application/zip")},
            404,
        ),
        (
            "missing file field",
            {"model_human_readable_id": "passthrough"},
            {"other": ("in.zip", make_zip({"a": b"1"}), "application/zip")},
            422,
        ),
        (
            "malformed priority",
            {"model_human_readable_id": "passthrough", "priority": "high"},
            {"zip_file": ("in.zip", make_zip({"a": b"1"}), "application/zip")},
            422,
        ),
        (
            "missing model parameter",
            {},
            {"zip_file": ("in.zip", make_zip({"a": b"1"}), "application/zip")},
            422,
        ),
    ]
    blobs_before = blob_files(platform)
    for name, params, files, expected in cases:
        response = requests.post(base, params=params, files=files, timeout=30)
        assert response.status_code == expected, f"{name}: {response.status_code} {response.text}"
        assert response.json()["detail"], name
    assert stored_rows(platform, "tasks") == 0
    assert blob_files(platform) == blobs_before


def test_brain_mask_example_segments_a_synthetic_scan(platform_factory, example_images, tmp_path):
    nibabel = pytest.importorskip("nibabel")
    import numpy as np

    volume = np.zeros((32, 32, 32), dtype=np.float32)
    grid = np.indices(volume.shape)
    inside = ((grid - 16) ** 2).sum(axis=0) < 10**2
    rng = np.random.default_rng(0)
    volume[inside] = 800 + rng.normal(0, 20, inside.sum())
    volume[~inside] = rng.normal(10, 5, (~inside).sum())
    image_path = tmp_path / "head.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), image_path)

    platform = platform_factory(consumers=1)
    register_examples_on(platform)
    uid = submit(
        platform.public_url, "brain-mask", make_zip({"subject1/head.nii.gz": image_path.read_bytes()})
    )
    response = poll_until_done(platform.public_url, uid, timeout=180)
    assert response.status_code == 200, response.text
    outputs = zip_members(response.content)
    mask_path = tmp_path / "mask.nii.gz"
    mask_path.write_bytes(outputs["subject1/head_mask.nii.gz"])
    mask = np.asarray(nibabel.load(mask_path).dataobj) > 0
    agreement = (mask == inside).mean()
    assert agreement > 0.98, agreement
    (entry,) = json.loads(outputs["report.json"])["images"]
    assert entry["input"] == "subject1/head.nii.gz"
    assert entry["voxels_in_mask"] == int(mask.sum())
    # 2 mm isotropic voxels: 8 mm3 each.
    assert entry["mask_volume_ml"] == pytest.approx(mask.sum() * 8 / 1000)


def test_a_model_whose_image_is_missing_fails_as_image_missing(platform_factory, tmp_path):
    """The engine has no such image: not the model's fault, and retrying it would not help."""
    platform = platform_factory(consumers=1)
    register_image(platform, "ghost", "inference-server/no-such-image:never-built")
    uid = submit(platform.public_url, "ghost", make_zip({"in.txt": b"1"}))
    assert poll_until_done(platform.public_url, uid).status_code == 552
    failed = status_of(platform.public_url, uid)
    assert (failed["status"], failed["failure"]) == ("failed", "image_missing")
    assert "is not on this engine" in failed["error"]
    assert failed["attempts"] == 1  # not retried: another try would not find it either
