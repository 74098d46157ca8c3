"""Row 5: NVML misbehaving. A GPU lost in the middle of the hub's inventory reads, NVML absent
(no driver library), and NVML slow. Servers already running keep running; spawns of CPU and of
GPU profiles on the healthy GPUs keep working."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from . import sizes
from .conftest import POLL_INTERVAL, MakeHub, MakeScenario
from .measure import Scenario, containers_of

pytestmark = pytest.mark.docker

POLICY = "defaults: {allow_full_gpu: true}\n"
#: Residents before the fault: a slice on GPU 0 (the GPU that will be lost), one elsewhere,
#: a CPU server.
RESIDENTS = [("r0", "mig-1g"), ("r1", "mig-3g"), ("r2", "cpu"), ("r3", "mig-1g")]
#: What users ask for during the fault; every GPU profile has room on the healthy GPUs
#: (a100x4: GPU 1 has 1g and 3g slices, GPU 2 two 3g slices, GPU 3 is whole).
DURING = ["cpu", "mig-3g", "cpu", "mig-1g", "cpu", "gpu-1", "cpu", "mig-3g"]


def parent_of(gpusim: Any, device: str) -> int | None:
    for gpu in gpusim.state()["gpus"]:
        if device == gpu["uuid"] or any(m["uuid"] == device for m in gpu["mig_devices"]):
            return int(gpu["index"])
    return None


def devices_of(engine: Any, key: tuple[str, str, str]) -> list[str]:
    found = containers_of(engine, key, running_only=True)
    if not found:
        return []
    attrs = engine.client.api.inspect_container(found[0]["Id"])
    return [d for r in attrs["HostConfig"].get("DeviceRequests") or []
            for d in r.get("DeviceIDs") or []]


def spawn_during(scn: Scenario, hub_id: str, size: sizes.Size, fault: Any = None,
                 at: float = 0.0) -> list[tuple[str, str, str]]:
    """``size.n`` users press Start at once; ``fault()`` strikes ``at`` seconds later."""
    outcomes: list[tuple[str, str, str]] = []

    def one(n: int) -> None:
        user, profile = f"d{n}", DURING[n % len(DURING)]
        outcomes.append((user, profile, scn.spawn(hub_id, user, profile)))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(size.n)]
    for thread in threads:
        thread.start()
    if fault is not None:
        time.sleep(at)
        scn.fault()
        fault()
    for thread in threads:
        thread.join()
    return outcomes


def start_residents(scn: Scenario, hub_id: str, count: int) -> None:
    for user, profile in RESIDENTS[:count]:
        assert scn.spawn(hub_id, user, profile) == "ready", scn.details
        scn.write_markers((hub_id, user, ""))


def judge(scn: Scenario, outcomes: list[tuple[str, str, str]], engine: Any, gpusim: Any,
          hub_id: str, lost_gpu: int | None = None) -> list[str]:
    """The spawns that did not work, and where the GPU ones landed."""
    broken = [f"{u} {p}: {o}" for u, p, o in outcomes if o != "ready"]
    landed = {}
    for user, profile, outcome in outcomes:
        if outcome == "ready":
            scn.write_markers((hub_id, user, ""))
            devices = devices_of(engine, (hub_id, user, ""))
            landed[user] = [parent_of(gpusim, d) for d in devices]
            if lost_gpu is not None and lost_gpu in landed[user]:
                broken.append(f"{user} {profile}: landed on the lost GPU {lost_gpu}")
    scn.details["spawns_during"] = [f"{u} {p}: {o}" for u, p, o in outcomes]
    scn.details["landed_on_gpus"] = landed
    scn.details["spawns_not_working"] = broken
    return broken


@pytest.mark.parametrize("size", [sizes.NVML], ids=lambda s: s.id)
def test_a_gpu_lost_mid_read(
    size: sizes.Size, fault_hub: MakeHub, scenario: MakeScenario, gpusim: Any, engine: Any
) -> None:
    """The GPU under a running server falls off the bus (``NVMLError_GpuIsLost`` on it and
    its MIG devices) while the hub reads NVML (every call slowed a little, so reads are in
    flight when it happens)."""
    hub_id = "faults-lost"
    scn = scenario("nvml-lost-gpu", size)
    scn.add_hub(hub_id, fault_hub(hub_id, policy=POLICY))
    scn.begin()
    start_residents(scn, hub_id, size.users)
    lost = parent_of(gpusim, devices_of(engine, (hub_id, "r0", ""))[0])
    assert lost is not None
    scn.details["lost_gpu"] = lost
    gpusim.set_nvml_delay(0.01)  # a read takes about two seconds
    outcomes = spawn_during(scn, hub_id, size, lambda: gpusim.lose_gpu(lost), at=1.0)
    broken = judge(scn, outcomes, engine, gpusim, hub_id, lost_gpu=lost)
    scn.expect(not broken, f"spawns did not work: {broken}")
    row = scn.finish(POLL_INTERVAL)
    assert row.ok(), row.explain()


@pytest.mark.parametrize("size", [sizes.NVML], ids=lambda s: s.id)
def test_nvml_absent(
    size: sizes.Size, fault_hub: MakeHub, scenario: MakeScenario, gpusim: Any, engine: Any
) -> None:
    """The hub restarts without an NVML library (nvidia-ml-py finds no libnvidia-ml; the
    simulator's pynvml is off its path), ``inventory_source = "auto"``: it falls back to
    ``nvidia-smi``. Running servers keep running; new spawns of every size still work."""
    hub_id = "faults-nonvml"
    scn = scenario("nvml-absent", size)
    hub = scn.add_hub(hub_id, fault_hub(
        hub_id, policy=POLICY, config_extra='c.GPUSpawner.inventory_source = "auto"\n'))
    scn.begin()
    start_residents(scn, hub_id, size.users)
    scn.fault()
    hub.env_extra["PYTHONPATH"] = ""  # the real nvidia-ml-py, without a driver library
    hub.restart()
    outcomes = spawn_during(scn, hub_id, size)
    broken = judge(scn, outcomes, engine, gpusim, hub_id)
    scn.details["nvml_in_hub_log"] = [line[:200] for line in hub.log_text().splitlines()
                                      if "NVML" in line][-3:]
    scn.expect(not broken, f"spawns did not work: {broken}")
    row = scn.finish(POLL_INTERVAL)
    assert row.ok(), row.explain()


@pytest.mark.parametrize("size", [sizes.NVML], ids=lambda s: s.id)
def test_nvml_slow(
    size: sizes.Size, fault_hub: MakeHub, scenario: MakeScenario, gpusim: Any, engine: Any
) -> None:
    """Every NVML call takes 2 s (a driver stuck behind a hung GPU), from the moment users
    press Start until the end of the scenario."""
    hub_id = "faults-slow"
    scn = scenario("nvml-slow", size)
    scn.add_hub(hub_id, fault_hub(hub_id, policy=POLICY))
    scn.begin()
    start_residents(scn, hub_id, size.users)
    scn.fault()
    gpusim.set_nvml_delay(2)
    time.sleep(3)  # older than the hub's kept inventory (2 s): the next spawn reads NVML
    began = time.monotonic()
    outcomes = spawn_during(scn, hub_id, size)
    scn.details["spawn_wave_seconds"] = round(time.monotonic() - began, 1)
    broken = judge(scn, outcomes, engine, gpusim, hub_id)
    scn.expect(not broken, f"spawns did not work: {broken}")
    row = scn.finish(POLL_INTERVAL)
    assert row.ok(), row.explain()
