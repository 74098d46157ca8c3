"""The real NVML backend of inventory.py against the simulator's fake ``pynvml``."""

from __future__ import annotations

import pytest

from gpuspawner import inventory
from gpuspawner.inventory import InventoryError
from tests import gpusim


@pytest.fixture
def sim(tmp_path, monkeypatch):
    simulator = gpusim.Simulator(tmp_path / "state.json")
    monkeypatch.setenv("GPUSIM_STATE", str(simulator.state_path))
    simulator.install("a100x4")
    return simulator


@pytest.fixture
def nvml():
    return gpusim.load_fake_nvml()


def test_reads_every_gpu_and_slice(sim, nvml):
    inv = inventory.read_nvml(nvml)
    assert inv.source == "nvml" and inv.driver_version == "550.90.07"
    assert inv.cuda_version == "12.4"
    assert [g.mig_enabled for g in inv.gpus] == [True, True, True, False]
    assert all(g.total_slices == 7 for g in inv.gpus)
    state = sim.state()
    expected = {
        (m["uuid"], f"{g['index']}.{m['index']}", m["profile"], m["gi"])
        for g in state["gpus"]
        for m in g.get("mig_devices", [])
    }
    got = {(m.uuid, m.slot, m.profile, m.gi) for m in inv.migs}
    assert got == expected
    by_profile = {m.profile: m for m in inv.migs}
    assert by_profile["1g.10gb"].equivalents == round(1 / 7, 4)
    assert by_profile["3g.40gb"].slices == 3 and by_profile["2g.20gb"].memory_mib == 19968
    assert inv.problems == ()


def test_without_root_profiles_are_matched_by_size(sim, nvml):
    sim.set_root(False)
    inv = inventory.read_nvml(nvml)
    assert sorted({m.profile for m in inv.migs}) == ["1g.10gb", "2g.20gb", "3g.40gb"]
    assert any("not root" in p for p in inv.problems)


def test_reboot_is_seen_on_the_next_read(sim, nvml):
    before = inventory.read_nvml(nvml)
    sim.reboot(seed=7)
    after = inventory.read_nvml(nvml)
    assert not {m.uuid for m in before.migs} & {m.uuid for m in after.migs}
    assert sorted((m.gpu_index, m.profile, m.gi) for m in before.migs) == sorted(
        (m.gpu_index, m.profile, m.gi) for m in after.migs
    )
    assert [g.uuid for g in before.gpus] == [g.uuid for g in after.gpus]


def test_empty_mig_and_pending_changes_are_reported(sim, nvml):
    sim.install("empty-mig")
    inv = inventory.read_nvml(nvml)
    text = " ".join(inv.problems)
    assert "MIG enabled but no MIG devices" in text
    assert "pending a GPU reset" in text


def test_no_driver(monkeypatch, nvml, tmp_path):
    monkeypatch.setenv("GPUSIM_STATE", str(tmp_path / "absent.json"))
    with pytest.raises(InventoryError, match="NVML could not be initialised"):
        inventory.read_nvml(nvml)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert inventory.read("auto", nvml=nvml).source == "none"


def test_uuid_lookup(sim, nvml):
    inv = inventory.read_nvml(nvml)
    assert inventory.uuid_present(inv.gpus[0].uuid, nvml)
    assert not inventory.uuid_present("GPU-00000000-0000-0000-0000-000000000000", nvml)


def test_nvidia_smi_fallback_agrees_with_nvml(sim, nvml, monkeypatch):
    monkeypatch.setenv("PATH", f"{gpusim.BIN_DIR}:/usr/bin:/bin")
    smi = inventory.read_nvidia_smi()
    real = inventory.read_nvml(nvml)
    assert [(g.uuid, g.mig_enabled) for g in smi.gpus] == [
        (g.uuid, g.mig_enabled) for g in real.gpus
    ]
    assert {(m.uuid, m.slot, m.profile) for m in smi.migs} == {
        (m.uuid, m.slot, m.profile) for m in real.migs
    }


def test_activity_per_device_as_nvml_reports_it(sim, nvml):
    """Memory in use and compute processes on each MIG device and on a GPU with MIG off,
    utilization of that GPU; nothing claimed where NVML does not say (a MIG-enabled GPU's
    own figures are its slices'; no utilization per MIG device)."""
    state = sim.state()
    slice_uuid = state["gpus"][0]["mig_devices"][2]["uuid"]
    whole = state["gpus"][3]
    pid = sim.start_process(slice_uuid, 7000)
    sim.set_memory_used(slice_uuid, 90)
    sim.start_process(whole["uuid"], 20000, pid=77)
    sim.set_utilization(3, 85)
    inv = inventory.read_nvml(nvml)
    mig = next(m for m in inv.migs if m.uuid == slice_uuid)
    assert [(p.pid, p.used_mib) for p in mig.processes] == [(pid, 7000)]
    assert mig.memory_used_mib == 7090
    idle = next(m for m in inv.migs if m.uuid != slice_uuid)
    assert idle.processes == () and idle.memory_used_mib == 0
    gpu3 = inv.gpus[3]
    assert [(p.pid, p.used_mib) for p in gpu3.processes] == [(77, 20000)]
    assert gpu3.memory_used_mib == 20000 and gpu3.utilization == 85
    assert inv.gpus[0].utilization is None and inv.gpus[0].memory_used_mib is None
    sim.end_process(pid)
    after = next(m for m in inventory.read_nvml(nvml).migs if m.uuid == slice_uuid)
    assert after.processes == () and after.memory_used_mib == 90


def test_activity_that_nvml_refuses_leaves_the_device_available(sim, nvml):
    """A failing process or memory call is no reason to stop giving a device out."""
    slice_uuid = sim.state()["gpus"][0]["mig_devices"][0]["uuid"]
    sim.start_process(slice_uuid, 500)
    sim.fail_calls(1000, "NoPermission", functions=[
        "nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2"])
    inv = inventory.read_nvml(nvml, sleep=lambda s: None)
    mig = next(m for m in inv.migs if m.uuid == slice_uuid)
    assert mig.unavailable is None and mig.processes == () and mig.memory_used_mib == 500
    assert not any(g.unavailable for g in inv.gpus)
