"""Checking, unpacking and packing task zips without trusting their contents.

The private API calls `inspect_zip` on every upload before storing it, and the consumer calls
`extract_zip` (which checks again) before a model sees the files, so a hostile archive is
refused at the door and could not escape its folder even if it slipped past.

Whatever `inspect_zip` accepts, the rest of the platform can unpack, measure, zip and remove:
names are plain UTF-8 paths, bounded in depth and length, and no two entries claim one place.
Trees on disk are walked by `file_trees`, which `zip_directory` uses too.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from inference_server.file_trees import TreeEntry, walk_tree

COPY_CHUNK = 1024 * 1024
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_ZIP_LAST = (2107, 12, 31, 23, 59, 58)


class UnsafeZipError(ValueError):
    """The archive is not a zip, is damaged, or breaks one of the limits; the message says which."""


@dataclass(frozen=True)
class ZipLimits:
    max_total_bytes: int = 20 * 1024**3
    # Files and folders (explicit entries or implied by a deeper path): what unpacking creates.
    max_files: int = 100_000
    max_ratio: float = 200.0
    allow_empty: bool = False
    # Path components of the deepest entry (its folders and its own name).
    max_depth: int = 64
    # UTF-8 bytes of a whole entry path, and of one name in it (255 is Linux's NAME_MAX).
    max_path_bytes: int = 1024
    max_name_bytes: int = 255

    def for_output(self) -> ZipLimits:
        """Limits for what a consumer sends back: no unsafe names, but segmentation masks compress
        extremely well, a model may legitimately write nothing, and outputs may be larger."""
        return replace(
            self,
            max_total_bytes=max(self.max_total_bytes, 1024**4),
            max_files=max(self.max_files, 1_000_000),
            max_ratio=float("inf"),
            allow_empty=True,
        )


@dataclass(frozen=True)
class ZipSummary:
    files: int
    total_bytes: int


def _show(name: str, limit: int = 120) -> str:
    """A name for an error message: hostile names can be kilobytes long."""
    return repr(name if len(name) <= limit else f"{name[:limit]}...")


def _parts_of(name: str) -> tuple[str, ...]:
    """The entry's path as components, normalised ('a//b', './a', 'a/' all name what they mean)."""
    if not name or "\x00" in name:
        raise UnsafeZipError("zip entry with an empty or NUL-containing name")
    if "\\" in name:
        raise UnsafeZipError(f"zip entry {_show(name)} uses backslashes; only '/' separates folders")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeZipError(f"zip entry {_show(name)} has an absolute path")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise UnsafeZipError(f"zip entry {_show(name)} escapes the archive folder with '..'")
    if not parts:
        raise UnsafeZipError(f"zip entry {_show(name)} names no file or folder")
    return parts


def _check_shape(parts: tuple[str, ...], limits: ZipLimits, shown: str) -> None:
    """Depth and length limits, the same for zips coming in and folders going out."""
    for part in parts:
        size = len(part.encode("utf-8"))
        if size > limits.max_name_bytes:
            raise UnsafeZipError(
                f"{shown} has a name of {size} bytes ({_show(part, 40)}); "
                f"the limit is {limits.max_name_bytes}"
            )
    if len(parts) > limits.max_depth:
        raise UnsafeZipError(f"{shown} is {len(parts)} levels deep; the limit is {limits.max_depth}")
    size = len("/".join(parts).encode("utf-8"))
    if size > limits.max_path_bytes:
        raise UnsafeZipError(f"{shown} has a path of {size} bytes; the limit is {limits.max_path_bytes}")


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    unix_mode = info.external_attr >> 16
    return info.create_system == 3 and stat.S_ISLNK(unix_mode)


@dataclass
class _Node:
    is_dir: bool
    name: str  # the entry that put it there, for the message
    explicit: bool


def _open_zip(path: Path) -> zipfile.ZipFile:
    # Names without the zip UTF-8 flag are read as UTF-8 too (not as the format's default CP437):
    # every archiver in use writes UTF-8 either way, and an invalid name fails here, so what is
    # unpacked, what a model sees and what comes back in the output zip are the same names.
    try:
        return zipfile.ZipFile(path, metadata_encoding="utf-8")
    except UnicodeDecodeError as exc:
        raw = exc.object[:120] if isinstance(exc.object, bytes) else b""
        raise UnsafeZipError(f"zip entry name {raw!r} is not valid UTF-8") from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise UnsafeZipError(f"not a valid zip file: {exc}") from exc
    except Exception as exc:  # zipfile raises assorted errors on crafted headers
        raise UnsafeZipError(f"not a valid zip file: {exc}") from exc


def _plan(archive: zipfile.ZipFile, limits: ZipLimits) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Every entry with its normalised path, checked (files and folders together within the limit)."""
    members = archive.infolist()
    # A cheap first bound, before any per-entry work: every entry creates at least one thing.
    if len(members) > limits.max_files:
        raise UnsafeZipError(
            f"zip holds {len(members)} entries, folders counted as files; the limit is {limits.max_files}"
        )
    nodes: dict[tuple[str, ...], _Node] = {}
    plan: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
    for member in members:
        name = member.orig_filename
        parts = _parts_of(name)
        _check_shape(parts, limits, f"zip entry {_show(name)}")
        is_dir = member.is_dir()
        for depth in range(1, len(parts)):
            prefix = parts[:depth]
            node = nodes.get(prefix)
            if node is None:
                nodes[prefix] = _Node(is_dir=True, name=name, explicit=False)
            elif not node.is_dir:
                raise UnsafeZipError(
                    f"zip entries {_show(node.name)} and {_show(name)} collide: "
                    f"{_show('/'.join(prefix))} would be both a file and a folder"
                )
        node = nodes.get(parts)
        if node is None:
            nodes[parts] = _Node(is_dir=is_dir, name=name, explicit=True)
        elif node.is_dir != is_dir:
            raise UnsafeZipError(
                f"zip entries {_show(node.name)} and {_show(name)} collide: "
                f"{_show('/'.join(parts))} would be both a file and a folder"
            )
        elif node.explicit or not is_dir:
            raise UnsafeZipError(
                f"zip entries {_show(node.name)} and {_show(name)} name the same "
                f"{'folder' if is_dir else 'file'} {_show('/'.join(parts))}"
            )
        else:
            node.explicit = True
        plan.append((member, parts))
        if len(nodes) > limits.max_files:
            raise UnsafeZipError(
                f"zip holds more than {limits.max_files} entries, folders counted as files; "
                f"the limit is {limits.max_files}"
            )
    return plan


def inspect_zip(path: Path, limits: ZipLimits) -> ZipSummary:
    """Validate an archive's directory and integrity without unpacking it."""
    with _open_zip(path) as archive:
        plan = _plan(archive, limits)
        files = [member for member, _ in plan if not member.is_dir()]
        if not files and not limits.allow_empty:
            raise UnsafeZipError("zip is empty: it holds no files")
        total = 0
        for member, _ in plan:
            if _is_symlink(member):
                raise UnsafeZipError(f"zip entry {_show(member.filename)} is a symbolic link")
            if member.flag_bits & 0x1:
                raise UnsafeZipError(f"zip entry {_show(member.filename)} is encrypted")
            total += member.file_size
            if total > limits.max_total_bytes:
                raise UnsafeZipError(
                    f"zip unpacks to more than {limits.max_total_bytes} bytes, the configured limit"
                )
            if member.file_size > 1024 * 1024:
                ratio = member.file_size / max(member.compress_size, 1)
                if ratio > limits.max_ratio:
                    raise UnsafeZipError(
                        f"zip entry {_show(member.filename)} expands {ratio:.0f}x, "
                        f"over the limit of {limits.max_ratio:.0f}x"
                    )
        try:
            broken = archive.testzip()
        except Exception as exc:
            raise UnsafeZipError(f"zip is damaged: {exc}") from exc
        if broken is not None:
            raise UnsafeZipError(f"zip entry {_show(broken)} is damaged (bad CRC)")
    return ZipSummary(files=len(files), total_bytes=total)


def extract_zip(
    path: Path, destination: Path, limits: ZipLimits, *, dir_mode: int = 0o755, file_mode: int = 0o644
) -> ZipSummary:
    """Unpack into `destination`, refusing anything `inspect_zip` refuses, counting real bytes.

    Modes are set explicitly, whatever the umask: the model may run as any user and must be able
    to read what was unpacked. Nothing existing is overwritten and no link is followed."""
    summary = inspect_zip(path, limits)
    destination.mkdir(parents=True, exist_ok=True)
    made: set[tuple[str, ...]] = set()

    def make_folders(parts: tuple[str, ...]) -> None:
        for depth in range(1, len(parts) + 1):
            prefix = parts[:depth]
            if prefix in made:
                continue
            folder = destination.joinpath(*prefix)
            try:
                os.mkdir(folder)
            except FileExistsError:
                # Only a folder already there (never a link someone planted) may be reused.
                if not stat.S_ISDIR(os.lstat(folder).st_mode):
                    raise UnsafeZipError(f"{_show('/'.join(prefix))} exists and is not a folder") from None
            os.chmod(folder, dir_mode)
            made.add(prefix)

    written = 0
    with _open_zip(path) as archive:
        plan = _plan(archive, limits)
        for member, parts in plan:
            if member.is_dir():
                make_folders(parts)
                continue
            make_folders(parts[:-1])
            target = destination.joinpath(*parts)
            # "x": O_CREAT|O_EXCL, which neither overwrites nor follows a link at the target.
            with archive.open(member) as source, open(target, "xb") as sink:
                while chunk := source.read(COPY_CHUNK):
                    written += len(chunk)
                    # Headers can lie about sizes; the bytes actually written are what count.
                    if written > limits.max_total_bytes:
                        raise UnsafeZipError(
                            f"zip unpacks to more than {limits.max_total_bytes} bytes, the configured limit"
                        )
                    sink.write(chunk)
            os.chmod(target, file_mode)
    return summary


def _output_parts(parts: tuple[str, ...]) -> str:
    """The entry name a path on disk gets in a zip, checked like `inspect_zip` checks names."""
    try:
        name = "/".join(parts)
        name.encode("utf-8")
    except UnicodeEncodeError:
        raw = "/".join(parts).encode("utf-8", "surrogateescape")
        raise UnsafeZipError(f"{raw[:120]!r} is not valid UTF-8") from None
    try:
        _parts_of(name)
    except UnsafeZipError as exc:
        raise UnsafeZipError(f"{_show(name)} cannot be a zip entry: {exc}") from None
    return name


def _zip_time(mtime: float) -> tuple[int, int, int, int, int, int]:
    # Zip timestamps run from 1980 to 2107; a model may set any mtime at all.
    stamp = time.localtime(max(0.0, min(mtime, 2**40)))[:6]
    return max(_ZIP_EPOCH, min(_ZIP_LAST, stamp))


def zip_directory(source: Path, archive_path: Path, limits: ZipLimits | None = None) -> int:
    """Zip every regular file under `source`, folders kept, anything else skipped; returns the
    file count. Links are never followed. The result passes `inspect_zip` with the same limits
    (by default `ZipLimits().for_output()`); a tree that would not raises UnsafeZipError, which
    says why in terms of the folder's own paths, and no archive is left behind."""
    limits = limits or ZipLimits().for_output()
    count = nodes = total = 0
    # Per open folder: whether anything was written below it; empty ones get an entry of their own.
    written_below = [False]
    try:
        with (
            zipfile.ZipFile(archive_path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive,
            contextlib.closing(walk_tree(source)) as entries,
        ):
            for entry in entries:
                if entry.kind == "enter":
                    name = _output_parts(entry.parts)
                    _check_shape(entry.parts, limits, _show(name))
                    nodes += 1
                    written_below.append(False)
                elif entry.kind == "leave":
                    if not written_below.pop():
                        archive.writestr(_output_parts(entry.parts) + "/", b"")
                    written_below[-1] = True
                elif stat.S_ISREG(entry.st.st_mode):
                    name = _output_parts(entry.parts)
                    _check_shape(entry.parts, limits, _show(name))
                    nodes += 1
                    total += _add_file(archive, entry, name, limits.max_total_bytes - total)
                    count += 1
                    written_below[-1] = True
                if nodes > limits.max_files:
                    raise UnsafeZipError(
                        f"more than {limits.max_files} files and folders; the limit is {limits.max_files}"
                    )
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(archive_path)
        raise
    return count


def _add_file(archive: zipfile.ZipFile, entry: TreeEntry, name: str, budget: int) -> int:
    try:
        # O_NONBLOCK: a pipe swapped in since the listing must not block the open.
        fd = os.open(
            entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=entry.dir_fd
        )
    except FileNotFoundError:
        return 0
    with os.fdopen(fd, "rb") as source:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return 0  # swapped for something else since it was listed
        info = zipfile.ZipInfo(name, date_time=_zip_time(st.st_mtime))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = (stat.S_IFREG | (stat.S_IMODE(st.st_mode) & 0o777)) << 16
        copied = 0
        with archive.open(info, "w", force_zip64=st.st_size > 2**31) as sink:
            while chunk := source.read(COPY_CHUNK):
                copied += len(chunk)
                if copied > budget:
                    raise UnsafeZipError(f"more than {budget} bytes to zip (at {_show(name)})")
                sink.write(chunk)
    return copied


def copy_stream(source: IO[bytes], sink: IO[bytes], chunk_size: int = COPY_CHUNK) -> int:
    """Copy a binary file-like object to another in chunks; returns the bytes copied."""
    copied = 0
    while chunk := source.read(chunk_size):
        sink.write(chunk)
        copied += len(chunk)
    return copied
