"""Playwright on Debian's Chromium, with pages that may reach only the platform under test.

Playwright cannot download a browser of its own here, so it drives the `chromium` that
scripts/setup.sh installs. Every page a test gets has its network limited to loopback: a request
anywhere else is aborted and recorded, so a test proves a page works offline by asserting that
nothing outside was even attempted (an aborted request alone could go unnoticed on the page).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, Request, Route, ViewportSize, sync_playwright

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# Schemes whose "requests" never leave the browser.
LOCAL_SCHEMES = frozenset({"data", "blob", "about"})
# A laptop screen: what the screenshots show and the layout the tests see.
VIEWPORT: ViewportSize = {"width": 1366, "height": 768}
SCREENSHOTS_DIR = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
# Screenshots under docs/ are rewritten only on request, so a normal run leaves the tree clean.
UPDATE_SCREENSHOTS = os.environ.get("IS_UPDATE_SCREENSHOTS") == "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that gets a browser is marked `browser`, so `-m "not browser"` leaves them out."""
    for item in items:
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)


def is_loopback(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in LOCAL_SCHEMES or (parts.hostname or "") in LOOPBACK_HOSTS


@dataclass
class OfflinePage:
    """A page whose requests reach loopback only; `blocked_urls` lists every other one it tried."""

    page: Page
    blocked_urls: list[str] = field(default_factory=list)


# Module-scoped, not session-scoped: Playwright's sync API keeps an asyncio loop running in this
# thread while it is started, and every later test that calls asyncio.run() would then fail.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("Debian's chromium is not installed: run `make setup` (scripts/setup.sh)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def save_screenshot(page: Page, name: str) -> None:
    """docs/screenshots/<name>.png of what the page shows now, when IS_UPDATE_SCREENSHOTS=1."""
    if UPDATE_SCREENSHOTS:
        SCREENSHOTS_DIR.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS_DIR / f"{name}.png"))


@pytest.fixture
def offline_page(browser: Browser) -> Iterator[OfflinePage]:
    """A fresh context (no cookies shared between tests) whose page can reach loopback only."""
    with open_offline_page(browser) as offline:
        yield offline


@contextmanager
def open_offline_page(browser: Browser) -> Iterator[OfflinePage]:
    """A page in a context of its own (its own cookies) that can reach loopback only; for a test
    that needs several people at once."""
    context = browser.new_context(viewport=VIEWPORT)
    offline = OfflinePage(page=context.new_page())

    def allow_loopback_only(route: Route, request: Request) -> None:
        if is_loopback(request.url):
            route.continue_()
        else:
            offline.blocked_urls.append(request.url)
            route.abort("internetdisconnected")

    # On the context, so pages a test opens later (popups, new tabs) are limited too.
    context.route("**/*", allow_loopback_only)
    try:
        yield offline
    finally:
        context.close()
