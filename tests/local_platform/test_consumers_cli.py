"""`inference-server consumers ...` on the database directly: list with states, drain, resume."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import update

from inference_server.contract import ConsumerRegistration, GpuInfo
from local_platform.cli import main
from private_api.consumer_registry import register_consumer
from private_api.db import make_engine, make_session_factory, upgrade_database
from private_api.models import Consumer, utcnow


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _register(
    database_url: str, consumer_id: str, registration: ConsumerRegistration, *, age_s: float = 0
) -> None:
    """A consumer as it registers itself, last heard from `age_s` ago."""
    upgrade_database(database_url)
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            register_consumer(
                session=session, consumer_id=consumer_id, registration=registration, lost_after_s=30
            )
            session.execute(
                update(Consumer)
                .where(Consumer.id == consumer_id)
                .values(last_seen_at=utcnow() - timedelta(seconds=age_s))
            )
            session.commit()
    finally:
        engine.dispose()


def test_list_drain_resume(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = ("--database-url", database_url)
    code, out, err = _run(capsys, "consumers", "list", *db)
    assert (code, out.strip()) == (0, "no consumer is registered"), err

    gpu = GpuInfo(index=0, uuid="GPU-a", memory_total_mb=24576, simulated=True)
    _register(
        database_url, "gpu-host-0", ConsumerRegistration(host="gpu-host", cpus=8, memory_mb=32768, gpus=[gpu])
    )
    _register(database_url, "old-host", ConsumerRegistration(host="old", cpus=2, memory_mb=4096), age_s=120)

    code, table, _ = _run(capsys, "consumers", "list", *db)
    assert code == 0
    lines = table.splitlines()
    assert lines[0].split() == ["ID", "STATE", "HOST", "GPUS", "RUNNING", "LAST", "SEEN"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["gpu-host-0"][1:6] == ["idle", "gpu-host", "0:24576MiB", "(sim)", "0"]
    assert rows["old-host"][1:5] == ["lost", "old", "-", "0"]

    code, out, _ = _run(capsys, "consumers", "drain", "gpu-host-0", *db)
    assert code == 0 and "is draining" in out
    code, listed, _ = _run(capsys, "consumers", "list", "--json", *db)
    by_id = {consumer["id"]: consumer for consumer in json.loads(listed)}
    assert by_id["gpu-host-0"]["state"] == "draining" and by_id["gpu-host-0"]["draining"] is True
    assert by_id["old-host"]["state"] == "lost"

    code, out, _ = _run(capsys, "consumers", "resume", "gpu-host-0", *db)
    assert code == 0 and "takes tasks again (idle)" in out
    code, out, err = _run(capsys, "consumers", "drain", "no-such-host", *db)
    assert code != 0 and "consumer 'no-such-host' is not registered" in err
