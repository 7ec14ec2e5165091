"""Folders on the consumer's disk: one work dir per task, one unpacked copy per model zip."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from inference_server.zipsafe import ZipLimits, extract_zip, remove_tree

MODELS_DIR = "models"
# Written next to (never inside) the mounted folders, so a model cannot see or change it.
OWNER_FILE = ".consumer"
TEMP_PREFIX = ".tmp-"


def _open_up(root: Path, dir_mode: int) -> None:
    """Let the unprivileged model user (65534) read what root unpacked, whatever the umask."""
    os.chmod(root, dir_mode)
    for folder, dirnames, _ in os.walk(root):
        for dirname in dirnames:
            os.chmod(Path(folder) / dirname, dir_mode)


@dataclass(frozen=True)
class TaskWorkspace:
    """IS_WORK_DIR/<uid>/: input/ (mounted ro), output/ (mounted rw), and the zips beside them."""

    root: Path

    @property
    def input_dir(self) -> Path:
        return self.root / "input"

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def input_zip(self) -> Path:
        return self.root / "input.zip"

    @property
    def output_zip(self) -> Path:
        return self.root / "output.zip"

    @property
    def model_zip(self) -> Path:
        return self.root / "model.zip"

    @classmethod
    def create(cls, work_dir: Path, uid: str, consumer_id: str) -> TaskWorkspace:
        root = work_dir / uid
        # A leftover of an earlier attempt on this host holds nothing worth keeping.
        remove_tree(root)
        root.mkdir(parents=True)
        (root / OWNER_FILE).write_text(consumer_id)
        workspace = cls(root)
        workspace.input_dir.mkdir()
        workspace.output_dir.mkdir()
        # Explicit modes, whatever the umask: the model may run as any user, it must be able to
        # read its input and write its results.
        os.chmod(workspace.input_dir, 0o755)
        os.chmod(workspace.output_dir, 0o777)
        return workspace

    def unpack_input(self, limits: ZipLimits) -> None:
        extract_zip(self.input_zip, self.input_dir, limits)
        self.input_zip.unlink(missing_ok=True)
        _open_up(self.input_dir, 0o755)

    def remove(self) -> None:
        remove_tree(self.root)


def owned_task_dirs(work_dir: Path, consumer_id: str) -> list[Path]:
    """Task work dirs this consumer created (found by their owner file)."""
    if not work_dir.is_dir():
        return []
    owned = []
    for entry in work_dir.iterdir():
        if entry.name == MODELS_DIR or not entry.is_dir():
            continue
        try:
            owner = (entry / OWNER_FILE).read_text().strip()
        except OSError:
            continue
        if owner == consumer_id:
            owned.append(entry)
    return owned


class ModelCache:
    """Unpacks each model zip once per sha256 under IS_WORK_DIR/models/ and reuses it.

    Unpacking goes to a private temporary folder that is renamed into place, so two
    consumers on one host racing for the same model both end up with a complete copy.
    """

    def __init__(self, work_dir: Path, consumer_id: str, limits: ZipLimits) -> None:
        self.root = work_dir / MODELS_DIR
        self.consumer_id = consumer_id
        self.limits = limits

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256

    def get(self, sha256: str, fetch: Callable[[Path], str]) -> Path:
        """The unpacked model; `fetch(dest)` downloads the zip to dest and returns its sha256."""
        if not _is_sha256(sha256):
            raise ValueError(f"model zip sha256 {sha256!r} is not a hex sha256 digest")
        final = self.path_for(sha256)
        if final.is_dir():
            self._mark_used(final)
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        temp = self.root / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        temp.mkdir()
        (temp / OWNER_FILE).write_text(self.consumer_id)
        try:
            zip_path = temp / "model.zip"
            got = fetch(zip_path)
            if got != sha256:
                raise ModelZipMismatch(f"model zip has sha256 {got}, the private API announced {sha256}")
            unpacked = temp / "unpacked"
            extract_zip(zip_path, unpacked, self._model_limits())
            _open_up(unpacked, 0o755)
            try:
                os.rename(unpacked, final)
            except OSError:
                # Another consumer on this host finished the same model first: use its copy.
                if not final.is_dir():
                    raise
        finally:
            remove_tree(temp)
        self._mark_used(final)
        return final

    @staticmethod
    def _mark_used(folder: Path) -> None:
        # The folder's mtime is its last use; prune() goes by it.
        with contextlib.suppress(OSError):
            os.utime(folder)

    def prune(self, unused_for_s: float) -> int:
        """Remove unpacked models no task on this host has used for `unused_for_s` seconds.

        Consumers share the cache, and a model in use is bind-mounted into a running container,
        so nothing is removed by size: only by age, with the age far above any task's run time.
        """
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - unused_for_s
        removed = 0
        for entry in self.root.iterdir():
            if not _is_sha256(entry.name):
                continue
            try:
                if entry.stat().st_mtime > cutoff:
                    continue
                # Renamed away first: a consumer looking the model up from now on unpacks it anew.
                doomed = self.root / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
                os.rename(entry, doomed)
            except OSError:
                continue
            (doomed / OWNER_FILE).write_text(self.consumer_id)
            remove_tree(doomed)
            removed += 1
        return removed

    def unpack_uncached(self, zip_path: Path, dest: Path) -> Path:
        """For a model zip without a known digest: unpack it for one task only."""
        extract_zip(zip_path, dest, self._model_limits())
        _open_up(dest, 0o755)
        return dest

    def _model_limits(self) -> ZipLimits:
        # A model zip may legitimately be a single empty marker; it was checked at registration.
        return ZipLimits(
            max_total_bytes=self.limits.max_total_bytes,
            max_files=self.limits.max_files,
            max_ratio=self.limits.max_ratio,
            allow_empty=True,
        )

    def remove_own_temp_dirs(self, older_than_s: float = 0.0) -> int:
        """Half-unpacked models left by a crash of this consumer."""
        if not self.root.is_dir():
            return 0
        removed = 0
        cutoff = time.time() - older_than_s
        for entry in self.root.glob(f"{TEMP_PREFIX}*"):
            try:
                owner = (entry / OWNER_FILE).read_text().strip()
                stale = entry.stat().st_mtime <= cutoff
            except OSError:
                continue
            if owner == self.consumer_id and stale:
                remove_tree(entry)
                removed += 1
        return removed


class ModelZipMismatch(Exception):
    """The downloaded model zip is not the one the claim described."""


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(ch in "0123456789abcdef" for ch in value)
