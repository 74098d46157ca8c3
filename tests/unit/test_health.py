"""Health checks (gpuspawner/health.py) on hand-made Snapshots: no engine, no NVML.

``doctor``, the admin page and spawner start-up all show these checks, and ``doctor`` turns
the worst of them into its exit code, so each finding must get the right severity: a warning
for what an admin should look at (a pending MIG change, an unmanaged holder), a failure only
for what is broken now (a running server whose device no longer exists).
"""

from __future__ import annotations

import itertools
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gpuspawner import health
from gpuspawner.health import FAIL, OK, WARN, Check
from gpuspawner.inventory import parse_topology
from gpuspawner.policy import Policy
from gpuspawner.records import CREATED, EXPIRED, HELD, RUNNING, Allocation, Inventory
from gpuspawner.snapshot import Snapshot

from ..gpusim import BIN_DIR
from .hosts import NOW, host

_ids = itertools.count()

#: Two A100s: GPU 0 cut into seven 1g.10gb slices, GPU 1 whole.
HOST = host(["1g.10gb"] * 7, None)
GPU1 = HOST.gpus[1].uuid
MIG00 = HOST.migs[0].uuid
GONE = "MIG-deadbeef-0000-4000-8000-000000000000"


def alloc(
    uuids: tuple[str, ...] = (),
    state: str = RUNNING,
    *,
    managed: bool = True,
    name: str | None = None,
    ports: tuple[tuple[str, int], ...] = (),
    problems: tuple[str, ...] = (),
    count: int = 0,
) -> Allocation:
    n = next(_ids)
    return Allocation(
        container_id=f"c{n:06d}",
        container_name=name or f"jupyter-u{n}",
        managed=managed,
        state=state,
        docker_status="running" if state == RUNNING else "created" if state == CREATED
        else "exited",
        user=f"u{n}" if managed else None,
        uuids=uuids,
        ports=ports,
        gpu_count=count,
        label_problems=problems,
        created_at=NOW,
    )


def snap(
    inventory: Inventory = HOST,
    allocations: tuple[Allocation, ...] | list[Allocation] = (),
    bound_ports: set[int] | frozenset[int] = frozenset(),
) -> Snapshot:
    return Snapshot(inventory, tuple(allocations), Policy.default(), frozenset(bound_ports), NOW)


def by_name(checks: list[Check]) -> dict[str, Check]:
    names = [c.name for c in checks]
    assert len(names) == len(set(names)), names  # one finding per subject
    return {c.name: c for c in checks}


def topology(*gpus: dict[str, Any], **top: Any) -> Inventory:
    """An inventory through the topology parser, so its problems read as the product's own."""
    entries = []
    for index, gpu in enumerate(gpus):
        entries.append({"index": index, "uuid": f"GPU-{index:08x}-1111-4000-8000-000000000000",
                        "name": "NVIDIA A100-SXM4-80GB", "memory_mib": 81920, **gpu})
    return parse_topology({"gpus": entries, **top})


def mig(index: int, profile: str = "1g.10gb", gi: int | None = None) -> dict[str, Any]:
    return {"index": index, "profile": profile, "gi": gi or index + 1, "ci": 0,
            "uuid": f"MIG-{index:08x}-2222-4000-8000-000000000000"}


# ------------------------------------------------------------------------------ a good host


def test_a_healthy_host_is_all_ok():
    checks = health.snapshot_checks(snap(), (40000, 40999))
    found = by_name(checks)
    assert list(found) == ["nvml", "mig-pending", "missing-uuids", "unmanaged", "conflicts",
                           "busy", "ports"]
    assert all(c.status == OK for c in checks), checks
    assert found["nvml"].message == "2 GPU(s), 7 MIG device(s) through file"
    assert found["ports"].message == "1000 of 1000 ports free in 40000-40999"
    assert health.worst(checks) == OK


def test_driver_and_cuda_versions_are_named():
    inv = topology({"mig_mode": "disabled"}, driver_version="550.90.07", cuda_version="12.4")
    nvml = by_name(health.snapshot_checks(snap(inv)))["nvml"]
    assert nvml.status == OK
    assert nvml.message == "1 GPU(s), 0 MIG device(s) through file; driver 550.90.07, CUDA 12.4"


def test_without_a_port_range_ports_are_not_checked():
    assert "ports" not in by_name(health.snapshot_checks(snap()))


def test_a_host_without_gpus_warns_with_the_inventory_reason():
    plain = by_name(health.snapshot_checks(snap(Inventory(source="none"))))["nvml"]
    assert plain.status == WARN and "only CPU servers can start" in plain.message
    why = "no NVIDIA driver answered (libnvidia-ml.so.1 not found): only CPU servers can start"
    told = by_name(health.snapshot_checks(snap(Inventory(source="none", problems=(why,)))))
    assert told["nvml"] == Check("nvml", WARN, why)
    assert told["mig-pending"].status == OK  # a driver message is no MIG problem
    assert "mig-empty" not in told


# ------------------------------------------------------------------------------ MIG


def test_pending_mig_change_warns_and_names_every_gpu():
    inv = topology(
        {"mig_mode": "disabled", "mig_pending": "enabled"},
        {"mig_mode": "enabled", "mig_devices": [mig(0)]},
        {"mig_mode": "enabled", "mig_pending": "disabled", "mig_devices": [mig(0, gi=3)]},
    )
    found = by_name(health.snapshot_checks(snap(inv)))
    pending = found["mig-pending"]
    assert pending.status == WARN
    assert "GPU 0 " in pending.message and "GPU 2 " in pending.message
    assert "GPU 1 " not in pending.message
    assert "change to on" in pending.message and "change to off" in pending.message
    assert pending.message.count("; ") >= 1  # one sentence per GPU, joined
    assert "mig-empty" not in found
    assert health.worst(list(found.values())) == WARN


def test_mig_enabled_without_devices_warns():
    inv = topology({"mig_mode": "enabled"}, {"mig_mode": "enabled", "mig_devices": [mig(0)]})
    found = by_name(health.snapshot_checks(snap(inv)))
    assert found["mig-empty"].status == WARN
    assert "GPU 0 " in found["mig-empty"].message and "no MIG devices" in found["mig-empty"].message
    assert found["mig-pending"].status == OK
    assert health.worst(list(found.values())) == WARN


def test_empty_and_pending_on_the_same_gpu_are_both_reported():
    inv = topology({"mig_mode": "enabled", "mig_pending": "disabled"})
    found = by_name(health.snapshot_checks(snap(inv)))
    assert found["mig-empty"].status == WARN and found["mig-pending"].status == WARN


# ------------------------------------------------------------------------------ missing UUIDs


def test_a_stopped_expired_server_on_a_gone_device_only_warns():
    stale = alloc((GONE,), EXPIRED, name="jupyter-ann")
    found = by_name(health.snapshot_checks(snap(allocations=[stale])))
    missing = found["missing-uuids"]
    assert missing.status == WARN
    assert missing.message.startswith("1 labelled device(s) no longer exist")
    assert "jupyter-ann" in missing.message and "re-allocate on restart" in missing.message
    assert health.worst(list(found.values())) == WARN


def test_a_running_server_on_a_gone_device_fails():
    running = alloc((GONE,), RUNNING, name="jupyter-bo")
    other = alloc(("MIG-cafe0000-0000-4000-8000-000000000000",), EXPIRED, name="jupyter-cy")
    found = by_name(health.snapshot_checks(snap(allocations=[running, other])))
    missing = found["missing-uuids"]
    assert missing.status == FAIL
    assert missing.message.startswith("2 labelled device(s)")
    assert "jupyter-bo" in missing.message and "jupyter-cy" in missing.message
    assert health.worst(list(found.values())) == FAIL


def test_an_unmanaged_running_holder_of_a_gone_device_fails():
    outside = alloc((GONE,), RUNNING, managed=False, name="outside-1")
    missing = by_name(health.snapshot_checks(snap(allocations=[outside])))["missing-uuids"]
    assert missing.status == FAIL and "outside-1" in missing.message


def test_present_devices_are_not_missing():
    fine = [alloc((MIG00,), RUNNING), alloc((GPU1,), EXPIRED)]
    missing = by_name(health.snapshot_checks(snap(allocations=fine)))["missing-uuids"]
    assert missing == Check("missing-uuids", OK, "every labelled device exists")


def test_a_stopped_server_inside_its_hold_on_a_gone_device_only_warns():
    held = alloc((GONE,), HELD, name="jupyter-eve")
    missing = by_name(health.snapshot_checks(snap(allocations=[held])))["missing-uuids"]
    assert missing.status == WARN


def test_missing_holders_are_named_at_most_ten_times():
    many = [alloc((f"MIG-{n:08x}-3333-4000-8000-000000000000",), EXPIRED, name=f"jupyter-{n:02d}")
            for n in range(12)]
    message = by_name(health.snapshot_checks(snap(allocations=many)))["missing-uuids"].message
    assert message.startswith("12 labelled device(s)")
    assert sum(f"jupyter-{n:02d}" in message for n in range(12)) == 10


# ------------------------------------------------------------------------------ unmanaged


def test_unmanaged_holders_warn_with_their_names():
    named = alloc((GPU1,), RUNNING, managed=False, name="outside-named")
    everything = alloc((), RUNNING, managed=False, name="outside-all", count=-1)
    found = by_name(health.snapshot_checks(snap(allocations=[named, everything])))
    unmanaged = found["unmanaged"]
    assert unmanaged.status == WARN
    assert unmanaged.message.startswith("2 container(s) hold GPUs without gpuspawner labels")
    assert "outside-named" in unmanaged.message and "outside-all" in unmanaged.message
    assert found["missing-uuids"].status == OK  # count=-1 names no device that could be gone
    # "--gpus all" runs on GPU 1 too: two running holders of one device are a conflict.
    assert found["conflicts"].status == FAIL and "GPU 1" in found["conflicts"].message
    alone = by_name(health.snapshot_checks(snap(allocations=[everything])))
    assert health.worst(list(alone.values())) == WARN


def test_stopped_unmanaged_containers_hold_nothing():
    gone = alloc((GPU1,), EXPIRED, managed=False, name="outside-stopped")
    unmanaged = by_name(health.snapshot_checks(snap(allocations=[gone])))["unmanaged"]
    assert unmanaged == Check("unmanaged", OK, "no unmanaged GPU containers")


def test_unmanaged_names_are_cut_at_ten():
    crowd = [alloc((GPU1,), RUNNING, managed=False, name=f"outside-{n:02d}") for n in range(13)]
    message = by_name(health.snapshot_checks(snap(allocations=crowd)))["unmanaged"].message
    assert message.startswith("13 container(s)")
    assert sum(f"outside-{n:02d}" in message for n in range(13)) == 10


# ------------------------------------------------------------------------------ labels


def test_label_problems_warn_with_the_first_example():
    bad = alloc((MIG00,), RUNNING, name="jupyter-hand-edited",
                problems=("ds01.gpu.equivalents 'lots' is not a number", "second problem"))
    worse = alloc((GPU1,), EXPIRED, problems=("ds01.gpu.priority 'high' is not a whole number",))
    found = by_name(health.snapshot_checks(snap(allocations=[bad, worse])))
    labels = found["labels"]
    assert labels.status == WARN
    assert labels.message == (
        "2 container(s) have labels that make no sense, e.g. jupyter-hand-edited: "
        "ds01.gpu.equivalents 'lots' is not a number"
    )
    assert health.worst(list(found.values())) == WARN


def test_clean_labels_add_no_label_check():
    assert "labels" not in by_name(health.snapshot_checks(snap(allocations=[alloc((MIG00,))])))


# ------------------------------------------------------------------------------ ports


@pytest.mark.parametrize(
    ("used", "status"),
    [(0, OK), (89, OK), (90, WARN), (99, WARN), (100, WARN)],
)
def test_port_range_almost_full_warns(used: int, status: str):
    bound = set(range(40000, 40000 + used)) | {22, 8888, 41000}  # outside the range: ignored
    ports = by_name(health.snapshot_checks(snap(bound_ports=bound), (40000, 40099)))["ports"]
    assert ports == Check("ports", status, f"{100 - used} of 100 ports free in 40000-40099")


def test_ports_promised_to_held_servers_count_and_expired_ones_do_not():
    held = alloc((MIG00,), HELD, ports=(("ssh", 40001), ("tb", 40002)))
    expired = alloc((GPU1,), EXPIRED, ports=(("ssh", 40003),))
    running = alloc((), RUNNING, ports=(("ssh", 40000),))  # also bound: counted once
    found = by_name(health.snapshot_checks(
        snap(allocations=[held, expired, running], bound_ports={40000}), (40000, 40009)))
    # 10 ports, 3 reserved (40000 bound, 40001-40002 promised): 7 > 10 // 10, still fine.
    assert found["ports"] == Check("ports", OK, "7 of 10 ports free in 40000-40009")


def test_a_small_range_warns_only_when_full():
    bound = {40000, 40001, 40002, 40003}
    assert by_name(health.snapshot_checks(snap(bound_ports=bound), (40000, 40004)))[
        "ports"].status == OK
    bound.add(40004)
    assert by_name(health.snapshot_checks(snap(bound_ports=bound), (40000, 40004)))[
        "ports"].status == WARN


# ------------------------------------------------------------------------------ worst


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], OK),
        ([OK], OK),
        ([OK, OK], OK),
        ([OK, WARN, OK], WARN),
        ([WARN, WARN], WARN),
        ([FAIL], FAIL),
        ([OK, FAIL, WARN], FAIL),
        ([WARN, OK, FAIL], FAIL),
    ],
)
def test_worst(statuses: list[str], expected: str):
    checks = [Check(f"c{n}", s, "m") for n, s in enumerate(statuses)]
    assert health.worst(checks) == expected


def test_check_json():
    assert Check("ports", WARN, "3 of 10").to_json() == {
        "name": "ports", "status": "warn", "message": "3 of 10"}


# ------------------------------------------------------------------------------ run_all


class FakeAPI:
    """``info()`` as an engine answers it, or the exception a dead engine raises."""

    base_url = "http+docker://localhost"

    def __init__(self, info: dict[str, Any] | Exception) -> None:
        self._info = info

    def info(self) -> dict[str, Any]:
        if isinstance(self._info, Exception):
            raise self._info
        return self._info


def test_engine_down_stops_before_reading_the_world():
    def never() -> Snapshot:
        raise AssertionError("the snapshot must not be read when the engine is down")

    client = SimpleNamespace(api=FakeAPI(ConnectionError("connection refused")))
    checks = health.run_all(client, never, (40000, 40999))
    assert [(c.name, c.status) for c in checks] == [("docker", FAIL), ("nvidia-runtime", WARN)]
    assert "does not answer (connection refused)" in checks[0].message
    assert health.worst(checks) == FAIL


def test_a_snapshot_that_cannot_be_read_fails():
    def broken() -> Snapshot:
        raise RuntimeError("NVML exploded")

    api = FakeAPI({"ServerVersion": "26.1.5", "Runtimes": {"nvidia": {}, "runc": {}}})
    checks = health.run_all(api, broken)
    assert [(c.name, c.status) for c in checks] == [
        ("docker", OK), ("nvidia-runtime", OK), ("snapshot", FAIL)]
    assert checks[0].message == "Docker 26.1.5 answers at http+docker://localhost"
    assert "NVML exploded" in checks[2].message


def test_run_all_adds_the_snapshot_checks():
    api = FakeAPI({"ServerVersion": "26.1.5", "Runtimes": {"nvidia": {}}})
    checks = health.run_all(api, snap, (40000, 40999))
    assert [c.name for c in checks] == [
        "docker", "nvidia-runtime", "nvml", "mig-pending", "missing-uuids", "unmanaged",
        "conflicts", "busy", "ports"]
    assert health.worst(checks) == OK


def test_runtime_found_through_the_hook_or_missing(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path):
    monkeypatch.setenv("PATH", str(BIN_DIR))  # the simulator's fake hook
    assert health.runtime_check({"Runtimes": {"runc": {}}}).status == OK
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing NVIDIA here
    missing = health.runtime_check({"Runtimes": {"runc": {}}})
    assert missing.status == WARN and "nvidia-container-toolkit" in missing.message
    assert health.runtime_check({"Runtimes": None}).status == WARN
    assert health.runtime_check(None).status == WARN


def test_nvidia_as_default_runtime_warns():
    """A DGX-style engine: the toolkit is there, but containers get GPUs without asking."""
    info = {"DefaultRuntime": "nvidia", "Runtimes": {"nvidia": {"path": "nvidia-container-runtime"},
                                                      "runc": {"path": "runc"}}}
    check = health.runtime_check(info)
    assert (check.name, check.status) == ("nvidia-runtime", WARN)
    assert "registered and is Docker's default runtime" in check.message
    assert "NVIDIA_VISIBLE_DEVICES=void on CPU servers" in check.message
    assert "containers made by hand may use GPUs no one sees" in check.message
    registered = health.runtime_check({**info, "DefaultRuntime": "runc"})
    assert registered.status == OK


def test_taken_at_is_not_needed_for_health():
    """Checks depend on the world, not the clock: the same snapshot later reads the same."""
    later = Snapshot(HOST, (), Policy.default(), frozenset(),
                     datetime(2030, 1, 1, tzinfo=timezone.utc))
    assert health.snapshot_checks(later) == health.snapshot_checks(snap())


# ------------------------------------------------------------------ NVML degraded


def test_unavailable_gpus_warn_with_their_reasons():
    from dataclasses import replace

    lost = "NVML says the GPU is lost"
    inv = replace(HOST, gpus=(replace(HOST.gpus[0], unavailable=lost), HOST.gpus[1]),
                  migs=tuple(replace(m, unavailable=lost) for m in HOST.migs))
    holder = alloc((MIG00,))
    found = by_name(health.snapshot_checks(snap(inv, [holder])))
    assert found["unavailable"].status == WARN
    assert found["unavailable"].message == (
        f"1 of 2 GPU(s) cannot be read and are not given out: GPU 0 ({HOST.gpus[0].uuid}, "
        f"7 MIG device(s)): {lost}")
    assert found["missing-uuids"].status == OK  # still listed: its holder's device exists
    assert "unavailable" not in by_name(health.snapshot_checks(snap()))


def test_a_non_root_read_warns_with_what_root_would_add():
    note = "the hub's user is not root, so NVML refused GPU-instance lookups"
    inv = Inventory(HOST.gpus, HOST.migs, "nvml", problems=(note,), unprivileged=note)
    found = by_name(health.snapshot_checks(snap(inv)))
    assert found["nvml-permissions"] == Check("nvml-permissions", WARN, note)
    assert found["nvml"].status == OK and found["mig-pending"].status == OK
