"""``nvidia-smi -L`` with ``nvidia-smi -q -x``: the inventory a host's own nvidia-smi gives
(what a probe container prints for a host whose NVML cannot be called from here).

Two oracles: a report written out by hand in the real tool's schema (``nvidia_smi_log``),
and, for the simulator's fake ``nvidia-smi``, the NVML backend reading the same simulated
host through the fake pynvml: two backends, one host, the same records.
"""

from __future__ import annotations

import subprocess

import pytest

from gpuspawner import inventory
from gpuspawner.inventory import InventoryError, parse_nvidia_smi_xml
from gpuspawner.records import GpuProcess, Inventory

from ..gpusim import BIN_DIR, Simulator, load_fake_nvml

LISTING = """\
GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-aaaaaaaa-0000-0000-0000-000000000000)
  MIG 3g.40gb     Device  0: (UUID: MIG-11111111-0000-0000-0000-000000000000)
  MIG 1g.10gb     Device  1: (UUID: MIG-22222222-0000-0000-0000-000000000000)
GPU 1: NVIDIA H100 PCIe (UUID: GPU-bbbbbbbb-0000-0000-0000-000000000000)
"""

REPORT = """\
<?xml version="1.0" ?>
<!DOCTYPE nvidia_smi_log SYSTEM "nvsmi_device_v12.dtd">
<nvidia_smi_log>
\t<timestamp>Sun Nov 29 09:00:00 2026</timestamp>
\t<driver_version>550.90.07</driver_version>
\t<cuda_version>12.4</cuda_version>
\t<attached_gpus>2</attached_gpus>
\t<gpu id="00000000:07:00.0">
\t\t<product_name>NVIDIA A100-SXM4-80GB</product_name>
\t\t<mig_mode><current_mig>Enabled</current_mig><pending_mig>Enabled</pending_mig></mig_mode>
\t\t<mig_devices>
\t\t\t<mig_device>
\t\t\t\t<index>0</index><gpu_instance_id>2</gpu_instance_id>
\t\t\t\t<compute_instance_id>0</compute_instance_id>
\t\t\t\t<fb_memory_usage><total>40192 MiB</total><reserved>0 MiB</reserved>
\t\t\t\t<used>6013 MiB</used><free>34179 MiB</free></fb_memory_usage>
\t\t\t</mig_device>
\t\t\t<mig_device>
\t\t\t\t<index>1</index><gpu_instance_id>9</gpu_instance_id>
\t\t\t\t<compute_instance_id>0</compute_instance_id>
\t\t\t\t<fb_memory_usage><total>9728 MiB</total><reserved>0 MiB</reserved>
\t\t\t\t<used>13 MiB</used><free>9715 MiB</free></fb_memory_usage>
\t\t\t</mig_device>
\t\t</mig_devices>
\t\t<uuid>GPU-aaaaaaaa-0000-0000-0000-000000000000</uuid>
\t\t<minor_number>0</minor_number>
\t\t<fb_memory_usage><total>81920 MiB</total><reserved>0 MiB</reserved>
\t\t<used>N/A</used><free>N/A</free></fb_memory_usage>
\t\t<utilization><gpu_util>N/A</gpu_util><memory_util>N/A</memory_util></utilization>
\t\t<processes>
\t\t\t<process_info>
\t\t\t\t<gpu_instance_id>2</gpu_instance_id><compute_instance_id>0</compute_instance_id>
\t\t\t\t<pid>4242</pid><type>C</type><process_name>python</process_name>
\t\t\t\t<used_memory>6000 MiB</used_memory>
\t\t\t</process_info>
\t\t</processes>
\t</gpu>
\t<gpu id="00000000:17:00.0">
\t\t<product_name>NVIDIA H100 PCIe</product_name>
\t\t<mig_mode><current_mig>Disabled</current_mig><pending_mig>Disabled</pending_mig></mig_mode>
\t\t<uuid>GPU-bbbbbbbb-0000-0000-0000-000000000000</uuid>
\t\t<minor_number>1</minor_number>
\t\t<fb_memory_usage><total>81559 MiB</total><reserved>0 MiB</reserved>
\t\t<used>2048 MiB</used><free>79511 MiB</free></fb_memory_usage>
\t\t<utilization><gpu_util>37 %</gpu_util><memory_util>5 %</memory_util></utilization>
\t\t<processes>
\t\t\t<process_info>
\t\t\t\t<gpu_instance_id>N/A</gpu_instance_id><compute_instance_id>N/A</compute_instance_id>
\t\t\t\t<pid>777</pid><type>C</type><process_name>train</process_name>
\t\t\t\t<used_memory>2000 MiB</used_memory>
\t\t\t</process_info>
\t\t</processes>
\t</gpu>
</nvidia_smi_log>
"""


def test_a_report_in_the_real_schema_gives_the_records():
    found = parse_nvidia_smi_xml(LISTING, REPORT)
    a100, h100 = found.gpus
    assert (found.driver_version, found.cuda_version) == ("550.90.07", "12.4")
    assert (a100.mig_enabled, a100.mig_pending, a100.memory_mib, a100.total_slices) == (
        True, True, 81920, 7)
    # A MIG-enabled GPU's own figures are its MIG devices', as in the NVML backend.
    assert (a100.memory_used_mib, a100.processes, a100.utilization) == (None, (), None)
    assert (h100.mig_enabled, h100.mig_pending, h100.memory_mib) == (False, False, 81559)
    assert (h100.memory_used_mib, h100.utilization) == (2048, 37)
    assert [(p.pid, p.used_mib) for p in h100.processes] == [(777, 2000)]
    big, small = found.migs
    assert (big.slot, big.profile, big.gi, big.ci, big.memory_mib) == ("0.0", "3g.40gb", 2, 0,
                                                                        40192)
    assert (big.memory_used_mib, [(p.pid, p.used_mib) for p in big.processes]) == (
        6013, [(4242, 6000)])
    assert (small.slot, small.profile, small.gi, small.memory_used_mib, small.processes) == (
        "0.1", "1g.10gb", 9, 13, ())
    assert (big.equivalents, small.equivalents) == (round(3 / 7, 4), round(1 / 7, 4))
    assert not found.problems


def test_a_broken_or_mismatched_report_is_an_error_that_says_so():
    with pytest.raises(InventoryError, match="no XML report"):
        parse_nvidia_smi_xml(LISTING, "NVIDIA-SMI has failed because it couldn't communicate")
    other = REPORT.replace("GPU-bbbbbbbb", "GPU-cccccccc")
    with pytest.raises(InventoryError, match="name different GPUs"):
        parse_nvidia_smi_xml(LISTING, other)


def view(inv: Inventory) -> tuple[list[tuple], list[tuple]]:
    """Everything both backends read of a host, as plain tuples."""
    return ([(g.index, g.uuid, g.name, g.memory_mib, g.mig_enabled, g.mig_pending,
              g.total_slices, g.memory_used_mib, g.processes, g.utilization)
             for g in inv.gpus],
            [(m.slot, m.uuid, m.parent_uuid, m.gi, m.ci, m.profile, m.memory_mib,
              m.slices, m.memory_used_mib, m.processes) for m in inv.migs])


def _smi(*argv: str) -> str:
    return subprocess.run([str(BIN_DIR / "nvidia-smi"), *argv], capture_output=True,
                          text=True, check=True).stdout


def test_the_fake_nvidia_smis_report_and_nvml_agree_on_a_working_host(gpusim_local: Simulator):
    """The simulator's fake nvidia-smi and fake NVML, over the same host with processes and
    memory in use: the two backends read the same inventory."""
    migs = gpusim_local.mig_uuids()
    first = gpusim_local.start_process(migs[0], 4000)
    gpusim_local.start_process(migs[0], 1000)
    gpusim_local.set_memory_used(migs[3], 2048)
    from_smi = parse_nvidia_smi_xml(_smi("-L"), _smi("-q", "-x"))
    from_nvml = inventory.read_nvml(load_fake_nvml())

    assert view(from_smi) == view(from_nvml)
    assert GpuProcess(first, 4000) in from_smi.migs[0].processes
    assert from_smi.driver_version == from_nvml.driver_version
