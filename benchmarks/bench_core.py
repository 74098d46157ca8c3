"""Ledger read and allocation decision on a big host: 8 GPUs x 7 slices, 1,000 containers.

The containers are faked at the Docker API boundary: ``containers(all=True)`` returns the
JSON that a Docker 20.10+ engine returns for such a list (decoded from text on every call, as
the HTTP client would), and ``inspect_container`` the HostConfig of each. The ledger, labels,
allocator and snapshot code under test are the real ones.

    .venv/bin/python benchmarks/bench_core.py [--containers 1000] [--repeat 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpuspawner import allocator, labels  # noqa: E402
from gpuspawner.inventory import parse_topology  # noqa: E402
from gpuspawner.ledger import Ledger  # noqa: E402
from gpuspawner.policy import Policy  # noqa: E402
from gpuspawner.snapshot import Snapshot  # noqa: E402

NOW = datetime.now(timezone.utc)


def topology(gpus: int = 8) -> dict:
    return {
        "driver_version": "550.90.07",
        "gpus": [
            {
                "index": g,
                "uuid": f"GPU-{g:08x}-0000-0000-0000-000000000000",
                "name": "NVIDIA A100-SXM4-80GB",
                "memory_mib": 81920,
                "mig_mode": "enabled",
                "total_slices": 7,
                "mig_devices": [
                    {
                        "index": m,
                        "profile": "1g.10gb",
                        "gi": 7 + m,
                        "ci": 0,
                        "uuid": f"MIG-{g:04x}{m:04x}-0000-0000-0000-000000000000",
                    }
                    for m in range(7)
                ],
            }
            for g in range(gpus)
        ],
    }


class FakeAPI:
    """The two Docker API calls the ledger makes, answering as a real engine would."""

    base_url = "http+docker://fake"

    def __init__(self, listing: list[dict], inspects: dict[str, dict]) -> None:
        self._listing = json.dumps(listing)
        self._inspects = {k: json.dumps(v) for k, v in inspects.items()}
        self.calls = 0

    def containers(self, all: bool = False) -> list[dict]:  # noqa: A002 - Docker's name
        self.calls += 1
        return json.loads(self._listing)

    def inspect_container(self, cid: str) -> dict:
        self.calls += 1
        return json.loads(self._inspects[cid])


def world(n: int, inventory) -> FakeAPI:
    listing, inspects = [], {}
    migs = list(inventory.migs)
    for i in range(n):
        cid = f"{i:064x}"
        user = f"student{i % 300:03d}"
        status, labelset, requests = "running", {}, []
        finished = (NOW - timedelta(minutes=i % 50 + 2)).isoformat()
        if i < len(migs) - 6:  # most slices held by managed servers
            mig = migs[i]
            status = "running" if i % 3 else "exited"
            labelset = labels.encode(
                hub="lab",
                user=user,
                server="",
                profile="mig-1g",
                created_at=NOW,
                slots=[mig.slot],
                uuids=[mig.uuid],
                parent_uuids=[mig.parent_uuid],
                gis=[mig.gi],
                gpu_profile=mig.profile,
                equivalents=mig.equivalents,
                ports={"ssh": 40000 + i},
            )
            requests = [
                {
                    "Driver": "nvidia",
                    "DeviceIDs": [mig.uuid],
                    "Capabilities": [["gpu"]],
                    "Count": 0,
                    "Options": {},
                }
            ]
        elif i < 600:  # CPU-only servers
            labelset = labels.encode(
                hub="lab", user=user, server=f"s{i}", profile="cpu", created_at=NOW
            )
            status = "running" if i % 2 else "exited"
        else:  # everything else on the host: databases, builds, other people's tools
            labelset = {"com.example.app": f"svc{i}"}
        listing.append(
            {
                "Id": cid,
                "Names": [f"/c{i}"],
                "Image": "img",
                "Labels": labelset,
                "State": status,
                "Status": "Up 2 hours"
                if status == "running"
                else f"Exited (0) {i % 50 + 2} minutes ago",
                "Created": int(NOW.timestamp()) - 3600,
                "Ports": [
                    {"IP": "127.0.0.1", "PrivatePort": 8888, "PublicPort": 30000 + i, "Type": "tcp"}
                ]
                if status == "running"
                else [],
            }
        )
        inspects[cid] = {
            "Id": cid,
            "State": {"Status": status, "FinishedAt": finished},
            "HostConfig": {"DeviceRequests": requests or None, "Runtime": "runc"},
            "Config": {"Env": ["PATH=/usr/bin"]},
        }
    return FakeAPI(listing, inspects)


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--containers", type=int, default=1000)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()

    inventory = parse_topology(topology(args.gpus), "bench")
    api = world(args.containers, inventory)
    policy = Policy.default()
    ledger = Ledger(api, start_timeout=120)

    api.calls = 0
    start = time.perf_counter()
    first = ledger.read(policy.hold_seconds)
    cold = time.perf_counter() - start
    cold_calls = api.calls
    api.calls = 0
    warm = timed(lambda: ledger.read(policy.hold_seconds), args.repeat)
    warm_calls = api.calls / args.repeat

    snap = Snapshot(inventory, first.allocations, policy, first.bound_ports, NOW)
    limits = policy.for_user("newcomer").limits
    request = allocator.Request("newcomer", mig_profile="1g.10gb")
    decisions = timed(lambda: snap.choose(request), args.repeat * 4)
    result = snap.choose(request)
    render = timed(snap.to_json, max(5, args.repeat // 5))

    held = sum(1 for a in first.allocations if a.holds and a.uuids)
    print(
        f"host: {args.gpus} GPUs x 7 MIG slices; {args.containers} containers, "
        f"{len(first.allocations)} allocations ({held} holding a slice)"
    )
    print(f"ledger read, cold (list + inspects): {cold * 1000:8.2f} ms, {cold_calls} API calls")
    print(
        f"ledger read, steady state (median):  {statistics.median(warm) * 1000:8.2f} ms, "
        f"{warm_calls:.0f} API call(s)"
    )
    print(
        f"allocation decision (median):        {statistics.median(decisions) * 1000:8.3f} ms "
        f"-> {result.describe() if hasattr(result, 'describe') else result.message}"
    )
    print(f"snapshot to JSON (median):           {statistics.median(render) * 1000:8.2f} ms")
    print(
        f"ratio decision / steady ledger read: "
        f"{statistics.median(decisions) / statistics.median(warm):.3f}"
    )
    assert limits is not None


if __name__ == "__main__":
    main()
