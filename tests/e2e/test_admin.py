"""The admin page as a lab runs it: a Hub-managed service in a real hub, on the private engine.

The service is configured the way docs/admin.md tells admins to (``admin.service(c)`` and
``admin.role()``), people log in through the hub's login form and OAuth, scripts use tokens.
Checked: who may see and who may act, that the JSON is the CLI's, that names with HTML stay
text, that actions need the XSRF token, and that releasing a hold removes the stopped
container, keeps its volume, frees the device and says who did it.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from ..hub import VENV_BIN, RunningHub, free_port, login
from .conftest import MakeHub

pytestmark = pytest.mark.docker

SERVICE = "gpu-allocations"
PREFIX = f"/services/{SERVICE}/"
HTML_NAME = '<img src=x onerror=alert(1)>"'


class Tokens:
    """API tokens of the script services the admin config adds."""

    def __init__(self) -> None:
        self.dashboard = secrets.token_hex(16)  # custom:gpuspawner:view
        self.prometheus = secrets.token_hex(16)  # read:metrics only
        self.ops = secrets.token_hex(16)  # an admin service


def admin_config(tokens: Tokens, before: str = "") -> str:
    """The two lines of docs/admin.md, plus viewers, and the test's own script services.

    The simulator's state file is the one variable the service needs that the spawner
    config does not name, so it is passed through ``environment``.
    """
    return before + f"""
import os
from gpuspawner import admin
c.JupyterHub.services.append(admin.service(
    c, port={free_port()}, viewers=True,
    environment={{"GPUSIM_STATE": os.environ["GPUSIM_STATE"], "GPUSPAWNER_ADMIN_REFRESH": "1s"}},
))
c.JupyterHub.load_roles.append(admin.role())
c.JupyterHub.custom_scopes = admin.custom_scopes()
c.JupyterHub.load_roles.append(admin.viewer_role(users=["ta"], services=["dashboard"]))
c.JupyterHub.services += [
    {{"name": "dashboard", "api_token": {tokens.dashboard!r}}},
    {{"name": "prometheus", "api_token": {tokens.prometheus!r}}},
    {{"name": "ops", "api_token": {tokens.ops!r}, "admin": True}},
]
c.JupyterHub.load_roles.append(
    {{"name": "scraper", "scopes": ["read:metrics"], "services": ["prometheus"]}})
"""


def policy(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return f"c.GPUSpawner.policy_file = {str(path)!r}\n"


def url(hub: RunningHub, path: str = "") -> str:
    return f"{hub.url}{PREFIX}{path}"


def open_page(hub: RunningHub, session: requests.Session, path: str = "",
              timeout: float = 30) -> requests.Response:
    """GET a page through the proxy, following the OAuth dance; waits for the service to be up
    (the hub starts it, the proxy answers 503 until it listens)."""
    deadline = time.monotonic() + timeout
    while True:
        response = session.get(url(hub, path), timeout=30)
        if response.status_code not in (502, 503) or time.monotonic() > deadline:
            return response
        time.sleep(0.3)


def without_clock(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Device rows without ``idle_seconds``: the admin service's clock moves between reads."""
    return [{k: v for k, v in row.items() if k != "idle_seconds"} for row in rows]


def with_token(hub: RunningHub, token: str, path: str, method: str = "GET",
               **kw: Any) -> requests.Response:
    session = requests.Session()
    session.trust_env = False
    headers = {"Authorization": f"token {token}", **kw.pop("headers", {})}
    return session.request(method, url(hub, path), headers=headers, timeout=30, **kw)


def xsrf_of(page: requests.Response) -> str:
    found = re.search(r'data-xsrf="([^"]+)"', page.text)
    assert found, page.text[:500]
    return found.group(1).replace("&#34;", '"')


def cli_json(hub: RunningHub, *args: str) -> Any:
    """``gpuspawner <args> --json`` with the hub's view of the world (engine, simulator)."""
    env = hub.env()
    env.update(GPUSPAWNER_INVENTORY="nvml", GPUSPAWNER_EVENTS=str(hub.events_path))
    out = subprocess.run([str(VENV_BIN / "gpuspawner"), *args, "--json"], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def uuid_of(hub: RunningHub, user: str) -> str:
    return hub.container(user).labels["ds01.gpu.uuid"]


def block_states(page_html: str) -> dict[str, str]:
    """data-uuid -> data-state of every device block on the overview."""
    found = {}
    for tag in re.findall(r'<button type="button" class="slice[^>]*>', page_html):
        uuid = re.search(r'data-uuid="([^"]*)"', tag)
        state = re.search(r'data-state="([^"]*)"', tag)
        if uuid and state:
            found[uuid.group(1)] = state.group(1)
    return found


def test_admins_see_everything_others_are_refused(make_hub: MakeHub):
    tokens = Tokens()
    hub = make_hub(config_extra=admin_config(tokens))
    hub.spawn("ann", "mig-1g")
    hub.spawn("bo", "mig-3g")
    admin = login(hub, "admin")
    home = admin.get(f"{hub.url}/hub/home", timeout=30)
    assert f'href="{PREFIX}"' in home.text  # in the Hub's Services menu

    page = open_page(hub, admin)
    assert page.status_code == 200, page.text[:2000]
    assert page.url == url(hub)  # back from the OAuth dance on the page itself
    states = block_states(page.text)
    assert states[uuid_of(hub, "ann")] == "running" and states[uuid_of(hub, "bo")] == "running"
    assert list(states.values()).count("free") == len(states) - 2
    assert "/hub/static/css/style.min.css" in page.text  # looks like the hub's pages
    assert hub.session.get(f"{hub.url}/hub/static/css/style.min.css").status_code == 200
    for path in ("allocations", "users", "events", "health"):
        other = admin.get(url(hub, path), timeout=30)
        assert other.status_code == 200, (path, other.text[:500])
        assert "ann" in other.text or path == "health"

    # The JSON API is the CLI's records (the allocations with the page's additions). Only
    # the service keeps an idle clock (the CLI reads once, with no past): a number there,
    # None from the CLI.
    gpus = admin.get(url(hub, "api/gpus"), timeout=30).json()
    assert all(isinstance(row["idle_seconds"], float) for row in gpus
               if row["memory_used_mib"] is not None), gpus
    assert without_clock(gpus) == without_clock(cli_json(hub, "gpus"))
    allocations = admin.get(url(hub, "api/allocations"), timeout=30).json()
    cli = {a["container_id"]: a for a in cli_json(hub, "allocations")}
    assert {a["container_id"] for a in allocations} == set(cli)
    for row in allocations:
        assert {k: row[k] for k in cli[row["container_id"]]} == cli[row["container_id"]]
        assert row["last_activity"], row  # from the Hub API
    assert admin.get(url(hub, "api/available?profile=1g.10gb"), timeout=30).json() == (
        cli_json(hub, "available", "--profile", "1g.10gb"))
    assert admin.get(url(hub, "api/available?profile=7g.80gb"), timeout=30).status_code == 404
    users = {u["user"]: u for u in admin.get(url(hub, "api/users"), timeout=30).json()}
    assert users["ann"]["equivalents"] == pytest.approx(1 / 7, abs=1e-3)
    assert users["ann"]["holding"] == 1 and not users["ann"]["idle"]
    logged = [e["event"] for e in admin.get(url(hub, "api/events"), timeout=30).json()]
    assert "gpu.allocate" in logged and "container.start" in logged
    checks = {c["name"]: c for c in admin.get(url(hub, "api/health"), timeout=30).json()}
    assert checks["docker"]["status"] == "ok" and checks["hub-api"]["status"] == "ok"
    assert checks["nvml"]["status"] == "ok" and checks["operation-log"]["status"] == "ok"

    # A plain user: the hub refuses the OAuth login to the service.
    bob = login(hub, "bob")
    refused = open_page(hub, bob)
    assert refused.status_code == 403, refused.text[:500]
    assert bob.get(url(hub, "api/gpus"), timeout=30).status_code == 403
    # A teaching assistant with the view scope: sees, may not act.
    ta = login(hub, "ta")
    seen = open_page(hub, ta)
    assert seen.status_code == 200 and "read only" in seen.text and "<form" not in seen.text
    tried = ta.post(url(hub, "api/release"),
                    data={"_xsrf": xsrf_of(seen), "container": hub.container("ann").id})
    assert tried.status_code == 403, tried.text
    assert "may look but not act" in tried.json()["message"]

    # Scripts: the view scope reads; read:metrics reads metrics only; no token, no metrics.
    assert without_clock(with_token(hub, tokens.dashboard, "api/gpus").json()) == (
        without_clock(gpus))
    assert with_token(hub, tokens.dashboard, "api/stop", "POST",
                      json={"user": "ann"}).status_code == 403
    assert with_token(hub, tokens.prometheus, "api/gpus").status_code == 403
    scraped = with_token(hub, tokens.prometheus, "metrics")
    assert scraped.status_code == 200, scraped.text
    assert 'gpuspawner_gpu_slots_used{gpu="0",profile="1g.10gb"} 1.0' in scraped.text
    assert 'gpuspawner_allocations{state="running",user="bo"} 1.0' in scraped.text
    assert "gpuspawner_up 1.0" in scraped.text
    assert hub.session.get(url(hub, "metrics"), timeout=30).status_code == 403
    # A bad token never falls back to the browser's cookie.
    assert admin.get(url(hub, "api/gpus"), headers={"Authorization": "token nope"},
                     timeout=30).status_code == 403


def test_names_with_html_are_shown_as_text(make_hub: MakeHub):
    hub = make_hub(config_extra=admin_config(Tokens()))
    created = hub.api("POST", "/users/" + requests.utils.quote(HTML_NAME, safe=""))
    assert created.status_code == 201, created.text  # JupyterHub accepts the name
    hub.spawn(HTML_NAME, "mig-1g")
    admin = login(hub, "admin")
    pages = [open_page(hub, admin)] + [admin.get(url(hub, p), timeout=30)
                                       for p in ("allocations", "users", "events")]
    for page in pages:
        assert page.status_code == 200, page.text[:500]
        assert HTML_NAME not in page.text
        assert "<img src=x" not in page.text
        assert "&lt;img src=x onerror=alert(1)&gt;&#34;" in page.text, page.url
    assert block_states(pages[0].text)[uuid_of(hub, HTML_NAME)] == "running"


def test_release_a_hold_removes_the_container_keeps_the_volume_and_is_logged(
    make_hub: MakeHub, tmp_path: Path, engine
):
    tokens = Tokens()
    hub = make_hub(config_extra=admin_config(tokens, before=(
        policy(tmp_path, "defaults: {gpu_hold_after_stop: 1h}\n")
        + 'c.DockerSpawner.volumes = {"e2e-home-{username}": "/home/jovyan/work"}\n')))
    hub.spawn("ann", "mig-1g")
    hub.spawn("bo", "mig-1g")
    held = hub.container("ann")
    slot = uuid_of(hub, "ann")
    api = engine.client.api
    api.exec_start(api.exec_create(held.id, ["sh", "-c", "echo mine > /opt/outside.txt"],
                                   user="root"))
    hub.stop_server("ann")
    admin = login(hub, "admin")
    page = open_page(hub, admin)
    assert block_states(page.text)[slot] == "held"
    assert "held until" in page.text

    # Without the XSRF token the cookie session is not accepted for an action.
    refused = admin.post(url(hub, "api/release"), data={"container": held.id},
                         allow_redirects=False)
    assert refused.status_code == 403, refused.text
    assert hub.container("ann").id == held.id
    # A running server's container is not removed.
    running = admin.post(url(hub, "api/release"), allow_redirects=False,
                         data={"_xsrf": xsrf_of(page), "container": hub.container("bo").id})
    assert running.status_code == 409 and "stop it first" in running.json()["message"]

    released = admin.post(url(hub, "api/release"), allow_redirects=False,
                          headers={"Accept": "text/html"},
                          data={"_xsrf": xsrf_of(page), "container": held.id, "next": ""})
    assert released.status_code == 303, released.text
    assert hub.container("ann") is None
    assert engine.client.volumes.get("e2e-home-ann").name == "e2e-home-ann"
    assert released.headers["Location"].startswith(PREFIX + "?message=")
    after = admin.get(hub.url + released.headers["Location"], timeout=30)
    assert block_states(after.text)[slot] == "free"
    assert "volumes kept" in after.text
    release = [e for e in hub.events() if e["event"] == "gpu.release"]
    assert release and release[-1]["by"] == "admin" and release[-1]["user"] == "ann"
    assert release[-1]["uuids"] == [slot] and release[-1]["container"] == held.name
    # Nothing ann made is lost: her next start is made from the saved container.
    hub.spawn("ann", "cpu")
    again = hub.container("ann")
    out = api.exec_start(api.exec_create(again.id, ["cat", "/opt/outside.txt"]))
    assert out.strip() == b"mine"

    # Stop a server through the Hub with a token (no XSRF needed), logged with who did it.
    stopped = with_token(hub, tokens.ops, "api/stop", "POST", json={"user": "bo"})
    assert stopped.status_code == 200, stopped.text
    deadline = time.monotonic() + 60
    while hub.server_model("bo") is not None and time.monotonic() < deadline:
        time.sleep(0.3)
    assert hub.server_model("bo") is None
    assert hub.container("bo").status == "exited"
    stops = [e for e in hub.events() if e["event"] == "server.stop"]
    assert stops and stops[-1]["by"] == "ops" and stops[-1]["user"] == "bo"
    shown = admin.get(url(hub, "api/events"), timeout=30).json()
    assert any(e["event"] == "gpu.release" and e["by"] == "admin" for e in shown)


def test_refusals_are_counted_in_metrics(make_hub: MakeHub, gpusim):
    gpusim.install({
        "gpus": [{"index": 0, "uuid": "GPU-aaaaaaaa-0000-4000-8000-000000000000",
                  "name": "NVIDIA A100-SXM4-80GB", "memory_mib": 81920,
                  "mig_mode": "enabled", "total_slices": 7,
                  "mig_devices": [{"index": 0, "profile": "3g.40gb", "gi": 2, "ci": 0,
                                   "uuid": "MIG-aaaaaaaa-0000-4000-8000-000000000001"}]}],
    })
    tokens = Tokens()
    hub = make_hub(config_extra=admin_config(tokens))
    hub.spawn("ann", "mig-3g")
    assert hub.spawn("bo", "mig-3g").status_code == 503
    deadline = time.monotonic() + 30
    while True:
        scraped = with_token(hub, tokens.prometheus, "metrics")
        if scraped.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert 'gpuspawner_allocation_refusals_total{code="full"} 1.0' in scraped.text
    assert 'gpuspawner_profile_free{profile="3g.40gb"} 0.0' in scraped.text
    assert 'gpuspawner_user_gpu_equivalents{user="ann"}' in scraped.text


def test_a_label_naming_a_vanished_uuid_is_flagged(make_hub: MakeHub, gpusim, tmp_path: Path):
    tokens = Tokens()
    hub = make_hub(config_extra=admin_config(tokens, before=policy(
        tmp_path, "defaults: {gpu_hold_after_stop: 1h}\n")))
    hub.spawn("ann", "mig-1g")
    old = uuid_of(hub, "ann")
    hub.stop_server("ann")
    gpusim.reboot(seed=3)  # MIG devices come back with new UUIDs
    admin = login(hub, "admin")
    page = open_page(hub, admin)
    states = block_states(page.text)
    assert states[old] == "missing" and "free" in states.values()
    checks = {c["name"]: c for c in admin.get(url(hub, "api/health"), timeout=30).json()}
    assert checks["missing-uuids"]["status"] in ("warn", "fail")
    assert "gpuspawner_missing_uuids 1.0" in with_token(hub, tokens.prometheus, "metrics").text
