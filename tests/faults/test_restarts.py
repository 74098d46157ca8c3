"""Rows 3 and 4: the Docker engine restarted, and the hub killed with SIGKILL, while spawns
are in flight, again and again; servers already running must come through, and nothing may
be left holding a device.

Each round: newcomers press Start at once; after a random moment the fault strikes; the
spawns end (ready, refused or failed); users whose running server the fault stopped press
Start again, as do newcomers whose spawn it broke (that second try must work); every server
the hub lists must answer; the round's newcomers stop their servers (so the host never runs
out of slices, their files stay in their stopped containers and are read back at the end).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from . import sizes
from .conftest import POLL_INTERVAL, MakeHub, MakeScenario
from .measure import Scenario, servers_of

pytestmark = pytest.mark.docker

SEED = 7
#: Residents take the scarce sizes, newcomers the plentiful ones: every server that was ever
#: ready fits on the host at once, so a second try is never refused for want of a slice.
RESIDENT_PROFILES = ["mig-3g", "gpu-1", "mig-1g"]
NEWCOMER_PROFILES = ["mig-1g", "cpu"]
POLICY = "defaults: {allow_full_gpu: true}\n"


def residents(scn: Scenario, hub_id: str, count: int) -> None:
    """Servers running before the first fault, each with its marker files."""
    for n in range(count):
        user = f"r{n}"
        outcome = scn.spawn(hub_id, user, RESIDENT_PROFILES[n % len(RESIDENT_PROFILES)])
        assert outcome == "ready", scn.details
        scn.write_markers((hub_id, user, ""))


def press_start(scn: Scenario, hub_id: str, users: list[str], rng: random.Random
                ) -> tuple[list[threading.Thread], dict[str, str]]:
    """Newcomers press Start at once; their outcomes land in the returned dict."""
    outcomes: dict[str, str] = {}

    def one(user: str, profile: str) -> None:
        outcomes[user] = scn.spawn(hub_id, user, profile, timeout=180)

    threads = [threading.Thread(target=one, args=(u, rng.choice(NEWCOMER_PROFILES)))
               for u in users]
    for thread in threads:
        thread.start()
    return threads, outcomes


def try_again(scn: Scenario, hub_id: str, users: list[str], outcomes: dict[str, str],
              rng: random.Random) -> None:
    """Newcomers whose spawn the fault broke press Start again, once: it must work. A server
    the hub lists as ready after all (its spawn finished unseen) needs no second try."""
    listed = servers_of(scn.hubs[hub_id])
    for user in users:
        if outcomes.get(user) == "ready":
            continue
        model = listed.get((user, "")) or {}
        if model.get("ready"):
            scn.count("second_try_not_needed")
            scn.ready[(hub_id, user, "")] = (model.get("user_options") or {}).get(
                "profile", "cpu")
            continue
        if model.get("pending"):
            scn.note(f"{user}: still pending after the fault")
        outcome = scn.spawn(hub_id, user, rng.choice(NEWCOMER_PROFILES))
        scn.count(f"second_try_{outcome}")


def rounds(scn: Scenario, hub_id: str, size: sizes.Size, strike: Callable[[], None],
           after: Callable[[], None]) -> None:
    rng = random.Random(SEED)
    scn.begin()
    with scn.phase("residents"):
        residents(scn, hub_id, int(size.extra))
    for round_ in range(size.n):
        users = [f"n{round_}-{k}" for k in range(size.users)]
        with scn.phase("spawns and fault"):
            threads, outcomes = press_start(scn, hub_id, users, rng)
            time.sleep(rng.uniform(0.3, 3.0))
            scn.fault()
            with scn.phase("fault"):
                strike()
            # The hub can see what the fault did only once it is over (an engine that is
            # back): the settle waits out its polls from here, not from the fault's start.
            scn.fault()
            for thread in threads:
                thread.join()
        scn.count("spawns_in_flight", len(users))
        scn.count("spawns_broken", sum(1 for u in users if outcomes.get(u) != "ready"))
        with scn.phase("after the fault"):
            after()
        with scn.phase("started again"):
            scn.count("started_again", len(scn.recover()))
            try_again(scn, hub_id, users, outcomes, rng)
        with scn.phase("checks and stops"):
            for user in users:
                if (hub_id, user, "") in scn.ready:
                    scn.write_markers((hub_id, user, ""))
            scn.check_servers()
            for user in users:
                if (hub_id, user, "") in scn.ready:
                    scn.stop(hub_id, user)


@pytest.mark.parametrize("size", [sizes.ENGINE_RESTARTS], ids=lambda s: s.id)
def test_engine_restarted_mid_spawn(
    size: sizes.Size, fault_hub: MakeHub, scenario: MakeScenario, engine: Any
) -> None:
    """Without live-restore, ``dockerd`` stops every container when it stops: the hub sees
    its servers stopped at its next poll, and their users press Start again (counted lost
    if that does not bring them back with their files)."""
    hub_id = "faults-engine"
    scn = scenario("engine-restart", size)
    scn.add_hub(hub_id, fault_hub(hub_id, policy=POLICY))

    def restart_engine() -> None:
        try:
            engine.stop()
        finally:
            engine.start()

    def hub_notices() -> None:
        scn.settle(POLL_INTERVAL)  # the hub polled every server since the restart

    rounds(scn, hub_id, size, restart_engine, hub_notices)
    scn.expect(not scn.details.get("second_try_failed"),
               "a spawn the fault broke did not work at its user's second try")
    row = scn.finish(POLL_INTERVAL)
    assert row.ok(), row.explain()


@pytest.mark.parametrize("size", [sizes.HUB_KILLS], ids=lambda s: s.id)
def test_hub_killed_mid_spawn(
    size: sizes.Size, fault_hub: MakeHub, scenario: MakeScenario
) -> None:
    """SIGKILL of the hub while its users' spawns are in flight, then a restart (same
    database and config; the proxy the dead hub started is ended and a new one started).
    Orphans are counted after each restart, before anyone presses Start again."""
    hub_id = "faults-kill"
    scn = scenario("hub-kill", size)
    hub = scn.add_hub(hub_id, fault_hub(hub_id, policy=POLICY))

    def kill() -> None:
        assert hub.process is not None
        os.kill(hub.process.pid, signal.SIGKILL)
        hub.process.wait(30)

    def restart() -> None:
        hub.restart()
        scn.fault()
        scn.settle(0)  # a restarted hub polled every server it lists before it answered
        scn.check_orphans()
        scn.check_servers()

    rounds(scn, hub_id, size, kill, restart)
    scn.expect(not scn.details.get("second_try_failed"),
               "a spawn the fault broke did not work at its user's second try")
    row = scn.finish(POLL_INTERVAL)
    assert row.ok(), row.explain()
