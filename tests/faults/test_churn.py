"""Row 2: churn. Random spawns, stops, restarts and removals (default and named servers, every
profile) through the Hub's REST API, with a fixed seed, and every 50 operations a container
made by hand with a ``docker run --gpus``-style device request for a MIG device that looks
free, which the hub must treat as taken while it runs."""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import docker
import pytest

from . import sizes
from .conftest import POLL_INTERVAL, MakeHub, MakeScenario
from .measure import Key, Scenario

pytestmark = pytest.mark.docker

SEED = 20240611
HUB = "faults-churn"
PROFILES = ["cpu", "mig-1g", "mig-1g", "mig-3g", "gpu-1"]
WORKERS = 2
BY_HAND_EVERY = 50
BY_HAND_FOR = 20  # operations a hand-made holder runs before it is removed


class Gate:
    """Operations run on ``WORKERS`` threads at once; a hand-made holder is made while none
    runs (a ``docker run`` racing a spawn for the same device is a double holder of the
    test's making, not the hub's)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.active = 0
        self.closed = False

    def enter(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: not self.closed)
            self.active += 1

    def leave(self) -> None:
        with self.cond:
            self.active -= 1
            self.cond.notify_all()

    def exclusive(self):
        gate = self

        class _Exclusive:
            def __enter__(self) -> None:
                with gate.cond:
                    gate.cond.wait_for(lambda: not gate.closed)
                    gate.closed = True
                    gate.cond.wait_for(lambda: gate.active == 0)

            def __exit__(self, *exc: object) -> None:
                with gate.cond:
                    gate.closed = False
                    gate.cond.notify_all()

        return _Exclusive()


def free_looking_mig(engine: Any, gpusim: Any, rng: random.Random) -> str | None:
    """A MIG UUID that no container names in its device requests (running or not)."""
    named: set[str] = set()
    api = engine.client.api
    for summary in api.containers(all=True):
        attrs = api.inspect_container(summary["Id"])
        for request in attrs["HostConfig"].get("DeviceRequests") or []:
            named.update(request.get("DeviceIDs") or [])
    free = sorted(set(gpusim.mig_uuids()) - named)
    return rng.choice(free) if free else None


def by_hand(engine: Any, image: str, name: str, device: str) -> str:
    """``docker run -d --gpus device=<uuid> <image> sleep``: no gpuspawner labels."""
    api = engine.client.api
    request = docker.types.DeviceRequest(driver="nvidia", device_ids=[device],
                                         capabilities=[["gpu"]])
    made = api.create_container(image, command=["sleep", "100000"], name=name,
                                host_config=api.create_host_config(device_requests=[request]))
    api.start(made["Id"])
    return made["Id"]


def operate(scn: Scenario, engine: Any, rng: random.Random, key: Key, running: bool,
            log: list[str]) -> None:
    """One random operation on one server, chosen by its state."""
    hub_id, user, server = key
    if not running:
        profile = rng.choice(PROFILES)
        outcome = scn.spawn(hub_id, user, profile, server)
        log.append(f"spawn {user}/{server} {profile}: {outcome}")
        if outcome == "ready":
            scn.write_markers(key)
        return
    action = rng.choices(["stop", "restart", "remove"], weights=[40, 35, 25])[0]
    if action == "stop":
        scn.stop(hub_id, user, server)
    elif action == "restart":
        profile = rng.choice([scn.ready.get(key, "cpu"), rng.choice(PROFILES)])
        scn.stop(hub_id, user, server)
        outcome = scn.spawn(hub_id, user, profile, server)
        action += f" {profile}: {outcome}"
        if outcome == "ready":
            scn.write_markers(key)
    else:  # the user deletes the server; the admin removes its container
        scn.stop(hub_id, user, server, remove=bool(server))
        for container in engine.client.api.containers(
                all=True, filters={"label": [f"ds01.hub={hub_id}", f"ds01.user={user}"]}):
            if (container.get("Labels") or {}).get("ds01.server", "") == server:
                engine.client.api.remove_container(container["Id"], force=True)
        scn.forget_data(key)
    log.append(f"{action} {user}/{server}")


@pytest.mark.parametrize("size", [sizes.CHURN], ids=lambda s: s.id)
def test_churn_through_the_api_with_holders_made_by_hand(
    size: sizes.Size, fault_hub: MakeHub, scenario: MakeScenario, gpusim: Any, engine: Any,
    base_image: str,
) -> None:
    scn = scenario("churn", size)
    hub = scn.add_hub(HUB, fault_hub(HUB, policy="defaults: {allow_full_gpu: true}\n"))
    users = [f"c{n:02d}" for n in range(size.users)]
    for user in users:
        hub.ensure_user(user)
    rng = random.Random(SEED)
    # The whole sequence is drawn up front from the seed: which server each operation
    # touches, and each worker's own random stream for what it does there.
    slots = [(HUB, user, server) for user in users for server in ("", "b")]
    plan = [rng.choice(slots) for _ in range(size.n)]
    shares = [[k for k in slots if users.index(k[1]) % WORKERS == w] for w in range(WORKERS)]
    gate, log, done = Gate(), [], []
    lock = threading.Lock()
    scn.begin()
    halt = threading.Event()  # the test ends early (an error, an interrupt): stop at once

    def worker(number: int) -> None:
        wrng = random.Random(SEED + number)
        mine = set(shares[number])
        for index, key in enumerate(plan):
            if halt.is_set():
                return
            if key not in mine:
                continue
            gate.enter()
            try:
                operate(scn, engine, wrng, key, key in scn.ready, log)
            finally:
                gate.leave()
            with lock:
                done.append(index)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(WORKERS)]
    for thread in threads:
        thread.start()
    try:
        watch(scn, engine, gpusim, base_image, rng, gate, threads, done, lock)
    finally:
        halt.set()
    scn.details["operations"] = len(done)
    scn.details["last_operations"] = log[-10:]
    scn.expect(len(done) == size.n, f"only {len(done)} of {size.n} operations ran")
    row = scn.finish(POLL_INTERVAL)
    assert row.ok(), row.explain()


def watch(scn: Scenario, engine: Any, gpusim: Any, image: str, rng: random.Random, gate: Gate,
          threads: list[threading.Thread], done: list[int], lock: threading.Lock) -> None:
    """While the workers run: every 50 operations a holder made by hand (on a MIG device
    that looks free, while no operation is in flight), removed again 20 operations later."""
    by_hand_made: list[tuple[int, str]] = []
    next_hand = BY_HAND_EVERY // 2
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        with lock:
            count = len(done)
        for made_at, cid in list(by_hand_made):
            if count - made_at >= BY_HAND_FOR:
                engine.client.api.remove_container(cid, force=True)
                by_hand_made.remove((made_at, cid))
        if count >= next_hand:
            next_hand += BY_HAND_EVERY
            with gate.exclusive():
                device = free_looking_mig(engine, gpusim, rng)
                if device is not None:
                    cid = by_hand(engine, image, f"by-hand-{count}", device)
                    scn.by_hand.add(cid)
                    by_hand_made.append((count, cid))
                    scn.count("made_by_hand")
                scn.check_servers()  # nothing in flight: every server it lists must answer
    for _, cid in by_hand_made:
        engine.client.api.remove_container(cid, force=True)
