"""`inference-server keys create` shows the key's webhook secret; `keys webhook-secret` shows it
again or rotates it."""

from __future__ import annotations

import pytest

from local_platform.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_secret_is_shown_at_creation_and_again_until_rotated(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = ("--database-url", database_url)
    code, key, err = _run(capsys, "keys", "create", "alice", *db)
    assert code == 0, err
    assert len(key.splitlines()) == 1  # still the key alone on stdout
    shown_at_creation = err.split("webhook secret, which signs the webhooks of its tasks: ")[1].split()[0]
    assert shown_at_creation.startswith("whsec_")

    code, out, err = _run(capsys, "keys", "webhook-secret", "alice", *db)
    assert code == 0, err
    assert out.strip() == shown_at_creation  # the secret alone on stdout
    assert "'alice'" in err

    code, out, err = _run(capsys, "keys", "webhook-secret", "alice", "--rotate", *db)
    assert code == 0, err
    rotated = out.strip()
    assert rotated.startswith("whsec_") and rotated != shown_at_creation
    assert "new webhook secret" in err
    assert _run(capsys, "keys", "webhook-secret", "alice", *db)[1].strip() == rotated

    _run(capsys, "keys", "create", "bob", *db)
    assert _run(capsys, "keys", "webhook-secret", "bob", *db)[1].strip() not in (rotated, shown_at_creation)


def test_an_unknown_key_is_one_line_and_exit_1(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "keys", "webhook-secret", "nobody", "--database-url", database_url)
    assert code == 1 and out == ""
    assert "no key is named 'nobody'" in err
