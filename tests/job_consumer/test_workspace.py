"""Task work dirs and the model cache: permissions, ownership, unpack-once, racing consumers."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import stat
import threading
import time
import zipfile
from pathlib import Path

import pytest

import job_consumer.workspace as workspace_module
from inference_server.zipsafe import UnsafeZipError, ZipLimits
from job_consumer.workspace import (
    MODELS_DIR,
    OWNER_FILE,
    TEMP_PREFIX,
    ModelCache,
    ModelZipMismatch,
    TaskWorkspace,
    owned_task_dirs,
)

UID = "workspacetest0000001"


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def restrictive_umask():
    # Whatever umask the consumer runs under, the unprivileged model must read its input.
    old = os.umask(0o077)
    yield
    os.umask(old)


def test_workspace_layout_and_permissions(tmp_path, restrictive_umask):
    workspace = TaskWorkspace.create(tmp_path, UID, "consumer-a", attempt=2)
    assert workspace.root.parent == tmp_path
    assert workspace.root.name.startswith(f"{UID}-a2-")
    # Only the consumer reads the task folder; the mounted folders below it are opened up.
    assert mode(workspace.root) == 0o700
    assert mode(workspace.output_dir) == 0o777
    assert mode(workspace.input_dir) == 0o755
    assert (workspace.root / OWNER_FILE).read_text() == "consumer-a"

    workspace.input_zip.write_bytes(zip_bytes({"a/b/c.txt": b"deep", "top.txt": b"top"}))
    workspace.unpack_input(ZipLimits())

    assert (workspace.input_dir / "a" / "b" / "c.txt").read_bytes() == b"deep"
    assert mode(workspace.input_dir / "a") == 0o755
    assert mode(workspace.input_dir / "a" / "b") == 0o755
    assert mode(workspace.input_dir / "top.txt") == 0o644
    assert not workspace.input_zip.exists()

    workspace.remove()
    assert not workspace.root.exists()


def test_every_attempt_gets_a_folder_of_its_own(tmp_path):
    # Two consumers sharing a work dir may hold two attempts of one task (a lease ran out while
    # the first still ran), even with the same attempt number: they must never share files.
    first = TaskWorkspace.create(tmp_path, UID, "consumer-a", attempt=1)
    (first.output_dir / "first.txt").write_text("first attempt's result")
    second = TaskWorkspace.create(tmp_path, UID, "consumer-b", attempt=1)
    third = TaskWorkspace.create(tmp_path, UID, "consumer-a", attempt=2)

    assert len({first.root, second.root, third.root}) == 3
    assert list(second.output_dir.iterdir()) == []
    assert (first.output_dir / "first.txt").read_text() == "first attempt's result"
    assert sorted(owned_task_dirs(tmp_path, "consumer-a")) == sorted([first.root, third.root])
    assert owned_task_dirs(tmp_path, "consumer-b") == [second.root]

    second.remove()
    assert not second.root.exists()
    assert (first.output_dir / "first.txt").exists()


def test_unsafe_input_zip_is_refused(tmp_path):
    workspace = TaskWorkspace.create(tmp_path, UID, "consumer-a")
    workspace.input_zip.write_bytes(zip_bytes({"../escape.txt": b"x"}))
    with pytest.raises(UnsafeZipError):
        workspace.unpack_input(ZipLimits())
    assert not (workspace.root / "escape.txt").exists()


def test_owned_task_dirs_are_found_by_owner_file(tmp_path):
    mine = TaskWorkspace.create(tmp_path, "workspacetest0000001", "consumer-a")
    TaskWorkspace.create(tmp_path, "workspacetest0000002", "consumer-b")
    (tmp_path / MODELS_DIR).mkdir()
    (tmp_path / "no-owner-file").mkdir()
    # An owner file that is not text is nobody's, and does not stop the search.
    (tmp_path / "garbled-owner").mkdir()
    (tmp_path / "garbled-owner" / OWNER_FILE).write_bytes(b"\xff\xfe\x00")
    assert owned_task_dirs(tmp_path, "consumer-a") == [mine.root]
    assert owned_task_dirs(tmp_path / "missing", "consumer-a") == []


class ZipServer:
    """Stands in for the private API's model zip download; counts the calls."""

    def __init__(self, data: bytes, barrier: threading.Barrier | None = None) -> None:
        self.data = data
        self.calls = 0
        self.barrier = barrier
        self.lock = threading.Lock()

    def fetch(self, dest: Path) -> str:
        with self.lock:
            self.calls += 1
        if self.barrier is not None:
            self.barrier.wait(timeout=10)
        dest.write_bytes(self.data)
        return hashlib.sha256(self.data).hexdigest()


def test_model_zip_is_unpacked_once_per_sha256(tmp_path, restrictive_umask):
    data = zip_bytes({"weights/w.json": b"{}"})
    sha = hashlib.sha256(data).hexdigest()
    server = ZipServer(data)
    cache = ModelCache(tmp_path, "consumer-a", ZipLimits())

    first = cache.get(sha, server.fetch)
    second = cache.get(sha, server.fetch)

    assert first == second == tmp_path / MODELS_DIR / sha
    assert (first / "weights" / "w.json").read_bytes() == b"{}"
    # The cache is the consumer's; the model folder in it is mounted, so readable to the model.
    assert mode(tmp_path / MODELS_DIR) == 0o700
    assert mode(first) == 0o755 and mode(first / "weights") == 0o755
    assert server.calls == 1
    assert [p.name for p in (tmp_path / MODELS_DIR).iterdir()] == [sha]


def test_model_zip_with_another_digest_is_refused(tmp_path):
    server = ZipServer(zip_bytes({"w.json": b"{}"}))
    cache = ModelCache(tmp_path, "consumer-a", ZipLimits())
    with pytest.raises(ModelZipMismatch):
        cache.get("0" * 64, server.fetch)
    assert list((tmp_path / MODELS_DIR).iterdir()) == []
    with pytest.raises(ValueError):
        cache.get("../../etc", server.fetch)


def test_two_consumers_racing_for_one_model_both_get_a_complete_copy(tmp_path):
    data = zip_bytes({f"part{i}.bin": os.urandom(1000) for i in range(20)})
    sha = hashlib.sha256(data).hexdigest()
    server = ZipServer(data, barrier=threading.Barrier(2))
    caches = [ModelCache(tmp_path, f"consumer-{n}", ZipLimits()) for n in "ab"]
    results: list[Path] = []
    errors: list[BaseException] = []

    def get(cache: ModelCache) -> None:
        try:
            results.append(cache.get(sha, server.fetch))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=get, args=(cache,)) for cache in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert errors == []
    assert server.calls == 2  # both downloaded at once (the barrier proves they overlapped)
    assert results == [tmp_path / MODELS_DIR / sha] * 2
    assert len(list(results[0].iterdir())) == 20
    assert [p.name for p in (tmp_path / MODELS_DIR).iterdir()] == [sha]


def test_only_own_stale_temp_dirs_are_removed(tmp_path):
    cache = ModelCache(tmp_path, "consumer-a", ZipLimits())
    for name, owner in (("mine", "consumer-a"), ("theirs", "consumer-b")):
        folder = tmp_path / MODELS_DIR / f"{TEMP_PREFIX}{name}"
        folder.mkdir(parents=True)
        (folder / OWNER_FILE).write_text(owner)
    assert cache.remove_own_temp_dirs() == 1
    assert sorted(p.name for p in (tmp_path / MODELS_DIR).iterdir()) == [f"{TEMP_PREFIX}theirs"]


def test_prune_removes_only_models_unused_for_longer_than_the_limit(tmp_path):
    cache = ModelCache(tmp_path, "consumer-a", ZipLimits())
    old_data, fresh_data = zip_bytes({"w.json": b"old"}), zip_bytes({"w.json": b"fresh"})
    old_sha, fresh_sha = hashlib.sha256(old_data).hexdigest(), hashlib.sha256(fresh_data).hexdigest()
    old_dir = cache.get(old_sha, ZipServer(old_data).fetch)
    fresh_dir = cache.get(fresh_sha, ZipServer(fresh_data).fetch)
    ten_days_ago = time.time() - 10 * 86400
    os.utime(old_dir, (ten_days_ago, ten_days_ago))
    os.utime(fresh_dir, (ten_days_ago, ten_days_ago))
    # Using a model marks it as used now, whatever its age.
    server = ZipServer(fresh_data)
    assert cache.get(fresh_sha, server.fetch) == fresh_dir
    assert server.calls == 0

    assert cache.prune(unused_for_s=7 * 86400) == 1

    assert not old_dir.exists()
    assert (fresh_dir / "w.json").read_bytes() == b"fresh"
    assert sorted(p.name for p in (tmp_path / MODELS_DIR).iterdir()) == [fresh_sha]
    # A pruned model is unpacked again on its next use.
    again = ZipServer(old_data)
    assert (cache.get(old_sha, again.fetch) / "w.json").read_bytes() == b"old"
    assert again.calls == 1


def test_model_zips_get_the_same_shape_limits_as_inputs(tmp_path):
    data = zip_bytes({"/".join(["d"] * 5): b"too deep"})
    sha = hashlib.sha256(data).hexdigest()
    cache = ModelCache(tmp_path, "consumer-a", ZipLimits(max_depth=4))
    with pytest.raises(UnsafeZipError, match="5 levels deep; the limit is 4"):
        cache.get(sha, ZipServer(data).fetch)
    assert [p.name for p in (tmp_path / MODELS_DIR).iterdir()] == []


def test_a_removal_that_fails_halfway_leaves_a_folder_the_next_sweep_still_owns(tmp_path, monkeypatch):
    workspace = TaskWorkspace.create(tmp_path, UID, "consumer-a")
    (workspace.output_dir / "result.txt").write_text("x")
    real_remove_tree = workspace_module.remove_tree

    def failing_on_output(path: Path) -> None:
        if path.name == "output":
            raise OSError(errno.EIO, "simulated", "output")
        real_remove_tree(path)

    monkeypatch.setattr(workspace_module, "remove_tree", failing_on_output)
    with pytest.raises(OSError):
        workspace.remove()
    # The owner file goes last: still there, so the sweep finds the folder again.
    assert owned_task_dirs(tmp_path, "consumer-a") == [workspace.root]

    monkeypatch.setattr(workspace_module, "remove_tree", real_remove_tree)
    workspace.remove()
    assert not workspace.root.exists()


def test_prune_that_cannot_remove_a_model_yet_leaves_it_to_a_later_sweep(tmp_path, monkeypatch, caplog):
    cache = ModelCache(tmp_path, "consumer-a", ZipLimits())
    data = zip_bytes({"w.json": b"old"})
    sha = hashlib.sha256(data).hexdigest()
    old_dir = cache.get(sha, ZipServer(data).fetch)
    long_ago = time.time() - 10 * 86400
    os.utime(old_dir, (long_ago, long_ago))
    real_remove_tree = workspace_module.remove_tree

    def refusing(path: Path) -> None:
        raise OSError(errno.EBUSY, "simulated", path.name)

    monkeypatch.setattr(workspace_module, "remove_tree", refusing)
    caplog.set_level(logging.WARNING, logger="job_consumer")

    assert cache.prune(unused_for_s=7 * 86400) == 0
    assert not old_dir.exists()  # renamed away at once: no task finds it any more
    assert any("could not remove unused model" in r.getMessage() for r in caplog.records)
    assert cache.remove_own_temp_dirs() == 0  # still refusing: logged again, not raised

    monkeypatch.setattr(workspace_module, "remove_tree", real_remove_tree)
    assert cache.remove_own_temp_dirs() == 1
    assert list((tmp_path / MODELS_DIR).iterdir()) == []


def test_params_file_is_the_params_as_json_readable_by_anyone(tmp_path, restrictive_umask):
    workspace = TaskWorkspace.create(tmp_path, UID, "consumer-a")
    params = {"method": "otsu", "threshold": 0.5, "label": "ü"}

    written = workspace.write_params(params)

    assert written == workspace.params_file and written.parent == workspace.root
    assert json.loads(written.read_text(encoding="utf-8")) == params
    assert mode(written) == 0o444


def test_model_from_zip_is_unpacked_into_the_attempts_own_model_folder(tmp_path, restrictive_umask):
    workspace = TaskWorkspace.create(tmp_path, UID, "consumer-a")
    workspace.model_zip.write_bytes(zip_bytes({"weights.bin": b"w", "meta/config.json": b"{}"}))

    workspace.unpack_model(ZipLimits())

    assert (workspace.model_dir / "meta" / "config.json").read_bytes() == b"{}"
    assert mode(workspace.model_dir) == 0o755
    assert not workspace.model_zip.exists()
    workspace.remove()
    assert not workspace.root.exists()


def test_model_from_zip_escaping_its_folder_is_refused(tmp_path):
    workspace = TaskWorkspace.create(tmp_path, UID, "consumer-a")
    workspace.model_zip.write_bytes(zip_bytes({"../escape.txt": b"x"}))

    with pytest.raises(UnsafeZipError):
        workspace.unpack_model(ZipLimits())

    assert not (workspace.root / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()
