"""Retention: old terminal tasks lose their files, keep their rows; recent and active ones are untouched."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import event, update

from inference_server.contract import TaskFailure, TaskStatus
from private_api.models import Task, utcnow
from private_api.retention import expire_old_tasks
from tests.helpers import wait_until
from tests.private_api.helpers import (
    as_consumer,
    claim,
    make_zip,
    register_model,
    stored_files,
    submit_ok,
    task_row,
)

CONSUMER = as_consumer("consumer-a")


def finish(client, uid: str) -> None:
    assert claim(client, uid).status_code == 200
    response = client.post(
        f"/tasks/{uid}/output", files={"zip_file": ("o.zip", make_zip({"out.txt": b"o"}))}, headers=CONSUMER
    )
    assert response.status_code == 200, response.text


def age(client, uid: str, days: float) -> None:
    with client.app.state.session_factory() as session:
        session.execute(
            update(Task).where(Task.uid == uid).values(finished_at=utcnow() - timedelta(days=days))
        )
        session.commit()


def test_old_tasks_lose_their_files_and_keep_their_rows(client, settings):
    register_model(client)
    old_finished, old_failed, recent, pending = (submit_ok(client)["uid"] for _ in range(4))
    finish(client, old_finished)
    finish(client, recent)
    assert claim(client, old_failed).status_code == 200
    failure = TaskFailure(error="model exited with code 1", exit_code=1)
    assert (
        client.post(f"/tasks/{old_failed}/fail", json=failure.model_dump(), headers=CONSUMER).status_code
        == 200
    )
    age(client, old_finished, 31)
    age(client, old_failed, 31)
    age(client, recent, 5)
    files_before = len(stored_files(settings))

    with client.app.state.session_factory() as session:
        expired = expire_old_tasks(session=session, blobs=client.app.state.blobs, max_age=timedelta(days=30))

    assert expired == 2
    expired_row = task_row(client, old_finished)
    assert expired_row.status == TaskStatus.EXPIRED
    assert expired_row.input_blob_key is None and expired_row.output_blob_key is None
    failed_row = task_row(client, old_failed)
    assert failed_row.status == TaskStatus.FAILED
    assert failed_row.error == "model exited with code 1"
    assert failed_row.input_blob_key is None
    # Two inputs, one output gone; the recent task and the pending one keep theirs.
    assert len(stored_files(settings)) == files_before - 3
    assert client.get(f"/tasks/{recent}/output").status_code == 200
    assert client.get(f"/tasks/{pending}/input").status_code == 200
    assert client.get(f"/tasks/{old_finished}").json()["status"] == "expired"
    assert client.get(f"/tasks/{old_finished}/output").status_code == 409  # no longer finished

    with client.app.state.session_factory() as session:
        assert (
            expire_old_tasks(session=session, blobs=client.app.state.blobs, max_age=timedelta(days=30)) == 0
        )


def test_the_maintenance_loop_applies_retention(start_app, make_settings):
    settings = make_settings(retention_days=1, retention_interval_s=0.1)
    client = start_app(settings)
    register_model(client)
    uid = submit_ok(client)["uid"]
    finish(client, uid)
    age(client, uid, 2)

    wait_until(lambda: client.get(f"/tasks/{uid}").json()["status"] == "expired", 10, "retention to run")
    assert client.get(f"/tasks/{uid}/output").status_code == 409


def test_a_task_deleted_while_retention_runs_keeps_what_the_delete_left(client, settings):
    """Retention's change is conditional: a row changed between its read and its write is skipped,
    and its files are left to whoever changed it."""
    register_model(client)
    uid = submit_ok(client)["uid"]
    finish(client, uid)
    age(client, uid, 31)
    engine = client.app.state.engine
    raced: list[str] = []

    def delete_meanwhile(_conn, _cursor, statement: str, *_args) -> None:
        # Right after retention's SELECT, the owner deletes the task through the API.
        if not raced and statement.lstrip().upper().startswith("SELECT") and "finished_at" in statement:
            raced.append(statement)
            assert client.delete(f"/tasks/{uid}").status_code == 200

    event.listen(engine, "after_cursor_execute", delete_meanwhile)
    try:
        with client.app.state.session_factory() as session:
            expired = expire_old_tasks(
                session=session, blobs=client.app.state.blobs, max_age=timedelta(days=30)
            )
    finally:
        event.remove(engine, "after_cursor_execute", delete_meanwhile)
    assert raced, "retention never read the task"
    assert expired == 0
    assert task_row(client, uid).status == TaskStatus.DELETED
