"""The simulator answers like a real NVIDIA host, so tests passing on it mean something.

The fake ``pynvml`` is checked against the real nvidia-ml-py module for names, constants,
signatures and result fields, and for the errors a real driver gives; the fake ``nvidia-smi``
for its exact output formats; the fake hook for what it accepts and how it refuses; and the
simulated reboot for new MIG UUIDs with the stable facts kept.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import pynvml as real
import pytest

from .. import gpusim
from ..engine import EnginePaths
from ..gpusim import BIN_DIR, Simulator, TopologyError, load_fake_nvml

UUID = re.compile(r"^(GPU|MIG)-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SMI = str(BIN_DIR / "nvidia-smi")
HOOK = str(BIN_DIR / "nvidia-container-runtime-hook")


@pytest.fixture
def nvml(gpusim_local: Simulator) -> ModuleType:
    return gpusim_local.nvml()


def _init(nvml: ModuleType) -> None:
    nvml.nvmlInit()


# ------------------------------------------------------------------------------ topologies


@pytest.mark.parametrize("name", ["a100x4", "h100x2", "empty-mig"])
def test_topologies_expand_fully_with_real_looking_uuids(name: str) -> None:
    topology = gpusim.load_topology(name)
    assert [g["index"] for g in topology["gpus"]] == list(range(len(topology["gpus"])))
    for gpu in topology["gpus"]:
        assert UUID.match(gpu["uuid"]) and gpu["uuid"].startswith("GPU-")
        assert {"mig_capable", "mig_mode", "mig_pending", "max_mig_devices"} <= set(gpu)
        for mig in gpu["mig_devices"]:
            assert UUID.match(mig["uuid"]) and mig["uuid"].startswith("MIG-")
            assert {"index", "memory_mib", "slices", "gi", "ci", "profile"} <= set(mig)
        assert sum(m["slices"] for m in gpu["mig_devices"]) <= gpu["total_slices"]


def test_a100x4_has_the_mixed_layouts() -> None:
    gpus = gpusim.load_topology("a100x4")["gpus"]
    layouts = [sorted(m["profile"] for m in g["mig_devices"]) for g in gpus]
    assert layouts[0] == ["1g.10gb"] * 7
    assert layouts[1] == ["1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb"]
    assert layouts[2] == ["3g.40gb", "3g.40gb"]
    assert gpus[3]["mig_mode"] == "disabled" and layouts[3] == []


def test_derived_fields_and_bad_topologies(tmp_path: Path) -> None:
    base = {"gpus": [{"index": 0, "uuid": "GPU-a", "mig_mode": "enabled", "mig_devices": [
        {"profile": "3g.40gb", "uuid": "MIG-a", "gi": 2}]}]}
    mig = gpusim.expand(base)["gpus"][0]["mig_devices"][0]
    assert (mig["index"], mig["slices"], mig["memory_mib"], mig["ci"]) == (0, 3, 40960, 0)
    overfull = json.loads(json.dumps(base))
    overfull["gpus"][0]["mig_devices"].append({"profile": "7g.80gb", "uuid": "MIG-b", "gi": 0})
    with pytest.raises(TopologyError, match="more than its 7 slices"):
        gpusim.expand(overfull)
    off = json.loads(json.dumps(base))
    off["gpus"][0]["mig_mode"] = "disabled"
    with pytest.raises(TopologyError, match="MIG mode is disabled"):
        gpusim.expand(off)


# --------------------------------------------------------------- fake pynvml vs the real one


def test_names_constants_and_signatures_match_nvidia_ml_py(nvml: ModuleType) -> None:
    for name in dir(nvml):
        if name.startswith(("NVML_ERROR_", "NVML_GPU_INSTANCE_PROFILE_", "NVML_DEVICE_MIG_")):
            assert getattr(nvml, name) == getattr(real, name), name
    assert nvml.nvmlGpuInstanceProfileInfo_v2 == real.nvmlGpuInstanceProfileInfo_v2
    for name in dir(nvml):
        if name.startswith("nvml") and callable(getattr(nvml, name)) and name[4].isupper():
            ours, theirs = getattr(nvml, name), getattr(real, name)
            if inspect.isfunction(theirs):
                assert list(inspect.signature(ours).parameters) == list(
                    inspect.signature(theirs).parameters
                ), name
    for struct in ("c_nvmlMemory_t", "c_nvmlDeviceAttributes", "c_nvmlGpuInstanceProfileInfo_t",
                   "c_nvmlGpuInstanceProfileInfo_v2_t"):
        assert [f[0] for f in getattr(nvml, struct)._fields_] == [
            f[0] for f in getattr(real, struct)._fields_
        ], struct
    for code, cls in real.NVMLError._valClassMapping.items():
        assert nvml.NVMLError._valClassMapping[code].__name__ == cls.__name__
    error = nvml.NVMLError(nvml.NVML_ERROR_NOT_FOUND)
    assert isinstance(error, nvml.NVMLError_NotFound) and str(error) == "Not Found"
    assert str(nvml.NVMLError_NoPermission()) == "Insufficient Permissions"


def test_uninitialized_and_no_driver(nvml: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(nvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()
    with pytest.raises(nvml.NVMLError_Uninitialized):
        nvml.nvmlShutdown()
    monkeypatch.delenv("GPUSIM_STATE")
    with pytest.raises(nvml.NVMLError_LibraryNotFound, match="NVML Shared Library Not Found"):
        nvml.nvmlInit()
    monkeypatch.setenv("GPUSIM_STATE", "/nonexistent/state.json")
    with pytest.raises(nvml.NVMLError_LibraryNotFound):
        nvml.nvmlInit()
    with pytest.raises(nvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()


def test_system_and_gpus(nvml: ModuleType, gpusim_local: Simulator) -> None:
    _init(nvml)
    assert nvml.nvmlSystemGetDriverVersion() == "550.90.07"
    assert nvml.nvmlSystemGetCudaDriverVersion() == 12040
    assert nvml.nvmlSystemGetCudaDriverVersion_v2() == 12040
    assert nvml.nvmlDeviceGetCount() == 4
    handle = nvml.nvmlDeviceGetHandleByIndex(3)
    uuid = nvml.nvmlDeviceGetUUID(handle)
    assert uuid == gpusim_local.gpu_uuids()[3] and isinstance(uuid, str)
    assert nvml.nvmlDeviceGetName(handle) == "NVIDIA A100-SXM4-80GB"
    assert nvml.nvmlDeviceGetIndex(nvml.nvmlDeviceGetHandleByUUID(uuid)) == 3
    assert nvml.nvmlDeviceGetMemoryInfo(handle).total == 81920 * 1024 * 1024
    assert nvml.nvmlDeviceGetMigMode(handle) == [0, 0]
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(handle) == 0  # MIG off: zero, not 7
    with pytest.raises(nvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetHandleByIndex(4)
    with pytest.raises(nvml.NVMLError_NotFound):
        nvml.nvmlDeviceGetHandleByUUID("MIG-00000000-0000-0000-0000-000000000000")
    nvml.nvmlShutdown()


def test_mig_enumeration_like_a_real_driver(nvml: ModuleType, gpusim_local: Simulator) -> None:
    _init(nvml)
    gpu = nvml.nvmlDeviceGetHandleByIndex(1)
    assert nvml.nvmlDeviceGetMigMode(gpu) == [nvml.NVML_DEVICE_MIG_ENABLE] * 2
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(gpu) == 7
    found = []
    for index in range(7):
        try:
            found.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, index))
        except nvml.NVMLError_NotFound:
            assert index >= 4  # empty handle indexes
    with pytest.raises(nvml.NVMLError_InvalidArgument):
        nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 7)
    expected = gpusim_local.state()["gpus"][1]["mig_devices"]
    assert [nvml.nvmlDeviceGetUUID(h) for h in found] == [m["uuid"] for m in expected]
    big = found[0]
    assert nvml.nvmlDeviceIsMigDeviceHandle(big) and not nvml.nvmlDeviceIsMigDeviceHandle(gpu)
    parent = nvml.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(big)
    assert nvml.nvmlDeviceGetUUID(parent) == nvml.nvmlDeviceGetUUID(gpu)
    assert nvml.nvmlDeviceGetName(big) == "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
    assert (nvml.nvmlDeviceGetGpuInstanceId(big), nvml.nvmlDeviceGetComputeInstanceId(big)) == (
        2, 0)
    attributes = nvml.nvmlDeviceGetAttributes(big)
    assert (attributes.gpuInstanceSliceCount, attributes.computeInstanceSliceCount) == (3, 3)
    assert attributes.memorySizeMB == 40192 and attributes.multiprocessorCount == 42
    assert nvml.nvmlDeviceGetMemoryInfo(big).total == 40192 * 1024 * 1024
    by_uuid = nvml.nvmlDeviceGetHandleByUUID(expected[2]["uuid"])
    assert nvml.nvmlDeviceGetGpuInstanceId(by_uuid) == expected[2]["gi"]
    instance = nvml.nvmlDeviceGetGpuInstanceById(gpu, 2)
    info = nvml.nvmlGpuInstanceGetInfo(instance)
    assert (info.id, info.profileId) == (2, 9)
    assert nvml.nvmlDeviceGetUUID(info.device) == nvml.nvmlDeviceGetUUID(gpu)
    with pytest.raises(nvml.NVMLError_NotFound):
        nvml.nvmlDeviceGetGpuInstanceById(gpu, 5)


def test_gpu_instance_lookups_need_root(nvml: ModuleType, gpusim_local: Simulator) -> None:
    gpusim_local.set_root(False)
    _init(nvml)
    gpu = nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(nvml.NVMLError_NoPermission, match="Insufficient Permissions"):
        nvml.nvmlDeviceGetGpuInstanceById(gpu, 7)
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 0)  # enumeration still works
    assert nvml.nvmlDeviceGetGpuInstanceId(mig) == 7


def _calls_refused_without_root(nvml: ModuleType) -> set[tuple[str, str]]:
    """Every read-only call the product could make, on every kind of handle: those that
    raise NoPermission, as (function, what it was asked about)."""
    refused: set[tuple[str, str]] = set()

    def attempt(name: str, what: str, *args: Any) -> Any:
        try:
            return getattr(nvml, name)(*args)
        except nvml.NVMLError_NoPermission:
            refused.add((name, what))
        except nvml.NVMLError:
            pass
        return None

    _init(nvml)
    for name in ("nvmlSystemGetDriverVersion", "nvmlSystemGetCudaDriverVersion",
                 "nvmlDeviceGetCount"):
        attempt(name, "system")
    for index in range(nvml.nvmlDeviceGetCount()):
        gpu = attempt("nvmlDeviceGetHandleByIndex", "gpu", index)
        mig_on = nvml.nvmlDeviceGetMigMode(gpu)[0] == nvml.NVML_DEVICE_MIG_ENABLE
        what = "mig-enabled gpu" if mig_on else "gpu"
        uuid = attempt("nvmlDeviceGetUUID", what, gpu)
        attempt("nvmlDeviceGetHandleByUUID", what, uuid)
        for name in ("nvmlDeviceGetName", "nvmlDeviceGetIndex", "nvmlDeviceGetMemoryInfo",
                     "nvmlDeviceGetMigMode", "nvmlDeviceGetMaxMigDeviceCount",
                     "nvmlDeviceIsMigDeviceHandle", "nvmlDeviceGetAttributes"):
            attempt(name, what, gpu)
        for profile in range(nvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
            attempt("nvmlDeviceGetGpuInstanceProfileInfo", what, gpu, profile, 2)
        for gi in range(16):
            instance = attempt("nvmlDeviceGetGpuInstanceById", what, gpu, gi)
            if instance is not None:
                attempt("nvmlGpuInstanceGetInfo", "gpu instance", instance)
        for position in range(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu)):
            mig = attempt("nvmlDeviceGetMigDeviceHandleByIndex", what, gpu, position)
            if mig is None:
                continue
            attempt("nvmlDeviceGetHandleByUUID", "mig", nvml.nvmlDeviceGetUUID(mig))
            for name in ("nvmlDeviceGetUUID", "nvmlDeviceGetName", "nvmlDeviceGetMemoryInfo",
                         "nvmlDeviceGetGpuInstanceId", "nvmlDeviceGetComputeInstanceId",
                         "nvmlDeviceGetAttributes", "nvmlDeviceIsMigDeviceHandle",
                         "nvmlDeviceGetDeviceHandleFromMigDeviceHandle"):
                attempt(name, "mig", mig)
    nvml.nvmlShutdown()
    return refused


def test_non_root_is_refused_exactly_where_nvml_refuses(
    nvml: ModuleType, gpusim_local: Simulator
) -> None:
    # Real NVML refuses a non-root caller GPU-instance lookups and the aggregate memory of a
    # MIG-enabled GPU ("only if the caller has appropriate privileges"); MIG device handles,
    # their ids, attributes and memory answer. As root nothing is refused.
    assert _calls_refused_without_root(nvml) == set()
    gpusim_local.set_root(False)
    assert _calls_refused_without_root(nvml) == {
        ("nvmlDeviceGetMemoryInfo", "mig-enabled gpu"),
        ("nvmlDeviceGetGpuInstanceById", "mig-enabled gpu"),
    }
    _init(nvml)
    with pytest.raises(nvml.NVMLError_NoPermission, match="^Insufficient Permissions$"):
        nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(0))
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(nvml.nvmlDeviceGetHandleByIndex(0), 0)
    assert nvml.nvmlDeviceGetMemoryInfo(mig).total == 9728 * 1024 * 1024
    assert nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(3)).total == (
        81920 * 1024 * 1024)  # MIG off: a plain GPU answers anyone
    nvml.nvmlShutdown()


def test_a_lost_gpu_fails_on_its_own_handles_only(
    nvml: ModuleType, gpusim_local: Simulator
) -> None:
    state = gpusim_local.state()
    gpusim_local.lose_gpu(1)
    _init(nvml)
    assert nvml.nvmlDeviceGetCount() == 4  # still counted, as NVML counts a GPU off the bus
    with pytest.raises(nvml.NVMLError_GpuIsLost, match="^GPU is lost$"):
        nvml.nvmlDeviceGetHandleByIndex(1)
    for uuid in (state["gpus"][1]["uuid"], state["gpus"][1]["mig_devices"][0]["uuid"]):
        with pytest.raises(nvml.NVMLError_GpuIsLost):
            nvml.nvmlDeviceGetHandleByUUID(uuid)
    for index in (0, 2, 3):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        assert nvml.nvmlDeviceGetUUID(handle) == state["gpus"][index]["uuid"]
    nvml.nvmlShutdown()
    # Lost while a handle is held: calls on it, and on its MIG devices' handles, fail.
    gpusim_local.clear_faults()
    _init(nvml)
    gpu = nvml.nvmlDeviceGetHandleByIndex(1)
    mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 0)
    gpusim_local.lose_gpu(1)
    for call in (lambda: nvml.nvmlDeviceGetUUID(gpu), lambda: nvml.nvmlDeviceGetMigMode(gpu),
                 lambda: nvml.nvmlDeviceGetAttributes(mig), lambda: nvml.nvmlDeviceGetUUID(mig)):
        with pytest.raises(nvml.NVMLError_GpuIsLost):
            call()
    assert nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(0)) == "NVIDIA A100-SXM4-80GB"
    nvml.nvmlShutdown()


def test_transient_failures_then_answers(nvml: ModuleType, gpusim_local: Simulator) -> None:
    gpusim_local.fail_calls(2, "Unknown", functions=["nvmlDeviceGetCount"])
    _init(nvml)
    for _ in range(2):
        with pytest.raises(nvml.NVMLError_Unknown, match="^Unknown Error$"):
            nvml.nvmlDeviceGetCount()
    assert nvml.nvmlDeviceGetCount() == 4
    nvml.nvmlShutdown()
    gpusim_local.fail_calls(1, "Timeout")  # any call, nvmlInit included
    with pytest.raises(nvml.NVMLError) as info:
        nvml.nvmlInit()
    assert info.value.value == nvml.NVML_ERROR_TIMEOUT and str(info.value) == "Timeout"
    _init(nvml)
    assert nvml.nvmlDeviceGetCount() == 4
    nvml.nvmlShutdown()


def test_a_fault_on_one_function_of_one_gpu(nvml: ModuleType, gpusim_local: Simulator) -> None:
    gpusim_local.fail_gpu(2, "NoPermission", functions=["nvmlDeviceGetName"])
    _init(nvml)
    with pytest.raises(nvml.NVMLError_NoPermission):
        nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(2))
    assert nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(2)) == (
        gpusim_local.gpu_uuids()[2])
    assert nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(1)) == "NVIDIA A100-SXM4-80GB"
    nvml.nvmlShutdown()
    with pytest.raises(ValueError, match="no NVML error named 'Lost'"):
        gpusim_local.fail_gpu(0, "Lost")


def test_slow_nvml(nvml: ModuleType, gpusim_local: Simulator) -> None:
    import time

    gpusim_local.set_nvml_delay(0.05)
    started = time.monotonic()
    _init(nvml)
    assert nvml.nvmlDeviceGetCount() == 4
    nvml.nvmlShutdown()  # not delayed
    assert 0.1 <= time.monotonic() - started < 2
    gpusim_local.clear_faults()
    assert "faults" not in gpusim_local.state()


def test_faults_survive_mig_changes(gpusim_local: Simulator) -> None:
    gpusim_local.lose_gpu(3)
    gpusim_local.set_nvml_delay(0.01)
    gpusim_local.set_mig(0, ["3g.40gb"])
    gpusim_local.reboot()
    faults = gpusim_local.state()["faults"]
    assert faults["delay_s"] == 0.01
    assert faults["rules"][0]["gpu"] == gpusim_local.gpu_uuids()[3]
    assert faults["rules"][0]["error"] == real.NVML_ERROR_GPU_IS_LOST


def test_profile_table(nvml: ModuleType) -> None:
    _init(nvml)
    gpu = nvml.nvmlDeviceGetHandleByIndex(0)
    rows = {}
    for index in range(nvml.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(gpu, index)
        except nvml.NVMLError_NotSupported:
            continue
        rows[index] = (info.id, info.name, info.sliceCount, info.instanceCount)
    assert rows[nvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE] == (19, b"MIG 1g.10gb", 1, 7)
    assert rows[nvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2] == (15, b"MIG 1g.20gb", 1, 4)
    assert rows[nvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE][:2] == (14, b"MIG 2g.20gb")
    assert rows[nvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE][:2] == (9, b"MIG 3g.40gb")
    assert rows[nvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE][:2] == (5, b"MIG 4g.40gb")
    assert rows[nvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE][:2] == (0, b"MIG 7g.80gb")
    v1 = nvml.nvmlDeviceGetGpuInstanceProfileInfoV(gpu, 2, 1)
    assert v1.id == 9 and not hasattr(v1, "name")
    # As in nvidia-ml-py: the version argument is 1 or 2, not the struct-version constant.
    with pytest.raises(nvml.NVMLError_FunctionNotFound):
        nvml.nvmlDeviceGetGpuInstanceProfileInfoV(gpu, 0, nvml.nvmlGpuInstanceProfileInfo_v2)
    with pytest.raises(real.NVMLError_FunctionNotFound):
        real.nvmlDeviceGetGpuInstanceProfileInfoV(None, 0, real.nvmlGpuInstanceProfileInfo_v2)


def test_not_mig_capable(nvml: ModuleType, gpusim_local: Simulator) -> None:
    gpusim_local.install({"gpus": [{"index": 0, "uuid": "GPU-1", "name": "NVIDIA L40S",
                                    "memory_mib": 46068, "mig_capable": False}]})
    _init(nvml)
    gpu = nvml.nvmlDeviceGetHandleByIndex(0)
    with pytest.raises(nvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetMigMode(gpu)
    with pytest.raises(nvml.NVMLError_NotSupported):
        nvml.nvmlDeviceGetGpuInstanceProfileInfo(gpu, 0)
    assert nvml.nvmlDeviceGetMaxMigDeviceCount(gpu) == 0


def test_a_change_of_the_host_is_seen_at_once(nvml: ModuleType, gpusim_local: Simulator) -> None:
    # A driver answers from the hardware, not from a copy taken at nvmlInit: a MIG device
    # destroyed after its handle was taken is no longer found, a GPU gone is lost.
    _init(nvml)
    gpu = nvml.nvmlDeviceGetHandleByIndex(0)
    old = nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, 0)
    before = nvml.nvmlDeviceGetUUID(old)
    gpusim_local.reboot()
    with pytest.raises(nvml.NVMLError_NotFound, match="Not Found"):
        nvml.nvmlDeviceGetUUID(old)  # a handle from before the reboot
    fresh = nvml.nvmlDeviceGetMigDeviceHandleByIndex(nvml.nvmlDeviceGetHandleByIndex(0), 0)
    assert nvml.nvmlDeviceGetUUID(fresh) != before
    last = nvml.nvmlDeviceGetHandleByIndex(3)
    gpusim_local.remove_gpu(3)
    with pytest.raises(nvml.NVMLError_GpuIsLost, match="GPU is lost"):
        nvml.nvmlDeviceGetUUID(last)
    nvml.nvmlShutdown()
    _init(nvml)
    assert nvml.nvmlDeviceGetCount() == 3
    nvml.nvmlShutdown()


# --------------------------------------------------------------------------------- reboot


def test_reboot_recreates_every_mig_device(gpusim_local: Simulator) -> None:
    before = gpusim_local.state()
    after = gpusim_local.reboot(seed=7)
    assert not set(gpusim_local.mig_uuids()) & {
        m["uuid"] for g in before["gpus"] for m in g["mig_devices"]
    }
    for old, new in zip(before["gpus"], after["gpus"], strict=True):
        assert new["uuid"] == old["uuid"]
        assert Counter((m["profile"], m["gi"]) for m in new["mig_devices"]) == Counter(
            (m["profile"], m["gi"]) for m in old["mig_devices"]
        )
        assert [m["index"] for m in new["mig_devices"]] == list(range(len(old["mig_devices"])))
        assert all(UUID.match(m["uuid"]) for m in new["mig_devices"])
    assert gpusim.read_state(gpusim_local.state_path) == after


def test_reboot_applies_pending_mig_modes(gpusim_local: Simulator) -> None:
    gpusim_local.install("empty-mig")
    gpusim_local.set_pending_mig(0, "disabled")
    state = gpusim_local.reboot()
    assert [(g["mig_mode"], g["mig_pending"]) for g in state["gpus"]] == [
        ("disabled", "disabled"), ("enabled", "enabled")]
    assert state["gpus"][1]["mig_devices"] == []  # MIG just turned on: no instances yet
    gpusim_local.install("a100x4")
    gpusim_local.set_pending_mig(1, "disabled")
    state = gpusim_local.reboot()
    assert state["gpus"][1]["mig_mode"] == "disabled" and state["gpus"][1]["mig_devices"] == []


def test_remove_gpu_and_set_mig(gpusim_local: Simulator) -> None:
    gone = gpusim_local.gpu_uuids()[1]
    state = gpusim_local.remove_gpu(1)
    assert gone not in gpusim_local.gpu_uuids() and [g["index"] for g in state["gpus"]] == [0, 1, 2]
    devices = gpusim_local.set_mig(0, ["3g.40gb", "2g.20gb", "1g.10gb"])
    assert [(d["profile"], d["index"], d["memory_mib"]) for d in devices] == [
        ("3g.40gb", 0, 40192), ("2g.20gb", 1, 19968), ("1g.10gb", 2, 9728)]
    assert len({d["gi"] for d in devices}) == 3
    with pytest.raises(TopologyError, match="enable it first"):
        gpusim_local.set_mig(2, ["1g.10gb"])  # old GPU 3, MIG off


# ----------------------------------------------------------------------------- nvidia-smi


def _smi(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SMI, *args], capture_output=True, text=True, env=env, check=False)


def test_nvidia_smi_list(gpusim_local: Simulator) -> None:
    out = _smi("-L")
    state = gpusim_local.state()
    lines = out.stdout.splitlines()
    assert out.returncode == 0
    assert lines[0] == f"GPU 0: NVIDIA A100-SXM4-80GB (UUID: {state['gpus'][0]['uuid']})"
    mig = state["gpus"][1]["mig_devices"][0]
    assert f"  MIG 3g.40gb     Device  0: (UUID: {mig['uuid']})" in lines
    assert lines[-1].startswith("GPU 3: ") and len(lines) == 4 + 7 + 4 + 2


def test_nvidia_smi_query(gpusim_local: Simulator) -> None:
    gpusim_local.install("empty-mig")
    fields = "index,uuid,name,memory.total,mig.mode.current,mig.mode.pending,driver_version"
    out = _smi(f"--query-gpu={fields}", "--format=csv").stdout.splitlines()
    assert out[0] == ("index, uuid, name, memory.total [MiB], mig.mode.current, "
                      "mig.mode.pending, driver_version")
    uuid = gpusim_local.gpu_uuids()[1]
    assert out[2] == f"1, {uuid}, NVIDIA A100-SXM4-80GB, 81920 MiB, Disabled, Enabled, 550.90.07"
    bare = _smi("--query-gpu=index,memory.total", "--format=csv,noheader,nounits").stdout
    assert bare == "0, 81920\n1, 81920\n"
    gpusim_local.install({"gpus": [{"index": 0, "uuid": "GPU-1", "name": "NVIDIA L40S",
                                    "memory_mib": 46068, "mig_capable": False}]})
    na = _smi("--query-gpu=mig.mode.current", "--format=csv,noheader").stdout
    assert na == "[N/A]\n"
    bad = _smi("--query-gpu=nonsense", "--format=csv")
    assert bad.returncode == 2 and 'Field "nonsense" is not a valid field' in bad.stdout


def test_nvidia_smi_without_driver(gpusim_local: Simulator) -> None:
    env = {k: v for k, v in os.environ.items() if k != "GPUSIM_STATE"}
    out = _smi("-L", env=env)
    assert out.returncode == 9
    assert out.stdout == (
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
        "Make sure that the latest NVIDIA driver is installed and running.\n"
    )


# ----------------------------------------------------------------------------------- hook


def _hook(tmp_path: Path, env_entries: list[str], extra_env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "config.json").write_text(json.dumps({"process": {"env": env_entries}}))
    env = {**os.environ, **(extra_env or {})}
    state = json.dumps({"ociVersion": "1.0.2", "id": "abc", "pid": 1, "bundle": str(bundle)})
    return subprocess.run([HOOK, "prestart"], input=state, capture_output=True, text=True,
                          env=env, check=False)


def test_hook_accepts_current_devices(gpusim_local: Simulator, tmp_path: Path) -> None:
    state = gpusim_local.state()
    mig = state["gpus"][1]["mig_devices"][2]
    for value in (mig["uuid"], f"1:{mig['index']}", "3", state["gpus"][3]["uuid"], "all",
                  "none", "void", f"{mig['uuid']},{state['gpus'][3]['uuid']}"):
        done = _hook(tmp_path, ["PATH=/bin", f"NVIDIA_VISIBLE_DEVICES={value}"])
        assert (done.returncode, done.stderr) == (0, ""), value
    assert _hook(tmp_path, ["PATH=/bin"]).returncode == 0  # no GPU asked for
    calls = gpusim_local.hook_calls()
    assert len(calls) == 9 and all(c["ok"] for c in calls)
    assert calls[0]["devices"] == [mig["uuid"]] and calls[0]["id"] == "abc"


def test_hook_refuses_unknown_devices(gpusim_local: Simulator, tmp_path: Path) -> None:
    old = gpusim_local.state()["gpus"][0]["mig_devices"][0]["uuid"]
    gpusim_local.reboot()
    done = _hook(tmp_path, [f"NVIDIA_VISIBLE_DEVICES={old}"])
    assert done.returncode == 1
    assert done.stderr == (
        "Auto-detected mode as 'legacy'\n"
        f"nvidia-container-cli: device error: {old}: unknown device\n"
    )
    assert _hook(tmp_path, ["NVIDIA_VISIBLE_DEVICES=3:0"]).returncode == 1  # MIG off there
    assert _hook(tmp_path, ["NVIDIA_VISIBLE_DEVICES=4"]).returncode == 1
    last = gpusim_local.hook_calls()[-1]
    assert not last["ok"] and "4: unknown device" in last["error"]
    no_driver = _hook(tmp_path, ["NVIDIA_VISIBLE_DEVICES=0"], {"GPUSIM_STATE": "/nonexistent"})
    assert no_driver.returncode == 1 and "load library failed" in no_driver.stderr


# -------------------------------------------------------------------------------- runtime

RUNTIME = str(BIN_DIR / "nvidia-container-runtime")


def _runtime(tmp_path: Path, argv: list[str], env_entries: list[str],
             hooks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the fake runtime with a stand-in ``runc`` first on PATH, check that ``runc`` got
    the arguments unchanged, and return the bundle's config.json afterwards."""
    bundle = tmp_path / "bundle"
    bundle.mkdir(exist_ok=True)
    config: dict[str, Any] = {"process": {"env": env_entries}}
    if hooks:
        config["hooks"] = hooks
    (bundle / "config.json").write_text(json.dumps(config))
    fake_runc = tmp_path / "bin" / "runc"
    fake_runc.parent.mkdir(exist_ok=True)
    fake_runc.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RUNC_ARGV"\n')
    fake_runc.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_runc.parent}:{os.environ['PATH']}",
           "RUNC_ARGV": str(tmp_path / "argv"), "GPUSIM_STATE": "/the/state"}
    argv = [a.replace("BUNDLE", str(bundle)) for a in argv]
    done = subprocess.run([RUNTIME, *argv], capture_output=True, text=True, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "argv").read_text().splitlines() == argv
    return json.loads((bundle / "config.json").read_text())


def test_runtime_adds_the_hook_when_the_environment_names_gpus(tmp_path: Path) -> None:
    create = ["--root", "/run/runc", "--log", "log.json", "--log-format", "json", "create",
              "--bundle", "BUNDLE", "--pid-file", "init.pid", "abc"]
    config = _runtime(tmp_path, create, ["NVIDIA_VISIBLE_DEVICES=void",
                                         "NVIDIA_VISIBLE_DEVICES=all"])
    [hook] = config["hooks"]["prestart"]
    assert hook["path"] == str(BIN_DIR / "nvidia-container-runtime-hook")
    assert hook["args"] == ["nvidia-container-runtime-hook", "prestart"]
    assert "GPUSIM_STATE=/the/state" in hook["env"]  # the hook reads the same host
    for value in ("none", ""):  # the hook runs; it hands over no device
        config = _runtime(tmp_path, ["create", "-b", "BUNDLE", "abc"],
                          [f"NVIDIA_VISIBLE_DEVICES={value}"])
        assert len(config["hooks"]["prestart"]) == 1


def test_runtime_leaves_other_containers_and_commands_alone(tmp_path: Path) -> None:
    for env_entries in (["PATH=/bin"], ["NVIDIA_VISIBLE_DEVICES=all",
                                        "NVIDIA_VISIBLE_DEVICES=void"]):
        config = _runtime(tmp_path, ["create", "--bundle=BUNDLE", "abc"], env_entries)
        assert "hooks" not in config
    # Docker added the hook itself for a DeviceRequest: the runtime adds no second one.
    docker_hook = {"path": "/usr/bin/nvidia-container-runtime-hook", "args": ["x", "prestart"]}
    config = _runtime(tmp_path, ["create", "--bundle", "BUNDLE", "abc"],
                      ["NVIDIA_VISIBLE_DEVICES=MIG-1"], {"prestart": [docker_hook]})
    assert config["hooks"]["prestart"] == [docker_hook]
    # Not a create (an option's value that reads "create" is no subcommand either).
    for argv in (["--root", "create", "start", "abc"], ["delete", "abc"]):
        config = _runtime(tmp_path, argv, ["NVIDIA_VISIBLE_DEVICES=all"])
        assert "hooks" not in config


def test_an_engine_beside_another_shares_no_bridge_or_subnet() -> None:
    for number in range(200):
        main = EnginePaths.from_env({"GPUSPAWNER_TEST_ROOT": f"/var/lib/root-{number}"})
        second = main.beside("nvidia-default")
        assert second.bridge != main.bridge and second.gateway_cidr != main.gateway_cidr
        assert second.socket != main.socket
        assert Path("/var/lib", f"root-{number}") in second.data_root.parents
    default = EnginePaths.from_env({}).beside("nvidia-default")
    assert default.bridge != EnginePaths.from_env({}).bridge


def test_two_workers_engines_share_no_bridge_subnet_or_root() -> None:
    """pytest-xdist workers each run an engine and its neighbours (nvidia-default, a remote
    host): six engines in one run, none sharing a bridge, a subnet or a socket, whatever the
    root."""
    for root in ({}, {"GPUSPAWNER_TEST_ROOT": "/var/lib/elsewhere"}):
        engines = []
        for worker in ("gw0", "gw1"):
            main = EnginePaths.from_env({**root, "PYTEST_XDIST_WORKER": worker})
            engines += [main, main.beside("nvidia-default"), main.beside("remote-h100")]
        for attribute in ("bridge", "gateway_cidr", "socket", "data_root"):
            values = [getattr(paths, attribute) for paths in engines]
            assert len(set(values)) == 6, (attribute, values)
        assert all(len(str(paths.socket)) < 100 for paths in engines)  # a unix socket's limit


def test_one_sessions_neighbour_engines_share_no_bridge_or_subnet() -> None:
    for environ in ({}, {"GPUSPAWNER_TEST_ROOT": "/var/lib/elsewhere"}):
        main = EnginePaths.from_env(environ)
        engines = [main, main.beside("nvidia-default"), main.beside("remote-h100")]
        assert len({p.bridge for p in engines}) == len({p.gateway_cidr for p in engines}) == 3


def test_copies_of_the_fake_nvml_loaded_at_once_are_each_whole():
    """Tests load fresh copies from several threads (a scenario's watcher beside the test):
    each copy's error classes and fault hooks are its own, and none fails to load."""
    with ThreadPoolExecutor(4) as pool:
        copies = list(pool.map(lambda _n: load_fake_nvml(), range(40)))
    for nvml in copies:
        assert nvml.NVMLError_NotFound is nvml.NVMLError._valClassMapping[
            nvml.NVML_ERROR_NOT_FOUND]
        assert issubclass(nvml.NVMLError_NoPermission, nvml.NVMLError)
        assert nvml.nvmlDeviceGetCount.__wrapped__ is not None  # the fault hook is on
