"""A task's extras end to end through the real private API, RabbitMQ and Docker: params at
/params.json, the result cache (a hit runs no container, a rebuilt image misses), model_from
mounted at /model and input_from as the input."""

from __future__ import annotations

import json
import secrets
import time

import pytest

from inference_server.contract import TaskPublic, TaskStatus
from tests import images
from tests.job_consumer.helpers import (
    COPY_MODEL_COMMAND,
    PARAMS_SCRIPT,
    ConsumerThread,
    containers_created,
    generation_command,
    unique_tag,
)
from tests.job_consumer.stack import make_zip

pytestmark = pytest.mark.docker

COPY_INPUT_SCRIPT = b"cp -R /input/. /output/\n"
# A "training" run: writes weights and a nested file, some far more compressible than an input may be.
TRAIN_SCRIPT = (
    b"mkdir -p /output/meta && head -c 2000000 /dev/zero > /output/weights.bin"
    b" && cp /input/data.txt /output/meta/trained-on.txt\n"
)


def hrid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def run_one(make_consumer):
    """One consumer that takes one task and runs it to its end."""
    consumer = make_consumer(max_tasks=1)
    assert ConsumerThread(consumer).start().join(60) == 1
    return consumer


def finished(private_api, uid: str) -> TaskPublic:
    task = private_api.task(uid)
    assert task.status == TaskStatus.FINISHED, task.error
    return task


def test_params_reach_the_model_and_are_absent_without(private_api, make_consumer, test_images):
    model_id = hrid("params")
    private_api.register_model(model_id, images.SCRIPT, model_zip=make_zip({"run.sh": PARAMS_SCRIPT}))
    params = {"method": "otsu", "threshold": 0.5, "labels": [1, 2]}

    with_params = private_api.submit(model_id, {"a.txt": b"a"}, params=params)
    run_one(make_consumer)
    without = private_api.submit(model_id, {"a.txt": b"a"})
    run_one(make_consumer)

    assert finished(private_api, with_params.uid).params == params
    assert json.loads(private_api.output(with_params.uid)["params.json"]) == params
    finished(private_api, without.uid)
    assert private_api.output(without.uid) == {"no-params.txt": b"absent\n"}


def test_cache_hit_runs_no_container_and_a_rebuilt_image_misses(
    private_api, make_consumer, docker_client, consumer_id, build_image
):
    tag = unique_tag("cache-stack")
    build_image(tag, generation_command(1))
    model_id = hrid("cached")
    private_api.register_model(model_id, tag, cacheable=True)
    # One zip for every task: the cache is keyed by the input's sha256.
    files = make_zip({"same.txt": b"same input"})
    since = time.time()

    original = private_api.submit(model_id, files, owner="alice")
    run_one(make_consumer)
    assert finished(private_api, original.uid).cached_from is None
    assert containers_created(docker_client, consumer_id, since, 1) == 1

    repeat = private_api.submit(model_id, files, owner="alice")
    consumer = run_one(make_consumer)
    answered = finished(private_api, repeat.uid)
    assert answered.cached_from == original.uid
    assert private_api.output(repeat.uid) == {"generation.txt": b"generation 1\n"}
    assert consumer.executor.cache_hits == 1
    assert containers_created(docker_client, consumer_id, since, 1) == 1

    forced = private_api.submit(model_id, files, cache=False, owner="alice")
    run_one(make_consumer)
    assert finished(private_api, forced.uid).cached_from is None
    assert containers_created(docker_client, consumer_id, since, 2) == 2

    build_image(tag, generation_command(2))
    rebuilt = private_api.submit(model_id, files, owner="alice")
    consumer = run_one(make_consumer)
    assert finished(private_api, rebuilt.uid).cached_from is None
    assert private_api.output(rebuilt.uid) == {"generation.txt": b"generation 2\n"}
    assert consumer.executor.cache_hits == 0
    assert containers_created(docker_client, consumer_id, since, 3) == 3


def test_model_from_mounts_the_upstream_output_and_input_from_feeds_it_as_input(
    private_api, make_consumer, test_images, build_image
):
    train_id = hrid("train")
    private_api.register_model(train_id, images.SCRIPT, model_zip=make_zip({"run.sh": TRAIN_SCRIPT}))
    copy_model_tag = unique_tag("copy-model-stack")
    build_image(copy_model_tag, COPY_MODEL_COMMAND)
    fine_tune_id = hrid("fine-tune")
    # Its own zip is never mounted for a model_from task.
    private_api.register_model(fine_tune_id, copy_model_tag, model_zip=make_zip({"own.txt": b"own"}))
    copy_input_id = hrid("copy-input")
    copy_input_zip = make_zip({"run.sh": COPY_INPUT_SCRIPT})
    private_api.register_model(copy_input_id, images.SCRIPT, model_zip=copy_input_zip)

    upstream = private_api.submit(train_id, {"data.txt": b"1 2 3"})
    run_one(make_consumer)
    upstream_output = private_api.output(finished(private_api, upstream.uid).uid)
    assert set(upstream_output) == {"weights.bin", "meta/trained-on.txt"}

    fine_tuned = private_api.submit(fine_tune_id, {"x.txt": b"x"}, model_from=upstream.uid)
    run_one(make_consumer)
    assert finished(private_api, fine_tuned.uid).model_from == upstream.uid
    assert private_api.output(fine_tuned.uid) == upstream_output

    predicted = private_api.submit(copy_input_id, None, input_from=upstream.uid)
    run_one(make_consumer)
    assert finished(private_api, predicted.uid).input_from == upstream.uid
    assert private_api.output(predicted.uid) == upstream_output
