"""`inference-server audit list` on the database directly: the keys commands are recorded as the
operator CLI, filtered by action, and no key or webhook secret reaches the trail."""

from __future__ import annotations

import json
import secrets

import pytest

from inference_server.contract import ConsumerRegistration
from local_platform.cli import main
from private_api.consumer_registry import register_consumer
from private_api.db import make_engine, make_session_factory, upgrade_database


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_key_commands_are_audited_as_the_operator_cli(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = ("--database-url", database_url)
    code, key, err = _run(capsys, "keys", "create", "audited-alice", "--max-priority", "2", *db)
    assert code == 0, err
    first_secret = err.split("Its webhook secret, which signs the webhooks of its tasks: ")[1].split()[0]
    assert _run(capsys, "keys", "set", "audited-alice", "--max-active-tasks", "default", *db)[0] == 0
    code, new_secret, err = _run(capsys, "keys", "webhook-secret", "audited-alice", "--rotate", *db)
    assert code == 0, err
    assert _run(capsys, "keys", "revoke", "audited-alice", *db)[0] == 0

    code, out, err = _run(capsys, "audit", "list", "--json", *db)
    assert code == 0, err
    entries = [entry for entry in json.loads(out) if entry["target"] == "audited-alice"]
    assert [(entry["action"], entry["actor"], entry["actor_role"]) for entry in entries] == [
        ("key.revoked", "operator CLI", None),
        ("key.webhook_secret_rotated", "operator CLI", None),
        ("key.limits_set", "operator CLI", None),
        ("key.created", "operator CLI", None),
    ]
    assert entries[1]["details"] == {} and entries[2]["details"] == {"max_active_tasks": None}
    for secret in (key.strip(), first_secret, new_secret.strip()):
        assert secret and secret not in out

    code, out, err = _run(capsys, "audit", "list", "--action", "key.revoked", *db)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "AT", "ACTOR", "ACTION", "TARGET", "DETAILS"]
    assert any("operator CLI" in row and "key.revoked" in row and "audited-alice" in row for row in rows)
    assert all("key.revoked" in row for row in rows)


def test_drain_and_resume_are_audited_as_the_operator_cli(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    consumer_id = f"audited-{secrets.token_hex(3)}"
    upgrade_database(database_url)
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            registration = ConsumerRegistration(host="box", cpus=4, memory_mb=8192)
            register_consumer(
                session=session, consumer_id=consumer_id, registration=registration, lost_after_s=30
            )
    finally:
        engine.dispose()
    db = ("--database-url", database_url)
    assert _run(capsys, "consumers", "drain", consumer_id, *db)[0] == 0
    assert _run(capsys, "consumers", "drain", consumer_id, *db)[0] == 0  # already draining: no entry
    assert _run(capsys, "consumers", "resume", consumer_id, *db)[0] == 0

    code, out, err = _run(capsys, "audit", "list", "--target", consumer_id, "--json", *db)
    assert code == 0, err
    assert [(entry["action"], entry["actor"]) for entry in json.loads(out)] == [
        ("consumer.resumed", "operator CLI"),
        ("consumer.drained", "operator CLI"),
    ]
