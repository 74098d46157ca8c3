"""Row 7: a host process listens on the lowest port of ``port_range`` and the hub cannot see
it (as a hub in a container's network namespace cannot: its bind probe finds every host port
free; simulated as tests/e2e/test_faults.py does, by a probe that always says free). Docker
refuses to publish the port; every spawn must still end with a working server on a port of
its own, and the container that could not start must not be left behind."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from ..e2e.test_faults import BLIND_PROBE
from . import sizes
from .conftest import POLL_INTERVAL, MakeHub, MakeScenario
from .measure import containers_of
from .test_nvml import spawn_during

pytestmark = pytest.mark.docker

WIDTH = 40


def free_range(width: int = WIDTH, start: int = 47100, stop: int = 49000) -> int:
    """The first port of ``width`` consecutive ports free on 127.0.0.1 now (other test
    sessions on the machine publish ports too)."""
    for base in range(start, stop, width):
        socks = []
        try:
            for port in range(base, base + width):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port range for the test")


@contextmanager
def squatter(port: int) -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    try:
        yield sock
    finally:
        sock.close()


@pytest.mark.parametrize("size", [sizes.PORT_SQUATTER], ids=lambda s: s.id)
def test_a_host_port_the_hub_cannot_see(
    size: sizes.Size, fault_hub: MakeHub, scenario: MakeScenario, engine: Any
) -> None:
    hub_id = "faults-ports"
    scn = scenario("port-squatter", size)
    base = free_range()
    with squatter(base):
        config = (BLIND_PROBE + 'c.GPUSpawner.ports = {"web": 6006}\n'
                  f"c.GPUSpawner.port_range = ({base}, {base + WIDTH - 1})\n")
        scn.add_hub(hub_id, fault_hub(hub_id, policy="defaults: {allow_full_gpu: true}\n",
                                      config_extra=config))
        scn.begin()
        scn.fault()
        outcomes = spawn_during(scn, hub_id, size)
        ports = {}
        for user, _profile, outcome in outcomes:
            if outcome == "ready":
                scn.write_markers((hub_id, user, ""))
                found = containers_of(engine, (hub_id, user, ""), running_only=True)
                ports[user] = int(found[0]["Labels"]["ds01.port.web"]) if found else None
        scn.details["ports"] = ports
        scn.details["spawns_during"] = [f"{u} {p}: {o}" for u, p, o in outcomes]
        scn.expect(all(o == "ready" for _, _, o in outcomes), "not every spawn worked")
        scn.expect(base not in ports.values(), f"a server got the squatted port {base}")
        scn.expect(len(set(ports.values())) == len(ports), f"two servers share a port: {ports}")
        row = scn.finish(POLL_INTERVAL)
    assert row.ok(), row.explain()
