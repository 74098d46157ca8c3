"""Row 8: a power-cycle. Everything stops at once (the hub is killed, the engine stops its
containers); the host comes back with MIG mode on but no MIG devices; the engine and the hub
start; users press Start while the devices are missing; the admin's boot script re-creates
them, with new UUIDs and in another order. Every user's restart must land on a device that
exists, with their files."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ..gpusim import install, reboot
from . import sizes
from .conftest import POLL_INTERVAL, MakeHub, MakeScenario
from .measure import containers_of

pytestmark = pytest.mark.docker

POLICY = "defaults: {allow_full_gpu: true}\n"
#: On a100x4 (nine 1g.10gb, three 3g.40gb, one whole GPU): 14 users fill all but the 2g.
PROFILES = ["mig-1g", "mig-3g", "gpu-1", "mig-1g", "cpu", "mig-3g", "mig-1g", "mig-1g",
            "mig-3g", "mig-1g", "cpu", "mig-1g", "mig-1g", "mig-1g"]
BOOT_SCRIPT_AFTER = 8.0  # seconds after the hub is back


def in_parallel(jobs: list[Any], width: int = 4) -> None:
    threads: list[threading.Thread] = []
    for job in jobs:
        while sum(t.is_alive() for t in threads) >= width:
            time.sleep(0.1)
        thread = threading.Thread(target=job)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()


@pytest.mark.parametrize("size", [sizes.POWER_CYCLE], ids=lambda s: s.id)
def test_a_power_cycle(
    size: sizes.Size, fault_hub: MakeHub, scenario: MakeScenario, gpusim: Any, engine: Any,
    tmp_path: Path,
) -> None:
    hub_id = "faults-power"
    scn = scenario("power-cycle", size)
    hub = scn.add_hub(hub_id, fault_hub(hub_id, policy=POLICY))
    users = [(f"p{n:02d}", PROFILES[n % len(PROFILES)]) for n in range(size.users)]
    scn.begin()

    first: dict[str, str] = {}

    def first_start(user: str, profile: str) -> None:
        first[user] = scn.spawn(hub_id, user, profile)
        if first[user] == "ready":
            scn.write_markers((hub_id, user, ""))

    in_parallel([lambda u=u, p=p: first_start(u, p) for u, p in users])
    assert all(o == "ready" for o in first.values()), scn.details
    before = {u: [d for c in containers_of(engine, (hub_id, u, ""))[:1]
                  for d in (c.get("Labels") or {}).get("ds01.gpu.uuids", "").split(",") if d]
              for u, _ in users}

    # Power off: everything stops at once.
    scn.fault()
    assert hub.process is not None
    os.kill(hub.process.pid, signal.SIGKILL)
    hub.process.wait(30)
    hub.stop()  # its proxy went down with the power too
    engine.stop()
    layout = gpusim.state()
    for gpu in layout["gpus"]:
        if gpu["mig_mode"] == "enabled":
            gpusim.set_mig(gpu["index"], [])  # MIG mode survives; the instances do not
    # The boot script will re-create the same layout: new UUIDs, another order.
    install(layout, tmp_path / "after-boot.json")
    later = reboot(tmp_path / "after-boot.json", seed=8)

    # Power on: the engine, then the hub; users press Start before the devices exist.
    engine.start()
    hub.start()
    scn.fault()

    def boot_script() -> None:
        time.sleep(BOOT_SCRIPT_AFTER)
        gpusim.install(later)

    booting = threading.Thread(target=boot_script)
    booting.start()
    outcomes: dict[str, str] = {}

    def press(user: str, profile: str) -> None:
        outcomes[user] = scn.spawn(hub_id, user, profile, timeout=240)

    try:
        in_parallel([lambda u=u, p=p: press(u, p) for u, p in users], width=len(users))
    finally:
        booting.join()
    scn.fault()

    present = set(gpusim.mig_uuids()) | set(gpusim.gpu_uuids())
    invalid, moved = [], {}
    for user, profile in users:
        found = containers_of(engine, (hub_id, user, ""), running_only=True)
        if not found or profile == "cpu":
            continue
        uuids = [d for d in found[0]["Labels"].get("ds01.gpu.uuids", "").split(",") if d]
        attrs = engine.client.api.inspect_container(found[0]["Id"])
        held = [d for r in attrs["HostConfig"].get("DeviceRequests") or []
                for d in r.get("DeviceIDs") or []]
        if not held or set(held) - present or set(held) != set(uuids):
            invalid.append(f"{user}: holds {held}, labels say {uuids}")
        moved[user] = f"{before.get(user)} -> {held}"
    scn.details.update({"restarts": outcomes, "devices_before_after": moved,
                        "invalid_devices": invalid})
    scn.expect(all(o == "ready" for o in outcomes.values()),
               f"not every restart worked: {outcomes}")
    scn.expect(not invalid, f"restarts on devices that do not exist: {invalid}")
    row = scn.finish(POLL_INTERVAL)
    assert row.ok(), row.explain()
