"""Task params, the result cache, webhooks and chained tasks, end to end (issue 11).

One platform is shared by the module's tests (starting one costs seconds): the private API on
its own SQLite database, the public API, and two CPU consumers, so that a dependent task that
were published too early would find a consumer free to run it. Webhooks may go to 127.0.0.1
only, and are retried quickly so a failed delivery comes again within a second or two.

Containers are counted with Docker's events: every container a consumer starts for a task
carries the label inference-server.task=<uid>, or, created ahead of its task, the task's name
(runner.task_of_container), so "no container ran for this task" is "no start event of its" over
the task's life, and each test shows the same count is not zero for a task that ran. Each test
prints one line of what went in and what came out.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import nibabel as nib
import numpy as np
import pytest

from inference_server import webhook_signing
from inference_server.contract import (
    MODEL_PARAMS_SCHEMA_FIELD,
    SERVICE_TOKEN_HEADER,
    WEBHOOK_EVENT_HEADER,
    ZIP_MEDIA_TYPE,
    PrivateRoutes,
    PublicRoutes,
    TaskSubmitFields,
    WebhookBody,
)
from job_consumer.runner import task_of_container
from local_platform.launcher import LocalPlatform
from local_platform.ports import free_port
from models_examples.catalog import EXAMPLES
from tests.helpers import make_zip, wait_until, zip_members
from tests.images import FAIL, SCRIPT, SLEEP, dockerfile_for
from tests.platform_fixtures import register_examples_on

pytestmark = [pytest.mark.docker, pytest.mark.slow]

BIN = Path(sys.executable).parent
# Long enough for a few container starts on a busy 2-core machine.
RUN_TIMEOUT_S = 180
ENDED = ("finished", "failed", "cancelled", "expired", "deleted")

ECHO_PARAMS_SCRIPT = """\
if [ -e /params.json ]; then cp /params.json /output/params.json; else echo absent > /output/no-params.txt; fi
"""
PARAMS_SCHEMA = {
    "type": "object",
    "properties": {"l2": {"type": "number", "minimum": 0}, "label": {"type": "string"}},
    "required": ["l2"],
    "additionalProperties": False,
}
# Copies its input and adds a value new on every run, so an output answered from the cache is
# told from one computed again by its bytes.
CACHE_ECHO_COMMAND = (
    '["sh", "-c", "cp -r /input/. /output/ && cat /proc/sys/kernel/random/uuid > /output/run-id.txt"]'
)


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


# --- a webhook receiver on loopback ---------------------------------------------------------------


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    answered: int

    @property
    def task_uid(self) -> str | None:
        try:
            return str(json.loads(self.body)["task"]["uid"])
        except (ValueError, KeyError, TypeError):
            return None

    @property
    def event(self) -> str | None:
        try:
            return str(json.loads(self.body)["event"])
        except (ValueError, KeyError, TypeError):
            return None


@dataclass
class WebhookReceiver:
    """An HTTP server on 127.0.0.1 recording every POST; `answer` picks each one's status code
    from its body and the deliveries before it (a test sets the rule it needs)."""

    answer: Callable[[Delivery, list[Delivery]], int] = lambda delivery, earlier: HTTPStatus.OK
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.lock:
                    delivery = Delivery(dict(self.headers.items()), body, HTTPStatus.OK)
                    delivery.answered = int(receiver.answer(delivery, list(receiver.deliveries)))
                    receiver.deliveries.append(delivery)
                code = delivery.answered
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # the test's output stays short
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/{secrets.token_hex(4)}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def of_task(self, uid: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.task_uid == uid]

    def taken_events(self, uid: str) -> list[str]:
        return [
            str(d.event)
            for d in self.of_task(uid)
            if HTTPStatus.OK <= d.answered < HTTPStatus.MULTIPLE_CHOICES
        ]


# --- the platform and how the tests drive it -------------------------------------------------------


@dataclass
class Driver:
    platform: LocalPlatform
    docker_client: docker.DockerClient
    operator: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.platform.public_url

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def register(
        self,
        model: str,
        container_tag: str,
        *,
        model_zip: bytes | None = None,
        params_schema: dict[str, Any] | None = None,
        cacheable: bool = False,
    ) -> dict[str, Any]:
        """Through the public API's v1.2 route, as an operator: the schema is a form field."""
        files: dict[str, Any] = {}
        if model_zip is not None:
            files[TaskSubmitFields.ZIP_FILE] = ("model.zip", model_zip, ZIP_MEDIA_TYPE)
        if params_schema is not None:
            files[MODEL_PARAMS_SCHEMA_FIELD] = (None, json.dumps(params_schema).encode())
        query = {
            "container_tag": container_tag,
            "human_readable_id": model,
            "description": f"e2e model {model}",
            "model_available": model_zip is not None,
            "use_gpu": False,
            "cacheable": cacheable,
        }
        with self.http() as client:
            response = client.post(
                PublicRoutes.MODELS, params=query, files=files or None, headers=self.operator
            )
        assert response.status_code == HTTPStatus.OK, response.text
        return dict(response.json())

    def submit_response(
        self,
        model: str,
        files: dict[str, bytes] | bytes | None = None,
        *,
        params: Any = None,
        raw_params: str | None = None,
        webhook_url: str | None = None,
        input_from: str | None = None,
        model_from: str | None = None,
        cache: bool | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """POST /api/tasks/ with the zip of `files`, or `files` as a zip already made (none with
        input_from), and the text fields."""
        form: dict[str, Any] = {}
        if files is not None:
            archive = files if isinstance(files, bytes) else make_zip(files)
            form[TaskSubmitFields.ZIP_FILE] = ("in.zip", archive, ZIP_MEDIA_TYPE)
        text = {
            TaskSubmitFields.PARAMS: raw_params if params is None else json.dumps(params),
            TaskSubmitFields.WEBHOOK_URL: webhook_url,
            TaskSubmitFields.INPUT_FROM: input_from,
            TaskSubmitFields.MODEL_FROM: model_from,
        }
        for name, value in text.items():
            if value is not None:
                form[name] = (None, value.encode())
        query: dict[str, Any] = {"model_human_readable_id": model}
        if cache is not None:
            query[TaskSubmitFields.CACHE_QUERY] = str(cache).lower()
        with self.http() as client:
            return client.post(
                PublicRoutes.TASKS,
                params=query,
                files=form,
                headers=self.operator if headers is None else headers,
            )

    def submit(self, model: str, files: dict[str, bytes] | bytes | None = None, **options: Any) -> str:
        response = self.submit_response(model, files, **options)
        assert response.status_code == HTTPStatus.OK, response.text
        return str(response.json())

    def status(self, uid: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        with self.http() as client:
            response = client.get(
                PublicRoutes.TASK_STATUS.format(uid=uid),
                headers=self.operator if headers is None else headers,
            )
        assert response.status_code == HTTPStatus.OK, response.text
        return dict(response.json())

    def task_count(self) -> int:
        with self.http() as client:
            response = client.get(PublicRoutes.TASKS, headers=self.operator)
        assert response.status_code == HTTPStatus.OK, response.text
        return len(response.json())

    def wait_ended(self, uids: list[str], headers: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        def ended() -> dict[str, dict[str, Any]] | None:
            states = {uid: self.status(uid, headers) for uid in uids}
            return states if all(state["status"] in ENDED for state in states.values()) else None

        return wait_until(ended, RUN_TIMEOUT_S, f"{len(uids)} task(s) to end", interval=0.3)

    def wait_status(self, uid: str, status: str) -> dict[str, Any]:
        return wait_until(
            lambda: (state := self.status(uid))["status"] == status and state,
            RUN_TIMEOUT_S,
            f"task {uid} to be {status}",
            interval=0.2,
        )

    def output(self, uid: str, headers: dict[str, str] | None = None) -> dict[str, bytes]:
        with self.http() as client:
            response = client.get(
                PublicRoutes.TASK.format(uid=uid), headers=self.operator if headers is None else headers
            )
        assert response.status_code == HTTPStatus.OK, f"{uid}: {response.status_code} {response.text}"
        return zip_members(response.content)

    def cancel(self, uid: str) -> dict[str, Any]:
        with self.http() as client:
            response = client.post(PublicRoutes.TASK_CANCEL.format(uid=uid), headers=self.operator)
        assert response.status_code == HTTPStatus.OK, response.text
        return dict(response.json())

    def delete(self, uid: str) -> None:
        with self.http() as client:
            response = client.delete(PublicRoutes.TASK.format(uid=uid), headers=self.operator)
        assert response.status_code == HTTPStatus.OK, response.text

    def private_metric(self, name: str) -> float:
        """A counter of the private API's /metrics (0 before its first increment)."""
        response = httpx.get(
            f"{self.platform.private_url}{PrivateRoutes.METRICS}",
            headers={SERVICE_TOKEN_HEADER: self.platform.service_token},
            timeout=30,
        )
        assert response.status_code == HTTPStatus.OK, response.text
        for line in response.text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        return 0.0

    def containers_ran(self, uid: str, since: float) -> int:
        """Containers that ran for task `uid` since `since` (Unix seconds), by their exits: the task
        label, or the task's name a prepared container takes (one started ahead was started
        before its task existed); removed ones count too."""
        events = self.docker_client.events(
            since=int(since),
            until=int(time.time()) + 1,
            filters={"type": "container", "event": "die"},
            decode=True,
        )
        return sum(
            1 for event in events if task_of_container(event.get("Actor", {}).get("Attributes", {})) == uid
        )

    def operator_command(self, *args: str) -> str:
        completed = subprocess.run(
            [str(BIN / "inference-server"), *args, "--database-url", self.platform.resolved_database_url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.returncode == 0, completed.stderr
        return completed.stdout.strip()

    def create_key(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.operator_command('keys', 'create', name)}"}

    def webhook_secret(self, key_name: str) -> str:
        """The key's webhook secret, as its owner gets it from the operator."""
        return self.operator_command("keys", "webhook-secret", key_name).split()[-1]


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    started = WebhookReceiver().start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def driver(
    tmp_path_factory: pytest.TempPathFactory,
    rabbitmq_url: str,
    module_queue_name: str,
    docker_client: docker.DockerClient,
    example_images: list[str],
    test_images: dict[str, str],
) -> Iterator[Driver]:
    platform = LocalPlatform(
        data_dir=tmp_path_factory.mktemp("chains"),
        public_port=free_port(),
        consumers=2,
        rabbitmq_url=rabbitmq_url,
        queue_name=module_queue_name,
        create_operator_key=True,
        extra_env={
            "IS_REAPER_INTERVAL_S": "0.5",
            "IS_HEARTBEAT_INTERVAL_S": "1",
            "IS_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
            "IS_WEBHOOK_INTERVAL_S": "0.2",
            "IS_WEBHOOK_FIRST_RETRY_S": "0.5",
            "IS_WEBHOOK_MAX_RETRY_S": "2",
        },
    )
    platform.start()
    try:
        register_examples_on(platform)
        key = platform.operator_key_file.read_text().strip()
        yield Driver(platform, docker_client, {"Authorization": f"Bearer {key}"})
    finally:
        platform.stop()


@pytest.fixture
def idle_driver(driver: Driver) -> Iterator[Driver]:
    """The shared platform, and after each test every task it left pending or running cancelled."""
    yield driver
    with driver.http() as client:
        listing = client.get(PublicRoutes.TASKS, headers=driver.operator)
        for task in listing.json():
            if task["status"] in ("pending", "running"):
                client.post(PublicRoutes.TASK_CANCEL.format(uid=task["uid"]), headers=driver.operator)


def test_examples_are_registered_with_their_schema_and_cache_switch(idle_driver: Driver) -> None:
    with idle_driver.http() as client:
        models = {
            m["human_readable_id"]: m
            for m in client.get(PublicRoutes.MODELS, headers=idle_driver.operator).json()
        }
    shown = {
        example.human_readable_id: (
            models[example.human_readable_id]["params_schema"] is not None,
            models[example.human_readable_id]["cacheable"],
        )
        for example in EXAMPLES
    }
    print(f"in: the example catalog registered; out: (has params_schema, cacheable) per model {shown}")
    for example in EXAMPLES:
        assert models[example.human_readable_id]["params_schema"] == example.params_schema()
        assert models[example.human_readable_id]["cacheable"] is example.cacheable


# --- params -----------------------------------------------------------------------------------------


def test_params_reach_the_model_and_bad_params_are_refused(idle_driver: Driver) -> None:
    driver = idle_driver
    echo_zip = make_zip({"run.sh": ECHO_PARAMS_SCRIPT.encode()})
    driver.register("params-echo", SCRIPT, model_zip=echo_zip, params_schema=PARAMS_SCHEMA)
    driver.register("params-free", SCRIPT, model_zip=echo_zip)
    params = {"l2": 0.25, "label": "zürich ✓"}

    with_params = driver.submit("params-echo", {"x.txt": b"x"}, params=params)
    without_params = driver.submit("params-free", {"x.txt": b"x"})
    before = driver.task_count()
    refusals = {
        "missing l2": driver.submit_response("params-echo", {"x.txt": b"x"}),
        "l2 < 0": driver.submit_response("params-echo", {"x.txt": b"x"}, params={"l2": -1}),
        "extra key": driver.submit_response("params-echo", {"x.txt": b"x"}, params={"l2": 1, "lr": 2}),
        "not an object": driver.submit_response("params-free", {"x.txt": b"x"}, raw_params="[1, 2]"),
        "not JSON": driver.submit_response("params-free", {"x.txt": b"x"}, raw_params="{l2: 1"),
    }
    stored_after_refusals = driver.task_count()
    states = driver.wait_ended([with_params, without_params])
    echoed = json.loads(driver.output(with_params)["params.json"])
    free_output = driver.output(without_params)

    codes = {what: response.status_code for what, response in refusals.items()}
    print(
        f"in: params {params} to a model with a schema, none to one without, 5 bad submissions; "
        f"out: /params.json {echoed}, status params {states[with_params]['params']}, "
        f"without: {sorted(free_output)}, refusals {codes}"
    )
    assert echoed == params
    assert states[with_params]["params"] == params
    assert states[without_params]["params"] is None
    assert "params.json" not in free_output and free_output["no-params.txt"] == b"absent\n"
    assert set(codes.values()) == {HTTPStatus.UNPROCESSABLE_ENTITY}, {k: r.text for k, r in refusals.items()}
    # The failing path is named.
    assert "l2" in refusals["l2 < 0"].json()["detail"]
    assert "l2" in refusals["missing l2"].json()["detail"]
    assert stored_after_refusals == before


def small_head_nifti() -> bytes:
    """A 16^3 image: a bright cube (intensity 100) in a dark background (10)."""
    volume = np.full((16, 16, 16), 10.0, dtype=np.float32)
    volume[4:12, 4:12, 4:12] = 100.0
    image = nib.Nifti1Image(volume, np.eye(4))
    return bytes(image.to_bytes())


def test_brain_mask_takes_its_threshold_method_from_params(idle_driver: Driver) -> None:
    driver = idle_driver
    head = {"head.nii": small_head_nifti()}
    fixed = driver.submit("brain-mask", head, params={"method": "fixed", "threshold": 55})
    refused = driver.submit_response("brain-mask", head, params={"method": "median"})
    states = driver.wait_ended([fixed])
    report = json.loads(driver.output(fixed)["report.json"])
    entry = report["images"][0]
    print(
        f"in: a 16^3 head with params method fixed, threshold 55, and one with method median; out: "
        f"{states[fixed]['status']}, method {report['method']!r}, threshold {entry['threshold']}, "
        f"{entry['voxels_in_mask']} voxels; median: {refused.status_code}"
    )
    assert states[fixed]["status"] == "finished"
    assert report["method"].startswith("fixed+") and entry["threshold"] == 55
    assert entry["voxels_in_mask"] == 8**3
    assert refused.status_code == HTTPStatus.UNPROCESSABLE_ENTITY and "method" in refused.json()["detail"]


def test_a_schema_that_is_not_json_schema_is_refused(idle_driver: Driver) -> None:
    with idle_driver.http() as client:
        response = client.post(
            PublicRoutes.MODELS,
            params={"container_tag": SCRIPT, "human_readable_id": "bad-schema", "description": "x"},
            files={MODEL_PARAMS_SCHEMA_FIELD: (None, b'{"type": "no-such-type"}')},
            headers=idle_driver.operator,
        )
        models = [
            m["human_readable_id"]
            for m in client.get(PublicRoutes.MODELS, headers=idle_driver.operator).json()
        ]
    print(f"in: params_schema {{'type': 'no-such-type'}}; out: {response.status_code} {response.text[:120]}")
    assert HTTPStatus.BAD_REQUEST <= response.status_code < HTTPStatus.INTERNAL_SERVER_ERROR
    assert "bad-schema" not in models


# --- the result cache -------------------------------------------------------------------------------


@pytest.fixture
def rebuildable_image(docker_client: docker.DockerClient, base_image: str) -> Iterator[Callable[[], str]]:
    """A tag of this test's own that can be built again, each build a new image ID; builds are
    cheap (one LABEL on the base image). Returns the build function; the images go afterwards."""
    tag = f"inference-server/test-cache-echo:{secrets.token_hex(4)}"
    built: list[str] = []

    def build() -> str:
        dockerfile = dockerfile_for(CACHE_ECHO_COMMAND) + f"LABEL build={secrets.token_hex(8)}\n"
        image, _ = docker_client.images.build(
            fileobj=io.BytesIO(dockerfile.encode()),
            tag=tag,
            buildargs={"BASE_IMAGE": base_image},
            rm=True,
            pull=False,
        )
        assert image.id is not None
        built.append(image.id)
        return tag

    yield build
    for image_id in reversed(built):
        # One still used by a container being removed stays: its tag is unique, nothing reuses it.
        with contextlib.suppress(docker.errors.APIError):
            docker_client.images.remove(image_id, force=True)


def test_a_cache_hit_starts_no_container_and_an_image_rebuilt_under_the_tag_misses(
    idle_driver: Driver, rebuildable_image: Callable[[], str]
) -> None:
    driver = idle_driver
    tag = rebuildable_image()
    assert driver.register("cache-echo", tag, cacheable=True)["cacheable"] is True
    scan_bytes = secrets.token_bytes(64)
    # One zip, sent each time: a zip made again a second later holds other timestamps, so
    # another input sha256.
    scan = make_zip({"scan.txt": scan_bytes})
    since = time.time() - 1
    hits_before = driver.private_metric("inference_cache_hits_total")
    misses_before = driver.private_metric("inference_cache_misses_total")

    first = driver.submit("cache-echo", scan)
    driver.wait_ended([first])
    hit = driver.submit("cache-echo", scan)
    forced = driver.submit("cache-echo", scan, cache=False)
    other_params = driver.submit("cache-echo", scan, params={"variant": 2})
    states = driver.wait_ended([hit, forced, other_params])
    rebuilt_tag = rebuildable_image()
    assert rebuilt_tag == tag
    after_rebuild = driver.submit("cache-echo", scan)
    states.update(driver.wait_ended([after_rebuild]))
    hit_after_rebuild = driver.submit("cache-echo", scan)
    states.update(driver.wait_ended([hit_after_rebuild]))

    uids = {
        "first": first,
        "hit": hit,
        "cache=false": forced,
        "other params": other_params,
        "rebuilt image": after_rebuild,
        "hit on rebuilt": hit_after_rebuild,
    }
    containers = {what: driver.containers_ran(uid, since) for what, uid in uids.items()}
    counted = (
        driver.private_metric("inference_cache_hits_total") - hits_before,
        driver.private_metric("inference_cache_misses_total") - misses_before,
    )
    outputs = {what: driver.output(uid) for what, uid in uids.items()}
    cached_from = {what: driver.status(uid)["cached_from"] for what, uid in uids.items()}
    print(
        "in: one zip six times (again, cache=false, other params, image rebuilt under its tag, again); "
        f"out: containers {containers}, cached_from {cached_from}, metrics (hits, misses) {counted}"
    )
    assert {what: driver.status(uid)["status"] for what, uid in uids.items()} == dict.fromkeys(
        uids, "finished"
    )
    assert containers == {
        "first": 1,
        "hit": 0,
        "cache=false": 1,
        "other params": 1,
        "rebuilt image": 1,
        "hit on rebuilt": 0,
    }
    assert cached_from == {
        "first": None,
        "hit": first,
        "cache=false": None,
        "other params": None,
        "rebuilt image": None,
        "hit on rebuilt": after_rebuild,
    }
    assert counted == (2, 4)
    # The hit is the very output of the task it came from; every run made a new one.
    assert outputs["hit"] == outputs["first"]
    assert outputs["hit on rebuilt"] == outputs["rebuilt image"]
    run_ids = {
        outputs[what]["run-id.txt"] for what in ("first", "cache=false", "other params", "rebuilt image")
    }
    assert len(run_ids) == 4
    assert outputs["hit"]["scan.txt"] == scan_bytes

    # The output is shared, not copied: deleting the task it came from leaves the hit's output.
    driver.delete(first)
    assert driver.output(hit) == outputs["first"]


# --- chains -----------------------------------------------------------------------------------------


def linear_csv(rows: list[tuple[int, int, float]]) -> bytes:
    return ("x1,x2,y\n" + "".join(f"{x1},{x2},{y}\n" for x1, x2, y in rows)).encode()


def noisy_line(count: int, seed: int) -> list[tuple[int, int, float]]:
    """y = 3 + 2 x1 - 0.5 x2 with a little deterministic noise: integers and halves, exact."""
    rows = []
    for i in range(count):
        x1, x2 = (i * 7 + seed) % 21 - 10, (i * 5 + 3 * seed) % 11 - 5
        rows.append((x1, x2, 3 + 2 * x1 - 0.5 * x2 + ((i + seed) % 3 - 1)))
    return rows


def test_train_finetune_predict_submitted_at_once_run_in_order(idle_driver: Driver) -> None:
    driver = idle_driver
    year1, year2 = noisy_line(20, seed=1), noisy_line(15, seed=2)
    queries = b"x1,x2\n1,2\n0,0\n-3,4\n"

    # The whole graph at once, nothing awaited: each task names upstreams that have not run yet.
    train = driver.submit("linear-train", {"year1.csv": linear_csv(year1)})
    tune = driver.submit("linear-train", {"year2.csv": linear_csv(year2)}, model_from=train, params={"l2": 0})
    query = driver.submit("passthrough", {"queries.csv": queries})
    predict = driver.submit("linear-predict", input_from=query, model_from=tune)
    waiting = driver.status(predict)
    both = driver.submit("linear-train", {"year1.csv": linear_csv(year1), "year2.csv": linear_csv(year2)})
    states = driver.wait_ended([train, tune, query, predict, both])

    order = sorted([train, tune, predict], key=lambda uid: moment(states[uid]["run_started_at"]))
    tuned, together = driver.output(tune), driver.output(both)
    predicted = driver.output(predict)
    weights = json.loads(tuned["weights.json"])
    print(
        f"in: train(20 rows) -> fine-tune(15 rows, model_from) -> predict(input_from=passthrough of "
        f"3 queries, model_from=fine-tune), all at once; out: {[states[u]['status'] for u in states]}, "
        f"predict waited with {waiting['waiting_reason']!r}, ran in order: "
        f"{order == [train, tune, predict]}, fine-tuned weights == trained on both: "
        f"{tuned['weights.json'] == together['weights.json']}, predictions {predicted['queries.csv']!r}"
    )
    assert all(state["status"] == "finished" for state in states.values()), states
    assert waiting["status"] == "pending" and waiting["waiting_reason"]
    assert tune in waiting["waiting_reason"] or query in waiting["waiting_reason"]
    assert (states[predict]["input_from"], states[predict]["model_from"]) == (query, tune)
    assert states[tune]["model_from"] == train
    # Each ran only once its upstreams had finished.
    assert moment(states[train]["finished_at"]) <= moment(states[tune]["run_started_at"])
    assert moment(states[tune]["finished_at"]) <= moment(states[predict]["run_started_at"])
    assert moment(states[query]["finished_at"]) <= moment(states[predict]["run_started_at"])
    # Fine-tuning continued from the first model: exactly training on both years.
    assert tuned["weights.json"] == together["weights.json"]
    assert json.loads(tuned["report.json"])["rows_earlier"] == 20
    # Predict read the passthrough's output as its input and the fine-tuned weights as /model.
    rows = list(csv.reader(io.StringIO(predicted["queries.csv"].decode())))
    assert rows[0] == ["x1", "x2", "prediction"]
    for x1, x2, value in rows[1:]:
        expected = (
            weights["intercept"]
            + weights["coefficients"]["x1"] * float(x1)
            + weights["coefficients"]["x2"] * float(x2)
        )
        assert float(value) == pytest.approx(expected, rel=1e-12)


def test_a_failed_upstream_fails_its_dependents_with_the_reason(idle_driver: Driver) -> None:
    driver = idle_driver
    driver.register("always-fails", FAIL)
    since = time.time() - 1
    upstream = driver.submit("always-fails", {"x.txt": b"x"})
    by_input = driver.submit("passthrough", input_from=upstream)
    by_model = driver.submit("linear-predict", {"q.csv": b"x1\n1\n"}, model_from=upstream)
    downstream = driver.submit("passthrough", input_from=by_input)
    states = driver.wait_ended([upstream, by_input, by_model, downstream])

    dependents = {"input_from": by_input, "model_from": by_model, "two levels down": downstream}
    containers = {what: driver.containers_ran(uid, since) for what, uid in dependents.items()}
    print(
        f"in: a failing task and three tasks chained on it; out: upstream {states[upstream]['status']}, "
        + ", ".join(
            f"{what} {states[uid]['status']} ({states[uid]['error']!r})" for what, uid in dependents.items()
        )
        + f", containers {containers}"
    )
    assert states[upstream]["status"] == "failed"
    for uid in (by_input, by_model):
        assert states[uid]["status"] == "failed"
        assert states[uid]["error"].startswith(f"upstream {upstream}"), states[uid]["error"]
    assert states[downstream]["status"] == "failed"
    assert "upstream" in states[downstream]["error"]
    assert containers == dict.fromkeys(dependents, 0)
    assert driver.containers_ran(upstream, since) >= 1


def test_cancelling_or_deleting_an_upstream_ends_what_waits_on_it(idle_driver: Driver) -> None:
    driver = idle_driver
    driver.register("sleeps", SLEEP)
    cancelled_upstream = driver.submit("sleeps", {"x.txt": b"x"})
    direct = driver.submit("passthrough", input_from=cancelled_upstream)
    indirect = driver.submit("passthrough", input_from=direct)
    deleted_upstream = driver.submit("sleeps", {"x.txt": b"y"})
    of_deleted = driver.submit("passthrough", model_from=deleted_upstream, files={"x.txt": b"z"})
    driver.wait_status(cancelled_upstream, "running")

    driver.cancel(cancelled_upstream)
    driver.delete(deleted_upstream)
    states = driver.wait_ended([cancelled_upstream, direct, indirect, of_deleted])
    summary = {
        what: (states[uid]["status"], states[uid]["error"])
        for what, uid in {"direct": direct, "indirect": indirect, "of deleted": of_deleted}.items()
    }
    print(f"in: a running upstream cancelled, another deleted, three dependents; out: {summary}")
    assert states[cancelled_upstream]["status"] == "cancelled"
    for uid in (direct, indirect, of_deleted):
        assert states[uid]["started_at"] is None, "a dependent of an ended upstream ran"
        assert states[uid]["status"] in ("cancelled", "failed")
    assert states[direct]["status"] == "cancelled" or cancelled_upstream in (states[direct]["error"] or "")
    assert states[of_deleted]["status"] == "failed"
    assert states[of_deleted]["error"].startswith(f"upstream {deleted_upstream}")


def test_chain_refusals_store_nothing(idle_driver: Driver) -> None:
    driver = idle_driver
    stranger = driver.create_key(f"stranger-{secrets.token_hex(3)}")
    mine = driver.submit("passthrough", {"x.txt": b"x"})
    before = driver.task_count()
    refusals = {
        "unknown upstream": driver.submit_response("passthrough", input_from="no-such-task"),
        "input_from and a zip": driver.submit_response("passthrough", {"x.txt": b"x"}, input_from=mine),
        "neither zip nor input_from": driver.submit_response("passthrough"),
        "another user's upstream": driver.submit_response("passthrough", input_from=mine, headers=stranger),
        "another user's model_from": driver.submit_response(
            "passthrough", {"x.txt": b"x"}, model_from=mine, headers=stranger
        ),
    }
    codes = {what: response.status_code for what, response in refusals.items()}
    print(f"in: five bad chained submissions; out: {codes}")
    for what, response in refusals.items():
        assert HTTPStatus.BAD_REQUEST <= response.status_code < HTTPStatus.INTERNAL_SERVER_ERROR, (
            what,
            response.text,
        )
    assert driver.task_count() == before


# --- webhooks ---------------------------------------------------------------------------------------


def verified_bodies(deliveries: list[Delivery], secret: str) -> list[WebhookBody]:
    """Every delivery's body, each checked: signed under `secret`, event header equal to the body's."""
    bodies = []
    for delivery in deliveries:
        assert webhook_signing.verify(secret, delivery.headers, delivery.body), delivery.headers
        assert not webhook_signing.verify("whsec_not-the-secret", delivery.headers, delivery.body)
        body = WebhookBody.model_validate_json(delivery.body)
        assert delivery.headers.get(WEBHOOK_EVENT_HEADER) == body.event.value
        bodies.append(body)
    return bodies


def test_a_webhook_refused_once_is_delivered_again_signed(
    idle_driver: Driver, receiver: WebhookReceiver
) -> None:
    driver = idle_driver
    key_name = f"hooked-{secrets.token_hex(3)}"
    user = driver.create_key(key_name)
    secret = driver.webhook_secret(key_name)

    def refuse_the_first_of_each_task(delivery: Delivery, earlier: list[Delivery]) -> int:
        if any(seen.task_uid == delivery.task_uid for seen in earlier):
            return HTTPStatus.OK
        return HTTPStatus.SERVICE_UNAVAILABLE

    receiver.answer = refuse_the_first_of_each_task
    uid = driver.submit("passthrough", {"x.txt": b"x"}, webhook_url=receiver.url, headers=user)
    driver.wait_ended([uid], headers=user)
    wait_until(
        lambda: sorted(set(receiver.taken_events(uid))) == ["finished", "running"],
        60,
        "the running and finished events to be taken",
    )
    deliveries = receiver.of_task(uid)
    bodies = verified_bodies(deliveries, secret)
    state = wait_until(
        lambda: (status := driver.status(uid, user))["webhook"]["pending"] == 0 and status,
        30,
        "the status to show no delivery pending",
    )
    answered = [(d.event, d.answered) for d in deliveries]
    print(
        f"in: a task with a webhook, its first delivery answered 503; out: deliveries {answered}, "
        f"status webhook {state['webhook']}"
    )
    refused_event, refused_code = answered[0]
    assert refused_code == HTTPStatus.SERVICE_UNAVAILABLE
    # The refused event came again and was taken; each event was taken exactly once.
    assert (refused_event, HTTPStatus.OK) in answered[1:]
    assert sorted(receiver.taken_events(uid)) == ["finished", "running"]
    assert len(deliveries) == 3
    assert {body.event.value: body.task.status for body in bodies}["finished"] == "finished"
    assert state["webhook"]["attempts"] == 3 and state["webhook"]["delivered"] == 2
    assert state["webhook"]["last_answer"].startswith("200")


def test_webhook_deliveries_survive_a_private_api_restart(
    idle_driver: Driver, receiver: WebhookReceiver
) -> None:
    driver = idle_driver
    key_name = f"restarted-{secrets.token_hex(3)}"
    user = driver.create_key(key_name)
    secret = driver.webhook_secret(key_name)
    accepting = threading.Event()
    receiver.answer = lambda delivery, earlier: (
        HTTPStatus.OK if accepting.is_set() else HTTPStatus.SERVICE_UNAVAILABLE
    )

    uid = driver.submit("passthrough", {"x.txt": b"x"}, webhook_url=receiver.url, headers=user)
    driver.wait_ended([uid], headers=user)
    # The task has ended, so both its events are in the outbox; deliveries were tried and refused
    # (a task's events go out in order, so the later one may wait behind the first).
    wait_until(lambda: receiver.of_task(uid), 60, "a first delivery to be tried")
    refused_before_restart = len(receiver.of_task(uid))
    driver.platform.restart("private-api")
    accepting.set()
    wait_until(
        lambda: sorted(set(receiver.taken_events(uid))) == ["finished", "running"],
        60,
        "both events to be delivered after the restart",
    )
    bodies = verified_bodies(receiver.of_task(uid), secret)
    print(
        f"in: a task whose deliveries were refused until the private API had restarted; out: "
        f"{refused_before_restart} refused before, then taken: {receiver.taken_events(uid)}"
    )
    assert refused_before_restart >= 1
    assert {body.event.value for body in bodies} == {"running", "finished"}


def test_webhook_destinations_are_checked_at_submission(idle_driver: Driver) -> None:
    driver = idle_driver
    before = driver.task_count()
    codes = {
        url: driver.submit_response("passthrough", {"x.txt": b"x"}, webhook_url=url).status_code
        for url in (
            "http://10.0.0.1/hook",
            "http://localhost.example/hook",
            "ftp://127.0.0.1/hook",
            "not a url",
        )
    }
    print(f"in: webhooks to hosts not allowed or not http(s); out: {codes}")
    assert all(HTTPStatus.BAD_REQUEST <= code < HTTPStatus.INTERNAL_SERVER_ERROR for code in codes.values())
    assert driver.task_count() == before
