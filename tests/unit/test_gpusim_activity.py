"""The simulator's GPU activity answers as real NVML does, so the product's busy/idle view of a
device is tested against the driver's rules and not against our own guesses.

The rules (NVML API reference, nvidia-ml-py 13): a MIG device handle reports its own processes
and memory; a MIG-enabled GPU's handle reports the aggregate, only to root; a GPU with MIG off
reports its own, processes carrying gpuInstanceId/computeInstanceId 0xFFFFFFFF; utilization
is not sampled per MIG device nor on a MIG-enabled GPU. Expected values are written from the
topology (tests/gpusim/topologies/a100x4.yaml), not computed by the simulator.
"""

from __future__ import annotations

import inspect
import json
import subprocess
from collections.abc import Iterator
from types import ModuleType

import pynvml as real
import pytest

from .. import gpusim
from ..gpusim import BIN_DIR, Simulator

MIB = 1024 * 1024
NA = 0xFFFFFFFF
GPU1 = "GPU-8d2e4f60-1a3b-4c5d-8e7f-90a1b2c3d4e5"
GPU3 = "GPU-f0e1d2c3-b4a5-4968-8776-655443322110"  # MIG off
BIG = "MIG-5b6c7d8e-9f0a-5b1c-9d2e-3f4a5b6c7d80"  # GPU 1, 3g.40gb, gi 2, 40192 MiB
SMALL = "MIG-5b6c7d8e-9f0a-5b1c-9d2e-3f4a5b6c7d82"  # GPU 1, 1g.10gb, gi 9, 9728 MiB
PROCESS_CALLS = ("nvmlDeviceGetComputeRunningProcesses",
                 "nvmlDeviceGetComputeRunningProcesses_v2",
                 "nvmlDeviceGetComputeRunningProcesses_v3")


@pytest.fixture
def nvml(gpusim_local: Simulator) -> Iterator[ModuleType]:
    module = gpusim_local.nvml()
    module.nvmlInit()
    yield module
    module.nvmlShutdown()


def _procs(nvml: ModuleType, handle: object) -> list[tuple[int, int, int, int]]:
    """(pid, MiB, gi, ci) from every process-list name, which must agree."""
    answers = [
        sorted((p.pid, p.usedGpuMemory // MIB, p.gpuInstanceId, p.computeInstanceId)
               for p in getattr(nvml, name)(handle))
        for name in PROCESS_CALLS
    ]
    assert answers[0] == answers[1] == answers[2]
    return answers[0]


def _is_real(error: BaseException, name: str) -> None:
    """Raised as nvidia-ml-py raises it: same class name, code and message."""
    cls = getattr(real, name)
    assert type(error).__name__ == cls.__name__
    assert error.value == cls().value and str(error) == str(cls())


def test_names_signatures_and_types_match_nvidia_ml_py(
    nvml: ModuleType, gpusim_local: Simulator
) -> None:
    for name in (*PROCESS_CALLS, "nvmlDeviceGetGraphicsRunningProcesses",
                 "nvmlDeviceGetGraphicsRunningProcesses_v2",
                 "nvmlDeviceGetGraphicsRunningProcesses_v3", "nvmlDeviceGetUtilizationRates",
                 "nvmlStructToFriendlyObject"):
        assert list(inspect.signature(getattr(nvml, name)).parameters) == list(
            inspect.signature(getattr(real, name)).parameters), name
    for struct in ("c_nvmlProcessInfo_t", "c_nvmlProcessInfo_v2_t", "c_nvmlProcessInfo_v3_t",
                   "c_nvmlUtilization_t"):
        assert [f[0] for f in getattr(nvml, struct)._fields_] == [
            f[0] for f in getattr(real, struct)._fields_], struct
    pid = gpusim.start_process(gpusim_local.state_path, GPU3, 100)  # the plain function
    (process,) = nvml.nvmlDeviceGetComputeRunningProcesses(nvml.nvmlDeviceGetHandleByIndex(3))
    assert type(process).__name__ == "nvmlFriendlyObject"  # as the real list holds
    assert (process.pid, process.usedGpuMemory) == (pid, 100 * MIB)


def test_processes_show_on_their_mig_handle_only(nvml: ModuleType, gpusim_local: Simulator
                                                 ) -> None:
    first = gpusim_local.start_process(BIG, 1500)
    second = gpusim_local.start_process(BIG, 500)
    third = gpusim_local.start_process(SMALL, 700, pid=4242)
    assert (first, second, third) == (400000, 400001, 4242)
    big, small = nvml.nvmlDeviceGetHandleByUUID(BIG), nvml.nvmlDeviceGetHandleByUUID(SMALL)
    assert _procs(nvml, big) == [(400000, 1500, 2, 0), (400001, 500, 2, 0)]
    assert _procs(nvml, small) == [(4242, 700, 9, 0)]
    other = nvml.nvmlDeviceGetMigDeviceHandleByIndex(nvml.nvmlDeviceGetHandleByIndex(1), 1)
    assert _procs(nvml, other) == []
    for index in (0, 2, 3):
        assert _procs(nvml, nvml.nvmlDeviceGetHandleByIndex(index)) == []
    # As root the MIG-enabled parent lists every MIG device's processes, with their ids.
    assert _procs(nvml, nvml.nvmlDeviceGetHandleByIndex(1)) == [
        (4242, 700, 9, 0), (400000, 1500, 2, 0), (400001, 500, 2, 0)]
    assert nvml.nvmlDeviceGetGraphicsRunningProcesses(big) == []


def test_a_gpu_with_mig_off_reports_its_own(nvml: ModuleType, gpusim_local: Simulator) -> None:
    pid = gpusim_local.start_process(GPU3, 2048)
    gpusim_local.set_memory_used(GPU3, 100)
    gpusim_local.set_utilization(3, 87, 40)
    gpu = nvml.nvmlDeviceGetHandleByIndex(3)
    assert _procs(nvml, gpu) == [(pid, 2048, NA, NA)]
    memory = nvml.nvmlDeviceGetMemoryInfo(gpu)
    assert (memory.total, memory.used, memory.free) == (
        81920 * MIB, 2148 * MIB, (81920 - 2148) * MIB)
    rates = nvml.nvmlDeviceGetUtilizationRates(gpu)
    assert (rates.gpu, rates.memory) == (87, 40)
    assert type(rates).__name__ == "c_nvmlUtilization_t"


def test_memory_adds_up_on_mig_devices_and_their_parent(
    nvml: ModuleType, gpusim_local: Simulator
) -> None:
    gpusim_local.start_process(BIG, 1500)
    gpusim_local.start_process(SMALL, 700)
    gpusim_local.set_memory_used(SMALL, 300)  # leaked: counted, no process listed
    gpusim_local.set_memory_used(GPU1, 64)
    big, small = nvml.nvmlDeviceGetHandleByUUID(BIG), nvml.nvmlDeviceGetHandleByUUID(SMALL)
    memory = nvml.nvmlDeviceGetMemoryInfo(small)
    assert (memory.total, memory.used, memory.free) == (9728 * MIB, 1000 * MIB, 8728 * MIB)
    assert [p[0] for p in _procs(nvml, small)] == [400001]  # the leak lists no process
    assert nvml.nvmlDeviceGetMemoryInfo(big).used == 1500 * MIB
    parent = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(1))
    assert (parent.total, parent.used, parent.free) == (
        81920 * MIB, 2564 * MIB, (81920 - 2564) * MIB)
    v2 = nvml.nvmlDeviceGetMemoryInfo(small, version=nvml.nvmlMemory_v2)
    assert (v2.total, v2.reserved, v2.used, v2.free) == (9728 * MIB, 0, 1000 * MIB, 8728 * MIB)
    # More than the device holds: free stops at zero, as an unsigned count must.
    gpusim_local.set_memory_used(SMALL, 20000)
    assert nvml.nvmlDeviceGetMemoryInfo(small).free == 0


def test_non_root_is_refused_the_parent_but_not_its_mig_devices(
    nvml: ModuleType, gpusim_local: Simulator
) -> None:
    pid = gpusim_local.start_process(SMALL, 700)
    gpusim_local.set_root(False)
    parent = nvml.nvmlDeviceGetHandleByIndex(1)
    for call in (nvml.nvmlDeviceGetMemoryInfo, *(getattr(nvml, n) for n in PROCESS_CALLS)):
        with pytest.raises(nvml.NVMLError_NoPermission) as refused:
            call(parent)
        _is_real(refused.value, "NVMLError_NoPermission")
    small = nvml.nvmlDeviceGetHandleByUUID(SMALL)
    assert _procs(nvml, small) == [(pid, 700, 9, 0)]
    assert nvml.nvmlDeviceGetMemoryInfo(small).used == 700 * MIB
    assert _procs(nvml, nvml.nvmlDeviceGetHandleByIndex(3)) == []  # MIG off: anyone may ask


def test_utilization_is_not_supported_with_mig(nvml: ModuleType, gpusim_local: Simulator
                                               ) -> None:
    gpusim_local.set_utilization(1, 50, 20)
    gpu = nvml.nvmlDeviceGetHandleByIndex(1)
    for handle in (gpu, nvml.nvmlDeviceGetHandleByUUID(BIG)):
        with pytest.raises(nvml.NVMLError_NotSupported) as refused:
            nvml.nvmlDeviceGetUtilizationRates(handle)
        _is_real(refused.value, "NVMLError_NotSupported")
    rates = nvml.nvmlDeviceGetUtilizationRates(nvml.nvmlDeviceGetHandleByIndex(3))
    assert (rates.gpu, rates.memory) == (0, 0)  # idle until set


def test_end_process_removes_it_everywhere(nvml: ModuleType, gpusim_local: Simulator) -> None:
    pid = gpusim_local.start_process(BIG, 1000)
    gpusim_local.start_process(GPU3, 2000, pid=pid)  # one process on two devices
    keep = gpusim_local.start_process(BIG, 10)
    gpusim_local.end_process(pid)
    gpusim_local.end_process(pid)  # already gone: no error
    assert _procs(nvml, nvml.nvmlDeviceGetHandleByUUID(BIG)) == [(keep, 10, 2, 0)]
    assert _procs(nvml, nvml.nvmlDeviceGetHandleByIndex(3)) == []
    assert nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(3)).used == 0
    assert gpusim_local.start_process(BIG, 1) == keep + 1  # pids are never handed out again


def test_reboot_and_set_mig_end_every_process(gpusim_local: Simulator) -> None:
    gpusim_local.start_process(BIG, 1000)
    gpusim_local.start_process(GPU3, 1000)
    gpusim_local.set_memory_used(SMALL, 5)
    gpusim_local.set_utilization(3, 99, 99)
    state = gpusim_local.reboot(seed=1)
    for gpu in state["gpus"]:
        assert (gpu["processes"], gpu["memory_used_mib"]) == ([], 0)
        assert gpu["utilization"] == {"gpu": 0, "memory": 0}
        for mig in gpu["mig_devices"]:
            assert (mig["processes"], mig["memory_used_mib"]) == ([], 0)
    with pytest.raises(KeyError, match=BIG):  # the old MIG UUID is gone with the reboot
        gpusim_local.start_process(BIG, 1)
    assert gpusim_local.start_process(GPU3, 1) == 400002  # the counter survives a reboot
    kept = gpusim_local.state()["gpus"][2]["mig_devices"]
    gpusim_local.start_process(kept[0]["uuid"], 1000)
    for device in gpusim_local.set_mig(2, kept):  # destroyed and created again: idle
        assert (device["processes"], device["memory_used_mib"]) == ([], 0)
    assert gpusim_local.state()["gpus"][3]["processes"] == [{"pid": 400002, "used_mib": 1}]


def test_refusals_name_the_device(gpusim_local: Simulator) -> None:
    unknown = "MIG-00000000-0000-0000-0000-000000000000"
    for call in (lambda: gpusim_local.start_process(unknown, 1),
                 lambda: gpusim_local.set_memory_used(unknown, 1)):
        with pytest.raises(KeyError, match=unknown):
            call()
    with pytest.raises(ValueError, match=f"{GPU1} has MIG enabled"):
        gpusim_local.start_process(GPU1, 1)  # CUDA sees only its MIG devices
    pid = gpusim_local.start_process(BIG, 1)
    with pytest.raises(ValueError, match="already runs"):
        gpusim_local.start_process(BIG, 1, pid=pid)
    with pytest.raises(ValueError, match="outside 0..100"):
        gpusim_local.set_utilization(3, 101)
    with pytest.raises(KeyError):
        gpusim_local.set_utilization(9, 1)


def test_state_files_from_before_still_answer(nvml: ModuleType, gpusim_local: Simulator
                                              ) -> None:
    state = gpusim_local.state()
    state.pop("next_pid")
    for gpu in state["gpus"]:
        for key in ("processes", "memory_used_mib", "utilization"):
            gpu.pop(key)
        for mig in gpu["mig_devices"]:
            mig.pop("processes")
            mig.pop("memory_used_mib")
    gpusim_local.state_path.write_text(json.dumps(state))
    assert _procs(nvml, nvml.nvmlDeviceGetHandleByIndex(1)) == []
    assert nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByUUID(BIG)).used == 0
    assert nvml.nvmlDeviceGetUtilizationRates(nvml.nvmlDeviceGetHandleByIndex(3)).gpu == 0
    assert gpusim_local.start_process(BIG, 1) == 400000


def test_faults_apply_to_the_activity_calls(nvml: ModuleType, gpusim_local: Simulator) -> None:
    gpu, big = nvml.nvmlDeviceGetHandleByIndex(1), nvml.nvmlDeviceGetHandleByUUID(BIG)
    gpusim_local.lose_gpu(1)
    for name in (*PROCESS_CALLS, "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates"):
        for handle in (gpu, big):
            with pytest.raises(nvml.NVMLError_GpuIsLost):
                getattr(nvml, name)(handle)
    assert _procs(nvml, nvml.nvmlDeviceGetHandleByIndex(3)) == []  # the others answer
    gpusim_local.clear_faults()
    gpusim_local.fail_calls(1, "Unknown", functions=["nvmlDeviceGetUtilizationRates"])
    gpu3 = nvml.nvmlDeviceGetHandleByIndex(3)
    with pytest.raises(nvml.NVMLError_Unknown):
        nvml.nvmlDeviceGetUtilizationRates(gpu3)
    assert nvml.nvmlDeviceGetUtilizationRates(gpu3).gpu == 0
    # A driver without the versioned symbol: the unversioned wrapper raises what the real
    # one does, not an NVMLError.
    gpusim_local.fail_calls(1, "FunctionNotFound",
                            functions=["nvmlDeviceGetComputeRunningProcesses"])
    with pytest.raises(nvml.NVMLLibraryMismatchError) as mismatch:
        nvml.nvmlDeviceGetComputeRunningProcesses(gpu3)
    assert not isinstance(mismatch.value, nvml.NVMLError)
    assert issubclass(real.NVMLLibraryMismatchError, Exception) and not issubclass(
        real.NVMLLibraryMismatchError, real.NVMLError)


def test_nvidia_smi_memory_follows_the_same_rule(gpusim_local: Simulator) -> None:
    gpusim_local.start_process(BIG, 1500)
    gpusim_local.set_memory_used(SMALL, 300)
    gpusim_local.start_process(GPU3, 2048)

    def smi() -> list[str]:
        out = subprocess.run(
            [str(BIN_DIR / "nvidia-smi"), "--query-gpu=index,memory.used,memory.free",
             "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True)
        return out.stdout.splitlines()

    assert smi() == ["0, 0, 81920", "1, 1800, 80120", "2, 0, 81920", "3, 2048, 79872"]
    gpusim_local.set_root(False)
    assert smi()[1] == "1, [Insufficient Permissions], [Insufficient Permissions]"
    assert smi()[3] == "3, 2048, 79872"
