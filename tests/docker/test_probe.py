"""A host's GPUs read through its Docker engine alone (``gpuspawner.probe``): a probe
container given every GPU with the ``utility`` capability prints the host's own
``nvidia-smi -L`` and ``-q -x`` (the simulated toolkit mounts the fake one, as the real
toolkit mounts the real one), and the records equal what NVML says of the same host. The
probe never holds a device and never outlives its run."""

from __future__ import annotations

from typing import Any

import docker.types
import pytest

from gpuspawner import inventory, probe
from gpuspawner.inventory import InventoryError
from gpuspawner.records import GpuProcess

from ..engine import start_sleeper
from ..gpusim import load_fake_nvml
from ..unit.test_inventory_smi_xml import view

pytestmark = pytest.mark.docker


def _probes(engine: Any) -> list[dict[str, Any]]:
    return engine.client.api.containers(all=True, filters={"label": "ds01.interface=probe"})


def test_the_probe_reads_what_nvml_reads_and_leaves_nothing(
    engine: Any, gpusim: Any, base_image: str
) -> None:
    migs = gpusim.mig_uuids()
    gpusim.start_process(migs[2], 3000)
    gpusim.set_memory_used(migs[5], 2048)
    found = probe.read(engine.client, base_image, "e2e")
    assert view(found) == view(inventory.read_nvml(load_fake_nvml()))
    assert [p.used_mib for p in found.migs[2].processes] == [3000]
    assert _probes(engine) == []
    [call] = [c for c in gpusim.hook_calls()]
    assert call["devices"] == ["all"]  # every GPU, for reading only

    # MIG re-created (a reboot gives new MIG UUIDs): the next probe sees the new ones.
    gpusim.reboot()
    again = probe.read(engine.client, base_image, "e2e")
    assert {m.uuid for m in again.migs} == set(gpusim.mig_uuids())
    assert not {m.uuid for m in again.migs} & set(migs)
    assert _probes(engine) == []


def test_only_the_probe_in_the_hosts_pid_namespace_sees_a_servers_processes(
    engine: Any, gpusim: Any, base_image: str
) -> None:
    """The driver names compute processes by host pid, so ``nvidia-smi`` in a container's own
    PID namespace lists none, even on the container's own device, while its memory in use
    shows; the probe runs with ``--pid=host``, sees every one, and names the container each
    runs in from its cgroup (GPU activity on a remote host comes from it)."""
    mig = gpusim.mig_uuids()[1]
    # The fake nvidia-smi in a container reports the host as of the container's start.
    outside = gpusim.start_process(mig, 3000)  # a pid of no process here: no container
    holder = engine.client.containers.run(
        base_image, ["sleep", "300"], detach=True, device_requests=[
            docker.types.DeviceRequest(driver="nvidia", device_ids=[mig],
                                       capabilities=[["gpu", "utility"]])])
    try:
        listing = holder.exec_run(["nvidia-smi", "-L"]).output.decode()
        report = holder.exec_run(["nvidia-smi", "-q", "-x"])
        assert report.exit_code == 0, report.output[-500:]
        inside = inventory.parse_nvidia_smi_xml(listing, report.output.decode())
        [own] = inside.migs
        assert own.uuid == mig and own.processes == () and own.memory_used_mib == 3000
        pid = start_sleeper(engine.client, holder.id, "/tmp/train.py")
        gpusim.start_process(mig, 1000, pid=pid)
        found = probe.read(engine.client, base_image, "e2e")
        assert found.by_uuid()[mig].processes == (GpuProcess(outside, 3000, None),
                                                  GpuProcess(pid, 1000, holder.id))
        assert engine.client.api.inspect_container(holder.id)["HostConfig"]["PidMode"] == ""
    finally:
        holder.remove(force=True)
    assert _probes(engine) == []


def test_a_probe_that_cannot_run_says_why_and_is_removed(
    engine: Any, gpusim: Any, base_image: str
) -> None:
    with pytest.raises(InventoryError, match="the GPU probe could not be created"):
        probe.read(engine.client, "gpuspawner-test/no-such-image:1", "e2e")
    assert _probes(engine) == []


def test_output_without_a_report_is_an_error_that_quotes_it() -> None:
    """What a host without a working driver prints instead of a report."""
    with pytest.raises(InventoryError, match="printed no report: NVIDIA-SMI has failed"):
        probe.parse_output("NVIDIA-SMI has failed because it couldn't communicate with the "
                           "NVIDIA driver.\n")


def test_a_probe_left_by_a_dead_hub_is_removed_by_the_next(
    engine: Any, gpusim: Any, base_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = engine.client.api
    left = api.create_container(base_image, command=["sleep", "600"],
                                labels=probe.labels("e2e"))
    api.start(left["Id"])
    other = api.create_container(base_image, command=["sleep", "600"],
                                 labels=probe.labels("another-hub"))
    monkeypatch.setattr(probe, "STALE_SECONDS", 0.0)
    import time

    time.sleep(1.1)  # Docker's Created has whole seconds
    probe.read(engine.client, base_image, "e2e")
    ids = {c["Id"] for c in _probes(engine)}
    assert left["Id"] not in ids  # ours, stale: removed
    assert other["Id"] in ids  # another hub's: never touched


def test_the_probes_cgroups_name_each_processs_container() -> None:
    """The cgroup section after the report: each pid's ``/proc/<pid>/cgroup``, whatever the
    cgroup driver; a pid whose file was not printed (it ended) or names no container has
    none."""
    one, two = "a" * 64, "b" * 64
    text = (f"{probe.PID}101\n0::/system.slice/docker-{one}.scope\n"
            f"{probe.PID}102\n12:memory:/docker/{two}\n1:cpu:/docker/{two}\n"
            f"{probe.PID}103\n0::/user.slice/session-1.scope\n"
            f"{probe.PID}104\n{probe.PID}oops\nnoise\n")
    assert probe.containers_of(text) == {101: one, 102: two}
