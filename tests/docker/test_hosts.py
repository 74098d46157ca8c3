"""A second GPU host reached the way a lab reaches one: its own Docker engine over TCP with
TLS client certificates (made by the test), its own simulated GPUs (h100x2). The hub's side
(``hosts.connect``, ``probe.read``) reads that host's GPUs through that engine alone, and
an engine refuses a client whose certificate another CA signed.

With a third host (an engine without the NVIDIA runtime: CPU servers only), one read covers
all three (``hosts.read_all``); a host whose engine stops is down with the reason while the
others are read as before, and is back at its next read once its engine is."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import docker
import pytest

from gpuspawner import cli, hosts, inventory, probe
from gpuspawner.ledger import LedgerError
from gpuspawner.policy import Policy

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


@pytest.fixture(scope="module")
def cpu_host() -> Iterator[tuple[PrivateEngine, str]]:
    engine = PrivateEngine(EnginePaths.from_env().beside("cpu-host"))
    engine.start()
    try:
        engine.remove_containers()
        yield engine, ensure_base_image(engine.client)
    finally:
        engine.stop()


def _holder(engine: PrivateEngine, image: str, name: str, uuid: str | None) -> str:
    """A container by hand, as ``docker run --gpus device=<uuid>`` makes it (or none)."""
    api = engine.client.api
    requests = [docker.types.DeviceRequest(driver="nvidia", device_ids=[uuid],
                                           capabilities=[["gpu"]])] if uuid else None
    cid = api.create_container(image, command=["sleep", "300"], name=name,
                               host_config=api.create_host_config(device_requests=requests))
    api.start(cid["Id"])
    return cid["Id"]


def test_one_read_covers_every_host_and_a_stopped_engine_is_down_while_the_others_go_on(
    remote: tuple[PrivateEngine, Simulator, str], cpu_host: tuple[PrivateEngine, str],
    engine: Any, gpusim: Any, base_image: str,
) -> None:
    far, far_sim, far_image = remote
    cpu, cpu_image = cpu_host
    local = hosts.Host("gpu1", engine.base_url)
    readers = [
        hosts.HostReader(host, image=image, hub_id="e2e", policy=Policy)
        for host, image in ((local, base_image), (_host(far), far_image),
                            (hosts.Host("cpu3", cpu.base_url), cpu_image))
    ]
    far_sim.install("h100x2")  # no process left by an earlier test
    mine = _holder(engine, base_image, "by-hand-1", gpusim.mig_uuids()[0])
    theirs = _holder(far, far_image, "by-hand-2", far_sim.gpu_uuids()[1])
    plain = _holder(cpu, cpu_image, "plain-3", None)
    try:
        with ThreadPoolExecutor(4) as pool:
            views = hosts.read_all(readers, pool)
            assert [(v.name, v.up) for v in views] == [("gpu1", True), ("gpu2", True),
                                                       ("cpu3", True)]
            one, two, three = (v.snapshot for v in views)
            # Each host's GPUs are its own, and so are its containers and what they hold.
            assert len(one.inventory.gpus) == 4 and len(two.inventory.gpus) == 2
            assert not {g.uuid for g in one.inventory.gpus} & {g.uuid for g in two.inventory.gpus}
            assert [(a.container_id, a.uuids) for a in one.allocations] == [
                (mine, (gpusim.mig_uuids()[0],))]
            assert [(a.container_id, a.uuids) for a in two.allocations] == [
                (theirs, (far_sim.gpu_uuids()[1],))]
            assert three.allocations == () and three.inventory.gpus == ()
            assert any(p.startswith("host cpu3: the GPU probe") for p in three.inventory.problems)
            assert views[2].to_json()["up"] is True

            # An admin re-creates the MIG devices of GPU 0 on gpu1: its probe shows them once
            # read again (a start that fails with "unknown device" asks for that).
            made = gpusim.set_mig(0, ["3g.40gb", "3g.40gb"])
            readers[0].invalidate()
            again = hosts.read_all(readers, pool)[0].snapshot
            assert {m.uuid for m in again.inventory.migs_of(again.inventory.gpus[0])} == {
                d["uuid"] for d in made}

            cpu.stop()
            began = time.monotonic()
            views = hosts.read_all(readers, pool, timeout=20)
            assert time.monotonic() - began < 20
            assert [(v.name, v.up) for v in views] == [("gpu1", True), ("gpu2", True),
                                                       ("cpu3", False)]
            assert views[2].down.startswith(f"host cpu3 ({cpu.base_url}): ")
            assert [a.container_id for a in views[1].snapshot.allocations] == [theirs]
            assert far.client.api.inspect_container(theirs)["State"]["Running"]
            assert views[2].to_json() == {"name": "cpu3", "up": False,
                                          "down": views[2].down, "snapshot": None}

            cpu.start()
            views = hosts.read_all(readers, pool)
            assert [v.up for v in views] == [True, True, True]
    finally:
        for eng, cid in ((far, theirs), (cpu, plain)):
            try:
                eng.client.api.remove_container(cid, force=True)
            except Exception:  # an engine this test stopped and could not start again
                pass


def test_the_hosts_command_and_doctor_speak_of_every_host(
    remote: tuple[PrivateEngine, Simulator, str], cpu_host: tuple[PrivateEngine, str],
    engine: Any, gpusim: Any, base_image: str, tmp_path: Any, capsys: Any,
) -> None:
    """``gpuspawner hosts`` reads every host of a hosts file at once (exit 1 with a host
    down, naming it and why); ``doctor --hosts`` checks each: its engine through TLS, its
    GPUs through the probe, a host without the NVIDIA runtime a warning (CPU servers)."""
    far, far_sim, _far_image = remote
    cpu, _cpu_image = cpu_host
    tls = far.tls_dir
    listed = tmp_path / "hosts.yaml"
    listed.write_text(
        f"gpu1: {engine.base_url}\n"
        f"gpu2:\n  url: {far.tls_url}\n  tls_ca: {tls / 'ca.pem'}\n"
        f"  tls_cert: {tls / 'cert.pem'}\n  tls_key: {tls / 'key.pem'}\n"
        f"cpu3: {cpu.base_url}\n")
    far_sim.install("h100x2")  # GPU 0: MIG (3g.40gb + four 1g.10gb); GPU 1 whole, idle
    held = _holder(far, base_image, "by-hand-2", far_sim.gpu_uuids()[1])
    common = ["--hosts", str(listed), "--probe-image", base_image]
    try:
        assert cli.main([*common, "hosts", "--json"]) == 0
        rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
        assert [rows[n]["up"] for n in ("gpu1", "gpu2", "cpu3")] == [True, True, True]
        assert (rows["gpu1"]["gpus"], rows["gpu2"]["gpus"], rows["cpu3"]["gpus"]) == (4, 2, 0)
        assert rows["gpu2"]["holders"] == ["by-hand-2"] and rows["gpu1"]["holders"] == []
        assert rows["gpu2"]["free"]["gpu"] == {"free": 0, "total": 1}
        assert rows["gpu2"]["free"]["1g.10gb"] == {"free": 4, "total": 4}
        assert rows["cpu3"]["problems"][0].startswith("host cpu3: the GPU probe")

        # The reading commands over every host: each record names its host.
        local = ["--docker-host", engine.base_url, *common]
        assert cli.main([*local, "allocations", "--json"]) == 0
        records = json.loads(capsys.readouterr().out)
        assert [(r["host"], r["container_name"]) for r in records] == [("gpu2", "by-hand-2")]
        assert cli.main([*local, "gpus", "--json"]) == 0
        devices = json.loads(capsys.readouterr().out)
        assert {d["host"] for d in devices} == {"gpu1", "gpu2"}
        [whole] = [d for d in devices
                   if d["host"] == "gpu2" and d["uuid"] == far_sim.gpu_uuids()[1]]
        assert whole["state"] == "unmanaged" and whole["holders"]  # held by hand
        assert cli.main([*local, "available", "--json"]) == 0
        free = json.loads(capsys.readouterr().out)
        assert free["hosts"]["gpu2"]["1g.10gb"] == {"free": 4, "total": 4}
        assert free["total"]["1g.10gb"] == {
            "free": 4 + free["hosts"]["gpu1"]["1g.10gb"]["free"],
            "total": 4 + free["hosts"]["gpu1"]["1g.10gb"]["total"]}
        assert free["hosts"]["cpu3"] == {}
        assert cli.main([*local, "status", "--json"]) == 0
        assert [row["host"] for row in json.loads(capsys.readouterr().out)] == [
            "gpu1", "gpu2", "cpu3"]
        assert cli.main([*local, "allocations"]) == 0
        assert re.search(r"^gpu2 +- +- +- ", capsys.readouterr().out, re.MULTILINE)

        assert cli.main(["--docker-host", engine.base_url, *common, "doctor", "--json"]) == 0
        checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
        assert checks["host gpu2"]["status"] == "ok"
        assert f"answers at https://{far.tls_url.removeprefix('tcp://')}" in checks[
            "host gpu2"]["message"]  # TLS, verified both ways
        assert checks["host gpu2: GPUs"]["status"] == "ok"
        assert checks["host gpu2: GPUs"]["message"].startswith("2 GPU(s), 5 MIG device(s)")
        assert checks["host cpu3: GPUs"]["status"] == "warn"
        assert "CPU servers only" in checks["host cpu3: GPUs"]["message"]

        cpu.stop()
        try:
            assert cli.main([*common, "hosts"]) == 1
            out = capsys.readouterr().out
            assert f"cpu3 ({cpu.base_url}): DOWN: host cpu3" in out
            assert "gpu2 (" in out and "1 holder(s)" in out
            assert cli.main(["--docker-host", engine.base_url, *common, "doctor"]) == 1
            assert "[FAIL] host cpu3: " in capsys.readouterr().out
            # What answers is shown; the host that does not is said, and the exit is 1.
            assert cli.main(["--docker-host", engine.base_url, *common, "allocations"]) == 1
            shown = capsys.readouterr()
            assert "by-hand-2" in shown.out and "gpuspawner: cpu3: DOWN: host cpu3" in shown.err
        finally:
            cpu.start()
    finally:
        far.client.api.remove_container(held, force=True)

    listed.write_text("gpu9: tcp://10.0.0.9:2376\n")
    assert cli.main([*common, "hosts"]) == 2
    assert "needs tls_ca, tls_cert and tls_key" in capsys.readouterr().err
