"""The admin page on a big host: 50 GPUs, 500 containers, everything a page poll does.

Docker is faked at its API boundary, as in bench_core.py: ``containers(all=True)`` returns
the JSON an engine returns (decoded from text on every call, as the HTTP client would) and
``inspect_container`` the HostConfig and State of each. The ledger, snapshot, view model,
templates, JSON and metrics code under test are the real ones.

Timed, each the median of ``--repeat`` runs (the page polls every 5 s, so each figure is a
share of that budget):
- the snapshot a poll takes (steady-state ledger read + inventory from the topology),
- the overview page's HTML (view model + template), the overview JSON the script polls,
- the allocations JSON (``/api/allocations``), the users JSON, and a ``/metrics`` scrape,
- with activity (``--activity``, on by default): every third MIG device and every whole GPU
  runs a compute process, and one free slice in twenty is busy (a zombie); and the activity
  sweep the service runs every minute: an NVML read of every GPU and MIG device with their
  memory and processes (through the simulator's pynvml, tests/gpusim: Python's cost per call,
  not a driver's), each process mapped to its container (``procs``: real host processes, a
  real ``/proc`` read each), then who is active, who idled past a limit and every device's
  idle clock (``admin/activity.py``).

    .venv/bin/python benchmarks/bench_admin.py [--gpus 50] [--containers 500] [--repeat 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpuspawner import labels  # noqa: E402
from gpuspawner.admin import metrics, views  # noqa: E402
from gpuspawner.admin.hubapi import HubUser  # noqa: E402
from gpuspawner.admin.render import Page, Renderer  # noqa: E402
from gpuspawner.inventory import parse_topology  # noqa: E402
from gpuspawner.ledger import Ledger  # noqa: E402
from gpuspawner.policy import parse_policy  # noqa: E402
from gpuspawner.records import GpuProcess, Inventory  # noqa: E402
from gpuspawner.snapshot import Snapshot, take  # noqa: E402

NOW = datetime.now(timezone.utc)
LAYOUTS = (["1g.10gb"] * 7, ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"], None)


def topology(gpus: int) -> dict[str, Any]:
    """``gpus`` A100s: mostly seven 1g.10gb slices, some mixed, some whole (MIG off)."""
    found = []
    for g in range(gpus):
        layout = LAYOUTS[0] if g < gpus * 0.8 else LAYOUTS[1] if g < gpus * 0.9 else LAYOUTS[2]
        entry: dict[str, Any] = {
            "index": g, "uuid": f"GPU-{g:08x}-0000-0000-0000-000000000000",
            "name": "NVIDIA A100-SXM4-80GB", "memory_mib": 81920,
            "mig_mode": "enabled" if layout else "disabled", "total_slices": 7,
        }
        if layout:
            entry["mig_devices"] = [
                {"index": m, "profile": p, "gi": 7 + m, "ci": 0,
                 "uuid": f"MIG-{g:04x}{m:04x}-0000-0000-0000-000000000000"}
                for m, p in enumerate(layout)
            ]
        found.append(entry)
    return {"driver_version": "550.90.07", "gpus": found}


class FakeAPI:
    """The two Docker API calls the ledger makes, answering as a real engine would."""

    base_url = "http+docker://fake"

    def __init__(self, listing: list[dict], inspects: dict[str, dict]) -> None:
        self._listing = json.dumps(listing)
        self._inspects = {k: json.dumps(v) for k, v in inspects.items()}

    def containers(self, all: bool = False) -> list[dict]:  # noqa: A002 - Docker's name
        return json.loads(self._listing)

    def inspect_container(self, cid: str) -> dict:
        return json.loads(self._inspects[cid])


def engine(n: int, inventory: Inventory) -> FakeAPI:
    """``n`` containers: every other device held by a managed server (running or stopped),
    a few unmanaged GPU holders, the rest CPU-only servers."""
    listing, inspects = [], {}
    devices: list[Any] = [*inventory.migs, *(g for g in inventory.gpus if not g.mig_enabled)]
    for i in range(n):
        cid = f"{i:064x}"
        user = f"student{i % 300:03d}"
        status, labelset, requests = "running", {}, []
        finished = (NOW - timedelta(minutes=i % 120 + 2)).isoformat()
        if i < len(devices) * 3 // 4:
            device = devices[i]
            status = "running" if i % 3 else "exited"
            mig = hasattr(device, "parent_uuid")
            labelset = labels.encode(
                hub="lab", user=user, server="", profile="mig-1g" if mig else "gpu-1",
                created_at=NOW - timedelta(hours=2), slots=[device.slot], uuids=[device.uuid],
                parent_uuids=[device.parent_uuid if mig else device.uuid],
                gis=[device.gi] if mig else [], gpu_profile=device.profile if mig else
                device.name, equivalents=device.equivalents, ports={"ssh": 40000 + i},
            )
            requests = [{"Driver": "nvidia", "DeviceIDs": [device.uuid],
                         "Capabilities": [["gpu"]], "Count": 0, "Options": {}}]
        elif i < len(devices) * 3 // 4 + 3:  # someone's `docker run --gpus 1`
            requests = [{"Driver": "nvidia", "DeviceIDs": None, "Capabilities": [["gpu"]],
                         "Count": 1, "Options": {}}]
        else:
            labelset = labels.encode(hub="lab", user=user, server=f"s{i}", profile="cpu",
                                     created_at=NOW - timedelta(hours=1))
            status = "running" if i % 2 else "exited"
        listing.append({
            "Id": cid, "Names": [f"/jupyter-c{i}"], "Image": "img", "Labels": labelset,
            "State": status,
            "Status": "Up 2 hours" if status == "running"
            else f"Exited (0) {i % 120 + 2} minutes ago",
            "Created": int(NOW.timestamp()) - 7200,
            "Ports": [{"IP": "127.0.0.1", "PrivatePort": 8888, "PublicPort": 30000 + i,
                       "Type": "tcp"}] if status == "running" else [],
        })
        inspects[cid] = {"Id": cid, "State": {"Status": status, "FinishedAt": finished},
                         "HostConfig": {"DeviceRequests": requests or None, "Runtime": "runc"},
                         "Config": {"Env": ["PATH=/usr/bin"]}}
    return FakeAPI(listing, inspects)


def with_activity(inventory: Inventory) -> Inventory:
    """Processes on every third MIG device and every whole GPU, zombies on one in twenty."""
    def busy(n: int, memory: int) -> dict[str, Any]:
        if n % 3 == 0 or n % 20 == 7:
            return {"processes": (GpuProcess(100000 + n, memory // 2),),
                    "memory_used_mib": memory // 2}
        return {"memory_used_mib": 0}

    return replace(
        inventory,
        migs=tuple(replace(m, **busy(n, m.memory_mib)) for n, m in enumerate(inventory.migs)),
        gpus=tuple(g if g.mig_enabled else replace(g, **busy(0, g.memory_mib), utilization=90)
                   for g in inventory.gpus))


def sweep_figures(gpus: int, repeat: int, snap: Snapshot) -> list[tuple[str, Any, None]]:
    """The activity sweep: NVML read through the simulator with processes on a third of the
    MIG devices, each a real process of this host (so mapping its pid to a container reads a
    real ``/proc/<pid>/cgroup``), and the pure decisions on the snapshot."""
    from gpuspawner import inventory as inventory_mod
    from gpuspawner import procs
    from gpuspawner.admin import activity
    from tests import gpusim

    sleepers: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            state = Path(tmp) / "state.json"
            os.environ["GPUSIM_STATE"] = str(state)
            sim = gpusim.Simulator(state)
            sim.install(topology(gpus))
            for n, uuid in enumerate(sim.mig_uuids()):
                if n % 3 == 0:
                    sleepers.append(subprocess.Popen(["sleep", "600"]))
                    sim.start_process(uuid, 4000, pid=sleepers[-1].pid)
            nvml = gpusim.load_fake_nvml()
            read = median_ms(lambda: inventory_mod.read_nvml(nvml), max(3, repeat // 5))
            pids = [p.pid for p in sleepers]
            mapping = median_ms(lambda: [procs.container_of(pid) for pid in pids], repeat)
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
    last: dict[str, float] = {}
    seen: activity.WorkSeen = {}
    return [
        ("activity: NVML read, all devices", read, None),
        (f"  of which pid -> container ({len(pids)})", mapping, None),
        ("activity: active, idle, idle clock", median_ms(
            lambda: (activity.active_servers(snap), activity.idle_stops(snap, last, 0.0, {}),
                     activity.note_work(snap, seen)), repeat), None),
    ]


def median_ms(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """(median, max) in milliseconds."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1000)
    return statistics.median(runs), max(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=50)
    parser.add_argument("--containers", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--no-activity", dest="activity", action="store_false")
    args = parser.parse_args()

    inventory = parse_topology(topology(args.gpus), "bench")
    if args.activity:
        inventory = with_activity(inventory)
    ledger = Ledger(engine(args.containers, inventory), start_timeout=120)
    policy = parse_policy("defaults: {gpu_hold_after_stop: 1h}\n")
    ledger.read(lambda user: policy.hold_seconds(user or ""))  # cold: the inspects

    def snapshot() -> Snapshot:
        return take(lambda: inventory, ledger, policy)

    snap = snapshot()
    hub_users = {f"student{u:03d}": HubUser(f"student{u:03d}", (), NOW - timedelta(minutes=u),
                                            (("", NOW - timedelta(minutes=u)),))
                 for u in range(300)}
    renderer = Renderer()
    page = Page(prefix="/services/gpu-allocations/", hub_prefix="/hub/", user="admin",
                can_act=True, xsrf="2|token")
    registry = metrics.registry(snapshot, None)

    html = renderer.overview(page, snap, "lab")
    overview_json = json.dumps(views.overview(snap, "lab").to_json())
    allocations_json = json.dumps(views.allocation_rows(snap, hub_users, "lab"))
    users_json = json.dumps(views.user_rows(snap, hub_users, 3600))
    blocks = sum(len(c.blocks) for c in views.overview(snap, "lab").cards)

    figures = [
        ("snapshot (steady ledger read)", median_ms(snapshot, args.repeat), None),
        ("overview page HTML", median_ms(lambda: renderer.overview(page, snap, "lab"),
                                         args.repeat), len(html)),
        ("overview JSON (page refresh)", median_ms(
            lambda: json.dumps(views.overview(snap, "lab").to_json()), args.repeat),
         len(overview_json)),
        ("allocations JSON", median_ms(
            lambda: json.dumps(views.allocation_rows(snap, hub_users, "lab")), args.repeat),
         len(allocations_json)),
        ("users JSON", median_ms(
            lambda: json.dumps(views.user_rows(snap, hub_users, 3600)), args.repeat),
         len(users_json)),
        ("metrics scrape (incl. snapshot)", median_ms(
            lambda: metrics.exposition(registry), args.repeat), None),
    ]
    if args.activity:
        figures += sweep_figures(args.gpus, args.repeat, replace(snap, hub_id="lab"))
    print(f"host: {args.gpus} GPUs, {len(inventory.migs)} MIG devices, {blocks} blocks on the "
          f"overview; {args.containers} containers, {len(snap.allocations)} allocations; "
          + (f"{len(snap.busy())} busy devices, activity on" if args.activity else
             "no activity"))
    for name, (median, worst), size in figures:
        extra = f", {size / 1024:7.1f} KiB" if size else ""
        print(f"{name:<34} median {median:7.2f} ms  max {worst:7.2f} ms{extra}")


if __name__ == "__main__":
    main()
