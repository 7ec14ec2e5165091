"""Every bad submit or registration is a 4xx with a detail, and leaves no row and no file behind."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator

import pytest

from tests.private_api.helpers import (
    make_zip,
    register_model,
    row_counts,
    stored_files,
    submit,
    symlink_zip,
    zip_with_entry,
)

BOUNDARY = "test-boundary-7d1f"


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """Upload handling is the same whatever the database; the rollback paths that do differ
    per database are covered by the parametrised tests elsewhere, so these run on SQLite only."""
    return sqlite_url


def multipart_body(field: str, data: bytes, *, closing: bool = True) -> bytes:
    head = (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="input.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n"
    ).encode()
    return head + data + (f"\r\n--{BOUNDARY}--\r\n".encode() if closing else b"")


def in_chunks(data: bytes, size: int = 16 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def post_raw(client, body, **params):
    return client.post(
        "/tasks",
        params={"model_human_readable_id": "seg-model", **params},
        content=body,
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )


VALID = make_zip()

CASES = {
    "not a zip": (lambda c: submit(c, data=b"this is not a zip file" * 50), 400, "not a valid zip"),
    "truncated zip": (lambda c: submit(c, data=VALID[:-40]), 400, "zip"),
    "dot-dot entry": (
        lambda c: submit(c, data=zip_with_entry(zipfile.ZipInfo("../evil.txt"))),
        400,
        "escapes the archive folder",
    ),
    "absolute entry": (
        lambda c: submit(c, data=zip_with_entry(zipfile.ZipInfo("/etc/cron.d/evil"))),
        400,
        "absolute path",
    ),
    "symlink entry": (lambda c: submit(c, data=symlink_zip()), 400, "symbolic link"),
    "empty zip": (lambda c: submit(c, data=make_zip({})), 400, "empty"),
    "missing field": (
        lambda c: c.post(
            "/tasks",
            params={"model_human_readable_id": "seg-model"},
            files={"wrong_name": ("input.zip", VALID, "application/zip")},
        ),
        422,
        "zip_file",
    ),
    "no body": (lambda c: c.post("/tasks", params={"model_human_readable_id": "seg-model"}), 422, "zip_file"),
    "json body": (
        lambda c: c.post("/tasks", params={"model_human_readable_id": "seg-model"}, json={"zip_file": "x"}),
        422,
        "multipart/form-data",
    ),
    "two zip fields": (
        lambda c: c.post(
            "/tasks",
            params={"model_human_readable_id": "seg-model"},
            files=[("zip_file", ("a.zip", VALID)), ("zip_file", ("b.zip", VALID))],
        ),
        400,
        "more than one",
    ),
    "unclosed multipart": (
        lambda c: post_raw(c, multipart_body("zip_file", VALID, closing=False)),
        400,
        "ended",
    ),
    # 1.5 MB of zeros deflate to ~1.5 kB: a ratio near 1000, far past the default limit of 200.
    "zip bomb (compression ratio)": (
        lambda c: submit(c, data=make_zip({"zeros.bin": bytes(1_500_000)})),
        400,
        "expands",
    ),
    "too many files": (
        lambda c: submit(c, data=make_zip({f"f{i}.txt": b"" for i in range(1_001)})),
        400,
        "files; the limit is 1000",
    ),
    "unpacks past the total limit": (
        lambda c: submit(c, data=make_zip({f"part{i}.bin": b"a" * 900_000 for i in range(3)})),
        400,
        "unpacks to more than",
    ),
    "unknown model": (lambda c: submit(c, model="no-such-model"), 404, "no-such-model"),
    "malformed model id": (lambda c: submit(c, model="../etc"), 422, "model_human_readable_id"),
    "priority not a number": (lambda c: submit(c, priority="high"), 422, "priority"),
    "priority too high": (lambda c: submit(c, priority=10), 422, "priority"),
    "priority negative": (lambda c: submit(c, priority=-1), 422, "priority"),
    "too large (declared length)": (
        lambda c: submit(c, data=os.urandom(1_300_000)),
        413,
        "the upload (",
    ),
    "too large (found while streaming)": (lambda c: submit(c, data=os.urandom(200_000)), 413, "limit"),
    "too large (streamed, no length)": (
        lambda c: post_raw(c, in_chunks(multipart_body("zip_file", os.urandom(300_000)))),
        413,
        "limit",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_submit_is_refused_and_leaves_nothing(case, start_app, make_settings):
    # 100 kB limit: big enough for every valid zip here, small enough to cross on purpose.
    settings = make_settings(max_upload_bytes=100_000, zip_max_files=1_000, zip_max_total_bytes=2_000_000)
    client = start_app(settings)
    register_model(client)
    send, status, detail = CASES[case]

    response = send(client)

    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]
    assert row_counts(client) == (1, 0)
    assert stored_files(settings) == []


def test_valid_submit_after_refusals_still_works(start_app, make_settings):
    settings = make_settings(max_upload_bytes=100_000)
    client = start_app(settings)
    register_model(client)
    assert submit(client, data=b"junk").status_code == 400
    ok = submit(client, data=make_zip({"big.bin": os.urandom(90_000)}))
    assert ok.status_code == 201, ok.text
    assert len(stored_files(settings)) == 1


@pytest.mark.parametrize(
    ("params", "files", "status", "detail"),
    [
        ({"human_readable_id": "bad id!"}, None, 422, "human_readable_id"),
        ({"human_readable_id": "-leading-dash"}, None, 422, "human_readable_id"),
        ({"container_tag": "UPPER/Case:1"}, None, 422, "container_tag"),
        ({"container_tag": "img; rm -rf /"}, None, 422, "container_tag"),
        ({"use_gpu": "maybe"}, None, 422, "use_gpu"),
        ({"memory_mb": 1}, None, 422, "memory_mb"),
        ({"timeout_s": 0}, None, 422, "timeout_s"),
        ({"model_available": True}, None, 422, "zip_file"),
        ({"model_available": False}, {"zip_file": ("m.zip", make_zip())}, 422, "model_available"),
        ({"model_available": True}, {"zip_file": ("m.zip", b"not a zip")}, 400, "not a valid zip"),
    ],
)
def test_bad_registration_is_refused_and_stores_nothing(client, settings, params, files, status, detail):
    query = {"human_readable_id": "ok-model", "container_tag": "registry.local:5000/team/seg:1.0", **params}

    response = client.post("/models", params=query, files=files)

    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]
    assert row_counts(client) == (0, 0)
    assert stored_files(settings) == []
