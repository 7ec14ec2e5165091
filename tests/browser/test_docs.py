"""The API documentation works without internet: a real Chromium, its network limited to
loopback, renders /docs and /redoc from the assets the platform serves itself, and no HTML page
the platform serves points anywhere outside it."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.routing import APIRoute
from starlette.routing import Route

from inference_server.api_docs import DOCS_PATH, REDOC_PATH
from inference_server.contract import DASHBOARD_SESSION_COOKIE, PublicRoutes
from local_platform.launcher import LocalPlatform
from local_platform.ports import free_port
from public_api.config import PublicSettings
from public_api.dashboard.routes import STATIC_FILES
from public_api.main import create_app
from tests.browser.conftest import LOOPBACK_HOSTS, OfflinePage, save_screenshot

# Swagger UI fetches the schema and renders it in the browser; a slow CI machine gets time.
RENDER_TIMEOUT_MS = 30_000

# Absolute http(s) URLs and protocol-relative ones in a loading attribute or CSS url().
ABSOLUTE_URL = re.compile(r"""https?://[^\s"'<>()`]+""", re.IGNORECASE)
PROTOCOL_RELATIVE_URL = re.compile(
    r"""(?:(?:src|href|action|poster|srcset|data)\s*=\s*["']?|url\(\s*["']?)(//[^\s"'<>()`]+)""",
    re.IGNORECASE,
)
# xmlns values name XML namespaces (inline SVG); a browser never fetches them.
XML_NAMESPACE_ATTRIBUTE = re.compile(r"""xmlns(?::[\w-]+)?\s*=\s*(?:"[^"]*"|'[^']*')""", re.IGNORECASE)


def external_references(html: str) -> list[str]:
    """The URLs in `html` that point at a host other than loopback, in the order they appear."""
    scanned = XML_NAMESPACE_ATTRIBUTE.sub("", html)
    found = [match.group(0) for match in ABSOLUTE_URL.finditer(scanned)]
    found += [f"http:{match.group(1)}" for match in PROTOCOL_RELATIVE_URL.finditer(scanned)]
    return [url for url in found if (urlsplit(url).hostname or "") not in LOOPBACK_HOSTS]


@pytest.fixture(scope="module")
def platform(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq_url: str, module_queue_name: str
) -> Iterator[LocalPlatform]:
    """Private and public API as local processes; the documentation needs no consumer."""
    running = LocalPlatform(
        data_dir=tmp_path_factory.mktemp("platform"),
        public_port=free_port(),
        consumers=0,
        rabbitmq_url=rabbitmq_url,
        queue_name=module_queue_name,
        create_operator_key=True,
    )
    running.start(timeout=90)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def operator_key(platform: LocalPlatform) -> str:
    return platform.operator_key_file.read_text().strip()


def test_swagger_ui_renders_the_v12_operations_with_the_network_blocked(
    platform: LocalPlatform, offline_page: OfflinePage
) -> None:
    schema = httpx.get(f"{platform.public_url}/openapi.json", timeout=10).json()
    submit_summary = schema["paths"][PublicRoutes.TASKS]["post"]["summary"]
    page = offline_page.page

    page.goto(f"{platform.public_url}{DOCS_PATH}")

    submit = page.locator(f'.opblock-post:has(.opblock-summary-path[data-path="{PublicRoutes.TASKS}"])')
    submit.wait_for(timeout=RENDER_TIMEOUT_MS)
    assert submit_summary in submit.inner_text()
    rendered_paths = set(page.locator(".opblock .opblock-summary-path").all_inner_texts())
    # Every path in the schema is an operation on the page (some wrap with zero-width spaces).
    assert {path.replace("\u200b", "") for path in rendered_paths} >= set(schema["paths"])
    assert offline_page.blocked_urls == []
    save_screenshot(page, "docs")


def test_redoc_renders_with_the_network_blocked(platform: LocalPlatform, offline_page: OfflinePage) -> None:
    schema = httpx.get(f"{platform.public_url}/openapi.json", timeout=10).json()
    submit = schema["paths"][PublicRoutes.TASKS]["post"]
    page = offline_page.page

    page.goto(f"{platform.public_url}{REDOC_PATH}")

    # ReDoc gives each operation a section "operation/<operationId>" once it has read the schema.
    section = page.locator(f'[data-section-id="operation/{submit["operationId"]}"]')
    section.wait_for(timeout=RENDER_TIMEOUT_MS)
    assert submit["summary"] in section.inner_text()
    assert offline_page.blocked_urls == []


def served_html_pages(base_url: str, paths: list[str], headers: dict[str, str]) -> dict[str, str]:
    """GET each path; the body of every answer that is an HTML page (streams are never read).

    Redirects are followed: a page behind a login is scanned as the login page it leads to.
    """
    pages: dict[str, str] = {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=10, follow_redirects=True) as client:
        for path in paths:
            with client.stream("GET", path) as response:
                if response.headers.get("content-type", "").startswith("text/html"):
                    pages[path] = response.read().decode(errors="replace")
    return pages


def public_get_paths_without_parameters() -> list[str]:
    """Every GET route of the public API that needs no path parameter, hidden ones included."""
    app = create_app(PublicSettings(service_token=secrets.token_urlsafe(24)))
    # access_routes, not app.router.routes: FastAPI keeps an included router's routes inside it.
    return sorted(
        {
            route.path
            for route in app.state.access_routes
            if isinstance(route, APIRoute | Route)
            and "GET" in (route.methods or ())
            and "{" not in route.path
        }
    )


def test_no_html_page_the_public_api_serves_references_anything_outside_it(
    platform: LocalPlatform, operator_key: str
) -> None:
    paths = public_get_paths_without_parameters()
    # Logged in to the dashboard too, so its pages are scanned as an operator sees them (without
    # a session each would lead to the login page).
    login = httpx.post(f"{platform.public_url}{PublicRoutes.DASHBOARD}/login", data={"key": operator_key})
    assert login.status_code == 303, login.text
    session_cookie = f"{DASHBOARD_SESSION_COOKIE}={login.cookies[DASHBOARD_SESSION_COOKIE]}"
    headers = {"Authorization": f"Bearer {operator_key}", "Cookie": session_cookie}
    pages = served_html_pages(platform.public_url, paths, headers)
    assets = {
        path: httpx.get(f"{platform.public_url}{path}", timeout=10).text
        for path in (f"{PublicRoutes.DASHBOARD}/static/{name}" for name in STATIC_FILES)
    }

    dashboard_pages = {
        f"{PublicRoutes.DASHBOARD}/{page}" for page in ("overview", "tasks", "models", "audit")
    }
    assert {DOCS_PATH, REDOC_PATH, *dashboard_pages} <= set(pages), f"pages found: {sorted(pages)}"
    assert all("Log out" in pages[path] for path in dashboard_pages)
    scanned = {**pages, **assets}
    assert {path: refs for path, text in scanned.items() if (refs := external_references(text))} == {}


def test_the_private_api_documentation_references_nothing_outside_it(platform: LocalPlatform) -> None:
    pages = served_html_pages(platform.private_url, [DOCS_PATH, REDOC_PATH], {})

    assert set(pages) == {DOCS_PATH, REDOC_PATH}
    assert {path: refs for path, html in pages.items() if (refs := external_references(html))} == {}


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        # FastAPI's own pages: what /docs and /redoc served before, loading from a CDN.
        (get_swagger_ui_html(openapi_url="/openapi.json", title="t").body, "cdn.jsdelivr.net"),
        (get_redoc_html(openapi_url="/openapi.json", title="t").body, "fonts.googleapis.com"),
        (b'<img src="//images.example.org/a.png">', "images.example.org"),
        (b"<style>body { background: url('//cdn.example.org/b.png') }</style>", "cdn.example.org"),
    ],
)
def test_the_scan_finds_references_outside_the_platform(page: Any, expected: str) -> None:
    found = external_references(bytes(page).decode())
    assert any(urlsplit(url).hostname == expected for url in found), found


def test_the_scan_passes_loopback_urls_and_xml_namespaces() -> None:
    html = (
        '<a href="http://127.0.0.1:8000/docs">docs</a><a href="http://localhost/x">x</a>'
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"></svg>'
    )
    assert external_references(html) == []
