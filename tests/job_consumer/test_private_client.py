"""PrivateApiClient against the real private API: unreachable vs HTTP errors, 409s, streaming."""

from __future__ import annotations

import hashlib

import httpx
import pytest

from inference_server.contract import TaskFailure, TaskStatus
from job_consumer.private_client import PrivateApiClient, PrivateApiHttpError, PrivateApiUnavailable
from tests import images
from tests.job_consumer.stack import CONSUMER_TOKEN


def client_for(url: str, token: str = CONSUMER_TOKEN, consumer_id: str = "client-test") -> PrivateApiClient:
    return PrivateApiClient(url, token, consumer_id, connect_timeout_s=2, read_timeout_s=10)


def test_unreachable_api_is_unavailable_not_an_http_error():
    with client_for("http://127.0.0.1:9") as client, pytest.raises(PrivateApiUnavailable):
        client.claim("unreachabletask00000001")


def test_overloaded_api_is_unavailable():
    transport = httpx.MockTransport(lambda request: httpx.Response(503, json={"detail": "database down"}))
    client = PrivateApiClient("http://private", "t", "c", transport=transport)
    with pytest.raises(PrivateApiUnavailable, match="database down"):
        client.heartbeat("sometask000000000001")


def test_wrong_token_is_an_http_error(private_api):
    with (
        client_for(private_api.url, token="wrong-token") as client,
        pytest.raises(PrivateApiHttpError) as caught,
    ):
        client.claim("sometask000000000001")
    assert caught.value.status_code == 401
    assert caught.value.detail


def test_claim_lifecycle_and_conflicts(private_api, tmp_path):
    private_api.register_model("client-model", images.SCRIPT)
    task = private_api.submit("client-model", {"in.txt": b"input bytes"})

    with (
        client_for(private_api.url, consumer_id="holder") as holder,
        client_for(private_api.url, consumer_id="other") as other,
    ):
        assert holder.claim("unknowntask000000001") is None  # 404: nothing to run
        claim = holder.claim(task.uid)
        assert claim is not None and claim.task.status == TaskStatus.RUNNING
        assert claim.model.human_readable_id == "client-model"
        assert other.claim(task.uid) is None  # 409: held under a live lease

        assert holder.heartbeat(task.uid).keep_running is True
        with pytest.raises(PrivateApiHttpError) as caught:
            other.heartbeat(task.uid)
        assert caught.value.is_conflict

        dest = tmp_path / "input.zip"
        digest = holder.download_input(task.uid, dest)
        assert digest == hashlib.sha256(dest.read_bytes()).hexdigest() == claim.task.input_sha256

        holder.upload_logs(task.uid, "some log line\n")
        failed = holder.fail(task.uid, TaskFailure(error="boom", exit_code=2))
        assert failed.status == TaskStatus.FAILED
        assert private_api.logs(task.uid) == "some log line\n"
        with pytest.raises(PrivateApiHttpError) as caught:
            holder.release(task.uid, "too late")
        assert caught.value.is_conflict


def test_failed_download_leaves_no_partial_file(private_api, tmp_path):
    dest = tmp_path / "model.zip"
    with client_for(private_api.url) as client, pytest.raises(PrivateApiHttpError) as caught:
        client.download_model_zip("no-such-model", dest)
    assert caught.value.status_code == 404
    assert not dest.exists()


def test_cache_lookup_is_for_the_holder_only_and_misses_for_a_model_not_cacheable(private_api):
    private_api.register_model("client-uncached", images.SCRIPT)
    task = private_api.submit("client-uncached", {"in.txt": b"input"})

    with (
        client_for(private_api.url, consumer_id="holder") as holder,
        client_for(private_api.url, consumer_id="other") as other,
    ):
        assert holder.claim(task.uid) is not None
        answer = holder.cache_lookup(task.uid, "sha256:" + "0" * 64)
        assert answer.hit is False and answer.cached_from is None
        with pytest.raises(PrivateApiHttpError) as caught:
            other.cache_lookup(task.uid, "sha256:" + "0" * 64)
        assert caught.value.is_conflict


def test_model_from_download_without_an_upstream_is_404_and_leaves_no_file(private_api, tmp_path):
    private_api.register_model("client-no-upstream", images.SCRIPT)
    task = private_api.submit("client-no-upstream", {"in.txt": b"input"})
    dest = tmp_path / "model-from.zip"

    with client_for(private_api.url, consumer_id="holder") as holder:
        assert holder.claim(task.uid) is not None
        with pytest.raises(PrivateApiHttpError) as caught:
            holder.download_model_from(task.uid, dest)

    assert caught.value.status_code == 404
    assert not dest.exists()
