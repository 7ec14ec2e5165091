"""Checking, unpacking and packing task zips without trusting their contents.

The private API calls `inspect_zip` on every upload before storing it, and the consumer calls
`extract_zip` (which checks again) before a model sees the files, so a hostile archive is
refused at the door and could not escape its folder even if it slipped past.
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

COPY_CHUNK = 1024 * 1024


class UnsafeZipError(ValueError):
    """The archive is not a zip, is damaged, or breaks one of the limits; the message says which."""


@dataclass(frozen=True)
class ZipLimits:
    max_total_bytes: int = 20 * 1024**3
    max_files: int = 100_000
    max_ratio: float = 200.0
    allow_empty: bool = False


@dataclass(frozen=True)
class ZipSummary:
    files: int
    total_bytes: int


def _check_member_name(name: str) -> PurePosixPath:
    if not name or "\x00" in name:
        raise UnsafeZipError("zip entry with an empty or NUL-containing name")
    if "\\" in name:
        raise UnsafeZipError(f"zip entry {name!r} uses backslashes; only '/' separates folders")
    path = PurePosixPath(name)
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise UnsafeZipError(f"zip entry {name!r} has an absolute path")
    if any(part == ".." for part in path.parts):
        raise UnsafeZipError(f"zip entry {name!r} escapes the archive folder with '..'")
    return path


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    unix_mode = info.external_attr >> 16
    return info.create_system == 3 and stat.S_ISLNK(unix_mode)


def inspect_zip(path: Path, limits: ZipLimits) -> ZipSummary:
    """Validate an archive's directory and integrity without unpacking it."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafeZipError(f"not a valid zip file: {exc}") from exc
    except Exception as exc:  # zipfile raises assorted errors on crafted headers
        raise UnsafeZipError(f"not a valid zip file: {exc}") from exc
    with archive:
        members = archive.infolist()
        files = [m for m in members if not m.is_dir()]
        if len(files) > limits.max_files:
            raise UnsafeZipError(f"zip holds {len(files)} files; the limit is {limits.max_files}")
        if not files and not limits.allow_empty:
            raise UnsafeZipError("zip is empty: it holds no files")
        total = 0
        for member in members:
            _check_member_name(member.filename)
            if _is_symlink(member):
                raise UnsafeZipError(f"zip entry {member.filename!r} is a symbolic link")
            if member.flag_bits & 0x1:
                raise UnsafeZipError(f"zip entry {member.filename!r} is encrypted")
            total += member.file_size
            if total > limits.max_total_bytes:
                raise UnsafeZipError(
                    f"zip unpacks to more than {limits.max_total_bytes} bytes, the configured limit"
                )
            if member.file_size > 1024 * 1024:
                ratio = member.file_size / max(member.compress_size, 1)
                if ratio > limits.max_ratio:
                    raise UnsafeZipError(
                        f"zip entry {member.filename!r} expands {ratio:.0f}x, "
                        f"over the limit of {limits.max_ratio:.0f}x"
                    )
        try:
            broken = archive.testzip()
        except Exception as exc:
            raise UnsafeZipError(f"zip is damaged: {exc}") from exc
        if broken is not None:
            raise UnsafeZipError(f"zip entry {broken!r} is damaged (bad CRC)")
    return ZipSummary(files=len(files), total_bytes=total)


def extract_zip(path: Path, destination: Path, limits: ZipLimits) -> ZipSummary:
    """Unpack into `destination`, refusing anything `inspect_zip` refuses, counting real bytes."""
    summary = inspect_zip(path, limits)
    destination.mkdir(parents=True, exist_ok=True)
    root = destination.resolve()
    written = 0
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            target = (root / _check_member_name(member.filename)).resolve()
            if target != root and root not in target.parents:
                raise UnsafeZipError(f"zip entry {member.filename!r} escapes the archive folder")
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as sink:
                while chunk := source.read(COPY_CHUNK):
                    written += len(chunk)
                    # Headers can lie about sizes; the bytes actually written are what count.
                    if written > limits.max_total_bytes:
                        raise UnsafeZipError(
                            f"zip unpacks to more than {limits.max_total_bytes} bytes, the configured limit"
                        )
                    sink.write(chunk)
            os.chmod(target, 0o644)
    return summary


def zip_directory(source: Path, archive_path: Path) -> int:
    """Zip every regular file under `source`, folders kept, links skipped; returns the file count."""
    count = 0
    root = source.resolve()
    with zipfile.ZipFile(archive_path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for folder, dirnames, filenames in os.walk(root, followlinks=False):
            folder_path = Path(folder)
            for dirname in sorted(dirnames):
                dir_path = folder_path / dirname
                if dir_path.is_symlink():
                    continue
                if not any(dir_path.iterdir()):
                    archive.writestr(str(dir_path.relative_to(root)) + "/", b"")
            for filename in sorted(filenames):
                file_path = folder_path / filename
                if file_path.is_symlink() or not file_path.is_file():
                    continue
                archive.write(file_path, file_path.relative_to(root).as_posix())
                count += 1
    return count


def directory_size(root: Path, stop_above: int | None = None) -> int:
    """Bytes in the regular files under `root` (links not followed). With `stop_above`, the walk
    ends as soon as the sum passes it: a model filling its folder is not walked to the end."""
    total = 0
    pending = [root]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue  # vanished or unreadable meanwhile: what cannot be read cannot be zipped either
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
            if stop_above is not None and total > stop_above:
                return total
    return total


def copy_stream(source, sink, chunk_size: int = COPY_CHUNK) -> int:
    """Copy a binary file-like object to another in chunks; returns the bytes copied."""
    copied = 0
    while chunk := source.read(chunk_size):
        sink.write(chunk)
        copied += len(chunk)
    return copied


def remove_tree(path: Path) -> None:
    """Remove a folder even where a model left files without write permission."""

    def _make_writable_and_retry(func, failed_path, _exc_info) -> None:
        os.chmod(failed_path, 0o700)
        func(failed_path)

    if path.exists():
        shutil.rmtree(path, onerror=_make_writable_and_retry)
