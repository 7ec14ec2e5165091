"""Files behind the database rows: task inputs, outputs, logs and model zips.

Keys are opaque relative paths made here; nothing outside this module builds a path from one.
A blob appears under its key only once completely written (temp name, fsync, rename), so a
crash or an aborted upload never leaves a half file that a row could point to.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from private_api.exceptions import TooLarge

log = logging.getLogger(__name__)

TEMP_DIR_NAME = ".incoming"
KEY_KINDS = frozenset({"inputs", "outputs", "logs", "models"})
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


class BlobTooLarge(TooLarge):
    """The stream went past the size allowed for it; the partial file is already gone."""


@dataclass(frozen=True)
class StoredBlob:
    key: str
    sha256: str
    size: int


class BlobWriter:
    """Writes one blob in pieces, hashing and counting as it goes; `commit` makes it visible."""

    def __init__(self, temp_path: Path, final_path: Path, key: str, max_bytes: int | None) -> None:
        self.key = key
        self.size = 0
        self._temp_path = temp_path
        self._final_path = final_path
        self._max_bytes = max_bytes
        self._digest = hashlib.sha256()
        # 0600 whatever the umask: these are patients' files; only this service reads them.
        descriptor = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
        self._file: BinaryIO | None = os.fdopen(descriptor, "wb")

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._file is None:
            raise RuntimeError(f"blob writer for {self.key} is closed")
        if self._max_bytes is not None and self.size + len(data) > self._max_bytes:
            self.abort()
            raise BlobTooLarge(f"upload is larger than the limit of {self._max_bytes} bytes")
        self._file.write(data)
        self._digest.update(data)
        self.size += len(data)

    def commit(self) -> StoredBlob:
        if self._file is None:
            raise RuntimeError(f"blob writer for {self.key} is closed")
        try:
            self._file.flush()
            # The row that points here is committed right after; the bytes must be on disk first.
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self._final_path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
            os.replace(self._temp_path, self._final_path)
        except BaseException:
            self.abort()
            raise
        return StoredBlob(key=self.key, sha256=self._digest.hexdigest(), size=self.size)

    def abort(self) -> None:
        """Drop whatever was written; safe to call more than once."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._temp_path.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._temp_dir = self.root / TEMP_DIR_NAME
        self._temp_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        # Folders made by earlier versions kept the umask's mode; tighten them too.
        for folder in (self.root, self._temp_dir, *(self.root / kind for kind in KEY_KINDS)):
            if folder.is_dir():
                os.chmod(folder, PRIVATE_DIR_MODE)

    def path(self, key: str) -> Path:
        """The file for a key; refuses keys that could point outside the store."""
        parts = PurePosixPath(key).parts
        if (
            len(parts) != 2
            or parts[0] not in KEY_KINDS
            or "\\" in key
            or any(part in ("", ".", "..") or part.startswith(".") for part in parts)
        ):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root.joinpath(*parts)

    def writer(self, kind: str, *, suffix: str = "", max_bytes: int | None = None) -> BlobWriter:
        if kind not in KEY_KINDS:
            raise ValueError(f"unknown blob kind {kind!r}")
        key = f"{kind}/{secrets.token_hex(16)}{suffix}"
        temp_path = self._temp_dir / f"{secrets.token_hex(16)}.part"
        return BlobWriter(temp_path, self.path(key), key, max_bytes)

    def save(
        self, chunks: Iterable[bytes], kind: str, *, suffix: str = "", max_bytes: int | None = None
    ) -> StoredBlob:
        writer = self.writer(kind, suffix=suffix, max_bytes=max_bytes)
        try:
            for chunk in chunks:
                writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def open(self, key: str) -> BinaryIO:
        """Open for reading; an open file keeps streaming even if the blob is deleted meanwhile."""
        return open(self.path(key), "rb")

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str | None) -> None:
        """Remove a blob; a missing one is fine (deletes are retried and may race)."""
        if key is None:
            return
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError:
            log.exception("could not delete blob %s", key)

    def remove_stale_temp_files(self, older_than_s: float = 24 * 3600) -> int:
        """Temp files of uploads a crash interrupted; young ones may belong to a live upload."""
        removed = 0
        cutoff = time.time() - older_than_s
        for temp in self._temp_dir.glob("*.part"):
            try:
                if temp.stat().st_mtime < cutoff:
                    temp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
