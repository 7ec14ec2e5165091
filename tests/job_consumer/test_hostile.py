"""A consumer against what a task or its model may do on purpose: hostile outputs, a read-only
root filesystem, errors of the consumer's own, leftovers it cannot remove yet. Real private API,
RabbitMQ and Docker; the consumer runs in this process so the test can look at its host side."""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import zipfile
from pathlib import Path

import pytest

import job_consumer.housekeeping as housekeeping_module
import job_consumer.task_execution as task_execution_module
from inference_server.contract import ZIP_MEDIA_TYPE, PrivateRoutes, TaskStatus
from job_consumer.private_client import PrivateApiHttpError
from job_consumer.workspace import OWNER_FILE, TaskWorkspace
from tests import images
from tests.helpers import nest_new_folders, wait_until
from tests.inference_server.test_zipsafe import REFUSED
from tests.job_consumer.helpers import ConsumerThread
from tests.job_consumer.stack import make_zip
from tests.job_consumer.test_consumer import COPY_SCRIPT, hrid, task_folders

pytestmark = pytest.mark.docker

SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
LONG_NAME = "L" * 255
DEEP_OK = "/".join(["d"] * 60)

# Run as root (the model allows it), inside the usual sandbox: every kind of file it can make.
HOSTILE_OUTPUT_SCRIPT = f"""
cd /output
echo plain > plain.txt
cp /bin/true suid-binary && chmod 4755 suid-binary
mkdir sgid-folder && chmod 3777 sgid-folder && echo inside > sgid-folder/in.txt
mkfifo fifo
python3 -c "import socket; socket.socket(socket.AF_UNIX).bind('/output/sock')"
ln -s /etc/passwd link-out
ln -s / link-root
ln plain.txt hard-link.txt
mknod char-device c 1 3 2>/dev/null && echo mknod=allowed || echo mknod=refused
mkdir -p {DEEP_OK} && echo deep > {DEEP_OK}/bottom.txt
echo long > {LONG_NAME}
echo wrote everything
""".encode()


def stored_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_every_refused_zip_is_a_400_at_the_private_api_and_nothing_is_stored(private_api):
    model_id = hrid("copy")
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": COPY_SCRIPT}))
    blobs = private_api.settings.blob_dir
    stored = stored_files(blobs)
    assert stored, "the model zip is stored: the comparisons below look in the right place"
    for case, (build, detail) in REFUSED.items():
        data = build()
        as_input = private_api.http.post(
            PrivateRoutes.TASKS,
            params={"model_human_readable_id": model_id},
            files={"zip_file": ("input.zip", data, ZIP_MEDIA_TYPE)},
        )
        assert as_input.status_code == 400, f"{case}: {as_input.text}"
        assert detail in as_input.json()["detail"], case
        as_model = private_api.http.post(
            PrivateRoutes.MODELS,
            params={"human_readable_id": hrid("m"), "container_tag": images.SCRIPT, "model_available": True},
            files={"zip_file": ("model.zip", data, ZIP_MEDIA_TYPE)},
        )
        assert as_model.status_code == 400, f"{case}: {as_model.text}"
        assert stored_files(blobs) == stored, case


def host_view(root: Path) -> dict[str, int]:
    """Every path under root with its lstat mode (the test's trees are shallow enough for this)."""
    seen = {}
    for folder, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(folder) / name
            seen[path.relative_to(root).as_posix()] = path.lstat().st_mode
    return seen


def test_hostile_output_of_a_root_model_comes_back_as_regular_files_only(
    private_api, make_consumer, test_images, monkeypatch
):
    model_id = hrid("hostile")
    private_api.register_model(
        model_id, images.SCRIPT, model_zip=make_zip({"run.sh": HOSTILE_OUTPUT_SCRIPT}), run_as_root=True
    )
    task = private_api.submit(model_id, {"x.txt": b"x"})
    consumer = make_consumer(max_tasks=1)
    # What the host holds in /output at the moment it is zipped, after the consumer's clean-up.
    zipped_from: list[dict[str, int]] = []
    real_zip_directory = task_execution_module.zip_directory

    def watching_zip_directory(source: Path, archive: Path, limits=None) -> int:
        zipped_from.append(host_view(source))
        return real_zip_directory(source, archive, limits)

    monkeypatch.setattr(task_execution_module, "zip_directory", watching_zip_directory)

    assert ConsumerThread(consumer).start().join(90) == 1

    done = private_api.task(task.uid)
    assert done.status == TaskStatus.FINISHED, done.error
    logs = private_api.logs(task.uid)
    assert "wrote everything" in logs
    assert "mknod=refused" in logs  # no capabilities: no device nodes, even as root
    for removed in (
        "fifo (named pipe)",
        "sock (socket)",
        "link-out (symbolic link)",
        "link-root (symbolic link)",
    ):
        assert removed in logs
    [on_host] = zipped_from
    regular = {
        "plain.txt",
        "hard-link.txt",
        "suid-binary",
        "sgid-folder/in.txt",
        f"{DEEP_OK}/bottom.txt",
        LONG_NAME,
    }
    assert {path for path, mode in on_host.items() if stat.S_ISREG(mode)} == regular
    assert all(stat.S_ISREG(mode) or stat.S_ISDIR(mode) for mode in on_host.values()), on_host
    assert [path for path, mode in on_host.items() if mode & SPECIAL_BITS] == []

    response = private_api.http.get(PrivateRoutes.TASK_OUTPUT.format(uid=task.uid))
    assert response.status_code == 200, response.text
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        members = {info.filename: info for info in archive.infolist()}
        assert set(members) == regular
        assert all((info.external_attr >> 16) & SPECIAL_BITS == 0 for info in members.values())
        assert archive.read("hard-link.txt") == archive.read("plain.txt") == b"plain\n"
    assert task_folders(consumer.settings.resolved_work_dir, task.uid) == []


DEEP_TOO_FAR = b"""python3 - <<'PY'
import os
os.chdir("/output")
for _ in range(1500):
    os.mkdir("d")
    os.chdir("d")
open("bottom.txt", "w").write("deep")
PY
"""
NOT_UTF8 = b"""python3 -c "open(b'/output/caf\\xe9.txt', 'w').write('x')"\n"""


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (DEEP_TOO_FAR, "is 65 levels deep; the limit is 64"),
        (NOT_UTF8, "is not valid UTF-8"),
    ],
    ids=["1500-deep tree", "name not UTF-8"],
)
def test_output_that_cannot_be_zipped_fails_the_task_with_the_reason_and_the_consumer_goes_on(
    private_api, make_consumer, test_images, script, reason
):
    bad_id, good_id = hrid("bad-output"), hrid("copy")
    private_api.register_model(bad_id, images.SCRIPT, model_zip=make_zip({"run.sh": script}))
    private_api.register_model(good_id, images.SCRIPT, model_zip=make_zip({"run.sh": COPY_SCRIPT}))
    bad = private_api.submit(bad_id, {"x.txt": b"x"})
    good = private_api.submit(good_id, {"y.txt": b"y"})
    consumer = make_consumer(max_tasks=2)

    assert ConsumerThread(consumer).start().join(120) == 2

    failed = private_api.task(bad.uid)
    assert failed.status == TaskStatus.FAILED
    assert failed.error.startswith("output refused: /output cannot be zipped: ")
    assert reason in failed.error
    assert failed.attempts == 1  # the same output would be refused again: not retried
    assert str(consumer.settings.resolved_work_dir) not in failed.error
    assert private_api.output(good.uid) == {"y.txt": b"y"}
    # The deep tree went with its work folder.
    assert task_folders(consumer.settings.resolved_work_dir, bad.uid) == []


def test_a_model_writing_to_its_root_filesystem_fails_cleanly(private_api, make_consumer, test_images):
    model_id = hrid("rootfs")
    script = b"echo trying; echo x > /var/tmp/state || exit 5\n"
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": script}))
    task = private_api.submit(model_id, {"x.txt": b"x"})

    assert ConsumerThread(make_consumer(max_tasks=1)).start().join(60) == 1

    failed = private_api.task(task.uid)
    assert failed.status == TaskStatus.FAILED
    assert failed.exit_code == 5
    assert failed.error.startswith("model exited with code 5")
    assert "Read-only file system" in failed.error
    assert failed.attempts == 1


def test_two_attempts_on_one_host_get_folders_of_their_own(private_api, make_consumer, test_images):
    model_id = hrid("copy")
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": COPY_SCRIPT}))
    task = private_api.submit(model_id, {"x.txt": b"x"})
    consumer = make_consumer(max_tasks=2)
    folders: list[Path] = []
    real_download = consumer.api.download_input

    def download_input(uid: str, dest: Path) -> None:
        folders.append(dest.parent)
        if len(folders) == 1:
            # The first attempt ends the way a flaky private API ends it: retryable.
            raise PrivateApiHttpError("GET", f"/tasks/{uid}/input", 503, "try again")
        real_download(uid, dest)

    consumer.api.download_input = download_input

    assert ConsumerThread(consumer).start().join(90) == 2

    done = private_api.task(task.uid)
    assert done.status == TaskStatus.FINISHED, done.error
    assert done.attempts == 2
    first, second = folders
    assert first != second
    assert first.name.startswith(f"{task.uid}-a1-") and second.name.startswith(f"{task.uid}-a2-")
    assert not first.exists() and not second.exists()


def test_an_unexpected_error_fails_only_that_task_without_host_paths(
    private_api, make_consumer, test_images, monkeypatch
):
    model_id = hrid("copy")
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": COPY_SCRIPT}))
    doomed = private_api.submit(model_id, {"x.txt": b"x"})
    fine = private_api.submit(model_id, {"y.txt": b"y"})
    real_unpack = TaskWorkspace.unpack_input

    def unpack_input(self: TaskWorkspace, limits) -> None:
        if self.root.name.startswith(doomed.uid):
            # As a bug deep in a library would: an error naming a host path.
            raise OSError(errno.EIO, "Input/output error", str(self.input_dir / "scan.nii"))
        real_unpack(self, limits)

    monkeypatch.setattr(TaskWorkspace, "unpack_input", unpack_input)
    consumer = make_consumer()
    worker = ConsumerThread(consumer).start()
    wait_until(
        lambda: (
            {private_api.task(uid).status for uid in (doomed.uid, fine.uid)}
            <= {TaskStatus.FAILED, TaskStatus.FINISHED}
        ),
        120,
        "both tasks to end",
    )
    consumer.request_stop()
    worker.join(30)

    failed = private_api.task(doomed.uid)
    assert failed.status == TaskStatus.FAILED
    assert failed.error.startswith("consumer error: OSError: [Errno 5] Input/output error")
    work_dir = consumer.settings.resolved_work_dir
    assert str(work_dir) not in failed.error
    assert "<work dir>/" in failed.error
    assert private_api.output(fine.uid) == {"y.txt": b"y"}
    assert task_folders(work_dir, doomed.uid) == []


def plant_deep_leftover(work_dir: Path, name: str, owner: str, levels: int = 1500) -> Path:
    """A work folder as a crashed consumer would leave it after a model made a deep tree."""
    folder = work_dir / name
    (folder / "output").mkdir(parents=True)
    (folder / OWNER_FILE).write_text(owner)
    os.close(nest_new_folders(folder / "output", levels))
    os.chmod(folder / "output", 0o000)  # and locked by the model, for good measure
    return folder


def test_clean_up_failures_are_logged_and_retried_never_fatal(
    private_api, make_consumer, test_images, monkeypatch, caplog
):
    model_id = hrid("copy")
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": COPY_SCRIPT}))
    consumer = make_consumer(cleanup_interval_s=0.5)
    work_dir = consumer.settings.resolved_work_dir
    work_dir.mkdir(parents=True)
    deep = plant_deep_leftover(work_dir, "deepleftover0000001-a1-00000000", consumer.settings.consumer_id)
    stuck = plant_deep_leftover(work_dir, "stuckleftover000001-a1-00000000", consumer.settings.consumer_id, 3)
    real_remove_owned = housekeeping_module.remove_owned
    refusing = True

    def remove_owned(folder: Path) -> None:
        if refusing and folder == stuck:
            raise RuntimeError("simulated: this one cannot be removed yet")
        real_remove_owned(folder)

    monkeypatch.setattr(housekeeping_module, "remove_owned", remove_owned)
    caplog.set_level(logging.WARNING, logger="job_consumer")
    worker = ConsumerThread(consumer).start()

    # Start-up went on past both: the deep one is gone, the stuck one is left for later...
    wait_until(lambda: not deep.exists(), 60, "the deep leftover to be removed")
    task = private_api.submit(model_id, {"x.txt": b"x"})
    wait_until(lambda: private_api.task(task.uid).status == TaskStatus.FINISHED, 60, "the task to finish")
    assert stuck.exists()
    assert any("could not remove stale work dir" in r.getMessage() for r in caplog.records)
    # ...and the periodic sweep tries again until it succeeds.
    refusing = False
    wait_until(lambda: not stuck.exists(), 30, "a later sweep to remove the stuck leftover")
    consumer.request_stop()
    assert worker.join(30) == 1
