"""The audit trail through InferenceClient and `infer audit`: an operator's drain and resume are
read back, filtered and paged; a user key gets a 403 as one `infer: error:` line."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from inference_client.cli import main
from inference_client.client import InferenceClient, InferenceClientError
from inference_server.contract import ApiKeyRole, AuditAction
from tests.inference_client.conftest import RegisterConsumer
from tests.inference_client.tables import parse_table

AUDIT_COLUMNS = ["ID", "AT", "ACTOR", "ACTION", "TARGET", "DETAILS"]


def run(public_url: str, *argv: str) -> int:
    return main(["--url", public_url, *argv])


def test_client_and_infer_audit_read_an_operators_drain_and_resume(
    public_url: str, register_consumer: RegisterConsumer, capsys: pytest.CaptureFixture[str]
) -> None:
    consumer_id = register_consumer(host="audited-box")
    with InferenceClient(public_url, timeout=30) as client:
        client.drain_consumer(consumer_id)
        client.resume_consumer(consumer_id)
        resumed, drained = client.list_audit_entries(target=consumer_id)
        assert (drained.action, resumed.action) == (
            AuditAction.CONSUMER_DRAINED,
            AuditAction.CONSUMER_RESUMED,
        )
        assert drained.actor_role == ApiKeyRole.OPERATOR and drained.actor.startswith("client-tests-")
        assert client.list_audit_entries(target=consumer_id, before_id=resumed.id) == [drained]
        assert client.list_audit_entries(target=consumer_id, since=resumed.at + timedelta(seconds=1)) == []
        assert client.list_audit_entries(target=consumer_id, until=resumed.at) == [drained]

    assert run(public_url, "audit", "--target", consumer_id, "--action", "consumer.drained", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(entry["id"], entry["action"]) for entry in listed] == [(drained.id, "consumer.drained")]
    assert run(public_url, "audit", "--target", consumer_id, "--limit", "1") == 0
    rows = parse_table(capsys.readouterr().out, AUDIT_COLUMNS)
    assert [(row["ID"], row["ACTION"], row["TARGET"]) for row in rows] == [
        (str(resumed.id), "consumer.resumed", consumer_id)
    ]
    assert rows[0]["ACTOR"] == f"{resumed.actor} (operator)"


def test_user_keys_are_refused(public_url: str, user_key: str, capsys: pytest.CaptureFixture[str]) -> None:
    with (
        InferenceClient(public_url, token=user_key) as user_client,
        pytest.raises(InferenceClientError) as refused,
    ):
        user_client.list_audit_entries()
    assert refused.value.status_code == 403 and "audit trail" in refused.value.detail
    assert run(public_url, "--token", user_key, "audit") == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("infer: error: ") and "403" in lines[0], captured.err
    assert captured.out == ""


def test_bad_times_are_usage_errors(public_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        run(public_url, "audit", "--since", "yesterday")
    assert exited.value.code == 2
    assert "ISO 8601" in capsys.readouterr().err
