"""`infer list --model --owner --uid` and InferenceClient.list_tasks' filters against a real
public API and private API."""

from __future__ import annotations

import json

import pytest

from inference_client.cli import main
from inference_client.client import InferenceClient
from inference_server.contract import TASK_UID_SEARCH_MIN_CHARS, TaskPublic
from tests.helpers import make_zip
from tests.public_api.stack import BASE_IMAGE_TAG, PrivateStack, unique_id


@pytest.fixture(scope="module")
def user(private_api: PrivateStack) -> tuple[str, str]:
    name = f"filters-user-{unique_id('x')}"
    return name, private_api.create_key(name)


@pytest.fixture(scope="module")
def planted(
    public_url: str, operator_key: str, user: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """Two models; a task of the operator's on each and one of the user's on the first."""
    first, second = unique_id(), unique_id()
    case = tmp_path_factory.mktemp("filters") / "input.zip"
    case.write_bytes(make_zip({"a.txt": b"a"}))
    uids: dict[str, str] = {}
    with InferenceClient(public_url, token=operator_key) as operator:
        operator.add_model(BASE_IMAGE_TAG, first, "filters first")
        operator.add_model(BASE_IMAGE_TAG, second, "filters second")
        uids["operator_first"] = operator.submit(first, case)
        uids["operator_second"] = operator.submit(second, case)
    with InferenceClient(public_url, token=user[1]) as client:
        uids["user_first"] = client.submit(first, case)
    return {"first": first, "second": second, **uids}


def _listed(capsys: pytest.CaptureFixture[str], public_url: str, *argv: str) -> list[TaskPublic]:
    capsys.readouterr()
    assert main(["--url", public_url, "list", "--json", *argv]) == 0
    return [TaskPublic.model_validate(task) for task in json.loads(capsys.readouterr().out)]


def test_client_filters(
    public_url: str, planted: dict[str, str], user: tuple[str, str], operator_key: str
) -> None:
    name, key = user
    with InferenceClient(public_url, token=operator_key) as operator:
        assert [task.uid for task in operator.list_tasks(model=planted["first"])] == [
            planted["user_first"],
            planted["operator_first"],
        ]
        by_owner = operator.list_tasks(owner=name)
        assert [(task.uid, task.owner) for task in by_owner] == [(planted["user_first"], name)]
        assert [task.uid for task in operator.list_tasks(uid=planted["operator_second"][:6])] == [
            planted["operator_second"]
        ]
    with InferenceClient(public_url, token=key) as client:
        # The user's own list, whatever owner it names.
        assert client.list_tasks(model=planted["second"]) == []
        assert client.list_tasks(uid=planted["operator_first"]) == []


def test_cli_filters(
    public_url: str, planted: dict[str, str], user: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    name, _ = user
    listed = _listed(capsys, public_url, "--model", planted["second"])
    assert [task.uid for task in listed] == [planted["operator_second"]]
    listed = _listed(capsys, public_url, "--owner", name, "--model", planted["first"])
    assert [task.uid for task in listed] == [planted["user_first"]]
    listed = _listed(capsys, public_url, "--uid", planted["operator_first"])
    assert [task.uid for task in listed] == [planted["operator_first"]]


def test_cli_refuses_a_short_uid(public_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--url", public_url, "list", "--uid", "a" * (TASK_UID_SEARCH_MIN_CHARS - 1)])
    assert f"at least {TASK_UID_SEARCH_MIN_CHARS} characters" in capsys.readouterr().err
