"""The back-off rule when two creators take the same device at the same instant.

Two hubs (or a hub and a `docker run`) can both read "slice free" before either creates its
container. After creating, each re-reads Docker and applies the same rule; exactly one keeps
the device, whatever order the checks run in.
"""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from gpuspawner import inventory, labels, spawnplan
from gpuspawner.allocator import Choice
from gpuspawner.spawner import GPUSpawner

from .test_ledger import make

pytestmark = pytest.mark.docker


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
