"""A task's extras as the consumer serves them, against real Docker: its params at /params.json,
the result cache asked by image ID, and a model_from upstream's output at /model.

The private API here is a stand-in answering from memory (what it is asked is what these tests
check); test_task_extras_stack.py runs the same features against the real private API.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from inference_server.contract import CacheAnswer, TaskClaim, TaskFailure, TaskPublic, TaskStatus
from job_consumer.active_task import ActiveTask
from job_consumer.private_client import PrivateApiHttpError, PrivateApiUnavailable
from job_consumer.runner import PARAMS_PATH, ModelRunner
from job_consumer.task_execution import TaskExecutor
from job_consumer.workspace import ModelCache
from tests import images
from tests.helpers import make_zip, zip_members
from tests.job_consumer.helpers import (
    COPY_MODEL_COMMAND,
    PARAMS_SCRIPT,
    containers_created,
    generation_command,
    make_model,
    unique_tag,
)

pytestmark = pytest.mark.docker


class StandInPrivateApi:
    """The calls TaskExecutor makes, answered from memory; `lookup` decides each cache lookup."""

    def __init__(
        self,
        *,
        input_files: dict[str, bytes],
        model_zip: bytes | None = None,
        model_from_zip: bytes | None = None,
        lookup: Callable[[str], CacheAnswer] | None = None,
    ) -> None:
        self.input_zip = make_zip(input_files)
        self.model_zip = model_zip
        self.model_from_zip = model_from_zip
        self.lookup = lookup or (lambda image_id: CacheAnswer(hit=False))
        self.lookups: list[str] = []
        self.downloads: list[str] = []
        self.outputs: dict[str, dict[str, bytes]] = {}
        self.failures: dict[str, TaskFailure] = {}

    def _serve(self, what: str, data: bytes | None, dest: Path) -> str:
        self.downloads.append(what)
        if data is None:
            raise PrivateApiHttpError("GET", what, 404, f"no {what}")
        dest.write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    def cache_lookup(self, uid: str, image_id: str) -> CacheAnswer:
        self.lookups.append(image_id)
        return self.lookup(image_id)

    def download_input(self, uid: str, dest: Path) -> str:
        return self._serve("input", self.input_zip, dest)

    def download_model_zip(self, human_readable_id: str, dest: Path) -> str:
        return self._serve("model zip", self.model_zip, dest)

    def download_model_from(self, uid: str, dest: Path) -> str:
        return self._serve("model_from output", self.model_from_zip, dest)

    def upload_logs(self, uid: str, text: str, progress=None) -> None:
        pass

    def upload_output(self, uid: str, zip_path: Path, run_times=None, final_log=None, progress=None) -> None:
        self.outputs[uid] = zip_members(zip_path.read_bytes())

    def fail(self, uid: str, failure: TaskFailure) -> None:
        self.failures[uid] = failure

    def release(self, uid: str, reason: str) -> None:
        raise AssertionError(f"task {uid} released: {reason}")


def claim_for(model, **task_fields) -> TaskClaim:
    task = TaskPublic(
        uid=f"extras{secrets.token_hex(8)}",
        model_human_readable_id=model.human_readable_id,
        status=TaskStatus.RUNNING,
        attempts=1,
        created_at=datetime.now(UTC),
        **task_fields,
    )
    return TaskClaim(task=task, model=model, lease_seconds=30)


def execute(settings, runner: ModelRunner, api: StandInPrivateApi, claim: TaskClaim) -> TaskExecutor:
    """Run one claimed task to its end, as a consumer's worker thread would."""
    executor = TaskExecutor(
        settings,
        api=api,  # type: ignore[arg-type]
        runner=runner,
        models=ModelCache(settings.resolved_work_dir, settings.consumer_id, settings.input_zip_limits),
        stopping_now=lambda: False,
    )
    executor.work(ActiveTask(claim))
    assert not list(settings.resolved_work_dir.glob(f"{claim.task.uid}-a*")), "workspace left behind"
    return executor


# --- params --------------------------------------------------------------------------------------


def script_model(**overrides):
    model_zip = make_zip({"run.sh": PARAMS_SCRIPT})
    return model_zip, make_model(
        images.SCRIPT,
        model_available=True,
        model_zip_sha256=hashlib.sha256(model_zip).hexdigest(),
        **overrides,
    )


def test_params_are_read_only_at_params_json(settings, runner, test_images):
    params = {"threshold": 0.25, "method": "otsu", "nested": {"labels": [1, 2, 3]}, "name": "ü"}
    model_zip, model = script_model()
    api = StandInPrivateApi(input_files={"a.txt": b"a"}, model_zip=model_zip)
    claim = claim_for(model, params=params)

    execute(settings, runner, api, claim)

    assert api.failures == {}
    output = api.outputs[claim.task.uid]
    assert set(output) == {"params.json"}
    assert json.loads(output["params.json"]) == params


def test_params_json_is_absent_without_params(settings, runner, test_images):
    model_zip, model = script_model()
    api = StandInPrivateApi(input_files={"a.txt": b"a"}, model_zip=model_zip)
    claim = claim_for(model)

    execute(settings, runner, api, claim)

    assert api.outputs[claim.task.uid] == {"no-params.txt": b"absent\n"}


def test_params_file_is_mounted_read_only(runner, tmp_path):
    params_file = tmp_path / "params.json"
    params_file.write_text("{}")
    model = make_model(images.SCRIPT)
    dirs = {"input_dir": tmp_path / "in", "output_dir": tmp_path / "out", "model_dir": None}

    with_params = runner.container_options(task_uid="t1", model=model, params_file=params_file, **dirs)
    without = runner.container_options(task_uid="t1", model=model, **dirs)

    assert with_params["volumes"][str(params_file.resolve())] == {"bind": PARAMS_PATH, "mode": "ro"}
    assert all(volume["bind"] != PARAMS_PATH for volume in without["volumes"].values())


# --- result cache -------------------------------------------------------------------------------------


def test_cache_hit_runs_no_container_and_a_rebuilt_image_misses(settings, runner, engine, build_image):
    tag = unique_tag("cache-rebuild")
    first_id = build_image(tag, generation_command(1))
    model = make_model(tag, cacheable=True)
    # The stand-in keys its cache by image ID alone: the rest of the key is equal for these tasks.
    finished_by_image: dict[str, str] = {}

    def lookup(image_id: str) -> CacheAnswer:
        if image_id in finished_by_image:
            return CacheAnswer(hit=True, cached_from=finished_by_image[image_id])
        return CacheAnswer(hit=False)

    def run_one() -> tuple[StandInPrivateApi, TaskClaim, TaskExecutor]:
        api = StandInPrivateApi(input_files={"a.txt": b"a"}, lookup=lookup)
        claim = claim_for(model)
        executor = execute(settings, runner, api, claim)
        assert api.failures == {}
        if claim.task.uid in api.outputs:
            finished_by_image[api.lookups[-1]] = claim.task.uid
        return api, claim, executor

    since = time.time()
    miss, miss_claim, miss_executor = run_one()
    assert miss.lookups == [first_id]
    assert miss.outputs[miss_claim.task.uid] == {"generation.txt": b"generation 1\n"}
    assert containers_created(engine, settings.consumer_id, since, 1) == 1
    assert miss_executor.cache_hits == 0

    hit, _, hit_executor = run_one()
    assert hit.lookups == [first_id]
    # Answered by the private API: nothing downloaded, nothing run, nothing uploaded.
    assert hit.downloads == [] and hit.outputs == {}
    assert hit_executor.cache_hits == 1
    assert containers_created(engine, settings.consumer_id, since, 1) == 1

    second_id = build_image(tag, generation_command(2))
    assert second_id != first_id
    rebuilt, rebuilt_claim, _ = run_one()
    assert rebuilt.lookups == [second_id]
    assert rebuilt.outputs[rebuilt_claim.task.uid] == {"generation.txt": b"generation 2\n"}
    assert containers_created(engine, settings.consumer_id, since, 2) == 2


def test_a_miss_runs_the_image_it_asked_about_even_if_retagged_meanwhile(
    settings, runner, engine, build_image
):
    tag = unique_tag("cache-retag")
    asked_id = build_image(tag, generation_command(1))
    other_tag = unique_tag("cache-retag-other")
    build_image(other_tag, generation_command(2))

    def retag_then_miss(image_id: str) -> CacheAnswer:
        # The tag moves to another image between the lookup and the run.
        # Repository and tag apart: Podman's Docker API refuses a repository with a tag in it.
        repository, version = tag.rsplit(":", 1)
        engine.images.get(other_tag).tag(repository, version)
        return CacheAnswer(hit=False)

    api = StandInPrivateApi(input_files={"a.txt": b"a"}, lookup=retag_then_miss)
    claim = claim_for(make_model(tag, cacheable=True))

    execute(settings, runner, api, claim)

    assert api.lookups == [asked_id]
    assert api.outputs[claim.task.uid] == {"generation.txt": b"generation 1\n"}


@pytest.mark.parametrize(
    "error",
    [
        PrivateApiUnavailable("POST /tasks/x/cache-lookup: connection refused"),
        PrivateApiHttpError("POST", "/tasks/x/cache-lookup", 500, "internal error"),
    ],
    ids=["unreachable", "server-error"],
)
def test_a_failed_cache_lookup_runs_the_task(settings, runner, engine, build_image, error):
    tag = unique_tag("cache-down")
    image_id = build_image(tag, generation_command(1))

    def failing_lookup(asked: str) -> CacheAnswer:
        raise error

    api = StandInPrivateApi(input_files={"a.txt": b"a"}, lookup=failing_lookup)
    claim = claim_for(make_model(tag, cacheable=True))
    since = time.time()

    execute(settings, runner, api, claim)

    assert api.lookups == [image_id]
    assert api.failures == {}
    assert api.outputs[claim.task.uid] == {"generation.txt": b"generation 1\n"}
    assert containers_created(engine, settings.consumer_id, since, 1) == 1


def test_a_model_that_is_not_cacheable_is_never_looked_up(settings, runner, build_image):
    tag = unique_tag("not-cacheable")
    build_image(tag, generation_command(1))
    api = StandInPrivateApi(input_files={"a.txt": b"a"}, lookup=lambda image_id: CacheAnswer(hit=True))
    claim = claim_for(make_model(tag))

    execute(settings, runner, api, claim)

    assert api.lookups == []
    assert api.outputs[claim.task.uid] == {"generation.txt": b"generation 1\n"}


# --- model_from -------------------------------------------------------------------------------------


def test_model_from_output_is_mounted_at_model_instead_of_the_model_zip(settings, runner, build_image):
    tag = unique_tag("copy-model")
    build_image(tag, COPY_MODEL_COMMAND)
    # Weights compress far beyond an input's ratio limit; an upstream's output may hold them.
    upstream_output = {
        "weights.bin": bytes(2_000_000),
        "meta/config.json": b'{"epochs": 3}',
        "meta/notes.txt": secrets.token_bytes(300),
    }
    own_zip = make_zip({"own.txt": b"the model's own zip"})
    model = make_model(tag, model_available=True, model_zip_sha256=hashlib.sha256(own_zip).hexdigest())
    api = StandInPrivateApi(
        input_files={"a.txt": b"a"}, model_zip=own_zip, model_from_zip=make_zip(upstream_output)
    )
    claim = claim_for(model, model_from=f"upstream{secrets.token_hex(6)}")

    execute(settings, runner, api, claim)

    assert api.failures == {}
    assert api.outputs[claim.task.uid] == upstream_output
    assert "model zip" not in api.downloads
    # Not in the shared model cache: the upstream's output was this attempt's only.
    assert not (settings.resolved_work_dir / "models").exists()


def test_model_from_output_that_is_gone_fails_the_task_without_retry(settings, runner, build_image):
    tag = unique_tag("copy-model-gone")
    build_image(tag, COPY_MODEL_COMMAND)
    api = StandInPrivateApi(input_files={"a.txt": b"a"}, model_from_zip=None)
    upstream = f"upstream{secrets.token_hex(6)}"
    claim = claim_for(make_model(tag), model_from=upstream)

    execute(settings, runner, api, claim)

    failure = api.failures[claim.task.uid]
    assert failure.retryable is False
    assert f"output of model_from task {upstream}" in failure.error


# --- input_from ----------------------------------------------------------------------------------


def test_an_input_from_upstream_output_is_held_to_the_output_limits(settings, runner, test_images):
    # What a model wrote compresses far beyond an upload's ratio limit; it must still be an input.
    upstream_output = {"mask.bin": bytes(2_000_000)}
    model_zip = make_zip({"run.sh": b"cp -R /input/. /output/\n"})
    model = make_model(
        images.SCRIPT, model_available=True, model_zip_sha256=hashlib.sha256(model_zip).hexdigest()
    )
    chained = StandInPrivateApi(input_files=upstream_output, model_zip=model_zip)
    uploaded = StandInPrivateApi(input_files=upstream_output, model_zip=model_zip)
    chained_claim = claim_for(model, input_from=f"upstream{secrets.token_hex(6)}")
    uploaded_claim = claim_for(model)

    execute(settings, runner, chained, chained_claim)
    execute(settings, runner, uploaded, uploaded_claim)

    assert chained.outputs[chained_claim.task.uid] == upstream_output
    # An upload is held to the input limits (the private API refuses it at the door already).
    assert "over the limit" in uploaded.failures[uploaded_claim.task.uid].error
