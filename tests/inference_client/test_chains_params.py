"""InferenceClient and `infer` with issue 11's options: params, params_schema and cacheable at
registration, webhook_url, input_from (--after), model_from and cache=false, against a real
public API and private API. A ConsumerDriver stands in for the job consumer where a task must
run or ask the result cache; this private API allows no webhook destination, so a webhook_url
reaching it is refused, which shows that it was sent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path

import pytest

from inference_client.cli import main
from inference_client.client import InferenceClient, InferenceClientError
from inference_server.contract import CacheAnswer, CacheLookup, PrivateRoutes, TaskStatus
from tests.helpers import make_zip
from tests.public_api.stack import BASE_IMAGE_TAG, ConsumerDriver, unique_id

SCHEMA = {
    "type": "object",
    "properties": {"l2": {"type": "number", "minimum": 0}, "name": {"type": "string"}, "flags": {}},
    "additionalProperties": False,
}
# What a consumer would report as the image it resolved; any ID will do for the cache key.
IMAGE_ID = "sha256:" + "ab" * 32


@pytest.fixture
def client(public_url: str) -> Iterator[InferenceClient]:
    with InferenceClient(public_url, timeout=30) as client:
        yield client


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "case"
    path.mkdir()
    (path / "scan.txt").write_text("scan")
    return path


@pytest.fixture(scope="module")
def schema_model(public_url: str) -> str:
    with InferenceClient(public_url) as client:
        return client.add_model(
            BASE_IMAGE_TAG, unique_id(), "takes params", params_schema=SCHEMA, cacheable=True
        ).human_readable_id


def run(public_url: str, *argv: str) -> int:
    return main(["--url", public_url, *argv])


def printed_uid(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def cache_answer(consumer: ConsumerDriver, uid: str) -> CacheAnswer:
    """Claim the task and ask the result cache, as a consumer does before running it."""
    consumer.claim(uid)
    response = consumer.http.post(
        PrivateRoutes.TASK_CACHE_LOOKUP.format(uid=uid), json=CacheLookup(image_id=IMAGE_ID).model_dump()
    )
    assert response.status_code == HTTPStatus.OK, response.text
    return CacheAnswer.model_validate(response.json())


# --- InferenceClient ---------------------------------------------------------------------------


def test_add_model_sends_params_schema_and_cacheable(client: InferenceClient, tmp_path: Path) -> None:
    plain = client.add_model(BASE_IMAGE_TAG, unique_id(), "no schema")
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "w.bin").write_bytes(b"w")
    # With a model zip too: the schema travels as a text part before the streamed file.
    zipped = client.add_model(
        BASE_IMAGE_TAG, unique_id(), "schema and zip", model_zip=weights, params_schema=SCHEMA, cacheable=True
    )
    print(
        f"in: add_model without and with params_schema+cacheable+zip; out: {plain.params_schema}, "
        f"{plain.cacheable}; {zipped.params_schema}, {zipped.cacheable}, zip {zipped.model_available}"
    )
    assert (plain.params_schema, plain.cacheable) == (None, False)
    assert (zipped.params_schema, zipped.cacheable, zipped.model_available) == (SCHEMA, True, True)
    assert next(m for m in client.list_models() if m.human_readable_id == zipped.human_readable_id).cacheable


def test_submit_params_input_from_and_model_from(
    client: InferenceClient, schema_model: str, folder: Path, consumer: ConsumerDriver
) -> None:
    params = {"l2": 0.5, "name": "zürich", "flags": [1, 2]}
    upstream = client.submit(schema_model, folder, params=params)
    dependent = client.submit(schema_model, input_from=upstream, model_from=upstream, params={"l2": 0})
    waiting = client.status(dependent)
    consumer.run_to_finish(upstream, make_zip({"weights.json": b"{}"}))
    after = client.status(dependent)
    print(
        f"in: params {params}, then a task on its output (input_from and model_from); out: "
        f"{client.status(upstream).params}, dependent {waiting.input_from == upstream}, "
        f"{waiting.model_from == upstream}, waiting {waiting.waiting_reason!r} then {after.waiting_reason!r}"
    )
    assert client.status(upstream).params == params
    assert (waiting.status, waiting.input_from, waiting.model_from) == (
        TaskStatus.PENDING,
        upstream,
        upstream,
    )
    assert waiting.params == {"l2": 0}
    assert waiting.waiting_reason is not None and upstream in waiting.waiting_reason
    assert after.waiting_reason is None or upstream not in after.waiting_reason


def test_bad_params_and_webhooks_are_the_servers_refusals(
    client: InferenceClient, schema_model: str, folder: Path
) -> None:
    with pytest.raises(InferenceClientError) as bad_params:
        client.submit(schema_model, folder, params={"l2": -1})
    with pytest.raises(InferenceClientError) as webhook:
        client.submit(schema_model, folder, webhook_url="http://127.0.0.1:9/hook")
    print(f"in: params l2=-1; a webhook where none is allowed; out: {bad_params.value}; {webhook.value}")
    assert bad_params.value.status_code == HTTPStatus.UNPROCESSABLE_ENTITY
    assert "l2" in bad_params.value.detail
    assert webhook.value.status_code is not None and 400 <= webhook.value.status_code < 500
    assert "webhook" in webhook.value.detail.lower()


def test_submit_needs_a_path_or_input_from_not_both(client: InferenceClient, folder: Path) -> None:
    with pytest.raises(InferenceClientError) as neither:
        client.submit("any-model")
    with pytest.raises(InferenceClientError) as both:
        client.submit("any-model", folder, input_from="someuid")
    for refused in (neither, both):
        assert refused.value.status_code is None  # refused before any request
        assert "either a path" in str(refused.value)


def test_cache_false_runs_what_the_cache_would_answer(
    client: InferenceClient, schema_model: str, folder: Path, consumer: ConsumerDriver
) -> None:
    first = client.submit(schema_model, folder, params={"l2": 1})
    assert cache_answer(consumer, first).hit is False
    consumer.finish(first, make_zip({"out.txt": b"out"}))
    forced = client.submit(schema_model, folder, params={"l2": 1}, cache=False)
    again = client.submit(schema_model, folder, params={"l2": 1})
    answers = {"cache=False": cache_answer(consumer, forced), "default": cache_answer(consumer, again)}
    print(f"in: the same input and params after a finished task; out: {answers}")
    assert answers["cache=False"].hit is False
    assert answers["default"] == CacheAnswer(hit=True, cached_from=first)


# --- infer ---------------------------------------------------------------------------------------


def test_infer_models_add_with_params_schema_and_cacheable(
    public_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    model = unique_id()
    code = run(
        public_url, "models", "add", "--container-tag", BASE_IMAGE_TAG, "--id", model,
        "--description", "cli schema", "--params-schema", str(schema_file), "--cacheable",
    )  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    print(
        f"in: models add --params-schema --cacheable; out: {code}, {printed['params_schema']}, "
        f"{printed['cacheable']}"
    )
    assert code == 0
    assert (printed["params_schema"], printed["cacheable"]) == (SCHEMA, True)

    schema_file.write_text("[1, 2]")
    code = run(
        public_url, "models", "add", "--container-tag", BASE_IMAGE_TAG, "--id", unique_id(),
        "--description", "x", "--params-schema", str(schema_file),
    )  # fmt: skip
    assert code == 1
    assert "must hold a JSON object" in capsys.readouterr().err


def test_infer_submit_params_after_model_from(
    public_url: str,
    schema_model: str,
    folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    params_file = tmp_path / "p.json"
    params_file.write_text(json.dumps({"l2": 3, "name": "from the file"}))
    code = run(
        public_url, "submit", schema_model, str(folder), "--params-file", str(params_file),
        "--param", "l2=0.25", "--param", "flags=[1, true]", "--param", "name=plain text",
    )  # fmt: skip
    assert code == 0
    upstream = printed_uid(capsys)
    assert run(public_url, "submit", schema_model, "--after", upstream, "--model-from", upstream) == 0
    dependent = printed_uid(capsys)
    assert run(public_url, "submit", schema_model, "--input-from", upstream) == 0
    aliased = printed_uid(capsys)
    with InferenceClient(public_url) as client:
        up, down, alias = client.status(upstream), client.status(dependent), client.status(aliased)
    print(
        f"in: --params-file and three --param; --after/--model-from; --input-from; out: {up.params}, "
        f"{(down.input_from, down.model_from) == (upstream, upstream)}, {alias.input_from == upstream}"
    )
    # --param overrides the file; a value is JSON when it parses, else the text itself.
    assert up.params == {"l2": 0.25, "name": "plain text", "flags": [1, True]}
    assert (down.input_from, down.model_from, down.params) == (upstream, upstream, None)
    assert alias.input_from == upstream


def test_infer_submit_no_cache(
    public_url: str,
    schema_model: str,
    folder: Path,
    consumer: ConsumerDriver,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(public_url, "submit", schema_model, str(folder), "--param", "l2=7") == 0
    first = printed_uid(capsys)
    assert cache_answer(consumer, first).hit is False
    consumer.finish(first, make_zip({"out.txt": b"out"}))
    assert run(public_url, "submit", schema_model, str(folder), "--param", "l2=7", "--no-cache") == 0
    forced = printed_uid(capsys)
    assert run(public_url, "submit", schema_model, str(folder), "--param", "l2=7") == 0
    cached = printed_uid(capsys)
    answers = (cache_answer(consumer, forced), cache_answer(consumer, cached))
    print(f"in: submit, then --no-cache and plain with the same input; out: {answers}")
    assert answers == (CacheAnswer(hit=False), CacheAnswer(hit=True, cached_from=first))


def test_infer_submit_refusals_are_one_line(
    public_url: str, schema_model: str, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {
        "no path": [schema_model],
        "bad param": [schema_model, str(folder), "--param", "l2=-1"],
        "webhook": [schema_model, str(folder), "--webhook", "http://127.0.0.1:9/hook"],
    }
    errors = {}
    for what, argv in cases.items():
        assert run(public_url, "submit", *argv) == 1, what
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("infer: error: "), lines
        errors[what] = lines[0]
    print(f"in: submit without PATH or --after, with l2=-1, with a webhook; out: {errors}")
    assert "either a path" in errors["no path"]
    assert "l2" in errors["bad param"]
    assert "webhook" in errors["webhook"].lower()
    with pytest.raises(SystemExit) as usage:
        run(public_url, "submit", schema_model, str(folder), "--param", "no-equals-sign")
    assert usage.value.code == 2
