"""Folders on the consumer's disk: one work dir per task, one unpacked copy per model zip."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from inference_server.file_trees import remove_tree
from inference_server.zipsafe import ZipLimits, extract_zip

log = logging.getLogger(__name__)

MODELS_DIR = "models"
# Written next to (never inside) the mounted folders, so a model cannot see or change it.
OWNER_FILE = ".consumer"
TEMP_PREFIX = ".tmp-"
# Folders only the consumer reads: task work folders, the models cache and its temporary folders.
# The folders mounted into a container below them are opened up on their own; a bind mount does
# not need search permission on the folders above its source.
PRIVATE_MODE = 0o700
# What the model (possibly the unprivileged 65534) reads: its input and its model files.
READABLE_DIR_MODE = 0o755
READABLE_FILE_MODE = 0o444


def make_private_dir(path: Path) -> None:
    path.mkdir(mode=PRIVATE_MODE, parents=True, exist_ok=True)
    os.chmod(path, PRIVATE_MODE)  # whatever the umask, and for a folder that was there already


@dataclass(frozen=True)
class TaskWorkspace:
    """IS_WORK_DIR/<uid>-a<attempt>-<random>/: input/ (mounted ro), output/ (mounted rw), and
    the zips beside them. Every attempt gets a folder of its own, so two attempts of one task on
    one host (two consumers sharing a work dir, or a lease that ran out) never share files."""

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

    @property
    def model_dir(self) -> Path:
        """This attempt's own /model: a model zip without a known digest, or a model_from
        upstream's output (both used by this task only, removed with the workspace)."""
        return self.root / "model"

    @property
    def params_file(self) -> Path:
        return self.root / "params.json"

    @classmethod
    def create(cls, work_dir: Path, uid: str, consumer_id: str, attempt: int = 0) -> TaskWorkspace:
        work_dir.mkdir(mode=PRIVATE_MODE, parents=True, exist_ok=True)
        root = work_dir / f"{uid}-a{attempt}-{secrets.token_hex(4)}"
        root.mkdir(mode=PRIVATE_MODE)
        os.chmod(root, PRIVATE_MODE)
        (root / OWNER_FILE).write_text(consumer_id)
        workspace = cls(root)
        workspace.input_dir.mkdir()
        workspace.output_dir.mkdir()
        # Explicit modes, whatever the umask: the model may run as any user, it must be able to
        # read its input and write its results.
        os.chmod(workspace.input_dir, READABLE_DIR_MODE)
        os.chmod(workspace.output_dir, 0o777)
        return workspace

    def unpack_input(self, limits: ZipLimits) -> None:
        extract_zip(self.input_zip, self.input_dir, limits, dir_mode=READABLE_DIR_MODE)
        self.input_zip.unlink(missing_ok=True)
        os.chmod(self.input_dir, READABLE_DIR_MODE)

    def unpack_model(self, limits: ZipLimits) -> None:
        """model.zip into this attempt's own /model folder (a model_from upstream's output)."""
        extract_zip(self.model_zip, self.model_dir, limits, dir_mode=READABLE_DIR_MODE)
        self.model_zip.unlink(missing_ok=True)
        os.chmod(self.model_dir, READABLE_DIR_MODE)

    def write_params(self, params: dict[str, Any]) -> Path:
        """The task's params as the model reads them at /params.json (mounted read-only)."""
        self.params_file.write_text(json.dumps(params, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        # Explicit, whatever the umask: the model may run as any user.
        os.chmod(self.params_file, READABLE_FILE_MODE)
        return self.params_file

    def remove(self) -> None:
        remove_owned(self.root)


def remove_owned(root: Path) -> None:
    """Remove a folder that carries an owner file, the owner file last: a removal that fails
    halfway leaves a folder the next sweep still recognises as this consumer's own."""
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return
    except NotADirectoryError:
        remove_tree(root)
        return
    for entry in entries:
        if entry.name != OWNER_FILE:
            remove_tree(entry)
    remove_tree(root)


def task_of_folder(folder: Path) -> str:
    """The task uid a work folder belongs to, from its name (<uid>-a<attempt>-<random>), so a
    folder is known as a running task's even before the task's worker has it in hand."""
    # Split from the right: a uid may itself hold "-a".
    with_attempt = folder.name.rsplit("-", 1)[0]
    return with_attempt.rsplit("-a", 1)[0]


def owned_task_dirs(work_dir: Path, consumer_id: str) -> list[Path]:
    """Task work dirs this consumer created (found by their owner file)."""
    if not work_dir.is_dir():
        return []
    owned = []
    for entry in work_dir.iterdir():
        try:
            if entry.name == MODELS_DIR or not entry.is_dir() or entry.is_symlink():
                continue
            owner = (entry / OWNER_FILE).read_text().strip()
        except (OSError, ValueError):  # ValueError: an owner file that is not text is not ours
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
        make_private_dir(self.root)
        temp = self.root / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        temp.mkdir(mode=PRIVATE_MODE)
        os.chmod(temp, PRIVATE_MODE)
        (temp / OWNER_FILE).write_text(self.consumer_id)
        try:
            zip_path = temp / "model.zip"
            got = fetch(zip_path)
            if got != sha256:
                raise ModelZipMismatch(f"model zip has sha256 {got}, the private API announced {sha256}")
            unpacked = temp / "unpacked"
            extract_zip(zip_path, unpacked, self._model_limits(), dir_mode=READABLE_DIR_MODE)
            os.chmod(unpacked, READABLE_DIR_MODE)
            try:
                os.rename(unpacked, final)
            except OSError:
                # Another consumer on this host finished the same model first: use its copy.
                if not final.is_dir():
                    raise
        finally:
            try:
                remove_owned(temp)
            except Exception as exc:  # owned and stale: remove_own_temp_dirs tries again later
                log.warning("could not remove model temp dir %s yet: %s", temp.name, _brief(exc))
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
            try:
                # Owned from here on: if removing fails, remove_own_temp_dirs tries again later.
                (doomed / OWNER_FILE).write_text(self.consumer_id)
                remove_owned(doomed)
            except Exception as exc:  # one model's folder must not stop the sweep
                log.warning("could not remove unused model %s yet: %s", entry.name, _brief(exc))
                continue
            removed += 1
        return removed

    def unpack_uncached(self, zip_path: Path, dest: Path) -> Path:
        """For a model zip without a known digest: unpack it for one task only."""
        extract_zip(zip_path, dest, self._model_limits(), dir_mode=READABLE_DIR_MODE)
        os.chmod(dest, READABLE_DIR_MODE)
        return dest

    def _model_limits(self) -> ZipLimits:
        # A model zip may legitimately be a single empty marker; it was checked at registration.
        return replace(self.limits, allow_empty=True)

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
            except (OSError, ValueError):
                continue
            if owner != self.consumer_id or not stale:
                continue
            try:
                remove_owned(entry)
            except Exception as exc:  # tried again at the next sweep
                log.warning("could not remove model temp dir %s yet: %s", entry.name, _brief(exc))
                continue
            removed += 1
        return removed


class ModelZipMismatch(Exception):
    """The downloaded model zip is not the one the claim described."""


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(ch in "0123456789abcdef" for ch in value)


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
