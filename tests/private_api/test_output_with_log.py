"""The output upload carrying the task's final log (OUTPUT_LOG_FIELD): one request for both; the
separate log upload stays accepted."""

from __future__ import annotations

from inference_server.contract import OUTPUT_LOG_FIELD, PROGRESS_MESSAGE_PARAM, PROGRESS_PARAM, TaskStatus
from tests.private_api.helpers import as_consumer, claim, make_zip, register_model, stored_files, submit_ok

A = as_consumer("consumer-a")


def upload(client, uid, form=None, headers=A):
    return client.post(
        f"/tasks/{uid}/output",
        files={"zip_file": ("output.zip", make_zip({"result.txt": b"42"}))},
        data=form or {},
        headers=headers,
    )


def test_the_output_upload_stores_the_final_log_and_progress_it_carries(client, settings):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)
    assert client.put(f"/tasks/{uid}/logs", content=b"live so far\n", headers=A).status_code == 204

    response = upload(
        client,
        uid,
        {
            OUTPUT_LOG_FIELD: "all of it \u2713\nexit code 0\n",
            PROGRESS_PARAM: "1.0",
            PROGRESS_MESSAGE_PARAM: "done",
        },
    )

    assert response.status_code == 200, response.text
    task = response.json()
    assert task["status"] == TaskStatus.FINISHED
    assert (task["progress"], task["progress_message"]) == (1.0, "done")
    assert client.get(f"/tasks/{uid}/logs").text == "all of it \u2713\nexit code 0\n"
    assert len(stored_files(settings)) == 3  # input, output and the final log (the live one replaced)


def test_without_a_log_field_the_log_uploaded_apart_stays(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)
    assert client.put(f"/tasks/{uid}/logs", content=b"sent on its own\n", headers=A).status_code == 204

    assert upload(client, uid).status_code == 200
    assert client.get(f"/tasks/{uid}/logs").text == "sent on its own\n"


def test_bad_progress_with_the_log_is_a_422_and_nothing_is_stored(client, settings):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)
    before = stored_files(settings)

    for progress in ("1.5", "lots"):
        response = upload(client, uid, {OUTPUT_LOG_FIELD: "log\n", PROGRESS_PARAM: progress})
        assert response.status_code == 422 and PROGRESS_PARAM in response.json()["detail"]
    too_long = upload(
        client, uid, {OUTPUT_LOG_FIELD: "log\n", PROGRESS_PARAM: "0.5", PROGRESS_MESSAGE_PARAM: "m" * 501}
    )
    assert too_long.status_code == 422 and PROGRESS_MESSAGE_PARAM in too_long.json()["detail"]

    assert stored_files(settings) == before
    assert client.get(f"/tasks/{uid}").json()["status"] == TaskStatus.RUNNING


def test_only_the_holder_stores_a_final_log(client):
    register_model(client)
    uid = submit_ok(client)["uid"]
    claim(client, uid)

    refused = upload(client, uid, {OUTPUT_LOG_FIELD: "intruder\n"}, headers=as_consumer("consumer-b"))

    assert refused.status_code == 409
    assert client.get(f"/tasks/{uid}/logs").text == ""
