"""GPU activity through a real Hub: a zombie process on a free slice is never handed out,
and the admin page, its JSON, ``doctor`` and the operation log say the slice is busy.

The simulator plays NVML: a compute process started with ``gpusim.start_process`` on a MIG
device shows in ``nvmlDeviceGetComputeRunningProcesses`` and in its memory, exactly as a
process that outlived its container would on a real host.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from gpuspawner import inventory

from ..engine import start_sleeper
from ..hub import login
from .conftest import MakeHub
from .test_admin import Tokens, admin_config, with_token
from .test_admin_browser import ARTIFACTS, browser, open_as_admin  # noqa: F401 - the fixture
from .test_admin_conflict import doctor

pytestmark = pytest.mark.docker


def test_zombie_slices_are_avoided_and_shown_busy(
    make_hub: MakeHub, engine: Any, gpusim: Any, browser: Any,  # noqa: F811
) -> None:
    tokens = Tokens()
    hub = make_hub(config_extra=admin_config(tokens))
    slices = [m for m in inventory.read("file", topology_file=gpusim.state_path).migs
              if m.profile == "1g.10gb"]
    assert len(slices) == 9
    clean, zombies = slices[4], [m for m in slices if m is not slices[4]]
    pids = {m.uuid: gpusim.start_process(m.uuid, 8090) for m in zombies}

    hub.spawn("ann", "mig-1g")  # the one slice with nothing on it is the only choice
    [container] = engine.client.containers.list(filters={"label": "ds01.user=ann"})
    [request] = container.attrs["HostConfig"]["DeviceRequests"]
    assert request["DeviceIDs"] == [clean.uuid]
    handed = [c["devices"] for c in gpusim.hook_calls() if c["id"] == container.id]
    assert handed == [[clean.uuid]]

    refused = hub.spawn("bo", "mig-1g")
    assert refused.status_code == 503, refused.text
    message = refused.json()["message"]
    assert "All 9 1g.10gb slices are in use (9/9)" in message, message
    assert "8 of them busy with processes or memory no running server owns" in message

    gpus = with_token(hub, tokens.dashboard, "api/gpus")
    assert gpus.status_code == 200, gpus.text
    seen = {d["uuid"]: d for d in gpus.json()}
    for m in zombies:
        assert seen[m.uuid]["state"] == "busy", seen[m.uuid]
        assert seen[m.uuid]["reason"] == (
            "busy: 1 process, 7.9 GiB in use, no running container holds it")
        assert seen[m.uuid]["processes"] == [{
            "pid": pids[m.uuid], "used_mib": 8090, "container_id": None, "container": None,
            "user": None, "server": None, "hub": None, "holder": False}]
    assert seen[clean.uuid]["state"] == "running"

    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    open_as_admin(page, hub)
    for when in ("rendered", "refreshed"):
        if when == "refreshed":
            page.wait_for_function("document.body.dataset.refreshed", timeout=15_000)
        block = page.locator(f'.slice[data-uuid="{zombies[0].uuid}"]')
        assert block.get_attribute("data-state") == "busy"
        assert "busy: 1 process, 7.9 GiB" in block.inner_text()
        assert "7.9/9.5 GiB · 1 process" in block.inner_text()
        width = block.locator(".mem-bar").evaluate("e => e.style.width")
        assert width == "83%", width
        assert f"pid {pids[zombies[0].uuid]} · no container · 7.9 GiB" in (
            block.get_attribute("title") or "")
        legend = page.locator('#legend li[data-state="busy"]')
        assert legend.locator(".count").inner_text() == "8"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "admin-activity.png"), full_page=True)
    assert not problems, problems
    context.close()

    code, checks = doctor(hub)
    found = {c["name"]: c for c in checks}
    assert code == 1 and found["busy"]["status"] == "fail", found.get("busy")
    assert all(str(pid) in found["busy"]["message"] for pid in list(pids.values())[:5])

    logged = [e for e in hub.events() if e["event"] == "gpu.busy"]
    assert sorted(e["uuid"] for e in logged) == sorted(m.uuid for m in zombies), logged

    gpusim.end_process(pids[zombies[0].uuid])  # an admin ended it: the slice is free again
    again = hub.spawn("bo", "mig-1g")
    assert again.status_code < 400, again.text
    [bo] = engine.client.containers.list(filters={"label": "ds01.user=bo"})
    assert bo.attrs["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == [zombies[0].uuid]


def _last_activity(hub: Any, user: str, server: str = "") -> str:
    model = hub.server_model(user, server)
    assert model is not None, f"{user}/{server} is not running"
    return str(model["last_activity"])


#: A real jupyterhub-idle-culler as a Hub-managed service, with a short timeout.
CULLER = """
import sys
c.JupyterHub.services.append({"name": "idle-culler", "command": [
    sys.executable, "-m", "jupyterhub_idle_culler", "--timeout=12", "--cull-every=2"]})
c.JupyterHub.load_roles.append({"name": "idle-culler", "services": ["idle-culler"],
    "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"]})
"""


def test_a_server_computing_on_its_slice_is_not_culled_with_the_browser_closed(
    make_hub: MakeHub, engine: Any, gpusim: Any,
) -> None:
    """No browser, no HTTP traffic: only a compute process on ann's slice. The admin service
    reports it, so the Hub's ``last_activity`` of ann's server advances, and
    jupyterhub-idle-culler (real, 12 s timeout) culls bo's idle GPU server and not ann's."""
    tokens = Tokens()
    hub = make_hub(config_extra=admin_config(tokens) + CULLER,
                   env_extra={"GPUSPAWNER_ADMIN_ACTIVITY_INTERVAL": "2s"})
    hub.spawn("ann", "mig-1g")
    [ann] = engine.client.containers.list(filters={"label": "ds01.user=ann"})
    [slice_uuid] = ann.attrs["HostConfig"]["DeviceRequests"][0]["DeviceIDs"]
    # A training run in ann's terminal: a real process in her container, which NVML lists
    # on her slice by its host pid.
    pid = start_sleeper(engine.client, ann.id, "/tmp/train.py")
    gpusim.start_process(slice_uuid, 6000, pid=pid)
    hub.spawn("bo", "mig-1g")
    before = _last_activity(hub, "ann")
    deadline = time.monotonic() + 90
    while hub.server_model("bo") is not None:  # the culler works: bo idles out
        assert time.monotonic() < deadline, "the culler never stopped bo's idle server"
        time.sleep(1)
    assert hub.server_model("ann") is not None, "ann's server computing was culled"
    assert _last_activity(hub, "ann") > before
    # The admin service maps the pid to ann's container (the kernel's cgroup of the pid):
    # JSON, page and metrics say whose process it is, and that her slice is not idle.
    gpus = {d["uuid"]: d for d in with_token(hub, tokens.dashboard, "api/gpus").json()}
    assert gpus[slice_uuid]["processes"] == [{
        "pid": pid, "used_mib": 6000, "container_id": ann.id, "container": ann.name,
        "user": "ann", "server": "", "hub": "e2e", "holder": True}]
    assert gpus[slice_uuid]["idle_seconds"] == 0
    scraped = with_token(hub, tokens.prometheus, "metrics").text
    assert (f'gpuspawner_device_idle_seconds{{device="{slice_uuid}",slot="'
            f'{gpus[slice_uuid]["slot"]}",user="ann"}} 0.0') in scraped, scraped[-3000:]
    nvidia_smi = ann.exec_run(["nvidia-smi", "-L"])
    lines = nvidia_smi.output.decode().splitlines()
    assert nvidia_smi.exit_code == 0 and len(lines) == 2 and slice_uuid in lines[1], lines


def test_a_gpu_server_idle_past_its_limit_is_stopped_and_told_why(
    make_hub: MakeHub, engine: Any, gpusim: Any, tmp_path: Any,
) -> None:
    """``gpu_idle_timeout: 12s`` in the policy: a GPU server whose slice runs nothing is
    stopped through the Hub, with ``gpu.idle-stop`` in the log and a line on its next spawn
    page; a server computing on its slice, and a CPU server, are left alone."""
    from .test_admin import policy

    tokens = Tokens()
    hub = make_hub(
        config_extra=policy(tmp_path, "defaults: {gpu_idle_timeout: 12s}\n")
        + admin_config(tokens),
        env_extra={"GPUSPAWNER_ADMIN_ACTIVITY_INTERVAL": "1s"})
    hub.spawn("bo", "mig-1g")
    [bo] = engine.client.containers.list(filters={"label": "ds01.user=bo"})
    gpusim.start_process(bo.attrs["HostConfig"]["DeviceRequests"][0]["DeviceIDs"][0], 4000)
    hub.spawn("ann", "mig-1g")
    hub.spawn("cy", "cpu")
    deadline = time.monotonic() + 60
    while hub.server_model("ann") is not None:
        assert time.monotonic() < deadline, "ann's idle GPU server was never stopped"
        time.sleep(1)
    assert hub.server_model("bo") is not None and hub.server_model("cy") is not None
    [stop] = [e for e in hub.events() if e["event"] == "gpu.idle-stop"]
    assert (stop["user"], stop["server"], stop["timeout"]) == ("ann", "", 12)
    assert stop["idle"] >= 12
    ann = login(hub, "ann")  # the spawn form, as ann's browser gets it
    page = ann.get(f"{hub.url}/hub/spawn/ann")
    assert page.status_code == 200, page.text[:300]
    assert "without GPU work (the limit is 12s)" in page.text, page.text[:2000]
    assert "gpuspawner-notice" in page.text
    hub.spawn("ann", "mig-1g")
    page = ann.get(f"{hub.url}/hub/spawn/ann")  # told once: it started since
    assert "without GPU work" not in page.text
