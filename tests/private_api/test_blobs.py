"""The blob store on its own: atomic writes, size limit, key safety."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from private_api.blobs import BlobStore, BlobTooLarge
from private_api.db import upgrade_database


def files_under(root) -> list:
    return [path for path in root.rglob("*") if path.is_file()]


def test_save_hashes_and_publishes_atomically(tmp_path):
    store = BlobStore(tmp_path)
    writer = store.writer("inputs", suffix=".zip")
    writer.write(b"abc")
    assert not store.exists(writer.key)  # invisible until committed

    blob = writer.commit()

    assert blob.sha256 == hashlib.sha256(b"abc").hexdigest()
    assert blob.size == 3
    with store.open(blob.key) as handle:
        assert handle.read() == b"abc"
    store.delete(blob.key)
    store.delete(blob.key)  # deleting twice is fine
    assert files_under(tmp_path) == []


def test_size_limit_aborts_and_removes_the_partial_file(tmp_path):
    store = BlobStore(tmp_path)
    with pytest.raises(BlobTooLarge, match="limit of 10 bytes"):
        store.save([b"12345", b"67890", b"x"], "inputs", max_bytes=10)
    assert files_under(tmp_path) == []
    assert store.save([b"12345", b"67890"], "inputs", max_bytes=10).size == 10


@pytest.mark.parametrize(
    "key", ["../etc/passwd", "/etc/passwd", "inputs/../x", "inputs/.hidden", "other/x", "x"]
)
def test_keys_cannot_leave_the_store(tmp_path, key):
    with pytest.raises(ValueError, match="not a blob key"):
        BlobStore(tmp_path).path(key)


def test_blobs_and_their_folders_are_private_whatever_the_umask(tmp_path):
    old_umask = os.umask(0)
    try:
        store = BlobStore(tmp_path / "blobs")
        blob = store.save([b"patient data"], "inputs")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(store.path(blob.key).stat().st_mode) == 0o600
    for folder in (store.root, store.path(blob.key).parent, store.root / ".incoming"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_the_sqlite_database_file_is_private(tmp_path):
    old_umask = os.umask(0)
    try:
        url = f"sqlite:///{tmp_path / 'db' / 'inference.db'}"
        upgrade_database(url)
    finally:
        os.umask(old_umask)
    for path in (tmp_path / "db").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
