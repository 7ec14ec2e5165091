"""zipsafe on its own: every refusal, every odd-but-valid zip through unpack, zip and remove, and
trees on disk too deep for recursion or for PATH_MAX."""

from __future__ import annotations

import io
import os
import socket
import stat
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from inference_server.file_trees import TreeChangedError, directory_size, make_inert, remove_tree, walk_tree
from inference_server.zipsafe import UnsafeZipError, ZipLimits, extract_zip, inspect_zip, zip_directory
from tests.helpers import nest_new_folders

LIMITS = ZipLimits()


def build_zip(entries: list[tuple[str, bytes | None]]) -> bytes:
    """Entries in order; data None makes an explicit folder entry (the name must end in '/')."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as archive:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicates some cases are about
        for name, data in entries:
            archive.writestr(zipfile.ZipInfo(name), data or b"")
    return buffer.getvalue()


def raw_name_zip(raw: bytes, *, utf8_flag: bool) -> bytes:
    """A zip whose one entry's name is exactly `raw`, with or without the zip UTF-8 flag.

    zipfile writes only ASCII or flagged UTF-8 names, so an ASCII stand-in of the same length
    is written and then patched, in the local header and in the central directory alike."""
    stand_in = b"N" * len(raw)
    info = zipfile.ZipInfo(stand_in.decode())
    if utf8_flag:
        info.flag_bits |= 0x800
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(info, b"payload")
    data = buffer.getvalue()
    assert data.count(stand_in) == 2
    return data.replace(stand_in, raw)


def deep_folder_entries(levels: int) -> bytes:
    """The attack as found: a folder entry for every level, one file at the bottom."""
    entries: list[tuple[str, bytes | None]] = []
    path = ""
    for _ in range(levels):
        path += "d/"
        entries.append((path, None))
    entries.append((path + "f.txt", b"bottom"))
    return build_zip(entries)


def written(tmp_path: Path, data: bytes, name: str = "in.zip") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


REFUSED: dict[str, tuple[Callable[[], bytes], str]] = {
    "1,500 nested folder entries": (lambda: deep_folder_entries(1500), "levels deep; the limit is 64"),
    "65 levels implied by one file": (lambda: build_zip([("d/" * 64 + "f", b"x")]), "65 levels deep"),
    "path over 1024 bytes": (
        lambda: build_zip([("/".join(["p" * 100] * 11), b"x")]),
        "has a path of 1110 bytes; the limit is 1024",
    ),
    "name over 255 bytes": (lambda: build_zip([("n" * 256, b"x")]), "has a name of 256 bytes"),
    # 128 characters, 256 bytes: the limit is in bytes, as the filesystem's.
    "multibyte name over 255 bytes": (lambda: build_zip([("é" * 128, b"x")]), "has a name of 256 bytes"),
    "folder entries count as entries": (
        lambda: build_zip([(f"f{i}/", None) for i in range(LIMITS.max_files)] + [("x.txt", b"x")]),
        f"folders counted as files; the limit is {LIMITS.max_files}",
    ),
    "implied folders count too": (
        lambda: build_zip([(f"f{i}/x.txt", b"x") for i in range(LIMITS.max_files // 2 + 1)]),
        "folders counted as files",
    ),
    "file, then a path through it": (
        lambda: build_zip([("a", b"1"), ("a/b", b"2")]),
        "'a' would be both a file and a folder",
    ),
    "path through a name, then that name as a file": (
        lambda: build_zip([("a/b", b"2"), ("a", b"1")]),
        "'a' would be both a file and a folder",
    ),
    "folder entry, then a file of its name": (
        lambda: build_zip([("c/", None), ("c", b"1")]),
        "'c' would be both a file and a folder",
    ),
    "file, then a folder entry of its name": (
        lambda: build_zip([("c", b"1"), ("c/", None)]),
        "'c' would be both a file and a folder",
    ),
    "duplicate file": (lambda: build_zip([("a.txt", b"1"), ("a.txt", b"2")]), "name the same file 'a.txt'"),
    "duplicate after '//'": (lambda: build_zip([("a/b", b"1"), ("a//b", b"2")]), "name the same file 'a/b'"),
    "duplicate after './'": (lambda: build_zip([("a", b"1"), ("./a", b"2")]), "name the same file 'a'"),
    "duplicate folder entry": (lambda: build_zip([("x/", None), ("x//", None)]), "name the same folder 'x'"),
    "name of only '.'": (lambda: build_zip([("./", None), ("a", b"1")]), "names no file or folder"),
    "unflagged name, not UTF-8": (lambda: raw_name_zip(b"\xff\xfe.txt", utf8_flag=False), "not valid UTF-8"),
    "flagged name, not UTF-8": (lambda: raw_name_zip(b"caf\xe9.txt", utf8_flag=True), "not valid UTF-8"),
    "backslash": (lambda: build_zip([("a\\b", b"1")]), "backslashes"),
    "dot-dot": (lambda: build_zip([("a/../../b", b"1")]), "escapes the archive folder"),
    "absolute": (lambda: build_zip([("/etc/passwd", b"1")]), "absolute path"),
    "only folders": (lambda: build_zip([("a/", None)]), "empty"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_inspect_refuses(case, tmp_path):
    build, message = REFUSED[case]
    archive = written(tmp_path, build())

    with pytest.raises(UnsafeZipError) as refused:
        inspect_zip(archive, LIMITS)
    assert message in str(refused.value)
    # Hostile names are long: the message stays readable.
    assert len(str(refused.value)) < 600

    # extract_zip refuses the same before it writes anything.
    with pytest.raises(UnsafeZipError):
        extract_zip(archive, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_depth_path_and_name_limits_are_configurable(tmp_path):
    archive = written(tmp_path, build_zip([("a/b/c/" + "n" * 20, b"x")]))
    inspect_zip(archive, LIMITS)
    for limits, message in (
        (ZipLimits(max_depth=3), "4 levels deep; the limit is 3"),
        (ZipLimits(max_path_bytes=20), "has a path of 26 bytes; the limit is 20"),
        (ZipLimits(max_name_bytes=10), "has a name of 20 bytes"),
        # a, a/b, a/b/c and the file: four things to create.
        (ZipLimits(max_files=3), "the limit is 3"),
    ):
        with pytest.raises(UnsafeZipError, match=message):
            inspect_zip(archive, limits)


# Odd, but meaning one tree without doubt: accepted, and every step after must cope.
ODD_BUT_VALID: dict[str, tuple[bytes, dict[str, bytes], set[str]]] = {
    "unflagged UTF-8 name (read as UTF-8, not CP437)": (
        raw_name_zip("résumé-µ.txt".encode(), utf8_flag=False),
        {"résumé-µ.txt": b"payload"},
        set(),
    ),
    "flagged UTF-8 name": (build_zip([("données/é.nii", b"v")]), {"données/é.nii": b"v"}, set()),
    "'./' and '//' in names": (
        build_zip([("./a.txt", b"a"), ("b//c.txt", b"c")]),
        {"a.txt": b"a", "b/c.txt": b"c"},
        set(),
    ),
    "folder entry after the files in it, and an empty folder": (
        build_zip([("a/b.txt", b"b"), ("a/", None), ("empty/", None)]),
        {"a/b.txt": b"b"},
        {"empty"},
    ),
    "names and depth at the limits": (
        build_zip(
            [
                ("n" * 255, b"long name"),
                ("/".join(["d"] * 63 + ["f"]), b"64 levels"),
                ("/".join(["p" * 99] * 10) + "/" + "q" * 24, b"1024 bytes"),
                ("é" * 127 + "x", b"255 bytes, 128 characters"),
            ]
        ),
        {
            "n" * 255: b"long name",
            "/".join(["d"] * 63 + ["f"]): b"64 levels",
            "/".join(["p" * 99] * 10) + "/" + "q" * 24: b"1024 bytes",
            "é" * 127 + "x": b"255 bytes, 128 characters",
        },
        set(),
    ),
    "spaces, newlines and emoji": (
        build_zip([("with space/line\nbreak 🧠.txt", b"x")]),
        {"with space/line\nbreak 🧠.txt": b"x"},
        set(),
    ),
}


def files_on_disk(root: Path) -> tuple[dict[str, bytes], set[str]]:
    files, empty = {}, set()
    for folder, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(folder) / name
            files[path.relative_to(root).as_posix()] = path.read_bytes()
        if not dirnames and not filenames and Path(folder) != root:
            empty.add(Path(folder).relative_to(root).as_posix())
    return files, empty


@pytest.mark.parametrize("case", list(ODD_BUT_VALID))
def test_odd_but_valid_zip_extracts_zips_and_removes(case, tmp_path):
    data, expected_files, expected_empty = ODD_BUT_VALID[case]
    archive = written(tmp_path, data)
    unpacked = tmp_path / "unpacked"

    summary = extract_zip(archive, unpacked, LIMITS)

    assert summary.files == len(expected_files)
    assert files_on_disk(unpacked) == (expected_files, expected_empty)
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o755 for p in unpacked.rglob("*") if p.is_dir())
    assert directory_size(unpacked) == sum(len(v) for v in expected_files.values())

    # What a model copies to /output comes back with the same names, and the private API's
    # check of the output zip accepts it.
    repacked = tmp_path / "repacked.zip"
    assert zip_directory(unpacked, repacked, LIMITS.for_output()) == len(expected_files)
    inspect_zip(repacked, LIMITS.for_output())
    with zipfile.ZipFile(repacked, metadata_encoding="utf-8") as result:
        names = result.namelist()
        assert {n: result.read(n) for n in names if not n.endswith("/")} == expected_files
        assert {n.rstrip("/") for n in names if n.endswith("/")} == expected_empty
    again = tmp_path / "again"
    extract_zip(repacked, again, LIMITS.for_output())
    assert files_on_disk(again) == (expected_files, expected_empty)

    remove_tree(unpacked)
    assert not unpacked.exists()


def make_deep_tree(root: Path, levels: int, name: str = "d") -> None:
    """`levels` nested folders under root, a file at the bottom, built through folder
    descriptors (a path would pass PATH_MAX long before the bottom)."""
    root.mkdir()
    fd = nest_new_folders(root, levels, name)
    try:
        bottom = os.open("bottom.bin", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        with os.fdopen(bottom, "wb") as sink:
            sink.write(b"z" * 4321)
        os.mkfifo("pipe", dir_fd=fd)
    finally:
        os.close(fd)


def test_a_1500_level_tree_on_disk_is_measured_refused_zipped_and_removed(tmp_path):
    root = tmp_path / "output"
    make_deep_tree(root, 1500)

    # Every byte counts, at any depth.
    assert directory_size(root) == 4321
    # Past the depth limit: refused with a reason, no half-written archive left.
    with pytest.raises(UnsafeZipError, match="65 levels deep; the limit is 64"):
        zip_directory(root, tmp_path / "out.zip", LIMITS.for_output())
    assert not (tmp_path / "out.zip").exists()
    # Where the limits allow it, it is zipped (the pipe skipped, not waited on).
    roomy = ZipLimits(max_depth=2000, max_path_bytes=4000).for_output()
    assert zip_directory(root, tmp_path / "out.zip", roomy) == 1
    with zipfile.ZipFile(tmp_path / "out.zip") as archive:
        assert archive.namelist() == ["d/" * 1500 + "bottom.bin"]

    remove_tree(root)
    assert not root.exists()


def test_a_tree_far_past_path_max_with_names_at_the_limit_is_measured_and_removed(tmp_path):
    root = tmp_path / "output"
    # 40 levels of 255-byte names: a 10 kB path, where path-based calls fail with ENAMETOOLONG.
    make_deep_tree(root, 40, name="n" * 255)
    assert directory_size(root) == 4321
    with pytest.raises(UnsafeZipError, match="has a path of"):
        zip_directory(root, tmp_path / "out.zip", LIMITS.for_output())
    remove_tree(root)
    assert not root.exists()


def test_remove_tree_copes_with_folders_a_model_locked_and_never_follows_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the model's")
    root = tmp_path / "work"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f.txt").write_text("x")
    (root / "a" / "link-to-outside").symlink_to(outside)
    (root / "a" / "file-link").symlink_to(outside / "keep.txt")
    os.chmod(root / "a" / "b", 0o000)  # unreadable and unwritable
    os.chmod(root / "a", 0o500)  # unwritable

    remove_tree(root)

    assert not root.exists()
    assert (outside / "keep.txt").read_text() == "not the model's"
    remove_tree(root)  # already gone: nothing to do
    (tmp_path / "plain").write_text("x")
    remove_tree(tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_make_inert_leaves_only_regular_files_and_folders_without_special_bits(tmp_path):
    root = tmp_path / "output"
    (root / "sgid-folder").mkdir(parents=True)
    os.chmod(root / "sgid-folder", 0o2775 | stat.S_ISVTX)
    (root / "sgid-folder" / "in.txt").write_text("inside")
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "suid", 0o6755)
    os.link(root / "suid", root / "hard-link")
    os.mkfifo(root / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "sock"))
    server.close()
    (root / "link-out").symlink_to("/etc/passwd")

    removed = make_inert(root)

    assert sorted(removed) == ["fifo (named pipe)", "link-out (symbolic link)", "sock (socket)"]
    remaining = {p.relative_to(root).as_posix(): p.lstat().st_mode for p in root.rglob("*")}
    assert sorted(remaining) == ["hard-link", "sgid-folder", "sgid-folder/in.txt", "suid"]
    assert all(stat.S_ISREG(m) or stat.S_ISDIR(m) for m in remaining.values())
    assert all(m & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX) == 0 for m in remaining.values())
    assert stat.S_IMODE(remaining["suid"]) == 0o755


def test_zip_directory_skips_what_is_not_a_regular_file_and_never_blocks_on_a_pipe(tmp_path):
    root = tmp_path / "output"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "data.bin").write_bytes(b"d" * 100)
    (root / "empty").mkdir()
    os.mkfifo(root / "sub" / "fifo")
    (root / "link").symlink_to("/etc")
    os.utime(root / "sub" / "data.bin", (0, 0))  # 1970: before what a zip can store

    assert zip_directory(root, tmp_path / "out.zip") == 1

    with zipfile.ZipFile(tmp_path / "out.zip") as archive:
        assert sorted(archive.namelist()) == ["empty/", "sub/data.bin"]
        assert archive.read("sub/data.bin") == b"d" * 100
    inspect_zip(tmp_path / "out.zip", LIMITS.for_output())


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (b"caf\xe9.txt", "not valid UTF-8"),
        (b"back\\slash.txt", "backslashes"),
        (b"/".join([b"n" * 200] * 6), "has a path of 1205 bytes"),
    ],
)
def test_zip_directory_refuses_a_tree_whose_zip_the_private_api_would_refuse(tmp_path, name, message):
    root = tmp_path / "output"
    root.mkdir()
    target = os.path.join(os.fsencode(root), name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as sink:
        sink.write(b"x")

    with pytest.raises(UnsafeZipError, match=message):
        zip_directory(root, tmp_path / "out.zip", LIMITS.for_output())
    assert not (tmp_path / "out.zip").exists()
    remove_tree(root)
    assert not root.exists()


def test_zip_directory_counts_files_and_folders_against_the_limit(tmp_path):
    root = tmp_path / "output"
    for index in range(3):
        (root / f"folder{index}").mkdir(parents=True)
    (root / "folder0" / "f.txt").write_text("x")
    with pytest.raises(UnsafeZipError, match="more than 3 files and folders"):
        zip_directory(root, tmp_path / "out.zip", ZipLimits(max_files=3))
    assert zip_directory(root, tmp_path / "out.zip", ZipLimits(max_files=4)) == 1


def test_a_folder_moved_during_a_walk_ends_it_with_a_clear_error_and_removal_starts_over(tmp_path):
    root = tmp_path / "output"
    make_deep_tree(root, 40)
    # A model still running may move folders while /output is measured. Past the descriptors
    # the walk keeps open, it finds its way up through ".."; moved, that is somewhere else.
    entries = walk_tree(root)
    with pytest.raises(TreeChangedError):
        for entry in entries:
            if entry.kind == "other" and entry.name == "bottom.bin":
                os.rename(root.joinpath(*["d"] * 40), root / "moved-away")
    entries.close()

    remove_tree(root)
    assert not root.exists()


def test_the_folder_given_may_itself_be_a_link_but_nothing_below_it_is_followed(tmp_path):
    real = tmp_path / "scans"
    (real / "series").mkdir(parents=True)
    (real / "series" / "1.dcm").write_bytes(b"dicom")
    (real / "elsewhere").symlink_to(tmp_path)
    (tmp_path / "link-to-scans").symlink_to(real)

    assert zip_directory(tmp_path / "link-to-scans", tmp_path / "out.zip") == 1
    with zipfile.ZipFile(tmp_path / "out.zip") as archive:
        assert archive.namelist() == ["series/1.dcm"]
    assert directory_size(tmp_path / "link-to-scans") == 5
    # Removing the link removes the link, not what it points to.
    remove_tree(tmp_path / "link-to-scans")
    assert (real / "series" / "1.dcm").exists()
