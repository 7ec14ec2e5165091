"""ModelRunner against the real engines, Docker and Podman (`container_runtime`): mounts,
sandbox, limits, stop, clean-up."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

import docker
import pytest

from inference_server.file_trees import directory_size
from job_consumer.runner import LABEL_CONSUMER, LABEL_MANAGED, LABEL_TASK, ModelRunError, ModelRunner
from tests import images
from tests.job_consumer.helpers import make_model


class Dirs:
    def __init__(self, root: Path) -> None:
        self.input = root / "input"
        self.output = root / "output"
        self.model = root / "model"
        self.input.mkdir(parents=True)
        self.output.mkdir()
        os.chmod(self.output, 0o777)
        self.model.mkdir()


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    return Dirs(tmp_path / "task")


def uid() -> str:
    return f"runnertest{secrets.token_hex(8)}"


def run_script(runner: ModelRunner, dirs: Dirs, script: str, task_uid: str | None = None, **model_fields):
    """Run the script image with `script` as /model/run.sh."""
    (dirs.model / "run.sh").write_text(script)
    os.chmod(dirs.model / "run.sh", 0o644)
    model = make_model(images.SCRIPT, model_available=True, **model_fields)
    return runner.run(
        task_uid=task_uid or uid(),
        model=model,
        input_dir=dirs.input,
        output_dir=dirs.output,
        model_dir=dirs.model,
    )


def task_containers(engine: docker.DockerClient, task_uid: str) -> list:
    return engine.containers.list(all=True, sparse=True, filters={"label": f"{LABEL_TASK}={task_uid}"})


@pytest.mark.docker
def test_nested_input_is_copied_to_output_byte_for_byte(runner, dirs, test_images, engine):
    files = {
        "top.bin": os.urandom(70_000),
        "a/b/c/deep.dat": os.urandom(1234),
        "with space/name.txt": b"hello\n",
    }
    for name, data in files.items():
        (dirs.input / name).parent.mkdir(parents=True, exist_ok=True)
        (dirs.input / name).write_bytes(data)
    task_uid = uid()

    result = run_script(runner, dirs, "cp -R /input/. /output/ && echo copied\n", task_uid=task_uid)

    assert result.exit_code == 0, result.logs
    assert result.succeeded
    for name, data in files.items():
        assert (dirs.output / name).read_bytes() == data
    assert "copied" in result.logs
    assert task_containers(engine, task_uid) == []


@pytest.mark.docker
def test_default_sandbox_readonly_mounts_no_network_unprivileged(runner, dirs, test_images):
    (dirs.input / "in.txt").write_text("input data")
    (dirs.model / "weights.txt").write_text("model data")
    script = r"""
exec > /output/report.txt 2>&1
echo "ids=$(id -u):$(id -g)"
touch /input/new 2>/dev/null && echo input=writable || echo input=readonly
touch /model/new 2>/dev/null && echo model=writable || echo model=readonly
echo "model_content=$(cat /model/weights.txt)"
echo "input_content=$(cat /input/in.txt)"
echo "interfaces=$(ls /sys/class/net | tr '\n' ' ')"
echo "capeff=$(grep CapEff /proc/self/status | tr -d '[:space:]')"
echo "nonewprivs=$(grep NoNewPrivs /proc/self/status | tr -d '[:space:]')"
"""
    result = run_script(runner, dirs, script, memory_mb=64, pids=32)

    assert result.exit_code == 0, result.logs
    report = dict(
        line.split("=", 1) for line in (dirs.output / "report.txt").read_text().splitlines() if "=" in line
    )
    assert report["ids"] == "65534:65534"
    assert report["input"] == "readonly"
    assert report["model"] == "readonly"
    assert report["model_content"] == "model data"
    assert report["input_content"] == "input data"
    assert report["interfaces"].split() == ["lo"]
    assert report["capeff"] == "CapEff:0000000000000000"
    assert report["nonewprivs"] == "NoNewPrivs:1"
    assert not (dirs.input / "new").exists()
    assert result.limits.memory_mb == 64 and result.limits.pids == 32


@pytest.mark.docker
def test_runs_as_root_only_when_the_model_allows_it(runner, dirs, test_images):
    result = run_script(runner, dirs, "id -u > /output/uid.txt\n", run_as_root=True)
    assert result.exit_code == 0, result.logs
    assert (dirs.output / "uid.txt").read_text().strip() == "0"


@pytest.mark.docker
def test_allow_network_gives_the_container_a_network(runner, dirs, test_images):
    result = run_script(runner, dirs, "ls /sys/class/net > /output/net.txt\n", allow_network=True)
    assert result.exit_code == 0, result.logs
    assert len((dirs.output / "net.txt").read_text().split()) >= 2


@pytest.mark.docker
def test_nonzero_exit_reports_code_and_both_streams(runner, dirs, test_images):
    result = run_script(runner, dirs, "echo to-stdout; echo to-stderr >&2; exit 3\n")
    assert result.exit_code == 3
    assert not result.succeeded
    assert not result.timed_out and not result.oom_killed and not result.cancelled
    assert "to-stdout" in result.logs and "to-stderr" in result.logs


@pytest.mark.docker
def test_timeout_kills_the_container_and_says_so(runner, dirs, test_images, engine):
    task_uid = uid()
    started = time.monotonic()
    result = run_script(runner, dirs, "echo begun; sleep 120\n", task_uid=task_uid, timeout_s=2)
    elapsed = time.monotonic() - started

    assert result.timed_out
    # Killed by the consumer, not for its memory (Podman's OOM report is inferred from the kill).
    assert not result.oom_killed
    assert not result.succeeded
    # At least the timeout, and far less than the model's own 120 s; the margin is for a loaded machine.
    assert 2 <= elapsed < 60
    assert "begun" in result.logs
    assert task_containers(engine, task_uid) == []


@pytest.mark.docker
def test_out_of_memory_is_reported(runner, dirs, test_images):
    script = 'python3 -c "blocks = [b\\"x\\" * (1 << 20) for _ in range(1024)]; print(len(blocks))"\n'
    result = run_script(runner, dirs, script, memory_mb=32)
    assert result.oom_killed, result.logs
    assert result.exit_code == 137
    assert not result.succeeded


@pytest.mark.docker
def test_should_stop_stops_the_container_within_seconds(runner, dirs, test_images, engine):
    task_uid = uid()
    (dirs.model / "run.sh").write_text("echo started; touch /output/started; exec sleep 120\n")
    model = make_model(images.SCRIPT, model_available=True)
    started_file = dirs.output / "started"
    stop_asked_at: list[float] = []

    def should_stop() -> bool:
        # The condition is the model's own "I am running" marker, not a guessed delay.
        if started_file.exists() and not stop_asked_at:
            stop_asked_at.append(time.monotonic())
        return bool(stop_asked_at)

    result = runner.run(
        task_uid=task_uid,
        model=model,
        input_dir=dirs.input,
        output_dir=dirs.output,
        model_dir=dirs.model,
        should_stop=should_stop,
    )
    stopped_after = time.monotonic() - stop_asked_at[0]

    assert result.cancelled
    assert not result.succeeded
    # Poll interval (1 s) + stop grace (1 s) + removal is the usual time; the model alone would run
    # 120 s, and the margin is for a loaded machine.
    assert stopped_after < 60
    assert "started" in result.logs
    assert task_containers(engine, task_uid) == []


@pytest.mark.docker
def test_missing_image_is_a_clear_non_retryable_error(runner, dirs, engine):
    task_uid = uid()
    model = make_model("inference-server/no-such-image:never")
    with pytest.raises(ModelRunError) as caught:
        runner.run(task_uid=task_uid, model=model, input_dir=dirs.input, output_dir=dirs.output)
    assert "inference-server/no-such-image:never" in str(caught.value)
    assert "not present" in str(caught.value)
    assert caught.value.retryable is False
    assert task_containers(engine, task_uid) == []


@pytest.mark.docker
def test_containers_carry_the_labels_a_reaper_needs(runner, dirs, test_images, engine, settings):
    task_uid = uid()
    seen: dict = {}

    def should_stop() -> bool:
        # Polled while the container waits for the go file: look at it, then let it finish.
        if not seen:
            found = task_containers(engine, task_uid)
            if found:
                seen.update(found[0].attrs["Labels"])
                (dirs.output / "go").write_text("go")
        return False

    (dirs.model / "run.sh").write_text("while [ ! -f /output/go ]; do sleep 0.1; done\n")
    result = runner.run(
        task_uid=task_uid,
        model=make_model(images.SCRIPT, model_available=True),
        input_dir=dirs.input,
        output_dir=dirs.output,
        model_dir=dirs.model,
        should_stop=should_stop,
    )
    assert result.exit_code == 0
    assert seen[LABEL_MANAGED] == "true"
    assert seen[LABEL_CONSUMER] == settings.consumer_id
    assert seen[LABEL_TASK] == task_uid
    assert task_containers(engine, task_uid) == []


@pytest.mark.docker
def test_remove_leftovers_removes_only_this_consumers_containers(runner, engine, test_images, settings):
    mine_old = runner.labels_for("leftovertask0000001")
    mine_current = runner.labels_for("leftovertask0000002")
    other = {**runner.labels_for("leftovertask0000003"), LABEL_CONSUMER: f"{settings.consumer_id}-other"}
    created = [
        engine.containers.create(images.SLEEP, labels=labels, network_mode="none")
        for labels in (mine_old, mine_current, other)
    ]
    try:
        removed = runner.remove_leftovers(keep_task_uids={"leftovertask0000002"})
        remaining = {
            c.id for c in engine.containers.list(all=True, sparse=True, filters={"label": LABEL_MANAGED})
        }
        assert removed == 1
        assert created[0].id not in remaining
        assert created[1].id in remaining
        assert created[2].id in remaining
    finally:
        for container in created:
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)


def test_gpu_is_requested_only_for_gpu_models_on_gpu_consumers(container_runtime, make_settings, dirs):
    def options(gpu: str | None, use_gpu: bool) -> dict:
        runner = ModelRunner(container_runtime, make_settings(gpu=gpu))
        return runner.container_options(
            task_uid=uid(),
            model=make_model(images.SCRIPT, use_gpu=use_gpu),
            input_dir=dirs.input,
            output_dir=dirs.output,
            model_dir=None,
        )

    with_gpu = options("1", True)
    # How each runtime names the GPU (a DeviceRequest, a CDI device) is test_container_runtime.py's.
    gpu_options = container_runtime.gpu_options("1")
    assert gpu_options and {name: with_gpu[name] for name in gpu_options} == gpu_options
    assert with_gpu["environment"] == {"NVIDIA_VISIBLE_DEVICES": "1", "CUDA_VISIBLE_DEVICES": "0"}
    assert "/model" not in {v["bind"] for v in with_gpu["volumes"].values()}
    # A CPU task on a GPU consumer gets no GPU, even from an image that asks the runtime for all.
    cpu_task = options("1", False)
    assert "device_requests" not in cpu_task and "devices" not in cpu_task
    assert cpu_task["environment"] == {"NVIDIA_VISIBLE_DEVICES": "void"}


def test_a_gpu_task_never_runs_on_a_consumer_without_a_gpu(container_runtime, make_settings, dirs):
    runner = ModelRunner(container_runtime, make_settings(gpu=None))
    with pytest.raises(ModelRunError, match="needs a GPU") as caught:
        runner.container_options(
            task_uid=uid(),
            model=make_model(images.SCRIPT, use_gpu=True),
            input_dir=dirs.input,
            output_dir=dirs.output,
            model_dir=None,
        )
    assert caught.value.retryable


@pytest.mark.docker
def test_a_simulated_gpu_gives_the_gpu_environment_and_no_device(
    container_runtime, engine, make_settings, dirs, test_images
):
    settings = make_settings(gpu="3", simulate_gpu_memory_mb=24576)
    runner = ModelRunner(container_runtime, settings)
    task_uid = uid()
    inspected: dict = {}

    def should_stop() -> bool:
        # Polled while the container waits for the go file: inspect it, then let it finish.
        if not inspected:
            found = task_containers(engine, task_uid)
            if found:
                found[0].reload()
                inspected.update(found[0].attrs)
                (dirs.output / "go").write_text("go")
        return False

    (dirs.model / "run.sh").write_text(
        "while [ ! -f /output/go ]; do sleep 0.1; done\n"
        'echo "$CUDA_VISIBLE_DEVICES/$NVIDIA_VISIBLE_DEVICES" > /output/gpu.txt\n'
    )
    result = runner.run(
        task_uid=task_uid,
        model=make_model(images.SCRIPT, model_available=True, use_gpu=True),
        input_dir=dirs.input,
        output_dir=dirs.output,
        model_dir=dirs.model,
        should_stop=should_stop,
    )

    assert result.exit_code == 0, result.logs
    assert (dirs.output / "gpu.txt").read_text() == "0/3\n"
    assert not inspected["HostConfig"].get("DeviceRequests")
    assert not inspected["HostConfig"].get("Devices")
    assert {"CUDA_VISIBLE_DEVICES=0", "NVIDIA_VISIBLE_DEVICES=3"} <= set(inspected["Config"]["Env"])


def test_container_options_mount_identical_absolute_host_paths(container_runtime, engine, settings, dirs):
    runner = ModelRunner(container_runtime, settings)
    opts = runner.container_options(
        task_uid=uid(),
        model=make_model(images.SCRIPT, cpus=64, memory_mb=100, pids=50),
        input_dir=dirs.input,
        output_dir=dirs.output,
        model_dir=dirs.model,
    )
    assert opts["volumes"] == {
        str(dirs.input.resolve()): {"bind": "/input", "mode": "ro"},
        str(dirs.output.resolve()): {"bind": "/output", "mode": "rw"},
        str(dirs.model.resolve()): {"bind": "/model", "mode": "ro"},
    }
    assert opts["network_mode"] == "none"
    assert opts["cap_drop"] == ["ALL"]
    assert opts["security_opt"] == ["no-new-privileges"]
    assert opts["user"] == "65534:65534"
    assert opts["mem_limit"] == "100m" and opts["memswap_limit"] == "100m"
    assert opts["pids_limit"] == 50
    # 64 CPUs asked for, but never more than the engine has.
    assert opts["nano_cpus"] == int(min(64, engine.info()["NCPU"]) * 1e9)
    # Read-only root filesystem, a /tmp of the consumer's default size.
    assert opts["read_only"] is True
    assert opts["tmpfs"]["/tmp"] == f"rw,nosuid,nodev,size={settings.default_tmp_mb}m"
    # Whatever else a read-only root needs on the engine is read-only (checked by running it below).
    assert all(mount.startswith("ro,") for path, mount in opts["tmpfs"].items() if path != "/tmp")
    loosened = runner.container_options(
        task_uid=uid(),
        model=make_model(images.SCRIPT, writable_rootfs=True, tmp_mb=7),
        input_dir=dirs.input,
        output_dir=dirs.output,
        model_dir=None,
    )
    assert loosened["read_only"] is False
    assert loosened["tmpfs"] == {"/tmp": "rw,nosuid,nodev,size=7m"}


ROOTFS_PROBE = r"""
exec > /output/report.txt 2>&1
sh -c 'echo x > /var/tmp/probe' 2>/output/root-error.txt && echo root=writable || echo root=readonly
head -c 1048576 /dev/zero > /tmp/one-mb && echo tmp1=ok || echo tmp1=failed
head -c 3145728 /dev/zero > /tmp/three-mb 2>/output/tmp-error.txt && echo tmp3=ok || echo tmp3=failed
grep ' /tmp ' /proc/mounts > /output/tmp-mount.txt
"""


def probe_report(dirs: Dirs) -> dict[str, str]:
    return dict(
        line.split("=", 1) for line in (dirs.output / "report.txt").read_text().splitlines() if "=" in line
    )


@pytest.mark.docker
def test_root_filesystem_is_read_only_and_tmp_is_a_small_tmpfs(runner, dirs, test_images):
    result = run_script(runner, dirs, ROOTFS_PROBE, tmp_mb=2)

    assert result.exit_code == 0, result.logs
    report = probe_report(dirs)
    assert report == {"root": "readonly", "tmp1": "ok", "tmp3": "failed"}
    assert "Read-only file system" in (dirs.output / "root-error.txt").read_text()
    assert "No space left on device" in (dirs.output / "tmp-error.txt").read_text()
    mount = (dirs.output / "tmp-mount.txt").read_text()
    assert mount.startswith("tmpfs /tmp tmpfs") and "nosuid" in mount and "nodev" in mount


@pytest.mark.docker
def test_writable_rootfs_is_an_operators_choice_per_model(runner, dirs, test_images):
    result = run_script(runner, dirs, ROOTFS_PROBE, writable_rootfs=True, tmp_mb=8)

    assert result.exit_code == 0, result.logs
    assert probe_report(dirs) == {"root": "writable", "tmp1": "ok", "tmp3": "ok"}


@pytest.mark.docker
def test_background_removal_answers_first_and_close_waits_for_the_removal(
    container_runtime, engine, settings, dirs, test_images
):
    runner = ModelRunner(container_runtime, settings, remove_in_background=True)
    task_uid = uid()
    try:
        result = run_script(runner, dirs, "echo done > /output/out.txt\n", task_uid=task_uid)
        assert result.succeeded, result.logs
        assert (dirs.output / "out.txt").read_text() == "done\n"
    finally:
        runner.close()
    # close() returns only once every container handed over for removal is gone.
    assert task_containers(engine, task_uid) == []
    # After close, removal happens in the caller's thread: still nothing is left behind.
    after_uid = uid()
    assert run_script(runner, dirs, "true\n", task_uid=after_uid).succeeded
    assert task_containers(engine, after_uid) == []


@pytest.mark.docker
def test_a_model_filling_output_past_the_limit_is_killed(
    container_runtime, engine, make_settings, dirs, test_images
):
    runner = ModelRunner(container_runtime, make_settings(max_output_bytes=3 * 1024 * 1024))
    task_uid = uid()
    # About 10 MB/s, without end: only the output limit stops it (the timeout is 60 s).
    script = "while true; do head -c 1048576 /dev/zero >> /output/big.bin; sleep 0.1; done\n"
    result = run_script(runner, dirs, script, task_uid=task_uid)

    assert result.output_too_large
    assert not result.timed_out
    assert not result.succeeded
    assert result.exit_code == 137
    # Stopped at the first check past the limit: far below what an unchecked minute would write.
    assert (dirs.output / "big.bin").stat().st_size < 40 * 1024 * 1024
    assert task_containers(engine, task_uid) == []


def test_directory_size_counts_files_not_links_and_stops_early(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.bin").write_bytes(b"x" * 1000)
    (tmp_path / "two.bin").write_bytes(b"y" * 500)
    (tmp_path / "link").symlink_to(tmp_path / "two.bin")
    (tmp_path / "dirlink").symlink_to(tmp_path / "a")

    assert directory_size(tmp_path) == 1500
    # Past the bound after the first file it meets, whichever that is: the walk ends there.
    assert directory_size(tmp_path, stop_above=100) in (500, 1000)


@pytest.mark.docker
def test_the_run_times_bracket_what_the_model_did(runner, dirs, test_images):
    """The model writes the moment it ran (same host clock); the run times hold it between them."""
    result = run_script(runner, dirs, "sleep 0.2; date -u +%s.%N > /output/ran_at\n")

    assert result.exit_code == 0, result.logs
    assert result.started_at is not None and result.finished_at is not None
    assert result.started_at.tzinfo is not None
    ran_at = float((dirs.output / "ran_at").read_text())
    assert result.started_at.timestamp() <= ran_at <= result.finished_at.timestamp()
    assert (result.finished_at - result.started_at).total_seconds() == pytest.approx(result.duration_s)
    assert result.run_times.run_started_at == result.started_at
