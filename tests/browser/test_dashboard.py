"""The dashboard in a real Chromium whose network reaches loopback only, against a whole local
platform with a consumer running a model that prints a line a second: a user logs in with a
key, watches a task submitted through the API appear and its log grow, and cancels it from its
page; an operator then finds the consumer and the audit entry of that cancel. A user never sees
another user's task; actions without the CSRF token are refused; logout ends the session.

With IS_UPDATE_SCREENSHOTS=1 the pages are saved as docs/screenshots/dashboard-<page>.png."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from inference_server.contract import DASHBOARD_SESSION_COOKIE, TASK_FILTER_UID, ApiKeyRole, PublicRoutes
from local_platform.launcher import LocalPlatform
from local_platform.ports import free_port
from private_api.db import make_engine, make_session_factory
from private_api.keys import create_key
from tests.browser.conftest import OfflinePage, open_offline_page, save_screenshot
from tests.helpers import make_zip, register_script_model, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow]

DASHBOARD = PublicRoutes.DASHBOARD
# Long enough to be cancelled while it runs; each line a second, with a progress line beside it.
TICKING = (
    "i=1; while [ $i -le 300 ]; do echo line $i; echo INFERENCE_PROGRESS $((i / 3))% tick $i; "
    "sleep 1; i=$((i+1)); done\n"
)
QUICK = "echo quick work done; echo result > /output/result.txt\n"
# Pages poll every second or two; a run needs its container started first.
SEEN_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def platform(
    tmp_path_factory: pytest.TempPathFactory,
    rabbitmq_url: str,
    module_queue_name: str,
    test_images: dict[str, str],
) -> Iterator[LocalPlatform]:
    """The whole platform, keys required (no anonymous access), one consumer."""
    running = LocalPlatform(
        data_dir=tmp_path_factory.mktemp("dashboard-platform"),
        public_port=free_port(),
        consumers=1,
        rabbitmq_url=rabbitmq_url,
        queue_name=module_queue_name,
        create_operator_key=True,
        extra_env={"IS_ANONYMOUS_TASKS": "false", "IS_ANONYMOUS_MODELS": "false"},
    )
    running.start(timeout=120)
    try:
        register_script_model(running, "ticking", TICKING)
        register_script_model(running, "quick", QUICK)
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def keys(platform: LocalPlatform) -> dict[str, str]:
    suffix = secrets.token_hex(3)
    engine = make_engine(platform.resolved_database_url)
    made = {"operator": platform.operator_key_file.read_text().strip()}
    try:
        with make_session_factory(engine)() as session:
            for person in ("alice", "bob"):
                made[person], _info = create_key(
                    session=session, name=f"{person}-{suffix}", role=ApiKeyRole.USER
                )
    finally:
        engine.dispose()
    return made


def submit(platform: LocalPlatform, key: str, model: str) -> str:
    response = httpx.post(
        platform.public_url + PublicRoutes.TASKS,
        params={"model_human_readable_id": model},
        files={"zip_file": ("input.zip", make_zip({"x.txt": b"x"}), "application/zip")},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return str(response.json())


def task_status(platform: LocalPlatform, key: str, uid: str) -> str:
    """The task's status as the API lists it."""
    response = httpx.get(
        platform.public_url + PublicRoutes.TASKS,
        params={TASK_FILTER_UID: uid},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    (task,) = response.json()
    return str(task["status"])


def log_in(page: Page, platform: LocalPlatform, key: str) -> None:
    page.goto(f"{platform.public_url}{DASHBOARD}/login")
    page.fill("#key", key)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{platform.public_url}{DASHBOARD}/overview")


def test_a_user_watches_a_task_run_and_cancels_it_then_an_operator_sees_the_consumer_and_the_audit(
    platform: LocalPlatform, keys: dict[str, str], browser: Browser
) -> None:
    with open_offline_page(browser) as user:
        page = user.page
        page.goto(f"{platform.public_url}{DASHBOARD}/tasks")
        expect(page).to_have_url(f"{platform.public_url}{DASHBOARD}/login")
        save_screenshot(page, "dashboard-login")
        log_in(page, platform, keys["alice"])

        cookie = next(c for c in page.context.cookies() if c["name"] == DASHBOARD_SESSION_COOKIE)
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        assert cookie["path"] == DASHBOARD
        # The page's scripts cannot read it.
        assert DASHBOARD_SESSION_COOKIE not in page.evaluate("document.cookie")

        page.goto(f"{platform.public_url}{DASHBOARD}/tasks")
        uid = submit(platform, keys["alice"], "ticking")
        # Submitted after the page loaded: the list updates itself.
        row = page.locator(f'tr[data-uid="{uid}"]')
        expect(row).to_be_visible(timeout=SEEN_TIMEOUT_MS)

        row.locator("a").click()
        expect(page).to_have_url(f"{platform.public_url}{DASHBOARD}/tasks/{uid}")
        log = page.locator("#log")
        expect(log).to_contain_text("line 3", timeout=SEEN_TIMEOUT_MS)
        # The lines are there while it still runs.
        expect(page.locator("#task-status")).to_have_text("running")
        assert task_status(platform, keys["alice"], uid) == "running"
        expect(log).to_contain_text("line 5", timeout=SEEN_TIMEOUT_MS)
        save_screenshot(page, "dashboard-task")

        page.click("#cancel")
        expect(page.locator("#task-status")).to_have_text("cancelled", timeout=SEEN_TIMEOUT_MS)
        assert task_status(platform, keys["alice"], uid) == "cancelled"
        assert user.blocked_urls == []

    with open_offline_page(browser) as operator:
        page = operator.page
        log_in(page, platform, keys["operator"])
        page.goto(f"{platform.public_url}{DASHBOARD}/consumers")
        consumer_row = page.locator("tr[data-consumer]")
        expect(consumer_row).to_have_count(1)
        expect(consumer_row).to_contain_text(socket.gethostname())
        expect(consumer_row.locator(".status")).to_have_text("idle", timeout=SEEN_TIMEOUT_MS)

        page.goto(f"{platform.public_url}{DASHBOARD}/audit")
        entry = page.locator(f'tr[data-action="task.cancelled"][data-target="{uid}"]')
        expect(entry).to_have_count(1)
        expect(entry).to_contain_text("alice-")
        save_screenshot(page, "dashboard-audit")
        assert operator.blocked_urls == []


def test_a_user_never_sees_another_users_task(
    platform: LocalPlatform, keys: dict[str, str], offline_page: OfflinePage
) -> None:
    bobs = submit(platform, keys["bob"], "quick")
    alices = submit(platform, keys["alice"], "quick")
    unknown = f"{bobs[:-6]}{'0' * 6}" if not bobs.endswith("0" * 6) else f"{bobs[:-6]}{'1' * 6}"
    page = offline_page.page
    log_in(page, platform, keys["alice"])

    page.goto(f"{platform.public_url}{DASHBOARD}/tasks")
    expect(page.locator(f'tr[data-uid="{alices}"]')).to_be_visible()
    expect(page.locator(f'tr[data-uid="{bobs}"]')).to_have_count(0)
    assert bobs not in page.content()
    # The nav shows what a user may see only.
    expect(page.locator("nav a")).to_have_text(["Overview", "Tasks", "Models"])

    other = page.goto(f"{platform.public_url}{DASHBOARD}/tasks/{bobs}")
    other_text = page.locator("main").inner_text()
    missing = page.goto(f"{platform.public_url}{DASHBOARD}/tasks/{unknown}")
    missing_text = page.locator("main").inner_text()
    assert other is not None and missing is not None
    assert other.status == missing.status == 404
    assert other_text.replace(bobs, "UID") == missing_text.replace(unknown, "UID")
    assert offline_page.blocked_urls == []


def test_an_action_without_the_csrf_token_is_refused_and_logout_ends_the_session(
    platform: LocalPlatform, keys: dict[str, str], browser: Browser
) -> None:
    uid = submit(platform, keys["alice"], "ticking")
    with open_offline_page(browser) as user:
        page = user.page
        log_in(page, platform, keys["alice"])
        # The session's cookie goes along (the context's own request client), the token does not.
        forged = page.context.request.post(f"{platform.public_url}{DASHBOARD}/tasks/{uid}/cancel", form={})
        assert forged.status == 403
        assert "CSRF" in forged.text()
        assert task_status(platform, keys["alice"], uid) in ("pending", "running")

        old_cookie = next(c for c in page.context.cookies() if c["name"] == DASHBOARD_SESSION_COOKIE)
        page.click("#logout")
        expect(page).to_have_url(f"{platform.public_url}{DASHBOARD}/login")
        assert [c for c in page.context.cookies() if c["name"] == DASHBOARD_SESSION_COOKIE] == []

    with open_offline_page(browser) as replay:
        replay.page.context.add_cookies(
            [{"name": old_cookie["name"], "value": old_cookie["value"], "url": platform.public_url}]
        )
        replay.page.goto(f"{platform.public_url}{DASHBOARD}/overview")
        expect(replay.page).to_have_url(f"{platform.public_url}{DASHBOARD}/login")
    # Cleanup through the API: nothing ticks on into the next test.
    httpx.post(
        platform.public_url + PublicRoutes.TASK_CANCEL.format(uid=uid),
        headers={"Authorization": f"Bearer {keys['alice']}"},
        timeout=30,
    )


def test_the_operators_pages_show_the_platform(
    platform: LocalPlatform, keys: dict[str, str], offline_page: OfflinePage
) -> None:
    finished = submit(platform, keys["operator"], "quick")
    wait_until(lambda: task_status(platform, keys["operator"], finished) == "finished", 120, "a quick task")
    running = submit(platform, keys["bob"], "ticking")
    wait_until(lambda: task_status(platform, keys["operator"], running) == "running", 120, "a running task")
    page = offline_page.page
    log_in(page, platform, keys["operator"])

    expect(page.locator("#running")).to_have_text("1", timeout=SEEN_TIMEOUT_MS)
    expect(page.locator("svg.chart rect").first).to_be_attached()
    expect(page.locator("nav a")).to_have_text(["Overview", "Tasks", "Models", "Consumers", "Audit log"])
    save_screenshot(page, "dashboard-overview")

    page.goto(f"{platform.public_url}{DASHBOARD}/tasks")
    expect(page.locator(f'tr[data-uid="{finished}"]')).to_contain_text("finished")
    # Operators see every task, with its owner.
    expect(page.locator(f'tr[data-uid="{running}"]')).to_contain_text("bob-")
    save_screenshot(page, "dashboard-tasks")

    page.goto(f"{platform.public_url}{DASHBOARD}/consumers")
    consumer_row = page.locator("tr[data-consumer]")
    expect(consumer_row).to_contain_text(running[:13], timeout=SEEN_TIMEOUT_MS)
    save_screenshot(page, "dashboard-consumers")
    # Drain asks first (a confirm dialog, accepted here), then resume.
    page.once("dialog", lambda dialog: dialog.accept())
    consumer_row.get_by_role("button", name="Drain").click()
    expect(consumer_row.locator(".status")).to_have_text("draining", timeout=SEEN_TIMEOUT_MS)
    consumer_row.get_by_role("button", name="Resume").click()
    expect(consumer_row.locator(".status")).to_have_text("busy", timeout=SEEN_TIMEOUT_MS)
    page.goto(f"{platform.public_url}{DASHBOARD}/audit?action=consumer.drained")
    expect(page.locator('tr[data-action="consumer.drained"]')).to_have_count(1)

    page.goto(f"{platform.public_url}{DASHBOARD}/tasks/{finished}")
    expect(page.locator("#log")).to_contain_text("quick work done")
    download = page.locator("#download")
    expect(download).to_be_visible()
    with page.expect_download() as downloading:
        download.click()
    assert downloading.value.suggested_filename == f"{finished}.zip"

    page.goto(f"{platform.public_url}{DASHBOARD}/models")
    expect(page.locator('tr[data-model="ticking"]')).to_be_visible()
    expect(page.locator('tr[data-model="quick"]')).to_be_visible()
    save_screenshot(page, "dashboard-models")
    assert offline_page.blocked_urls == []
    httpx.post(
        platform.public_url + PublicRoutes.TASK_CANCEL.format(uid=running),
        headers={"Authorization": f"Bearer {keys['operator']}"},
        timeout=30,
    )
