"""The admin events page shows what Docker did to every GPU container, a ``docker rm`` done by
hand included: the admin service of a real hub follows the private engine's events."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ..docker.test_ledger import make
from ..hub import RunningHub
from .conftest import MakeHub
from .test_admin import Tokens, admin_config, with_token

pytestmark = pytest.mark.docker


def shown(hub: RunningHub, token: str) -> list[dict[str, Any]]:
    response = with_token(hub, token, "api/events?limit=2000")
    if response.status_code in (502, 503):  # the service is not listening yet
        return []
    assert response.status_code == 200, response.text[:500]
    return [e for e in response.json() if str(e.get("event", "")).startswith("docker.")]


def wait_until(what: str, check, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.3)


def test_the_events_page_shows_a_docker_rm_done_by_hand(
    make_hub: MakeHub, engine, gpusim, base_image
):
    tokens = Tokens()
    hub = make_hub(config_extra=admin_config(tokens))

    def following() -> bool:
        response = with_token(hub, tokens.ops, "api/health")
        if response.status_code != 200:
            return False
        checks = {c["name"]: c for c in response.json()}
        return checks.get("docker-events", {}).get("status") == "ok"

    wait_until("the service follows Docker's events", following)
    hub.spawn("ann", "mig-1g")
    uuid = hub.container("ann").labels["ds01.gpu.uuid"]
    api = engine.client.api
    # Someone runs a container on ann's slice by hand, then removes it, and one without GPUs.
    cid = make(engine, base_image, "intruder", device_ids=[uuid])
    plain = make(engine, base_image, "plain-by-hand")
    api.remove_container(cid, force=True)
    api.remove_container(plain, force=True)

    def intruder_gone() -> list[dict[str, Any]]:
        lines = shown(hub, tokens.ops)
        return lines if any(e["event"] == "docker.destroy" and e["container"] == "intruder"
                            for e in lines) else []

    lines = wait_until("docker.destroy of the intruder on the events page", intruder_gone)
    intruder = [e["event"] for e in lines if e["container"] == "intruder"]
    assert intruder == ["docker.create", "docker.start", "docker.die", "docker.destroy"]
    assert all(e["devices"] == [uuid] for e in lines if e["container"] == "intruder")
    assert not any(e["container"] == "plain-by-hand" for e in lines)
    # gpuspawner's own container is in Docker's record too, with its user.
    ann = [e for e in lines if e.get("user") == "ann"]
    assert [e["event"] for e in ann][:2] == ["docker.create", "docker.start"]
    # The page itself (HTML) lists it, newest first.
    page = with_token(hub, tokens.ops, "events")
    assert page.status_code == 200 and "docker.destroy" in page.text
    assert page.text.index("docker.destroy") < page.text.index("docker.create")
    # The hub's own operation log file has them (one log for the spawner and the service).
    assert any(e["event"] == "docker.destroy" and e.get("container") == "intruder"
               for e in hub.events())
