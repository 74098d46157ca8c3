"""Row 1: two hubs (their own ``hub_id``, one engine, one simulated host) with every user
pressing Start at the same moment, more users than slices, several rounds."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest

from . import sizes
from .conftest import POLL_INTERVAL, MakeHub, MakeScenario

pytestmark = pytest.mark.docker

HUBS = ("faults-a", "faults-b")


def nine_slices() -> dict[str, Any]:
    """Two A100s: seven 1g.10gb slices on GPU 0, two on GPU 1 (the rest of it unused)."""
    def gpu(index: int, count: int) -> dict[str, Any]:
        return {
            "index": index, "uuid": f"GPU-dddddddd-0000-4000-8000-00000000000{index}",
            "name": "NVIDIA A100-SXM4-80GB", "memory_mib": 81920, "mig_mode": "enabled",
            "total_slices": 7,
            "mig_devices": [
                {"index": n, "profile": "1g.10gb", "gi": 7 + n, "ci": 0,
                 "uuid": f"MIG-dddddddd-000{index}-4000-8000-00000000000{n}"}
                for n in range(count)
            ],
        }
    return {"driver_version": "550.90.07", "cuda_version": "12.4",
            "gpus": [gpu(0, 7), gpu(1, 2)]}


@pytest.mark.parametrize("size", [sizes.TWO_HUBS], ids=lambda s: s.id)
def test_two_hubs_all_pressing_start_at_once(
    size: sizes.Size, fault_hub: MakeHub, scenario: MakeScenario, gpusim: Any
) -> None:
    gpusim.install(nine_slices())
    scn = scenario("two-hubs", size)
    for hub_id in HUBS:
        hub = scn.add_hub(hub_id, fault_hub(hub_id))
        for n in range(size.users):
            hub.ensure_user(f"u{n:02d}")
    everyone = [(hub_id, f"u{n:02d}") for n in range(size.users) for hub_id in HUBS]
    scn.begin()
    per_round = []
    for _ in range(size.n):
        with concurrent.futures.ThreadPoolExecutor(len(everyone)) as pool:
            outcomes = list(pool.map(lambda who: scn.spawn(who[0], who[1], "mig-1g"),
                                     everyone))
        winners = [who for who, outcome in zip(everyone, outcomes, strict=True)
                   if outcome == "ready"]
        per_round.append(len(winners))
        for hub_id, user in winners:
            scn.write_markers((hub_id, user, ""))
        scn.check_servers()
        with concurrent.futures.ThreadPoolExecutor(len(winners) or 1) as pool:
            list(pool.map(lambda who: scn.stop(who[0], who[1]), winners))
    scn.details["ready_per_round"] = per_round
    scn.expect(all(0 < n <= 9 for n in per_round), f"ready servers per round: {per_round}")
    row = scn.finish(POLL_INTERVAL)
    assert row.ok(), row.explain()
