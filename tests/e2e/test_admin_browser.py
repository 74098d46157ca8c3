"""The admin page in a real headless browser, driven from Python, against a real hub.

The browser logs in through the hub's login form, follows the OAuth redirect to the service,
and sees the spawned users' slices in their colours; the page's script refreshes from the
JSON API (with the XSRF header a browser fetch needs), a hold is released from the detail
panel and its block turns free while the user's volume stays. Screenshots are kept under
``artifacts/`` for a person to look at.

The browser is the one Debian packages (``scripts/setup-browser.sh``); nothing is downloaded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ..hub import REPO, hub_password
from .conftest import MakeHub
from .test_admin import Tokens, admin_config, policy, url, uuid_of

pytestmark = pytest.mark.docker

CHROMIUM = os.environ.get("GPUSPAWNER_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
ARTIFACTS = REPO / "artifacts"

#: The state colours of admin.css, as the browser computes them.
RUNNING_BLUE = "rgb(13, 110, 253)"
HELD_AMBER = "rgb(255, 193, 7)"
FREE_GREEN = "rgb(232, 245, 236)"


@pytest.fixture
def browser():
    """The headless browser. Missing pieces fail the test, never skip it: a green run
    without the browser would prove nothing about the page."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[test]'")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run bash scripts/setup-browser.sh as root")
    with sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield launched
        finally:
            launched.close()


def open_as_admin(page, hub) -> None:
    """Log in through the hub's form as ``admin`` and open the admin page, waiting for the
    service: the hub starts it with itself, and the proxy answers 503 until it listens."""
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", "admin")
    page.fill("#password_input", hub_password(hub))
    page.click("#login_submit")
    page.wait_for_url("**/hub/**")
    deadline = time.monotonic() + 30
    while True:
        response = page.goto(url(hub))
        if response and response.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert response and response.status == 200, response and response.text()


def test_admin_releases_a_hold_in_the_browser(make_hub: MakeHub, tmp_path: Path, engine,
                                              browser):
    hub = make_hub(config_extra=admin_config(Tokens(), before=(
        policy(tmp_path, "defaults: {gpu_hold_after_stop: 1h}\n")
        + 'c.DockerSpawner.volumes = {"e2e-home-{username}": "/home/jovyan/work"}\n')))
    for user, profile in (("ann", "mig-1g"), ("bo", "mig-3g"), ("cy", "mig-1g")):
        hub.spawn(user, profile)
    hub.stop_server("ann")
    ann, bo = uuid_of(hub, "ann"), uuid_of(hub, "bo")

    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("dialog", lambda dialog: dialog.accept())
    open_as_admin(page, hub)
    held = page.locator(f'.slice[data-uuid="{ann}"]')
    running = page.locator(f'.slice[data-uuid="{bo}"]')
    assert held.get_attribute("data-state") == "held" and "state-held" in held.get_attribute(
        "class")
    assert running.get_attribute("data-state") == "running"
    assert held.evaluate("e => getComputedStyle(e).backgroundColor") == HELD_AMBER
    assert running.evaluate("e => getComputedStyle(e).backgroundColor") == RUNNING_BLUE
    assert "ann" in held.inner_text() and "bo" in running.inner_text()
    # The Hub's stylesheet is in use (its navbar layout), and the script refreshed the page
    # from the JSON API, which needs the XSRF header on a browser fetch.
    assert page.locator("nav.navbar").evaluate("e => getComputedStyle(e).display") == "flex"
    page.wait_for_function("document.body.dataset.refreshed", timeout=15_000)
    assert page.locator("#stale").is_hidden()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "admin-overview.png"), full_page=True)

    held.click()
    panel = page.locator("#detail")
    assert panel.is_visible() and "user ann" in panel.inner_text()
    panel.get_by_role("button", name="Release hold").click()
    page.wait_for_function(
        f'document.querySelector(\'.slice[data-uuid="{ann}"]\').dataset.state === "free"',
        timeout=15_000)
    freed = page.locator(f'.slice[data-uuid="{ann}"]')
    assert freed.evaluate("e => getComputedStyle(e).backgroundColor") == FREE_GREEN
    assert "volumes kept" in page.locator("#message").inner_text()
    assert hub.container("ann") is None
    assert engine.client.volumes.get("e2e-home-ann").name == "e2e-home-ann"
    assert [e["by"] for e in hub.events() if e["event"] == "gpu.release"] == ["admin"]
    page.screenshot(path=str(ARTIFACTS / "admin-overview-released.png"), full_page=True)

    page.goto(url(hub, "allocations"))
    page.fill("#filter", "bo")
    visible = page.locator("#table tbody tr:visible")
    assert visible.count() == 1 and "bo" in visible.first.inner_text()
    page.fill("#filter", "")
    page.click('th[data-key="user"]')
    page.click('th[data-key="user"]')  # descending
    users = page.locator("#table tbody tr td:first-child").all_inner_texts()
    assert users == sorted(users, reverse=True)
    page.screenshot(path=str(ARTIFACTS / "admin-allocations.png"), full_page=True)
    assert not problems, problems
    context.close()
