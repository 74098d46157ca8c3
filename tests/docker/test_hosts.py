"""A second GPU host reached the way a lab reaches one: its own Docker engine over TCP with
TLS client certificates (made by the test), its own simulated GPUs (h100x2). The hub's side
(``hosts.connect``, ``probe.read``) reads that host's GPUs through that engine alone, and
an engine refuses a client whose certificate another CA signed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from gpuspawner import hosts, inventory, probe
from gpuspawner.ledger import LedgerError

from ..engine import EnginePaths, PrivateEngine
from ..gpusim import Simulator, load_fake_nvml
from ..hub import free_port
from ..images import ensure_base_image
from ..unit.test_inventory_smi_xml import view

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def remote() -> Iterator[tuple[PrivateEngine, Simulator, str]]:
    engine = PrivateEngine(EnginePaths.from_env().beside("remote-h100"), nvidia_runtime=True,
                           tls_port=free_port())
    engine.start()
    try:
        engine.remove_containers()
        sim = Simulator(engine.state_path, engine.hook_log)
        sim.install("h100x2")
        yield engine, sim, ensure_base_image(engine.client)
    finally:
        engine.stop()


def _host(engine: PrivateEngine, client: str = "") -> hosts.Host:
    tls = engine.tls_dir
    return hosts.parse_hosts({"gpu2": {
        "url": engine.tls_url, "tls_ca": str(tls / "ca.pem"),
        "tls_cert": str(tls / f"{client}cert.pem"), "tls_key": str(tls / f"{client}key.pem"),
    }})[0]


def test_a_remote_hosts_gpus_are_read_through_its_engine_over_tls(
    remote: tuple[PrivateEngine, Simulator, str], engine: Any, gpusim: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    far, sim, image = remote
    sim.start_process(sim.gpu_uuids()[1], 5000)
    client = hosts.connect(_host(far))
    found = probe.read(client, image, "e2e")
    monkeypatch.setenv("GPUSIM_STATE", str(far.state_path))  # NVML on that host, for the oracle
    assert view(found) == view(inventory.read_nvml(load_fake_nvml()))
    assert len(found.gpus) == 2 and all("H100" in g.name for g in found.gpus), found.gpus
    assert [p.used_mib for p in found.gpus[1].processes] == [5000]
    # The local host (a100x4, its own engine) is another host entirely.
    local = probe.read(engine.client, ensure_base_image(engine.client), "e2e")
    assert not {g.uuid for g in local.gpus} & {g.uuid for g in found.gpus}
    assert far.client.api.containers(all=True, filters={"label": "ds01.interface=probe"}) == []


def test_a_client_the_hosts_ca_did_not_sign_is_refused_with_the_hosts_name(
    remote: tuple[PrivateEngine, Simulator, str],
) -> None:
    far, _sim, _image = remote
    with pytest.raises(LedgerError, match=r"host gpu2: its Docker engine at tcp://127\.0\.0\.1"):
        hosts.connect(_host(far, client="other-"))
    missing = hosts.Host("gpu2", far.tls_url, None, "/nonexistent/ca.pem", "/x", "/y")
    with pytest.raises(LedgerError, match="host gpu2: TLS file /nonexistent/ca.pem"):
        hosts.connect(missing)
