"""NVML as real hosts give it: a non-root hub, a GPU lost, MIG devices re-created while they
are read, a driver that hiccups or crawls. inventory.read_nvml against the simulator's fake
``pynvml``, with the faults switched on through the simulator's state.

The rules the expected values come from (docs/inventory.md): a non-root read lists every GPU
and MIG device; a failure on one GPU makes that GPU and its MIG devices unavailable with the
reason, keeps them listed, and leaves the others allocatable; Timeout, NotReady and Unknown
are tried three times; nothing but InventoryError ever leaves read_nvml. Expected values are
written from the topology (tests/gpusim/topologies/a100x4.yaml), never computed by the code
under test.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from types import ModuleType

import pytest

from gpuspawner import allocator, form, health, inventory
from gpuspawner.allocator import Choice, Refusal
from gpuspawner.inventory import InventoryError
from gpuspawner.policy import Policy
from gpuspawner.profiles import Profile
from gpuspawner.records import RUNNING, Allocation, Inventory
from gpuspawner.snapshot import Snapshot
from tests import gpusim

from .hosts import Request, holding, limits

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)

# a100x4, as the topology file writes it.
GPU_UUIDS = [
    "GPU-3f1c9a2e-7b45-4d08-9e6a-1c2b3d4e5f60",
    "GPU-8d2e4f60-1a3b-4c5d-8e7f-90a1b2c3d4e5",
    "GPU-c4d5e6f7-0819-4a2b-b3c4-d5e6f7081920",
    "GPU-f0e1d2c3-b4a5-4968-8776-655443322110",
]
GPU0_MIGS = {f"MIG-0a1b2c3d-4e5f-5a6b-8c7d-9e0f1a2b3c4{n}" for n in range(7)}
GPU1_MIGS = {  # uuid -> (slot, profile, gi, memory MiB)
    "MIG-5b6c7d8e-9f0a-5b1c-9d2e-3f4a5b6c7d80": ("1.0", "3g.40gb", 2, 40192),
    "MIG-5b6c7d8e-9f0a-5b1c-9d2e-3f4a5b6c7d81": ("1.1", "2g.20gb", 3, 19968),
    "MIG-5b6c7d8e-9f0a-5b1c-9d2e-3f4a5b6c7d82": ("1.2", "1g.10gb", 9, 9728),
    "MIG-5b6c7d8e-9f0a-5b1c-9d2e-3f4a5b6c7d83": ("1.3", "1g.10gb", 10, 9728),
}
GPU2_MIGS = {"MIG-e7f80912-a3b4-5c5d-ae6f-708192a3b4c0", "MIG-e7f80912-a3b4-5c5d-ae6f-708192a3b4c1"}
ALL_MIGS = GPU0_MIGS | set(GPU1_MIGS) | GPU2_MIGS


@pytest.fixture
def sim(tmp_path, monkeypatch) -> gpusim.Simulator:
    simulator = gpusim.Simulator(tmp_path / "state.json")
    monkeypatch.setenv("GPUSIM_STATE", str(simulator.state_path))
    monkeypatch.setenv("PATH", "/nonexistent")  # no nvidia-smi to fall back on
    simulator.install("a100x4")
    return simulator


@pytest.fixture
def nvml() -> ModuleType:
    return gpusim.load_fake_nvml()


class Sleeps(list):
    """The pauses a read takes, recorded instead of slept."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def read(nvml: ModuleType, previous: Inventory | None = None) -> tuple[Inventory, Sleeps]:
    sleeps = Sleeps()
    return inventory.read_nvml(nvml, previous=previous, sleep=sleeps), sleeps


def available(inv: Inventory) -> set[str]:
    return {d.uuid for d in (*inv.gpus, *inv.migs) if not allocator.unavailable(inv, d)}


def snapshot(inv: Inventory, allocations=()) -> Snapshot:
    return Snapshot(inv, tuple(allocations), Policy.default(), frozenset(), NOW)


# ------------------------------------------------------------------------------- non-root


def test_non_root_lists_every_gpu_and_mig_device(sim, nvml):
    sim.set_root(False)
    inv, _ = read(nvml)
    assert [g.uuid for g in inv.gpus] == GPU_UUIDS
    assert [g.mig_enabled for g in inv.gpus] == [True, True, True, False]
    assert {m.uuid for m in inv.migs} == ALL_MIGS
    gpu1 = {m.uuid: (m.slot, m.profile, m.gi, m.memory_mib) for m in inv.migs
            if m.gpu_index == 1}
    assert gpu1 == GPU1_MIGS  # names matched by size: the same names root reads
    assert sorted(m.profile for m in inv.migs if m.gpu_index == 0) == ["1g.10gb"] * 7
    assert all(m.ci == 0 and m.total_slices == 7 for m in inv.migs)
    # A MIG-enabled GPU's memory is refused: "80GB" in its name says 81920 MiB.
    assert [g.memory_mib for g in inv.gpus] == [81920] * 4
    assert all(g.unavailable is None for g in inv.gpus)
    assert all(m.unavailable is None for m in inv.migs)
    assert available(inv) == set(GPU_UUIDS) | ALL_MIGS


def test_non_root_says_what_root_would_add(sim, nvml):
    root, _ = read(nvml)
    assert root.unprivileged is None and root.problems == ()
    sim.set_root(False)
    inv, sleeps = read(nvml)
    assert sleeps == []  # NoPermission is not asked twice
    assert inv.unprivileged is not None
    assert "not root" in inv.unprivileged
    assert "GPU-instance lookups" in inv.unprivileged
    assert "total memory of MIG-enabled GPUs" in inv.unprivileged
    assert inv.unprivileged in inv.problems
    checks = {c.name: c for c in health.snapshot_checks(snapshot(inv))}
    assert checks["nvml-permissions"].status == health.WARN
    assert "as root" in checks["nvml-permissions"].message
    assert checks["nvml"].status == health.OK
    assert "nvml-permissions" not in {c.name for c in health.snapshot_checks(snapshot(root))}


def test_non_root_spawns_cpu_and_mig_alike(sim, nvml):
    sim.set_root(False)
    inv = inventory.read("auto", nvml=nvml)
    assert inv.source == "nvml"
    assert isinstance(allocator.choose(inv, [], limits(), Request("ann")), Choice)
    choice = allocator.choose(inv, [], limits(), Request("ann", mig_profile="2g.20gb"))
    assert isinstance(choice, Choice)
    assert choice.uuids == ("MIG-5b6c7d8e-9f0a-5b1c-9d2e-3f4a5b6c7d81",)


# ----------------------------------------------------------------------------- a lost GPU


def test_a_lost_gpu_is_unavailable_and_the_others_serve(sim, nvml):
    before, _ = read(nvml)
    sim.lose_gpu(1)
    inv, sleeps = read(nvml, previous=before)
    assert sleeps == []  # a lost GPU is not asked again
    assert [g.uuid for g in inv.gpus] == GPU_UUIDS  # still listed
    gpu1 = inv.gpus[1]
    assert gpu1.unavailable is not None and "lost" in gpu1.unavailable
    assert [g.unavailable for g in inv.gpus[:1] + inv.gpus[2:]] == [None] * 3
    # Its MIG devices stay listed (from the last read), unavailable with its reason.
    listed = {m.uuid: (m.slot, m.profile, m.gi, m.memory_mib) for m in inv.migs
              if m.parent_uuid == GPU_UUIDS[1]}
    assert listed == GPU1_MIGS
    assert {m.unavailable for m in inv.migs if m.gpu_index == 1} == {gpu1.unavailable}
    assert available(inv) == (set(GPU_UUIDS) - {GPU_UUIDS[1]}) | GPU0_MIGS | GPU2_MIGS
    assert any(p.startswith(f"GPU 1 ({GPU_UUIDS[1]}) is unavailable") for p in inv.problems)


def test_a_gpu_lost_before_the_first_read_is_listed_by_index(sim, nvml):
    sim.lose_gpu(1)
    inv, _ = read(nvml)
    assert [g.index for g in inv.gpus] == [0, 1, 2, 3]
    assert inv.gpus[1].uuid not in GPU_UUIDS and inv.gpus[1].unavailable
    assert {m.uuid for m in inv.migs} == GPU0_MIGS | GPU2_MIGS
    assert [g.uuid for g in inv.gpus if g.index != 1] == GPU_UUIDS[:1] + GPU_UUIDS[2:]


def test_the_allocator_avoids_a_lost_gpu(sim, nvml):
    before, _ = read(nvml)
    sim.lose_gpu(1)
    inv, _ = read(nvml, previous=before)
    taken = []
    for n in range(7):  # seven 1g.10gb can be had: GPU 0's; GPU 1's two are not
        choice = allocator.choose(inv, taken, limits(), Request(f"u{n}", mig_profile="1g.10gb"))
        assert isinstance(choice, Choice), choice
        assert choice.uuids[0] in GPU0_MIGS
        taken.append(holding(choice, f"u{n}"))
    full = allocator.choose(inv, taken, limits(), Request("late", mig_profile="1g.10gb"))
    assert isinstance(full, Refusal) and full.code == allocator.FULL
    only_there = allocator.choose(inv, [], limits(), Request("ann", mig_profile="2g.20gb"))
    assert isinstance(only_there, Refusal) and only_there.code == allocator.UNAVAILABLE
    assert "lost" in only_there.message
    free = allocator.free_by_profile(inv, [])
    assert free["1g.10gb"] == (7, 7) and free["1g.10gb"].unavailable == 2
    assert free["2g.20gb"] == (0, 0) and free["2g.20gb"].unavailable == 1
    assert free["3g.40gb"] == (2, 2) and free["3g.40gb"].unavailable == 1
    assert free["gpu"] == (1, 1) and free["gpu"].unavailable == 0


def test_the_form_says_unavailable_not_full(sim, nvml):
    before, _ = read(nvml)
    sim.lose_gpu(1)
    inv, _ = read(nvml, previous=before)
    free = allocator.free_by_profile(inv, [])
    note, disabled = form.availability(
        Profile("mid", "Medium", mig_profile="2g.20gb"), free, True, None)
    assert note.startswith("unavailable: NVML says the GPU is lost") and disabled
    note, disabled = form.availability(
        Profile("small", "Small", mig_profile="1g.10gb"), free, True, None)
    assert note == "1g.10gb: 7 of 7 free, 2 unavailable" and not disabled
    note, disabled = form.availability(
        Profile("whole", "Whole", gpus=1), free, True, None)
    assert note == "whole GPUs: 1 of 1 free" and not disabled
    # Plain pairs (no unavailable count) read as before.
    assert form.availability(Profile("s", "S", mig_profile="1g.10gb"), {"1g.10gb": (0, 3)},
                             True, None) == ("1g.10gb: 0 of 3 free - full", True)


def test_a_container_on_a_lost_gpu_still_holds_a_device_that_exists(sim, nvml):
    before, _ = read(nvml)
    sim.lose_gpu(1)
    inv, _ = read(nvml, previous=before)
    mig = "MIG-5b6c7d8e-9f0a-5b1c-9d2e-3f4a5b6c7d82"
    holder = Allocation("c1", "jupyter-ann", True, RUNNING, "running", user="ann",
                        uuids=(mig,), created_at=NOW)
    snap = snapshot(inv, [holder])
    assert snap.missing_uuids() == {}
    checks = {c.name: c for c in health.snapshot_checks(snap)}
    assert checks["missing-uuids"].status == health.OK
    assert checks["unavailable"].status == health.WARN
    assert f"GPU 1 ({GPU_UUIDS[1]}, 4 MIG device(s))" in checks["unavailable"].message
    # The slice it holds is not offered to another either way.
    choice = allocator.choose(inv, [holder], limits(), Request("bob", mig_profile="1g.10gb"))
    assert isinstance(choice, Choice) and choice.uuids[0] in GPU0_MIGS


def test_a_lost_gpu_comes_back_on_the_next_read(sim, nvml):
    sim.fail_gpu(1, "GpuIsLost", times=1)
    first, sleeps = read(nvml)
    assert first.gpus[1].unavailable and sleeps == []
    second, _ = read(nvml, previous=first)
    assert available(second) == set(GPU_UUIDS) | ALL_MIGS
    assert second.problems == ()


# ------------------------------------------------------------------- other per-GPU errors


@pytest.mark.parametrize(
    ("error", "words"),
    [("NoPermission", "refused access"), ("Unknown", "'Unknown Error' 3 times"),
     ("Timeout", "'Timeout' 3 times"), ("ResetRequired", "GPU requires restart"),
     ("NotSupported", "Not Supported")],
)
def test_a_failing_gpu_is_unavailable_with_the_reason(sim, nvml, error, words):
    sim.fail_gpu(2, error)
    inv, _ = read(nvml)
    assert inv.gpus[2].unavailable is not None and words in inv.gpus[2].unavailable
    assert available(inv) == (set(GPU_UUIDS) - {GPU_UUIDS[2]}) | GPU0_MIGS | set(GPU1_MIGS)


def test_an_error_after_the_uuid_keeps_the_gpu_by_uuid(sim, nvml):
    sim.fail_gpu(2, "NoPermission", functions=["nvmlDeviceGetMigDeviceHandleByIndex"])
    inv, _ = read(nvml)
    assert inv.gpus[2].uuid == GPU_UUIDS[2] and "refused" in inv.gpus[2].unavailable
    assert inv.gpus[2].name == "NVIDIA A100-SXM4-80GB" and inv.gpus[2].mig_enabled


# -------------------------------------------------------------- MIG re-created mid-read


def _recreate_during_enumeration(monkeypatch, sim, nvml, times: int) -> list[set[str]]:
    """Re-create GPU 1's MIG devices right after the read takes its first MIG handle, on
    the first ``times`` enumerations of GPU 1. Returns the UUIDs each re-creation made."""
    made: list[set[str]] = []
    original = nvml.nvmlDeviceGetMigDeviceHandleByIndex

    def get(device, index):
        handle = original(device, index)
        if nvml.nvmlDeviceGetUUID(device) == GPU_UUIDS[1] and index == 0 and len(made) < times:
            devices = sim.set_mig(1, ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"])
            made.append({d["uuid"] for d in devices})
        return handle

    monkeypatch.setattr(nvml, "nvmlDeviceGetMigDeviceHandleByIndex", get)
    return made


def test_mig_recreated_during_the_read_is_read_again(sim, nvml, monkeypatch):
    made = _recreate_during_enumeration(monkeypatch, sim, nvml, times=1)
    inv, sleeps = read(nvml)
    assert len(made) == 1 and len(sleeps) == 1
    assert {m.uuid for m in inv.migs if m.gpu_index == 1} == made[0]
    assert sorted(m.profile for m in inv.migs if m.gpu_index == 1) == [
        "1g.10gb", "1g.10gb", "2g.20gb", "3g.40gb"]
    assert available(inv) == set(GPU_UUIDS) | GPU0_MIGS | made[0] | GPU2_MIGS


def test_mig_that_keeps_changing_makes_its_gpu_unavailable(sim, nvml, monkeypatch):
    made = _recreate_during_enumeration(monkeypatch, sim, nvml, times=10)
    inv, _ = read(nvml)
    assert len(made) == 3  # three tries, then the GPU is given up for this read
    assert inv.gpus[1].uuid == GPU_UUIDS[1] and "changed" in inv.gpus[1].unavailable
    assert available(inv) == {GPU_UUIDS[0], GPU_UUIDS[2], GPU_UUIDS[3]} | GPU0_MIGS | GPU2_MIGS


# -------------------------------------------------------------------- transient errors


def test_transient_errors_are_tried_again(sim, nvml):
    sim.fail_calls(2, "Unknown")  # the first two calls: nvmlInit, twice
    inv, sleeps = read(nvml)
    assert sleeps == [0.05, 0.2]
    assert available(inv) == set(GPU_UUIDS) | ALL_MIGS and inv.problems == ()
    sim.fail_calls(2, "Timeout", functions=["nvmlDeviceGetUUID"])
    inv, sleeps = read(nvml)
    assert sleeps == [0.05, 0.2] and available(inv) == set(GPU_UUIDS) | ALL_MIGS
    # Four in a row: GPU 0's UUID fails three tries (unavailable), GPU 1's once (read).
    sim.fail_calls(4, "Timeout", functions=["nvmlDeviceGetUUID"])
    inv, sleeps = read(nvml)
    assert sleeps == [0.05, 0.2, 0.05]
    assert inv.gpus[0].unavailable == "NVML answered 'Timeout' 3 times in a row"
    assert available(inv) == set(GPU_UUIDS[1:]) | set(GPU1_MIGS) | GPU2_MIGS
    sim.fail_calls(2, "NotReady", functions=["nvmlDeviceGetAttributes"])
    inv, _ = read(nvml)
    assert available(inv) == set(GPU_UUIDS) | ALL_MIGS


def test_errors_that_a_pause_does_not_change_are_not_tried_again(sim, nvml):
    sim.fail_calls(1, "NoPermission", functions=["nvmlDeviceGetUUID"])
    inv, sleeps = read(nvml)
    assert sleeps == [] and inv.gpus[0].unavailable and not inv.gpus[1].unavailable


def test_a_driver_that_keeps_failing_is_an_inventory_error(sim, nvml):
    sim.fail_calls(3, "Unknown", functions=["nvmlInit", "nvmlInitWithFlags"])
    with pytest.raises(InventoryError, match="NVML could not be initialised: Unknown Error"):
        read(nvml)
    sim.fail_calls(3, "Unknown", functions=["nvmlDeviceGetCount"])
    with pytest.raises(InventoryError, match="NVML cannot count the GPUs: Unknown Error"):
        read(nvml)
    sim.fail_calls(3, "Unknown", functions=["nvmlDeviceGetCount"])
    inv = inventory.read("auto", nvml=nvml)
    assert inv.source == "none" and "cannot count the GPUs" in inv.problems[0]


# ------------------------------------------------------------------------------ slow NVML


def test_slow_nvml_still_returns_everything(sim, nvml):
    sim.set_nvml_delay(0.004)
    started = time.monotonic()
    inv, _ = read(nvml)
    took = time.monotonic() - started
    assert available(inv) == set(GPU_UUIDS) | ALL_MIGS
    assert took >= 0.004 * 100  # well over a hundred calls, each slow


# ------------------------------------------------------------------ never a raw NVMLError

CALLED = [
    "nvmlInit", "nvmlDeviceGetCount", "nvmlSystemGetDriverVersion",
    "nvmlSystemGetCudaDriverVersion", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID",
    "nvmlDeviceGetName", "nvmlDeviceGetMigMode", "nvmlDeviceGetGpuInstanceProfileInfo",
    "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex", "nvmlDeviceGetGpuInstanceId",
    "nvmlDeviceGetComputeInstanceId", "nvmlDeviceGetAttributes",
    "nvmlDeviceGetGpuInstanceById", "nvmlGpuInstanceGetInfo",
]
ERRORS = ["Uninitialized", "InvalidArgument", "NotSupported", "NoPermission", "NotFound",
          "DriverNotLoaded", "Timeout", "GpuIsLost", "ResetRequired", "Memory", "NotReady",
          "Unknown"]


@pytest.mark.parametrize("error", ERRORS)
def test_never_a_raw_nvml_error(sim, nvml, error, monkeypatch):
    monkeypatch.setattr(inventory, "RETRY_PAUSES", (0.0, 0.0))  # read() sleeps for real
    for function in CALLED:
        sim.clear_faults()
        sim.fail_calls(1000, error, functions=[function])
        try:
            inv, _ = read(nvml)
        except InventoryError:
            assert function in ("nvmlInit", "nvmlDeviceGetCount"), function
            continue
        assert [g.index for g in inv.gpus] == [0, 1, 2, 3], function
        assert inventory.read("auto", nvml=nvml).source == "nvml"


@pytest.mark.parametrize("error", ERRORS)
def test_a_failure_on_one_gpu_leaves_the_others_alone(sim, nvml, error):
    for function in CALLED[4:]:
        sim.clear_faults()
        sim.fail_gpu(1, error, functions=[function])
        inv, _ = read(nvml)
        assert [g.uuid for g in inv.gpus if g.index != 1] == [
            GPU_UUIDS[0], GPU_UUIDS[2], GPU_UUIDS[3]], function
        others = available(inv) - {GPU_UUIDS[1]} - set(GPU1_MIGS)
        assert others == {GPU_UUIDS[0], GPU_UUIDS[2], GPU_UUIDS[3]} | GPU0_MIGS | GPU2_MIGS, (
            function)
        for gpu in inv.gpus:  # a GPU is either read in full or unavailable with a reason
            assert gpu.unavailable is None or gpu.unavailable.strip(), function
        assert {m.unavailable for m in inv.migs if m.gpu_index == 1} <= {
            inv.gpus[1].unavailable}, function
