"""The services' CPU accounting and the real-model input: real processes and files, no platform."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib

from bench.common import child_pids, process_cpu_s, process_tree_cpu_s, services_cpu_delta_s
from bench.real_model import VOLUME_SHAPE, write_input_zip

# A shell whose child (a Python) burns CPU until killed: the CPU is the child's, not the shell's.
BUSY_CHILD_UNDER_SHELL = ["/bin/sh", "-c", f"'{sys.executable}' -c 'while True: pass'; :"]


def test_a_process_trees_cpu_includes_its_busy_child() -> None:
    parent = subprocess.Popen(BUSY_CHILD_UNDER_SHELL)
    try:
        deadline = time.monotonic() + 10
        while not child_pids(parent.pid):
            assert time.monotonic() < deadline, "the shell never started its child"
            time.sleep(0.02)
        while (process_tree_cpu_s(parent.pid) or 0.0) < 0.3:
            assert time.monotonic() < deadline, "the child's CPU never showed in the tree"
            time.sleep(0.05)
        own = process_cpu_s(parent.pid)
        assert own is not None and own < 0.1, "the shell itself only waits"
    finally:
        for child in child_pids(parent.pid):
            os.kill(child, 9)
        parent.wait(10)


def test_a_process_that_is_gone_has_no_cpu_figure() -> None:
    finished = subprocess.Popen(["/bin/true"])
    finished.wait(10)
    assert process_tree_cpu_s(finished.pid) is None


def test_a_service_started_between_readings_counts_from_zero() -> None:
    before = {"private-api": 1.0}
    after = {"private-api": 1.5, "consumer-1": 0.25}
    assert services_cpu_delta_s(before, after) == 0.75


def test_the_real_model_input_is_the_same_every_time(tmp_path: Path) -> None:
    first = write_input_zip(tmp_path / "a" / "input.zip").read_bytes()
    second = write_input_zip(tmp_path / "b" / "input.zip").read_bytes()
    assert first == second
    with zipfile.ZipFile(tmp_path / "a" / "input.zip") as archive:
        assert archive.namelist() == ["head.nii.gz"]
        archive.extractall(tmp_path / "unpacked")
    image = nib.Nifti1Image.from_filename(tmp_path / "unpacked" / "head.nii.gz")
    assert image.shape == VOLUME_SHAPE
