"""A device conflict made by hand, seen through every window: the admin page in a real
browser, ``gpuspawner doctor``, ``/metrics`` and the operation log.

Two containers are started straight through the Docker API on the private engine, each with
an NVIDIA device request for the same MIG UUID. The simulator's hook lets both start, as the
real NVIDIA runtime does, so nothing stops the conflict; gpuspawner must show it: a red block
that names both containers, a failing ``conflicts`` check, the gauge at 1, one ``gpu.conflict``
line however often the page refreshes, and a release action that refuses containers it did
not make.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import docker
import pytest

from gpuspawner import inventory

from ..hub import VENV_BIN, login
from .conftest import MakeHub
from .test_admin import Tokens, admin_config, open_page, url, with_token, xsrf_of
from .test_admin_browser import ARTIFACTS, browser, open_as_admin  # noqa: F401 - the fixture

pytestmark = pytest.mark.docker

#: The conflict colour of admin.css (#dc3545), as the browser computes it.
CONFLICT_RED = "rgb(220, 53, 69)"
NAMES = ("rogue-a", "rogue-b")


def start_on(engine: Any, image: str, name: str, uuid: str) -> str:
    """``docker run --gpus device=<uuid>`` through the API: no gpuspawner labels."""
    api = engine.client.api
    request = docker.types.DeviceRequest(driver="nvidia", device_ids=[uuid],
                                         capabilities=[["gpu"]])
    created = api.create_container(
        image, command=["sleep", "600"], name=name,
        host_config=api.create_host_config(device_requests=[request]),
    )
    api.start(created["Id"])
    return str(created["Id"])


def doctor(hub: Any) -> tuple[int, list[dict[str, Any]]]:
    """``gpuspawner doctor --json`` as an admin's shell runs it, with the hub's settings."""
    env = hub.env()
    env.update(GPUSPAWNER_INVENTORY="nvml", GPUSPAWNER_HUB_ID="e2e",
               GPUSPAWNER_START_TIMEOUT="120")
    done = subprocess.run([str(VENV_BIN / "gpuspawner"), "doctor", "--json"], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def test_a_conflict_is_red_failed_counted_and_logged_once(
    make_hub: MakeHub, engine, gpusim, base_image: str, browser,  # noqa: F811
):
    tokens = Tokens()
    hub = make_hub(config_extra=admin_config(tokens))
    mig = inventory.read("file", topology_file=gpusim.state_path).migs[0]
    ids = [start_on(engine, base_image, name, mig.uuid) for name in NAMES]
    for cid in ids:  # both run: the hook, like the real runtime, does not stop the second
        assert engine.client.containers.get(cid).status == "running"

    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    open_as_admin(page, hub)

    block = page.locator(f'.slice[data-uuid="{mig.uuid}"]')

    def shows_the_conflict() -> None:
        assert block.get_attribute("data-state") == "conflict"
        assert "state-conflict" in (block.get_attribute("class") or "").split()
        assert block.evaluate("e => getComputedStyle(e).backgroundColor") == CONFLICT_RED
        text = block.inner_text()
        assert all(name in text for name in NAMES), text
        title = block.get_attribute("title") or ""
        assert "two running holders" in title
        assert all(f"unmanaged container {name}" in title for name in NAMES), title
        legend = page.locator('#legend li[data-state="conflict"]')
        assert "two running holders" in legend.inner_text()
        assert legend.locator(".count").inner_text() == "1"
        others = page.locator('.slice[data-state="conflict"]')
        assert others.count() == 1  # only that slice; its neighbours on GPU 0 are free

    shows_the_conflict()  # as the server rendered it
    page.wait_for_function("document.body.dataset.refreshed", timeout=15_000)
    shows_the_conflict()  # and as the script re-drew it from the JSON API
    block.click()
    panel = page.locator("#detail")
    assert panel.is_visible()
    assert all(name in panel.inner_text() for name in NAMES), panel.inner_text()
    assert panel.locator("form").count() == 0  # not ours: nothing to release or stop
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "admin-conflict.png"), full_page=True)
    assert not problems, problems
    context.close()

    code, checks = doctor(hub)
    found = {c["name"]: c for c in checks}
    assert code == 1, checks
    assert found["conflicts"]["status"] == "fail", found
    message = found["conflicts"]["message"]
    assert mig.uuid in message and f"MIG slice {mig.slot}" in message
    assert all(name in message for name in NAMES), message

    scraped = with_token(hub, tokens.prometheus, "metrics")
    assert scraped.status_code == 200, scraped.text
    assert "gpuspawner_device_conflicts 1.0" in scraped.text

    # The page refreshed every second and metrics were scraped: still one line in the log.
    logged = [e for e in hub.events() if e["event"] == "gpu.conflict"]
    assert len(logged) == 1, logged
    assert logged[0]["uuid"] == mig.uuid and logged[0]["slot"] == mig.slot
    assert sorted(logged[0]["container_ids"]) == sorted(ids)
    assert sorted(logged[0]["containers"]) == list(NAMES)

    # The admin may not remove either container: gpuspawner did not make them.
    admin = login(hub, "admin")
    form = open_page(hub, admin)
    refused = admin.post(url(hub, "api/release"), data={"_xsrf": xsrf_of(form),
                                                       "container": ids[0]})
    assert refused.status_code == 409, refused.text
    assert "not made by gpuspawner" in refused.json()["message"]
    assert engine.client.containers.get(ids[0]).status == "running"

