"""The attack as found, on the embedded platform (private API, public API and a consumer as real
processes): odd zips are refused at the door or run, and a deep tree left in the work folder
stops no consumer, at start-up or in its periodic sweep."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests

from job_consumer.workspace import OWNER_FILE
from tests.faults.test_faults import all_terminal, status, submit
from tests.helpers import nest_new_folders, register_script_model, wait_until, zip_members
from tests.inference_server.test_zipsafe import build_zip, deep_folder_entries, raw_name_zip

pytestmark = [pytest.mark.docker, pytest.mark.slow]

COPY = "cp -R /input/. /output/\necho copied\n"

REFUSED_AT_UPLOAD = {
    "1,500 nested folders": (deep_folder_entries(1500), "65 levels deep; the limit is 64"),
    "file next to a folder of its name": (
        build_zip([("a", b"1"), ("a/b", b"2")]),
        "'a' would be both a file and a folder",
    ),
    "folder entry next to a file of its name": (
        build_zip([("c/", None), ("c", b"1")]),
        "'c' would be both a file and a folder",
    ),
    "same name twice after normalisation": (build_zip([("a/b", b"1"), ("a//b", b"2")]), "name the same file"),
    "name not UTF-8": (raw_name_zip(b"\xff\xfe.txt", utf8_flag=False), "not valid UTF-8"),
    "name over 255 bytes": (build_zip([("n" * 256, b"x")]), "has a name of 256 bytes"),
}

ODD_BUT_VALID_FILES = {
    "résumé.txt": b"unflagged UTF-8 name",
    "a/b.txt": b"folder entry after its file",
    "n" * 255: b"name at the limit",
    "/".join(["d"] * 63 + ["bottom.txt"]): b"64 levels",
}


def odd_but_valid_zip() -> bytes:
    """Every odd-but-valid kind in one zip, "résumé.txt" without the zip UTF-8 flag (as many
    archivers write it): an ASCII stand-in of the same length, patched to the raw bytes."""
    stand_in = "N" * len("résumé.txt".encode())
    deep = "/".join(["d"] * 63 + ["bottom.txt"])
    data = build_zip(
        [
            ("./a/b.txt", ODD_BUT_VALID_FILES["a/b.txt"]),
            ("a/", None),
            ("empty//", None),
            ("n" * 255, ODD_BUT_VALID_FILES["n" * 255]),
            (deep, ODD_BUT_VALID_FILES[deep]),
            (stand_in, ODD_BUT_VALID_FILES["résumé.txt"]),
        ]
    )
    assert data.count(stand_in.encode()) == 2
    return data.replace(stand_in.encode(), "résumé.txt".encode())


def upload(platform, model: str, data: bytes) -> requests.Response:
    return requests.post(
        f"{platform.public_url}/api/tasks/",
        params={"model_human_readable_id": model},
        files={"zip_file": ("in.zip", data, "application/zip")},
        timeout=60,
    )


def stored_blobs(platform) -> list[Path]:
    blobs = platform.data_dir / "blobs"
    return sorted(p for p in blobs.rglob("*") if p.is_file()) if blobs.exists() else []


def plant_deep_tree(folder: Path, owner: str, levels: int = 1500) -> None:
    """A work folder as a consumer that died mid-task leaves it: a model's 1,500-level tree."""
    (folder / "output").mkdir(parents=True)
    (folder / OWNER_FILE).write_text(owner)
    os.close(nest_new_folders(folder / "output", levels))


def test_hostile_zips_are_refused_odd_ones_run_and_deep_leftovers_stop_no_consumer(
    platform_factory, test_images
):
    platform = platform_factory(consumers=1, IS_CLEANUP_INTERVAL_S="1")
    register_script_model(platform, "copy", COPY)
    consumer = platform.processes["consumer-0"]

    # Refused at the door, with the reason, and nothing stored.
    for case, (data, detail) in REFUSED_AT_UPLOAD.items():
        before = stored_blobs(platform)
        response = upload(platform, "copy", data)
        assert response.status_code == 400, f"{case}: {response.status_code} {response.text}"
        assert detail in response.json()["detail"], case
        assert stored_blobs(platform) == before, case

    # Odd but meaning one tree without doubt: runs, and comes back with the same names.
    response = upload(platform, "copy", odd_but_valid_zip())
    assert response.status_code in (200, 201), response.text
    odd_uid = response.json()
    assert stored_blobs(platform), "an accepted zip is stored: the checks above looked in the right place"
    final = wait_until(lambda: all_terminal(platform, [odd_uid]), 90, "the odd zip's task to end")[odd_uid]
    assert final["status"] == "finished", final
    output = requests.get(f"{platform.public_url}/api/tasks/{odd_uid}", timeout=60)
    assert zip_members(output.content) == ODD_BUT_VALID_FILES
    consumer_id = final["consumer_id"]

    # A deep tree appears in the work folder while the consumer runs: its sweep removes it.
    work = platform.data_dir / "work"
    swept = work / "sweptleftover000001-a1-00000000"
    plant_deep_tree(swept, consumer_id)
    wait_until(lambda: not swept.exists(), 60, "the periodic sweep to remove the deep tree")
    assert consumer.running

    # Restart on the same work folder with a deep leftover: it starts, removes it, serves.
    consumer.stop()
    left = work / "crashleftover000001-a1-00000000"
    plant_deep_tree(left, consumer_id)
    platform.restart("consumer-0")
    uid = submit(platform, "copy", {"after.txt": b"still serving"})
    final = wait_until(lambda: all_terminal(platform, [uid]), 90, "the next task to end")[uid]
    assert final["status"] == "finished", final
    assert not left.exists()
    assert consumer.running and consumer.restarts == 1
    assert status(platform, uid)["attempts"] == 1
    assert "RecursionError" not in consumer.log_tail(400)
