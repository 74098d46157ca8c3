"""The back-off rule when two creators take the same device at the same instant.

Two hubs (or a hub and a `docker run`) can both read "slice free" before either creates its
container. After creating, each re-reads Docker and applies the same rule; exactly one keeps
the device, whatever order the checks run in.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from gpuspawner import inventory, labels, spawnplan
from gpuspawner.allocator import Choice
from gpuspawner.spawner import GPUSpawner

from .test_ledger import make

pytestmark = pytest.mark.docker


@pytest.fixture(autouse=True, params=["events", "lists"])
def planned(request, monkeypatch):
    """``events``: every spawner of the test planned a moment before its containers were
    made, so its checks ask the event buffer first; ``lists``: no plan time, lists only."""
    if request.param == "events":
        monkeypatch.setattr(GPUSpawner, "_planned_ns", time.time_ns())
    return request.param


def claim(engine, image, user, mig) -> str:
    labelset = labels.encode(
        hub=f"hub-{user}", user=user, server="", profile="mig-3g",
        created_at=datetime.now(timezone.utc), slots=[mig.slot], uuids=[mig.uuid],
        parent_uuids=[mig.parent_uuid], gis=[mig.gi], gpu_profile=mig.profile,
        equivalents=mig.equivalents,
    )
    return make(engine, image, f"jupyter-{user}", labelset=labelset, device_ids=[mig.uuid],
                start=False)


def spawner_for(gpusim, user: str, container_id: str, mig) -> GPUSpawner:
    """A spawner that has just created ``container_id`` for ``mig`` (its plan says so), about
    to apply the race rule before its start."""
    spawner = GPUSpawner(user=SimpleNamespace(name=user, groups=[]), inventory_source="file",
                         topology_file=str(gpusim.state_path), hub_id=f"hub-{user}")
    spawner.object_id = container_id
    spawner._plan = spawnplan.Plan(spawnplan.CREATE, Choice((mig,)), device_ids=(mig.uuid,))
    return spawner


@pytest.mark.parametrize("check_order", [("first", "second"), ("second", "first")])
async def test_exactly_one_of_two_creators_keeps_the_device(
    engine, gpusim, base_image, monkeypatch, check_order
):
    monkeypatch.setattr(GPUSpawner, "_client", engine.client.api)
    mig = next(m for m in inventory.read("file", topology_file=gpusim.state_path).migs
               if m.profile == "3g.40gb")
    ids = {"first": claim(engine, base_image, "ann", mig),
           "second": claim(engine, base_image, "bo", mig)}
    users = {"first": "ann", "second": "bo"}
    lost = {}
    for who in check_order:
        lost[who] = await spawner_for(gpusim, users[who], ids[who], mig)._race(running=False)
    assert lost == {"first": (), "second": (mig.uuid,)}


async def test_a_running_holder_always_wins(engine, gpusim, base_image, monkeypatch):
    monkeypatch.setattr(GPUSpawner, "_client", engine.client.api)
    mig = inventory.read("file", topology_file=gpusim.state_path).migs[0]
    ours = claim(engine, base_image, "ann", mig)
    # Someone runs a container on the same slice by hand, after our create.
    make(engine, base_image, "by-hand", device_ids=[mig.uuid])
    assert await spawner_for(gpusim, "ann", ours, mig)._race(running=False) == (mig.uuid,)


async def test_a_stopped_container_started_again_gives_way_to_one_that_already_runs(
    engine, gpusim, base_image, monkeypatch
):
    """Docker's own clocks: the old container (created long before) is started again after
    a new one took its slice and finished its checks. The old one started later, so it is
    the one that gives way; the new one keeps the slice, whichever checks first."""
    api, mig, old, again = stopped_server(engine, gpusim, base_image, monkeypatch)
    new = claim(engine, base_image, "bo", mig)
    api.start(new)
    api.start(old)
    assert await spawner_for(gpusim, "bo", new, mig)._race(running=True) == ()
    assert await again._race(running=True) == (mig.uuid,)


def reuser(gpusim, engine, user: str, container_id: str, mig) -> GPUSpawner:
    """A spawner about to start ``container_id`` (stopped) again: its plan says reuse."""
    spawner = spawner_for(gpusim, user, container_id, mig)
    spawner._plan = spawnplan.Plan(spawnplan.REUSE, Choice((mig,)), device_ids=(mig.uuid,),
                                   existing=container_id)
    name = engine.client.api.inspect_container(container_id)["Name"].lstrip("/")
    spawner.__dict__["object_name"] = name  # DockerSpawner's name of this server's container
    return spawner


def stopped_server(engine, gpusim, base_image, monkeypatch):
    """ann's server, started once and stopped, on the first MIG slice; and the spawner about
    to start it again: (api, the slice, its container, that spawner)."""
    monkeypatch.setattr(GPUSpawner, "_client", engine.client.api)
    api = engine.client.api
    mig = inventory.read("file", topology_file=gpusim.state_path).migs[0]
    old = claim(engine, base_image, "ann", mig)
    api.start(old)
    api.stop(old, timeout=0)
    return api, mig, old, reuser(gpusim, engine, "ann", old, mig)


@pytest.mark.parametrize("first", ["stopped", "new"])
async def test_a_stopped_container_races_through_a_place_holder_before_its_start(
    engine, gpusim, base_image, monkeypatch, first
):
    """A stopped container is in no one's check: started again as it is, it and a new
    container on its slice could both pass. Its place-holder (created, never started, with
    the same devices) races for it; the earlier of the two creates wins, seen from both."""
    api, mig, old, again = stopped_server(engine, gpusim, base_image, monkeypatch)
    if first == "stopped":
        lost_again = await again._race(running=False)
        new = claim(engine, base_image, "bo", mig)
        lost_new = await spawner_for(gpusim, "bo", new, mig)._race(running=False)
        assert (lost_again, lost_new) == ((), (mig.uuid,))
    else:
        new = claim(engine, base_image, "bo", mig)
        lost_again = await again._race(running=False)
        lost_new = await spawner_for(gpusim, "bo", new, mig)._race(running=False)
        assert (lost_again, lost_new) == ((mig.uuid,), ())
    place = api.inspect_container("jupyter-ann-starting")
    assert place["State"]["Status"] == "created"
    assert place["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == [mig.uuid]
    await again._release_place()
    assert not api.containers(all=True, filters={"name": "jupyter-ann-starting"})


async def test_a_rival_gone_before_its_inspect_makes_the_check_read_again(
    engine, gpusim, base_image, monkeypatch
):
    """A place-holder listed by a check and removed before the check inspects it went
    because its container now runs: the check reads again and sees that container, instead
    of taking the missing rival for one that gave way."""
    api, mig, old, again = stopped_server(engine, gpusim, base_image, monkeypatch)
    assert await again._race(running=False) == ()  # its place-holder stands
    new = claim(engine, base_image, "bo", mig)
    checker = spawner_for(gpusim, "bo", new, mig)
    clock = checker._clock

    async def late_clock(container_id: str):
        if container_id == again._place:  # meanwhile: ann's container starts, its
            api.start(old)  # place-holder goes, exactly in this order
            await again._release_place()
        return await clock(container_id)

    checker._clock = late_clock  # type: ignore[method-assign]
    assert await checker._race(running=False) == (mig.uuid,)


# ----------------------------------------------------------------- the event buffer itself


class Lists:
    """Counts the container lists a check makes (``api.containers``)."""

    def __init__(self, api, monkeypatch) -> None:
        self.calls = 0
        real = api.containers

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(api, "containers", counted)


async def test_a_quiet_engine_is_checked_without_a_list(
    engine, gpusim, base_image, monkeypatch, planned
):
    """Nothing but this spawn's own container (and a CPU container) became live since the
    plan: both checks answer from the buffer alone, one event read each, and no list."""
    monkeypatch.setattr(GPUSpawner, "_client", engine.client.api)
    api = engine.client.api
    mig = inventory.read("file", topology_file=gpusim.state_path).migs[0]
    if planned == "events":
        # The window reaches event_margin back before the plan: let the tests before this
        # one (which start GPU containers) fall out of it.
        time.sleep(1.0)
        monkeypatch.setattr(GPUSpawner, "_planned_ns", time.time_ns())
    make(engine, base_image, "cpu-only")  # runs, asks for no GPU: no rival
    lists = Lists(api, monkeypatch)
    ours = claim(engine, base_image, "ann", mig)
    spawner = spawner_for(gpusim, "ann", ours, mig)
    assert await spawner._race(running=False) == ()
    api.start(ours)
    assert await spawner._race(running=True) == ()
    if planned == "events":
        assert lists.calls == 0
    else:
        assert lists.calls >= 2  # each check lists


async def test_a_rival_started_by_hand_since_the_plan_is_found(
    engine, gpusim, base_image, monkeypatch, planned
):
    """An old container on the slice, stopped before the plan, is started by hand after
    this spawn's start: the check after the start sees its start event, lists, and gives
    way (it started later, but it is not a spawn that checks: the rule is the rule)."""
    monkeypatch.setattr(GPUSpawner, "_planned_ns", None)
    old_planned = time.time_ns()
    api, mig, old, _again = stopped_server(engine, gpusim, base_image, monkeypatch)
    if planned == "events":
        monkeypatch.setattr(GPUSpawner, "_planned_ns", time.time_ns())
    else:
        assert old_planned  # the old container's own events are before any plan here
    new = claim(engine, base_image, "bo", mig)
    spawner = spawner_for(gpusim, "bo", new, mig)
    assert await spawner._race(running=False) == ()
    api.start(new)
    api.start(old)
    # bo started first: bo keeps the slice; the old one, seen from its own side, gives way.
    assert await spawner._race(running=True) == ()
    again = reuser(gpusim, engine, "ann", old, mig)
    assert await again._race(running=True) == (mig.uuid,)


async def test_a_rival_whose_event_left_the_buffer_is_found_by_the_lists(
    engine, gpusim, base_image, monkeypatch
):
    """Docker keeps its last 256 events. A rival made by hand after the plan, then 300
    other events: the buffer cannot prove the window, and the lists find the rival."""
    monkeypatch.setattr(GPUSpawner, "_client", engine.client.api)
    api = engine.client.api
    mig = inventory.read("file", topology_file=gpusim.state_path).migs[0]
    make(engine, base_image, "by-hand", device_ids=[mig.uuid])
    for n in range(150):
        api.remove_container(api.create_container(base_image, command="true",
                                                  name=f"noise-{n}")["Id"])
    ours = claim(engine, base_image, "ann", mig)
    lists = Lists(api, monkeypatch)
    assert await spawner_for(gpusim, "ann", ours, mig)._race(running=False) == (mig.uuid,)
    assert lists.calls >= 1


async def test_an_engine_with_live_restore_is_always_listed(
    engine, gpusim, base_image, monkeypatch, planned
):
    """With live-restore a restart of the engine keeps containers running and empties the
    buffer, and no event is ever logged for them: the buffer proves nothing there."""
    monkeypatch.setattr(GPUSpawner, "_client", engine.client.api)
    api = engine.client.api
    info = api.info
    monkeypatch.setattr(api, "info", lambda: {**info(), "LiveRestoreEnabled": True})
    mig = inventory.read("file", topology_file=gpusim.state_path).migs[0]
    spawner = spawner_for(gpusim, "ann", claim(engine, base_image, "ann", mig), mig)
    spawner.ledger._facts_at = None
    lists = Lists(api, monkeypatch)
    try:
        assert await spawner._race(running=False) == ()
        assert lists.calls >= 1
    finally:
        spawner.ledger._facts_at = None


@pytest.mark.parametrize("skew", [30.0, -30.0])
async def test_a_wrong_idea_of_the_engine_clock_falls_back_to_the_lists(
    engine, gpusim, base_image, monkeypatch, skew, planned
):
    """The ledger's idea of the engine's clock is 30 s off. Too far ahead, the read would
    wait for a moment still to come: it is dropped after a second. Too far behind, the
    window ends before this spawn's own event. Either way the lists answer, and a rival
    made by hand is found."""
    monkeypatch.setattr(GPUSpawner, "_client", engine.client.api)
    api = engine.client.api
    mig = inventory.read("file", topology_file=gpusim.state_path).migs[0]
    ours = claim(engine, base_image, "ann", mig)
    make(engine, base_image, "by-hand", device_ids=[mig.uuid])
    spawner = spawner_for(gpusim, "ann", ours, mig)
    ledger = spawner.ledger
    ledger._engine_facts()
    ledger._skew_ns += int(skew * 1e9)
    lists = Lists(api, monkeypatch)
    began = time.monotonic()
    try:
        assert await spawner._race(running=False) == (mig.uuid,)
    finally:
        ledger._facts_at = None
    assert lists.calls >= 1
    assert time.monotonic() - began < 10
