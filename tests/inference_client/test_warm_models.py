"""A model's `warm` flag (consumers keep a container of it created ahead) through InferenceClient
and `infer models add/update`, against a real public API and private API."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from inference_client.cli import main
from inference_client.client import InferenceClient
from inference_server.contract import PublicRoutes
from tests.public_api.stack import BASE_IMAGE_TAG, unique_id


@pytest.fixture
def client(public_url: str) -> Iterator[InferenceClient]:
    with InferenceClient(public_url, timeout=30) as client:
        yield client


def listed(client: InferenceClient, human_readable_id: str) -> bool:
    return next(model for model in client.list_models() if model.human_readable_id == human_readable_id).warm


def test_add_model_warm_and_update_it(client: InferenceClient) -> None:
    plain = client.add_model(BASE_IMAGE_TAG, unique_id(), "cold")
    warm = client.add_model(BASE_IMAGE_TAG, unique_id(), "warm", warm=True)
    assert (plain.warm, warm.warm) == (False, True)
    assert listed(client, warm.human_readable_id)

    cooled = client.update_model(warm.human_readable_id, warm=False)
    assert cooled.warm is False and not listed(client, warm.human_readable_id)
    assert client.update_model(plain.human_readable_id, warm=True).warm is True
    # Only what was sent changes.
    assert client.update_model(plain.human_readable_id, memory_mb=512).warm is True


def test_warm_must_be_a_boolean(public_url: str, client: InferenceClient) -> None:
    model = client.add_model(BASE_IMAGE_TAG, unique_id(), "typed")
    path = PublicRoutes.MODEL.format(human_readable_id=model.human_readable_id)
    response = httpx.patch(f"{public_url}{path}", json={"warm": "yes"}, timeout=30)
    assert response.status_code == 422 and "warm" in json.dumps(response.json()["detail"])
    assert not listed(client, model.human_readable_id)


def test_infer_models_add_and_update_warm(public_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    model = unique_id()
    code = main(
        ["--url", public_url, "models", "add", "--container-tag", BASE_IMAGE_TAG, "--id", model,
         "--description", "cli warm", "--warm"]
    )  # fmt: skip
    assert code == 0 and json.loads(capsys.readouterr().out)["warm"] is True

    assert main(["--url", public_url, "models", "update", model, "--no-warm"]) == 0
    assert json.loads(capsys.readouterr().out)["warm"] is False
    assert main(["--url", public_url, "models", "update", model, "--warm"]) == 0
    assert json.loads(capsys.readouterr().out)["warm"] is True

    assert main(["--url", public_url, "models", "update", model]) == 1
    assert "nothing to change" in capsys.readouterr().err
