"""Live logs end to end on the consumer side: a model printing a line a second has its first
lines, and its progress, at the private API while it still runs (each real container engine)."""

from __future__ import annotations

import secrets

import pytest

from inference_server.contract import TaskStatus
from job_consumer.container_runtime import ContainerRuntime
from tests import images
from tests.helpers import wait_until
from tests.job_consumer.helpers import ConsumerThread
from tests.job_consumer.stack import make_zip
from tests.job_consumer.test_consumer import let_gated_model_end

pytestmark = pytest.mark.docker

# A line and a progress report a second, then waits for the test's /output/go before it ends, so
# the test decides when the run is over and reads the live log while it surely runs.
TICKING_GATED_SCRIPT = (
    b"for i in 1 2 3; do echo line $i; echo INFERENCE_PROGRESS 0.$i step $i; sleep 1; done\n"
    b"while [ ! -f /output/go ]; do sleep 0.1; done\n"
    b"rm /output/go; echo done > /output/result.txt; echo finished\n"
)
# Far more output than the cap, then the same gate.
FLOODING_GATED_SCRIPT = (
    b"i=0; while [ $i -lt 400 ]; do echo flood line $i of many many bytes; i=$((i+1)); done\n"
    b"echo INFERENCE_PROGRESS 0.5 past the cap\n"
    b"while [ ! -f /output/go ]; do sleep 0.1; done\n"
    b"rm /output/go; echo finished\n"
)


@pytest.fixture
def consumer_runtime(container_runtime: ContainerRuntime) -> ContainerRuntime:
    return container_runtime


def release_gate(consumer, uid: str) -> None:
    let_gated_model_end(consumer, uid)


def test_a_running_models_lines_and_progress_are_readable_before_it_ends(
    private_api, make_consumer, test_images
):
    model_id = f"ticking-{secrets.token_hex(4)}"
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": TICKING_GATED_SCRIPT}))
    task = private_api.submit(model_id, {"x.txt": b"x"})
    consumer = make_consumer()
    worker = ConsumerThread(consumer).start()

    wait_until(lambda: "line 2\n" in private_api.logs(task.uid), 30, "the first lines in the live log")
    running = private_api.task(task.uid)
    assert running.status == TaskStatus.RUNNING
    assert running.progress is not None and running.progress >= 0.2
    assert running.progress_message is not None and running.progress_message.startswith("step ")
    assert private_api.logs(task.uid).startswith("line 1\n")

    release_gate(consumer, task.uid)
    wait_until(lambda: private_api.task(task.uid).status == TaskStatus.FINISHED, 30, "the task to finish")
    consumer.request_stop(now=False)
    worker.join(30)
    finished = private_api.task(task.uid)
    assert (finished.progress, finished.progress_message) == (0.3, "step 3")
    assert "line 3\nINFERENCE_PROGRESS 0.3 step 3\nfinished\n" in private_api.logs(task.uid)


def test_the_live_log_stops_at_the_cap_with_a_marker(private_api, make_consumer, test_images):
    model_id = f"flooding-{secrets.token_hex(4)}"
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": FLOODING_GATED_SCRIPT}))
    task = private_api.submit(model_id, {"x.txt": b"x"})
    consumer = make_consumer(max_log_bytes=2048)
    worker = ConsumerThread(consumer).start()

    def capped_log() -> str | None:
        text = private_api.logs(task.uid)
        return text if "live log stopped at 2048 bytes" in text else None

    live = wait_until(capped_log, 30, "the capped live log")
    wait_until(lambda: private_api.task(task.uid).progress == 0.5, 30, "the progress printed past the cap")

    assert private_api.task(task.uid).status == TaskStatus.RUNNING
    assert live.startswith("flood line 0 ")
    assert len(live.encode()) < 2048 + 200
    release_gate(consumer, task.uid)
    wait_until(lambda: private_api.task(task.uid).status == TaskStatus.FINISHED, 30, "the task to finish")
    consumer.request_stop(now=False)
    worker.join(30)


def test_progress_printed_just_before_the_exit_is_in_the_status(private_api, make_consumer, test_images):
    model_id = f"quick-{secrets.token_hex(4)}"
    script = b"echo INFERENCE_PROGRESS 1 all done\n"
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": script}))
    task = private_api.submit(model_id, {"x.txt": b"x"})
    consumer = make_consumer()
    worker = ConsumerThread(consumer).start()

    wait_until(lambda: private_api.task(task.uid).status == TaskStatus.FINISHED, 30, "the task to finish")
    consumer.request_stop(now=False)
    worker.join(30)

    finished = private_api.task(task.uid)
    assert (finished.progress, finished.progress_message) == (1.0, "all done")
