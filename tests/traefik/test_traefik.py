"""Traefik, the platform's only door: TLS with the project's certificate, HTTP redirected, secure
headers, big uploads spooled through, and nothing of the private API reachable through it."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import docker
import httpx
import pytest
import yaml

from inference_server.contract import CONSUMER_ID_HEADER, SERVICE_TOKEN_HEADER, PrivateRoutes, PublicRoutes
from inference_server.launcher import LocalPlatform
from models_examples.catalog import build_example_images, get_example
from tests.traefik.helpers import (
    TRAEFIK_DIR,
    FrontDoor,
    dynamic_config_as_yaml,
    private_only_requests,
    register_model,
    run_task,
)

GIB = 1024**3


def test_https_with_the_project_certificate_reaches_the_public_api(front_door: FrontDoor) -> None:
    with front_door.client() as client:
        live = client.get(PublicRoutes.HEALTH_LIVE)
        models = client.get(PublicRoutes.MODELS)
    assert live.status_code == 200
    assert live.json()["status"] == "ok"
    assert models.status_code == 200
    assert isinstance(models.json(), list)

    # The certificate served is the one make_cert.sh wrote, not Traefik's built-in default.
    host, port = urlsplit(front_door.https_url).hostname, urlsplit(front_door.https_url).port
    served = ssl.get_server_certificate((host, port))
    assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(front_door.ca_file.read_text())


def test_the_api_key_passes_through_and_no_key_is_a_401(front_door: FrontDoor) -> None:
    with front_door.client(anonymous=True) as client:
        missing = client.get(PublicRoutes.MODELS)
        wrong = client.get(PublicRoutes.MODELS, headers={"Authorization": "Bearer isk_00000000_" + "x" * 43})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in missing.json()["detail"]
    assert wrong.status_code == 401
    with front_door.client() as client:  # the operator key, through Traefik to the public API
        assert client.get(PublicRoutes.TASKS).status_code == 200


def test_a_client_without_the_ca_refuses_the_connection(front_door: FrontDoor) -> None:
    """Proves TLS is really verified in the test above (the system CAs do not know this cert)."""
    with (
        httpx.Client(base_url=front_door.https_url, timeout=5.0) as client,
        pytest.raises(httpx.ConnectError),
    ):
        client.get(PublicRoutes.HEALTH_LIVE)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_plain_http_is_redirected_to_https(front_door: FrontDoor, method: str) -> None:
    with httpx.Client(base_url=front_door.http_url, timeout=5.0, follow_redirects=False) as client:
        response = client.request(method, "/api/models/?page=2")
    assert response.status_code in (301, 308)
    assert response.headers["location"] == f"{front_door.https_url}/api/models/?page=2"


def test_no_private_api_route_is_reachable_through_traefik(
    front_door: FrontDoor, platform: LocalPlatform
) -> None:
    # Even a caller holding the service token gets nothing private through the front door.
    headers = {SERVICE_TOKEN_HEADER: platform.service_token, CONSUMER_ID_HEADER: "intruder"}
    requests = private_only_requests()
    assert len(requests) >= 12
    with front_door.client(headers=headers) as client:
        for method, path in requests:
            response = client.request(method, path)
            assert response.status_code in (404, 405), f"{method} {path} -> {response.status_code}"

    # The same token does open those routes on the private port, so the 404s above are the
    # router's doing and not a missing route.
    direct = httpx.get(f"{platform.private_url}{PrivateRoutes.MODELS}", headers=headers, timeout=10.0)
    assert direct.status_code == 200


@pytest.mark.parametrize("path", ["/api/rawdata", "/api/http/routers", "/dashboard/", "/ping"])
def test_traefik_api_dashboard_and_ping_are_not_exposed(front_door: FrontDoor, path: str) -> None:
    with front_door.client() as client:
        response = client.get(path)
    assert response.status_code == 404
    # The 404 comes from the public API (JSON detail), not from a Traefik handler.
    assert "detail" in response.json()


@pytest.mark.parametrize("path", [PublicRoutes.HEALTH_LIVE, "/no/such/page"])
def test_secure_headers_on_every_answer(front_door: FrontDoor, path: str) -> None:
    with front_door.client() as client:
        headers = client.get(path).headers
    sts = headers["strict-transport-security"]
    assert "max-age=31536000" in sts
    assert "includeSubDomains" in sts
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert "server" not in headers


def test_upload_limit_and_timeouts_allow_big_uploads() -> None:
    dynamic = dynamic_config_as_yaml()
    buffering = dynamic["http"]["middlewares"]["upload-limit"]["buffering"]
    assert buffering["maxRequestBodyBytes"] >= 50 * GIB
    # Small: anything bigger spools to disk instead of Traefik's memory.
    assert buffering["memRequestBodyBytes"] <= 16 * 1024**2
    routers = dynamic["http"]["routers"]
    assert set(routers) == {"public-api", "public-api-uploads"}
    assert {router["service"] for router in routers.values()} == {"public-api"}
    assert "upload-limit" in routers["public-api-uploads"]["middlewares"]

    static = yaml.safe_load((TRAEFIK_DIR / "traefik.yml").read_text())
    timeouts = static["entryPoints"]["websecure"]["transport"]["respondingTimeouts"]
    read_timeout = str(timeouts["readTimeout"])
    assert read_timeout in ("0", "0s") or read_timeout.endswith("h"), read_timeout


@pytest.mark.docker
@pytest.mark.slow
def test_a_whole_task_over_https(
    front_door: FrontDoor, docker_client: docker.DockerClient, base_image: str
) -> None:
    example = get_example("passthrough")
    build_example_images(docker_client, base_image, [example])
    with front_door.client() as client:
        model = register_model(client, example.container_tag, example.human_readable_id)
        assert model["human_readable_id"] == example.human_readable_id
        uid, output = run_task(client, example.human_readable_id)
    # A 6 MiB file (above memRequestBodyBytes) made the round trip byte for byte.
    assert max(len(data) for data in output.values()) > 4 * 1024**2
    assert uid


def test_make_cert_names_the_domain_localhost_and_loopback(tls_cert: tuple[Path, Path]) -> None:
    cert, key = tls_cert
    text = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    names = {name.strip() for name in text.splitlines()[-1].split(",")}
    assert {"DNS:inference.test", "DNS:localhost", "IP Address:127.0.0.1"} <= names
    assert key.stat().st_mode & 0o077 == 0, "the private key must not be readable by others"
