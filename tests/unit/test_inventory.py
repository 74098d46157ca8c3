"""The inventory's text and file backends, and the fallbacks of ``auto``."""

from __future__ import annotations

import pytest

from gpuspawner import inventory
from gpuspawner.inventory import InventoryError

LISTING = """\
GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-11111111-2222-3333-4444-555555555555)
  MIG 3g.40gb     Device  0: (UUID: MIG-aaaaaaaa-2222-3333-4444-555555555555)
  MIG 1g.10gb     Device  1: (UUID: MIG-bbbbbbbb-2222-3333-4444-555555555555)
GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-66666666-2222-3333-4444-555555555555)
GPU 2: NVIDIA A30 (UUID: GPU-77777777-2222-3333-4444-555555555555)
"""
QUERY = "".join(
    f"{i}, GPU-{u}-2222-3333-4444-555555555555, {name}, {mem}, {cur}, {pend}, 550.90.07\n"
    for i, u, name, mem, cur, pend in [
        (0, "11111111", "NVIDIA A100-SXM4-80GB", 81920, "Enabled", "Enabled"),
        (1, "66666666", "NVIDIA A100-SXM4-80GB", 81920, "Disabled", "Enabled"),
        (2, "77777777", "NVIDIA A30", 24576, "Enabled", "Enabled"),
    ]
)


def test_nvidia_smi_text():
    inv = inventory.parse_nvidia_smi(LISTING, QUERY)
    assert inv.source == "nvidia-smi" and inv.driver_version == "550.90.07"
    assert [g.index for g in inv.gpus] == [0, 1, 2]
    assert inv.gpus[0].mig_enabled and not inv.gpus[1].mig_enabled
    assert inv.gpus[1].mig_pending is True
    assert [m.slot for m in inv.migs] == ["0.0", "0.1"]
    big, small = inv.migs
    assert (big.profile, big.slices, big.equivalents) == ("3g.40gb", 3, round(3 / 7, 4))
    assert small.parent_uuid == inv.gpus[0].uuid and small.gi is None
    assert inv.gpus[2].total_slices == 4  # an A30 has 4 compute slices, not 7
    text = " ".join(inv.problems)
    assert "GPU 1" in text and "pending a GPU reset" in text
    assert "GPU 2" in text and "MIG enabled but no MIG devices" in text


def test_topology_file(tmp_path):
    path = tmp_path / "host.yaml"
    path.write_text(
        """
driver_version: "550.90.07"
cuda_version: "12.4"
gpus:
  - index: 0
    uuid: GPU-0
    name: NVIDIA H100 80GB HBM3
    memory_mib: 81559
    mig_mode: enabled
    total_slices: 7
    mig_devices:
      - {index: 0, profile: 3g.40gb, uuid: MIG-a, gi: 2, ci: 0}
      - {index: 2, profile: 1g.10gb, uuid: MIG-b, gi: 9, ci: 0, memory_mib: 9856, slices: 1}
  - {index: 1, uuid: GPU-1, name: NVIDIA H100 80GB HBM3, memory_mib: 81559, mig_mode: disabled}
"""
    )
    inv = inventory.read(topology_file=path)
    assert inv.source == "file" and inv.cuda_version == "12.4"
    assert [m.slot for m in inv.migs] == ["0.0", "0.2"]
    assert inv.migs[0].memory_mib == 40 * 1024 and inv.migs[1].memory_mib == 9856
    assert inv.migs[0].gi == 2 and not inv.gpus[1].mig_enabled
    assert inv.by_uuid()["MIG-b"].equivalents == round(1 / 7, 4)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("gpus: 3", "expected a mapping with a 'gpus' list"),
        ("gpus:\n  - {index: 0}", "malformed topology"),
        ("gpus:\n  - {index: 0, uuid: GPU-0, mig_mode: maybe}", "MIG mode 'maybe'"),
        ("gpus: [", "not valid YAML"),
    ],
)
def test_bad_topology_files_say_what_is_wrong(tmp_path, text, fragment):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(InventoryError, match=fragment):
        inventory.read("file", topology_file=path)


def test_missing_topology_file():
    with pytest.raises(InventoryError, match="cannot be read"):
        inventory.read("file", topology_file="/nonexistent/topology.yaml")


def test_auto_without_any_driver_is_a_cpu_host(monkeypatch):
    class NoNVML:
        class NVMLError(Exception):
            pass

        def nvmlInit(self):
            raise self.NVMLError("NVML Shared Library Not Found")

    fake = NoNVML()
    monkeypatch.setenv("PATH", "/nonexistent")
    inv = inventory.read("auto", nvml=fake)
    assert inv.source == "none" and not inv.gpus
    assert "NVML Shared Library Not Found" in inv.problems[0]
    assert "nvidia-smi is not on PATH" in inv.problems[0]


def test_explicit_sources_are_loud():
    with pytest.raises(InventoryError, match="unknown inventory source"):
        inventory.read("magic")
    with pytest.raises(InventoryError, match="needs a topology file"):
        inventory.read("file")
