"""Row 1: two hubs (their own ``hub_id``, one engine, one simulated host) with every user
pressing Start at the same moment, more users than slices, several rounds.

The engine also holds a history of old stopped containers, as a lab's does, so the spawns'
reads take the path they take in a lab: what runs, plus every container made after an old
one (Docker's ``since``), plus the rest from the last full list (``Ledger.read``). In
production an anchor is older than ``start_timeout`` and a minute; here the hubs are told
``HISTORY_AGE`` seconds, so that the history need not wait minutes to be old."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import pytest

from . import sizes
from .conftest import POLL_INTERVAL, MakeHub, MakeScenario

pytestmark = pytest.mark.docker

HUBS = ("faults-a", "faults-b")
#: Containers made this long before a full list may anchor Docker's ``since`` (tests/hub.py's
#: ``start_timeout`` is 120 s): longer than any spawn here stays created before its start.
HISTORY_AGE = 20
ANCHOR_CONFIG = ("import gpuspawner.ledger\n"
                 f"gpuspawner.ledger.Ledger.anchor_slack = {HISTORY_AGE} - 120\n")


def make_history(api: Any, image: str, count: int = 24) -> list[str]:
    """Old stopped containers, a third of them never started, none with a device."""
    made = []
    for n in range(count):
        cid = api.create_container(image, command=["true"], name=f"history-{n:02d}",
                                   labels={"lab.history": "yes"})["Id"]
        if n % 3:
            api.start(cid)
        made.append(cid)
    return made


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
    size: sizes.Size, fault_hub: MakeHub, scenario: MakeScenario, gpusim: Any,
    base_image: str,
) -> None:
    gpusim.install(nine_slices())
    scn = scenario("two-hubs", size)
    api = scn.engine.client.api
    made_at = time.monotonic()
    make_history(api, base_image)
    for hub_id in HUBS:
        hub = scn.add_hub(hub_id, fault_hub(hub_id, config_extra=ANCHOR_CONFIG))
        for n in range(size.users):
            hub.ensure_user(f"u{n:02d}")
    time.sleep(max(0.0, made_at + HISTORY_AGE + 2 - time.monotonic()))
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
