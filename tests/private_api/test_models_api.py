"""Registering, listing, downloading and deleting models."""

from __future__ import annotations

import hashlib

import pytest

from inference_server.contract import ApiKeyRole
from tests.private_api.helpers import (
    acting_as,
    claim,
    make_zip,
    register_model,
    row_counts,
    stored_files,
    submit_ok,
)


def test_register_model_with_zip_and_download_it_back(client, settings):
    model_zip = make_zip({"weights/model.pt": b"\x01\x02" * 10_000, "config.json": b"{}"})

    model = register_model(
        client, "liver-seg.v2", zip_bytes=model_zip, use_gpu=True, timeout_s=600, cpus=1.5, pids=64
    )

    assert model["human_readable_id"] == "liver-seg.v2"
    assert model["model_available"] is True
    assert model["use_gpu"] is True
    assert model["model_zip_sha256"] == hashlib.sha256(model_zip).hexdigest()
    assert (model["timeout_s"], model["cpus"], model["pids"], model["memory_mb"]) == (600, 1.5, 64, None)
    assert model["allow_network"] is False and model["run_as_root"] is False
    download = client.get("/models/liver-seg.v2/zip")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/zip"
    assert download.content == model_zip
    assert len(stored_files(settings)) == 1


def test_register_without_zip_then_list_and_get(client):
    register_model(client, "b-model")
    register_model(client, "a-model", description="second", model_available="False")

    listed = client.get("/models").json()
    assert [model["human_readable_id"] for model in listed] == ["a-model", "b-model"]
    got = client.get("/models/a-model")
    assert got.status_code == 200
    assert got.json()["description"] == "second"
    assert got.json()["model_zip_sha256"] is None
    no_zip = client.get("/models/a-model/zip")
    assert no_zip.status_code == 404
    assert "no model zip" in no_zip.json()["detail"]
    assert client.get("/models/missing").status_code == 404


def test_duplicate_name_is_409_and_stores_nothing(client, settings):
    register_model(client, zip_bytes=make_zip())

    duplicate = client.post(
        "/models",
        params={"human_readable_id": "seg-model", "container_tag": "other:1", "model_available": True},
        files={"zip_file": ("m.zip", make_zip({"other": b"x"}))},
    )

    assert duplicate.status_code == 409
    assert "already exists" in duplicate.json()["detail"]
    assert row_counts(client) == (1, 0)
    assert len(stored_files(settings)) == 1


def test_delete_model_removes_its_zip_and_finished_tasks_but_not_while_busy(client, settings):
    register_model(client, zip_bytes=make_zip())
    done = submit_ok(client)["uid"]
    claim(client, done)
    client.post(f"/tasks/{done}/fail", json={"error": "boom"}, headers={"X-Consumer-Id": "consumer-a"})
    busy = submit_ok(client)["uid"]

    refused = client.delete("/models/seg-model")
    assert refused.status_code == 409
    assert "1 pending or running" in refused.json()["detail"]

    client.post(f"/tasks/{busy}/cancel")
    deleted = client.delete("/models/seg-model")

    assert deleted.status_code == 200
    assert deleted.json()["human_readable_id"] == "seg-model"
    assert row_counts(client) == (0, 0)
    assert stored_files(settings) == []
    assert client.get("/models/seg-model").status_code == 404
    assert client.delete("/models/seg-model").status_code == 404
    # The name is free again.
    register_model(client)


def test_isolation_defaults_and_the_operator_switches(client):
    """Root filesystem read-only and the platform's /tmp size unless the operator says otherwise."""
    default = register_model(client, "locked")
    assert (default["writable_rootfs"], default["tmp_mb"]) == (False, None)

    loosened = register_model(client, "writes-home", writable_rootfs=True, tmp_mb=2048)
    assert (loosened["writable_rootfs"], loosened["tmp_mb"]) == (True, 2048)

    changed = client.patch("/models/locked", json={"writable_rootfs": True, "tmp_mb": 64})
    assert changed.status_code == 200, changed.text
    assert (changed.json()["writable_rootfs"], changed.json()["tmp_mb"]) == (True, 64)
    back = client.patch("/models/locked", json={"writable_rootfs": False, "tmp_mb": None})
    assert (back.json()["writable_rootfs"], back.json()["tmp_mb"]) == (False, None)

    for bad in ({"writable_rootfs": "yes"}, {"writable_rootfs": 1}, {"tmp_mb": 0}, {"tmp_mb": "64"}):
        refused = client.patch("/models/locked", json=bad)
        assert refused.status_code == 422, (bad, refused.text)
        assert refused.json()["detail"]


ANONYMOUS = acting_as(None)
OPERATOR = acting_as("root-of-lab", ApiKeyRole.OPERATOR)


@pytest.mark.parametrize("switch", ["run_as_root", "allow_network", "writable_rootfs"])
def test_only_operators_loosen_isolation_even_with_anonymous_models_on(client, settings, switch):
    """IS_ANONYMOUS_MODELS lets callers without an operator key manage models; it must not let
    them open the host: the isolation switches stay an operator's."""
    for caller in (ANONYMOUS, acting_as("alice")):
        refused = client.post(
            "/models",
            params={"human_readable_id": "rooted", "container_tag": "img:1", switch: True},
            headers=caller,
            files={"zip_file": ("m.zip", make_zip(), "application/zip")},
        )
        assert refused.status_code == 403, refused.text
        assert switch in refused.json()["detail"]
        assert client.get("/models/rooted").status_code == 404
        assert stored_files(settings) == []
    plain = client.post(
        "/models", params={"human_readable_id": "plain", "container_tag": "i:1"}, headers=ANONYMOUS
    )
    assert plain.status_code == 201, plain.text
    patched = client.patch("/models/plain", json={switch: True}, headers=ANONYMOUS)
    assert patched.status_code == 403, patched.text
    assert client.get("/models/plain").json()[switch] is False
    # Operators (and the platform itself) may.
    assert client.patch("/models/plain", json={switch: True}, headers=OPERATOR).json()[switch] is True


def test_a_model_with_other_owners_tasks_is_removed_only_by_an_operator(client):
    register_model(client, "shared")
    own = client.post(
        "/tasks",
        params={"model_human_readable_id": "shared"},
        files={"zip_file": ("in.zip", make_zip(), "application/zip")},
        headers=ANONYMOUS,
    )
    assert own.status_code == 201, own.text
    assert client.post(f"/tasks/{own.json()['uid']}/cancel").status_code == 200
    # Only anonymous tasks on it: an anonymous caller may remove it ...
    register_model(client, "lonely")
    assert client.delete("/models/lonely", headers=ANONYMOUS).status_code == 200

    alice = client.post(
        "/tasks",
        params={"model_human_readable_id": "shared"},
        files={"zip_file": ("in.zip", make_zip(), "application/zip")},
        headers=acting_as("alice"),
    )
    assert client.post(f"/tasks/{alice.json()['uid']}/cancel").status_code == 200
    # ... but not once it holds alice's task; neither may bob. alice herself meets the anonymous one.
    for caller in (ANONYMOUS, acting_as("bob"), acting_as("alice")):
        refused = client.delete("/models/shared", headers=caller)
        assert refused.status_code == 403, refused.text
        assert "other owners" in refused.json()["detail"]
    assert client.get("/models/shared").status_code == 200
    assert client.delete("/models/shared", headers=OPERATOR).status_code == 200
