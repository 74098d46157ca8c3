"""Single faults a shared GPU host meets, in a real hub on the private engine: each must leave
spawns working, and nothing lost or shared."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from ..hub import PORT_BASE
from .conftest import MakeHub
from .test_promises import mig_host
from .test_spawn import STREAM

pytestmark = pytest.mark.docker

#: The hub as it runs in the shipped compose deployment: in a container's network namespace,
#: where a bind probe finds every host port free.
BLIND_PROBE = """
import gpuspawner.ports as _ports
_ports.host_port_free = lambda port, host="": True
"""


def answers(port: int, path: str, timeout: float = 20) -> str:
    session = requests.Session()
    session.trust_env = False
    deadline = time.monotonic() + timeout
    while True:
        try:
            return session.get(f"http://127.0.0.1:{port}{path}", timeout=2).text.strip()
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_a_host_port_the_hub_cannot_see_is_chosen_again(make_hub: MakeHub, engine):
    """A host process holds the lowest port of ``port_range``; the hub cannot see it. Docker
    refuses to publish it; the spawn chooses again without it, and says so in the log."""
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", PORT_BASE))
    squatter.listen()
    try:
        hub = make_hub(config_extra=BLIND_PROBE + 'c.GPUSpawner.ports = {"web": 6006}\n')
        response = hub.spawn("ann", "cpu")
        assert response.status_code < 400, (response.text, hub.log_tail())
        container = hub.container("ann")
        container.reload()
        host_port = int(container.labels["ds01.port.web"])
        assert host_port == PORT_BASE + 1
        published = container.attrs["NetworkSettings"]["Ports"]["6006/tcp"]
        assert [int(b["HostPort"]) for b in published] == [PORT_BASE + 1]
        api = engine.client.api
        api.exec_start(api.exec_create(container.id, [
            "sh", "-c", "cd /tmp && echo served > index.html && "
            "nohup /opt/venv/bin/python -m http.server 6006 >/dev/null 2>&1 &"]), detach=True)
        assert answers(host_port, "/index.html") == "served"
        taken = [e for e in hub.events() if e["event"] == "port.taken"]
        assert [e["port"] for e in taken] == [PORT_BASE]
        # The failed first container is gone: one container, the running one.
        assert [c.id for c in engine.client.containers.list(all=True)] == [container.id]
        # The next server avoids the port at once.
        hub.spawn("bob", "cpu")
        assert int(hub.container("bob").labels["ds01.port.web"]) == PORT_BASE + 2
        assert len([e for e in hub.events() if e["event"] == "port.taken"]) == 1
    finally:
        squatter.close()


def test_a_spawn_during_boot_waits_for_the_mig_devices(make_hub: MakeHub, gpusim):
    """A power-cycle: MIG mode survived, the MIG devices are not made yet. A spawn waits,
    saying what for, and gets a slice as soon as the boot script has made them."""
    gpusim.install(mig_host([]))
    hub = make_hub(config_extra=STREAM)

    def boot_script() -> None:
        time.sleep(6)
        gpusim.install(mig_host(["1g.10gb", "1g.10gb"]))

    later = threading.Thread(target=boot_script)
    later.start()
    try:
        hub.spawn("ann", "mig-1g", timeout=90)
    finally:
        later.join()
    assert any("The GPU host is still starting (waiting for MIG devices (1g.10gb))" in m
               for m in hub.last_progress), hub.last_progress
    uuid = hub.container("ann").labels["ds01.gpu.uuid"]
    present = {m["uuid"] for g in gpusim.state()["gpus"] for m in g.get("mig_devices", [])}
    assert uuid in present
