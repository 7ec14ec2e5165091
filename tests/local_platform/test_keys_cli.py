"""`inference-server keys ...` on the database directly, and the operator key `make run` creates."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from inference_server.contract import ApiKeyRole, Principal
from local_platform.cli import main
from local_platform.operator_key import ensure_operator_key
from private_api.db import make_engine, make_session_factory
from private_api.keys import resolve_key

BIN = Path(sys.executable).parent


def _resolve(database_url: str, key: str) -> Principal | None:
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            return resolve_key(session=session, key=key)
    finally:
        engine.dispose()


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_create_list_revoke(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = ("--database-url", database_url)
    code, alice_key, err = _run(capsys, "keys", "create", "alice", *db)
    assert code == 0, err
    alice_key = alice_key.strip()
    assert alice_key.startswith("isk_") and len(alice_key.splitlines()) == 1  # the key alone on stdout
    assert "shown only this once" in err
    code, bob_key, _ = _run(capsys, "keys", "create", "bob", "--operator", *db)
    assert code == 0
    assert _resolve(database_url, alice_key) == Principal(name="alice", role=ApiKeyRole.USER)
    assert _resolve(database_url, bob_key.strip()) == Principal(name="bob", role=ApiKeyRole.OPERATOR)

    code, table, _ = _run(capsys, "keys", "list", *db)
    assert code == 0
    lines = table.splitlines()
    assert lines[0].split() == [
        "NAME", "ROLE", "ID", "CREATED", "REVOKED", "LAST", "USED", "MAX_PRIORITY", "MAX_ACTIVE"
    ]  # fmt: skip
    assert lines[1].split()[:3] == ["alice", "user", alice_key.split("_")[1]]
    assert lines[2].split()[:2] == ["bob", "operator"]
    assert alice_key.split("_", 2)[2] not in table and bob_key.strip().split("_", 2)[2] not in table

    code, out, _ = _run(capsys, "keys", "revoke", "alice", *db)
    assert code == 0 and "revoked" in out
    assert _resolve(database_url, alice_key) is None
    code, listed, _ = _run(capsys, "keys", "list", "--json", *db)
    by_name = {key["name"]: key for key in json.loads(listed)}
    assert by_name["alice"]["revoked_at"] is not None and by_name["bob"]["revoked_at"] is None
    assert "key" not in by_name["alice"] and "key_hash" not in by_name["alice"]

    code, _, err = _run(capsys, "keys", "revoke", bob_key.strip().split("_")[1], *db)  # by id
    assert code == 0
    assert _resolve(database_url, bob_key.strip()) is None


def test_keys_carry_limits_set_at_creation_and_changed_later(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = ("--database-url", sqlite_url)
    assert (
        _run(capsys, "keys", "create", "dana", "--max-priority", "3", "--max-active-tasks", "2", *db)[0] == 0
    )
    assert _run(capsys, "keys", "create", "erin", *db)[0] == 0

    def limits() -> dict[str, tuple[int | None, int | None]]:
        listed = json.loads(_run(capsys, "keys", "list", "--json", *db)[1])
        return {key["name"]: (key["max_priority"], key["max_active_tasks"]) for key in listed}

    assert limits() == {"dana": (3, 2), "erin": (None, None)}  # None: the role's default
    code, out, err = _run(capsys, "keys", "set", "erin", "--max-priority", "9", *db)
    assert code == 0, err
    assert "max priority 9, max active tasks default" in out
    code, out, _ = _run(capsys, "keys", "set", "dana", "--max-active-tasks", "default", *db)
    assert code == 0
    assert limits() == {"dana": (3, None), "erin": (9, None)}
    table = _run(capsys, "keys", "list", *db)[1].splitlines()
    assert table[1].split()[-2:] == ["3", "default"]

    code, _, err = _run(capsys, "keys", "set", "dana", "--max-priority", "10", *db)
    assert code == 1 and "0..9" in err
    assert _run(capsys, "keys", "set", "dana", *db)[0] == 2  # nothing to change
    code, _, err = _run(capsys, "keys", "set", "nobody", "--max-priority", "1", *db)
    assert code == 1 and "no key is named" in err
    assert limits()["dana"] == (3, None)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["keys", "create", "dup"], "exists already"),
        (["keys", "create", "bad name"], "invalid key name"),
        (["keys", "revoke", "nobody"], "no key is named"),
    ],
)
def test_mistakes_are_one_line_and_exit_1(
    sqlite_url: str, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    assert _run(capsys, "keys", "create", "dup", "--database-url", sqlite_url)[0] == 0
    code, out, err = _run(capsys, *argv, "--database-url", sqlite_url)
    assert code == 1
    assert out == ""
    assert err.startswith("inference-server: error: ") and expected in err
    assert len(err.strip().splitlines()) == 1


def test_installed_command_uses_is_database_url(sqlite_url: str) -> None:
    env = {**os.environ, "IS_DATABASE_URL": sqlite_url}
    env.pop("IS_SERVICE_TOKEN", None)  # database work needs no service token
    created = subprocess.run(
        [str(BIN / "inference-server"), "keys", "create", "carol"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert _resolve(sqlite_url, created.stdout.strip()) == Principal(name="carol", role=ApiKeyRole.USER)
    assert "Traceback" not in created.stderr


def test_ensure_operator_key_creates_once_and_keeps_the_file_private(sqlite_url: str, tmp_path: Path) -> None:
    key_file = tmp_path / "data" / "operator.key"
    assert ensure_operator_key(sqlite_url, key_file) == "operator"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert _resolve(sqlite_url, key) == Principal(name="operator", role=ApiKeyRole.OPERATOR)

    assert ensure_operator_key(sqlite_url, key_file) is None  # a second start keeps it
    assert key_file.read_text().strip() == key
    # Another data folder on the same database: the name `operator` is taken.
    other = tmp_path / "other" / "operator.key"
    assert ensure_operator_key(sqlite_url, other) == "operator-2"
    assert _resolve(sqlite_url, other.read_text().strip()) == Principal(
        name="operator-2", role=ApiKeyRole.OPERATOR
    )


def test_standalone_platform_key_is_found_by_infer(platform_factory, tmp_path: Path) -> None:
    platform = platform_factory(
        consumers=0, create_operator_key=True, IS_ANONYMOUS_TASKS="false", IS_ANONYMOUS_MODELS="false"
    )
    assert platform.operator_key_created == "operator"
    assert stat.S_IMODE(platform.operator_key_file.stat().st_mode) == 0o600
    env = {key: value for key, value in os.environ.items() if key != "IS_API_TOKEN"}

    def infer(data_dir: Path, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "infer"), "--url", platform.public_url, *argv],
            env={**env, "IS_DATA_DIR": str(data_dir)}, capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip

    found = infer(platform.data_dir, "models", "list", "--json")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout) == []
    elsewhere = tmp_path / "no-key-here"
    elsewhere.mkdir()
    refused = infer(elsewhere, "models", "list")
    assert refused.returncode == 1
    assert "401" in refused.stderr and "Authorization: Bearer" in refused.stderr
