"""Traefik, the platform's only door: TLS with the project's certificate, HTTP redirected, secure
headers, big uploads spooled through, and nothing of the private API reachable through it."""

from __future__ import annotations

import re
import secrets
import ssl
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import docker
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from inference_server.contract import CONSUMER_ID_HEADER, SERVICE_TOKEN_HEADER, PrivateRoutes, PublicRoutes
from local_platform.launcher import LocalPlatform
from models_examples.catalog import build_example_images, get_example
from tests.helpers import register_model_public
from tests.public_api.hostile import HUGE, MULTIPART, multipart_body, send
from tests.traefik.helpers import (
    TRAEFIK_DIR,
    FrontDoor,
    dynamic_config_as_yaml,
    example_zip,
    private_only_requests,
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


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_documentation_and_its_assets_load_through_traefik(front_door: FrontDoor, page: str) -> None:
    """The pages name their scripts, stylesheet and schema by path on the platform itself: every
    one of them must be reachable through the door users have, without a key."""
    with front_door.client(anonymous=True) as client:
        html = client.get(page)
        assert html.status_code == 200
        assert html.headers["content-type"].startswith("text/html")
        referenced = re.findall(r"""(?:src|href|spec-url)="([^"]+)"|url: '([^']+)'""", html.text)
        paths = {first or second for first, second in referenced}
        assert any(path.endswith(".js") for path in paths), paths
        assert "/openapi.json" in paths
        for path in sorted(paths):
            assert path.startswith("/"), f"{page} references {path}, not a path on the platform"
            assert client.get(path).status_code == 200, path


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


@pytest.mark.parametrize("path", ["/api/rawdata", "/api/http/routers", "/ping"])
def test_traefik_api_dashboard_and_ping_are_not_exposed(front_door: FrontDoor, path: str) -> None:
    with front_door.client() as client:
        response = client.get(path)
    assert response.status_code == 404
    # The 404 comes from the public API (JSON detail), not from a Traefik handler.
    assert "detail" in response.json()


def test_dashboard_is_the_platforms_own_reached_without_a_key_with_a_secure_cookie(
    front_door: FrontDoor,
) -> None:
    # /dashboard/ is where Traefik's own dashboard would be; here it leads to the platform's
    # login page, which needs no key to reach (the dashboard checks its session cookie itself).
    with front_door.client(anonymous=True, follow_redirects=True) as client:
        page = client.get("/dashboard/")
        assert page.status_code == 200, page.text
        assert page.url.path == f"{PublicRoutes.DASHBOARD}/login"
        assert 'name="key"' in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        login = client.post(
            f"{PublicRoutes.DASHBOARD}/login", data={"key": front_door.api_key}, follow_redirects=False
        )
    assert login.status_code == 303, login.text
    # The browser came over HTTPS (Traefik's X-Forwarded-Proto): the session cookie is Secure.
    attributes = {part.strip().lower() for part in login.headers["set-cookie"].split(";")}
    assert {"secure", "httponly", "samesite=strict"} <= attributes


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
    dynamic = dynamic_config_as_yaml({"upstream": "http://public_api:8000"})
    middlewares = dynamic["http"]["middlewares"]
    buffering = middlewares["upload-limit"]["buffering"]
    assert buffering["maxRequestBodyBytes"] >= 50 * GIB
    # Small: anything bigger spools to disk instead of Traefik's memory.
    assert buffering["memRequestBodyBytes"] <= 16 * 1024**2
    routers = dynamic["http"]["routers"]
    assert set(routers) == {"public-api", "public-api-uploads"}
    assert {router["service"] for router in routers.values()} == {"public-api"}
    chain = routers["public-api-uploads"]["middlewares"]
    # The key is checked before anything is buffered.
    assert chain.index("check-key") < chain.index("upload-limit")
    check = middlewares["check-key"]["forwardAuth"]
    assert check["address"] == "http://public_api:8000" + PublicRoutes.AUTH_CHECK
    assert check["trustForwardHeader"] is False
    assert not check.get("forwardBody", False)
    assert {"Authorization", "X-Token"} <= set(check["authRequestHeaders"])
    # Downloads and polls are not held up by a second request.
    assert "check-key" not in routers["public-api"]["middlewares"]

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
        model = register_model_public(client, example.human_readable_id, example.container_tag).json()
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


def _public_api_requests(platform: LocalPlatform) -> dict[tuple[str, str, str], float]:
    """The public API's own request counts by (method, route, status), read from its /metrics."""
    metrics_token = {"Authorization": f"Bearer {platform.metrics_token}"}
    text = httpx.get(platform.public_url + PublicRoutes.METRICS, headers=metrics_token, timeout=10.0).text
    counts: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "public_api_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                labels = sample.labels
                counts[(labels["method"], labels["route"], labels["status"])] = sample.value
    return counts


def _delta(before: dict, after: dict, method: str, route: str) -> dict[str, float]:
    return {
        status: count - before.get((m, r, status), 0)
        for (m, r, status), count in after.items()
        if (m, r) == (method, route) and count != before.get((m, r, status), 0)
    }


def test_an_upload_without_the_right_key_is_refused_before_traefik_buffers_it(
    front_door: FrontDoor, platform: LocalPlatform, user_key: str
) -> None:
    assert front_door.spool_dir is not None
    refused = [
        # (method, path, headers, expected)
        ("POST", PublicRoutes.TASKS + "?model_human_readable_id=passthrough", {}, 401),
        ("POST", PublicRoutes.TASKS.rstrip("/") + "?model_human_readable_id=passthrough", {}, 401),
        ("POST", PublicRoutes.MODELS + "?container_tag=a/b:1&human_readable_id=x", {}, 401),
        ("PATCH", PublicRoutes.MODEL.format(human_readable_id="passthrough"), {}, 401),
        ("POST", "/no/such/route", {"Authorization": "Bearer isk_00000000_" + "x" * 43}, 401),
        (
            "POST",
            PublicRoutes.MODELS + "?container_tag=a/b:1&human_readable_id=x",
            {"X-Token": user_key},
            403,
        ),
    ]
    before = _public_api_requests(platform)
    for method, path, headers, expected in refused:
        # Only the headers of a 400 MB upload: buffering first, Traefik would wait for the body
        # and never answer; checking the key first, it answers at once.
        answer = send(
            front_door.https_url,
            method,
            path,
            multipart_body(HUGE),
            length=HUGE,
            headers={"Content-Type": MULTIPART, **headers},
            ssl_context=front_door.ssl_context(),
            send_body=False,
            timeout=30,
        )
        assert answer.status == expected, (method, path, answer.status, answer.body[:300])
        assert httpx.Response(expected, content=answer.body).json()["detail"]
    # And with the body streaming: refused within the first megabytes, nothing spooled.
    streamed = send(
        front_door.https_url,
        "POST",
        PublicRoutes.TASKS + "?model_human_readable_id=passthrough",
        multipart_body(HUGE),
        length=HUGE,
        headers={"Content-Type": MULTIPART},
        ssl_context=front_door.ssl_context(),
        timeout=30,
    )
    assert streamed.status == 401
    assert streamed.sent < HUGE // 10
    assert list(front_door.spool_dir.iterdir()) == []

    after = _public_api_requests(platform)
    # The public API saw the key checks only, never one of the uploads.
    assert _delta(before, after, "GET", PublicRoutes.AUTH_CHECK) == {"401": 6, "403": 1}
    for route in (PublicRoutes.TASKS, PublicRoutes.MODELS, PublicRoutes.MODEL, "unmatched"):
        assert _delta(before, after, "POST", route) == {}
        assert _delta(before, after, "PATCH", route) == {}


def test_an_upload_with_the_right_key_passes_the_check_and_the_buffer(
    front_door: FrontDoor, platform: LocalPlatform, user_key: str
) -> None:
    model_id = f"traefik-checked-{secrets.token_hex(3)}"
    payload, _files = example_zip()  # 6 MiB: spooled to disk by the buffer on its way
    before = _public_api_requests(platform)
    with front_door.client() as operator:
        # An image no engine has: the consumer fails the task at once, which is not the point here.
        registered = register_model_public(operator, model_id, "inference-server/not-built:none").json()
        changed = operator.patch(
            PublicRoutes.MODEL.format(human_readable_id=model_id), json={"description": "d"}
        )
    with front_door.client(headers={"Authorization": f"Bearer {user_key}"}) as user:
        submitted = user.post(
            PublicRoutes.TASKS,
            params={"model_human_readable_id": model_id},
            files={"zip_file": ("input.zip", payload, "application/zip")},
        )
    after = _public_api_requests(platform)
    assert registered["human_readable_id"] == model_id
    assert changed.status_code == 200, changed.text
    assert changed.json()["description"] == "d"
    assert submitted.status_code == 200, submitted.text
    assert _delta(before, after, "GET", PublicRoutes.AUTH_CHECK) == {"200": 3}
    assert _delta(before, after, "POST", PublicRoutes.TASKS) == {"200": 1}
