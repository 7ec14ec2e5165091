"""Trees on disk walked, measured, made inert and removed without trusting them.

What a model wrote, or what a crash left behind, may be thousands of folders deep, hold names at
the kernel's length limit, folders without permissions, links, pipes and device nodes. Walks here
use no recursion and go through folder file descriptors, so neither Python's recursion limit nor
the kernel's PATH_MAX bounds what can be measured or removed, and no link is ever followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

# Open folder descriptors kept on the way down a tree; deeper levels are reopened through ".."
# on the way up, so a tree of any depth is walked with a bounded number of open files.
_KEPT_DIR_FDS = 32
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


class TreeChangedError(OSError):
    """A folder was moved while it was walked; the walk cannot tell where it is any more."""


@dataclass(frozen=True)
class TreeEntry:
    """One step of a walk. `dir_fd` is the parent folder's descriptor, valid until the next step."""

    kind: str  # "other" (anything but a folder), "enter" (a folder, before its contents), "leave"
    dir_fd: int
    name: str
    parts: tuple[str, ...]
    st: os.stat_result


@dataclass
class _Frame:
    fd: int | None
    ident: tuple[int, int]
    names: list[str]
    parts: tuple[str, ...]
    st: os.stat_result | None = None


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _open_dir(name: str | Path, dir_fd: int | None, make_accessible: bool) -> int:
    # The root of a walk is the caller's own path (a user's folder given to the client may be a
    # link to it); everything below it is never followed.
    flags = _DIR_FLAGS if dir_fd is not None else _DIR_FLAGS & ~os.O_NOFOLLOW
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:
        if not make_accessible:
            raise
    # A model may leave folders without read or search permission; we may change that only
    # on our own folders (or as root), and only when removing.
    os.chmod(name, 0o700, dir_fd=dir_fd)
    return os.open(name, flags, dir_fd=dir_fd)


def walk_tree(root: Path, *, make_accessible: bool = False) -> Generator[TreeEntry, None, None]:
    """Every entry under `root`, depth first, folders announced before and after their contents.

    Iterative, through descriptors, never following links and never leaving root's filesystem.
    Entries that vanish meanwhile are skipped; a folder moved meanwhile ends the walk with
    TreeChangedError (possible only while a model still runs)."""
    stack: list[_Frame] = []
    root_fd = _open_dir(root, None, make_accessible)
    try:
        root_st = os.fstat(root_fd)
        if make_accessible and stat.S_IMODE(root_st.st_mode) & 0o700 != 0o700:
            os.fchmod(root_fd, 0o700)
        names = sorted(os.listdir(root_fd), reverse=True)
    except BaseException:
        os.close(root_fd)
        raise
    stack.append(_Frame(root_fd, _ident(root_st), names, ()))
    try:
        while stack:
            frame = stack[-1]
            assert frame.fd is not None
            if not frame.names:
                if len(stack) == 1:
                    break
                parent = stack[-2]
                if parent.fd is None:
                    # Closed on the way down to bound the open descriptors: found again through
                    # "..", and checked to be the same folder.
                    parent_fd = os.open("..", _DIR_FLAGS, dir_fd=frame.fd)
                    if _ident(os.fstat(parent_fd)) != parent.ident:
                        os.close(parent_fd)
                        raise TreeChangedError(errno.ESTALE, "a folder was moved while it was walked")
                    parent.fd = parent_fd
                stack.pop()
                os.close(frame.fd)
                assert frame.st is not None
                yield TreeEntry("leave", parent.fd, frame.parts[-1], frame.parts, frame.st)
                continue
            name = frame.names.pop()
            try:
                st = os.stat(name, dir_fd=frame.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            parts = (*frame.parts, name)
            if not stat.S_ISDIR(st.st_mode):
                yield TreeEntry("other", frame.fd, name, parts, st)
                continue
            if st.st_dev != root_st.st_dev:
                continue  # a mount point: not ours to walk into
            yield TreeEntry("enter", frame.fd, name, parts, st)
            try:
                child_fd = _open_dir(name, frame.fd, make_accessible)
            except (FileNotFoundError, NotADirectoryError):
                continue  # replaced meanwhile
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                continue  # replaced by a link meanwhile: never followed
            try:
                child_st = os.fstat(child_fd)
                if _ident(child_st) != _ident(st):
                    os.close(child_fd)
                    continue
                if make_accessible and stat.S_IMODE(child_st.st_mode) & 0o700 != 0o700:
                    os.fchmod(child_fd, 0o700)
                names = sorted(os.listdir(child_fd), reverse=True)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(child_fd)
                raise
            if len(stack) >= _KEPT_DIR_FDS:
                os.close(frame.fd)
                frame.fd = None
            stack.append(_Frame(child_fd, _ident(child_st), names, parts, child_st))
    finally:
        for frame in stack:
            if frame.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(frame.fd)


def directory_size(root: Path, stop_above: int | None = None) -> int:
    """Bytes in the regular files under `root`, at any depth (links not followed). With
    `stop_above`, the walk ends as soon as the sum passes it: a model filling its folder is not
    walked to the end. A folder that cannot be read raises: bytes that cannot be seen cannot
    be called small."""
    total = 0
    try:
        walk = walk_tree(root)
        with contextlib.closing(walk) as entries:
            for entry in entries:
                if entry.kind == "other" and stat.S_ISREG(entry.st.st_mode):
                    total += entry.st.st_size
                    if stop_above is not None and total > stop_above:
                        return total
    except FileNotFoundError:
        if total == 0 and not os.path.lexists(root):
            return 0
        raise
    return total


def remove_tree(path: Path) -> None:
    """Remove a file or folder of any depth and any names, even where a model left folders
    without read or write permission. Raises OSError if something cannot be removed."""
    for _ in range(3):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        try:
            with contextlib.closing(walk_tree(path, make_accessible=True)) as entries:
                for entry in entries:
                    if entry.kind == "other":
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.name, dir_fd=entry.dir_fd)
                    elif entry.kind == "leave":
                        with contextlib.suppress(FileNotFoundError):
                            os.rmdir(entry.name, dir_fd=entry.dir_fd)
            os.rmdir(path)
            return
        except FileNotFoundError:
            if not os.path.lexists(path):
                return
            raise
        except TreeChangedError:
            continue  # moved under us: start again from the top
    raise TreeChangedError(errno.ESTALE, "folders kept moving while they were removed")


def _describe(mode: int) -> str:
    for test, what in (
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISFIFO, "named pipe"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return what
    return "special file"


def make_inert(root: Path) -> list[str]:
    """Leave only regular files and folders under `root`, none setuid, setgid or sticky.

    Run on what a model wrote, after it stopped, before anything on the host reads it: links,
    pipes, sockets and device nodes are removed (a host process must not open a pipe, follow a
    link or find a device), and special mode bits are cleared. Returns what was removed, as
    "relative/path (kind)" lines."""
    removed: list[str] = []
    with contextlib.closing(walk_tree(root)) as entries:
        for entry in entries:
            mode = entry.st.st_mode
            if entry.kind == "leave":
                continue
            if entry.kind == "other" and not stat.S_ISREG(mode):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=entry.dir_fd)
                shown = "/".join(entry.parts).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                removed.append(f"{shown} ({_describe(mode)})")
            elif mode & _SPECIAL_BITS:
                # Regular file or folder, checked by lstat just now, and the model has stopped.
                os.chmod(entry.name, stat.S_IMODE(mode) & ~_SPECIAL_BITS, dir_fd=entry.dir_fd)
    return removed
