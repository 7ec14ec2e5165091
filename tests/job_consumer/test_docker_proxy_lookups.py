"""The consumer's Docker clients skip the environment's proxy settings on a local socket only."""

from __future__ import annotations

import docker
import pytest

from job_consumer.container_runtime import DockerRuntime, without_proxy_lookups


@pytest.mark.docker
def test_the_runtimes_local_engine_client_looks_up_no_proxies_and_still_answers() -> None:
    runtime = DockerRuntime()
    try:
        assert runtime.client.api.base_url.startswith("http+docker://")
        assert runtime.client.api.trust_env is False
        assert runtime.client.ping() is True
    finally:
        runtime.stop()


def test_a_tcp_engine_keeps_the_environments_proxy_settings() -> None:
    # An explicit API version: the client is made without asking an engine that is not there.
    client = docker.DockerClient(base_url="tcp://127.0.0.1:2375", version="1.41")
    try:
        assert without_proxy_lookups(client).api.trust_env is True
    finally:
        client.close()
