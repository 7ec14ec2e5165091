"""Chained tasks through the public API: input_from and model_from are relayed form fields, a
user chains only their own tasks, and a dependent runs on its upstream's output."""

from __future__ import annotations

import secrets
from typing import Any

import httpx

from inference_server.contract import PrivateRoutes, PublicRoutes, TaskPublic, TaskStatus, TaskSubmitFields
from tests.public_api.stack import ConsumerDriver, PrivateStack, make_zip, register_model, shared_http


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _submit(
    public_url: str, model_id: str, headers: dict[str, str], *, zip_file: bool = False, **fields: str
) -> httpx.Response:
    files: dict[str, Any] = {name: (None, value) for name, value in fields.items()}
    if zip_file:
        files[TaskSubmitFields.ZIP_FILE] = ("input.zip", make_zip({"in.csv": b"1,2\n"}), "application/zip")
    return shared_http().post(
        public_url + PublicRoutes.TASKS,
        params={"model_human_readable_id": model_id},
        files=files,
        headers=headers,
    )


def _status(public_url: str, uid: str, headers: dict[str, str]) -> TaskPublic:
    response = shared_http().get(public_url + PublicRoutes.TASK_STATUS.format(uid=uid), headers=headers)
    assert response.status_code == 200, response.text
    return TaskPublic.model_validate(response.json())


def test_a_user_chains_their_own_tasks_and_the_dependent_runs_on_the_upstream_output(
    public_url: str, private_api: PrivateStack, consumer: ConsumerDriver
) -> None:
    suffix = secrets.token_hex(3)
    alice = _bearer(private_api.create_key(f"alice-{suffix}"))
    bob = _bearer(private_api.create_key(f"bob-{suffix}"))
    model_id = register_model(public_url)
    upstream = _submit(public_url, model_id, alice, zip_file=True).json()

    chained = _submit(public_url, model_id, alice, input_from=upstream, model_from=upstream)
    assert chained.status_code == 200, chained.text
    uid = chained.json()
    task = _status(public_url, uid, alice)
    assert (task.input_from, task.model_from) == (upstream, upstream)
    assert task.waiting_reason == f"waiting for upstream {upstream} (pending)"

    foreign = _submit(public_url, model_id, bob, input_from=upstream)
    assert foreign.status_code == 404 and "unknown" in foreign.json()["detail"]
    both = _submit(public_url, model_id, alice, zip_file=True, input_from=upstream)
    assert both.status_code == 422 and "not both" in both.json()["detail"]

    output = make_zip({"weights.csv": b"0.5,1.5\n"})
    consumer.run_to_finish(upstream, output)
    assert _status(public_url, uid, alice).status == TaskStatus.PENDING
    consumer.claim(uid)
    for route in (PrivateRoutes.TASK_INPUT, PrivateRoutes.TASK_MODEL_FROM):
        downloaded = consumer.http.get(route.format(uid=uid))
        assert downloaded.status_code == 200 and downloaded.content == output, route
