"""The ledger against a real Docker engine with the simulated NVIDIA host.

Containers are made exactly as the spawner makes them (labels + a DeviceRequest naming UUIDs)
and read back; holders made with `docker run --gpus`-style requests are seen; hand-edited
labels are reported; holds are counted from Docker's own FinishedAt.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import docker
import pytest

from gpuspawner import inventory, labels
from gpuspawner.allocator import Choice, Request, choose
from gpuspawner.ledger import LIVE_ALL, LIVE_RUNNING, Ledger, LedgerError
from gpuspawner.records import CREATED, EXPIRED, FAILED, HELD, RUNNING

from ..unit.hosts import limits

pytestmark = pytest.mark.docker


def make(engine, image, name, *, labelset=None, device_ids=None, count=0, start=True, env=None):
    api = engine.client.api
    requests = []
    if device_ids or count:
        requests = [
            docker.types.DeviceRequest(
                driver="nvidia",
                device_ids=device_ids or None,
                count=count or None,
                capabilities=[["gpu"]],
            )
        ]
    host_config = api.create_host_config(device_requests=requests or None)
    created = api.create_container(
        image,
        command=["sleep", "300"],
        name=name,
        labels=labelset or {},
        host_config=host_config,
        environment=env,
    )
    if start:
        api.start(created["Id"])
    return created["Id"]


def spawn_like(engine, image, inv, user, mig_profile=None, gpus=0, server="", taken=()):
    choice = choose(inv, list(taken), limits(), Request(user, server, "p", mig_profile, gpus))
    assert isinstance(choice, Choice), choice
    labelset = labels.encode(
        hub="test",
        user=user,
        server=server,
        profile="p",
        created_at=datetime.now(timezone.utc),
        slots=choice.slots,
        uuids=choice.uuids,
        parent_uuids=choice.parent_uuids,
        gis=choice.gis,
        gpu_profile=choice.gpu_profile,
        equivalents=choice.equivalents,
        ports={"ssh": 40022},
    )
    cid = make(engine, image, f"jupyter-{user}", labelset=labelset, device_ids=list(choice.uuids))
    return cid, choice


def test_managed_containers_read_back_exactly(engine, gpusim, base_image):
    inv = inventory.read("file", topology_file=gpusim.state_path)
    ledger = Ledger(engine.client)
    cid_a, a = spawn_like(engine, base_image, inv, "ann", mig_profile="1g.10gb")
    first = ledger.read()
    cid_b, b = spawn_like(engine, base_image, inv, "bo", gpus=1, taken=first.allocations)
    reading = ledger.read()
    by_id = {x.container_id: x for x in reading.allocations}
    ann, bo = by_id[cid_a], by_id[cid_b]
    assert ann.managed and ann.user == "ann" and ann.state == RUNNING
    assert ann.uuids == a.uuids and ann.slots == a.slots and ann.parent_uuids == a.parent_uuids
    assert ann.gpu_profile == "1g.10gb" and ann.equivalents == round(1 / 7, 4)
    assert ann.port_map == {"ssh": 40022} and ann.label_problems == ()
    assert bo.uuids == b.uuids and bo.uuids[0].startswith("GPU-") and bo.equivalents == 1.0
    # Docker stored the same devices the labels name.
    attrs = engine.client.api.inspect_container(cid_a)
    request = attrs["HostConfig"]["DeviceRequests"][0]
    assert request["Driver"] == "nvidia" and request["DeviceIDs"] == list(a.uuids)
    assert request["Capabilities"] == [["gpu"]]
    assert a.uuids != b.uuids


def test_unmanaged_gpu_containers_are_holders(engine, gpusim, base_image):
    inv = inventory.read("file", topology_file=gpusim.state_path)
    gpu3 = inv.gpus[3].uuid
    named = make(engine, base_image, "outside-named", device_ids=[gpu3])
    everything = make(engine, base_image, "outside-all", count=-1)
    plain = make(engine, base_image, "no-gpu-at-all")
    reading = Ledger(engine.client).read()
    by_id = {x.container_id: x for x in reading.allocations}
    assert plain not in by_id  # a container without GPUs is not an allocation
    assert by_id[named].managed is False and by_id[named].uuids == (gpu3,)
    assert by_id[everything].gpu_count == -1 and by_id[everything].state == RUNNING
    refused = choose(inv, reading.allocations, limits(), Request("ann", mig_profile="1g.10gb"))
    assert refused.code == "full" and any(not h.managed for h in refused.holders)


def test_holds_follow_docker_finish_time(engine, gpusim, base_image):
    inv = inventory.read("file", topology_file=gpusim.state_path)
    cid, _ = spawn_like(engine, base_image, inv, "ann", mig_profile="3g.40gb")
    engine.client.api.stop(cid, timeout=0)
    ledger = Ledger(engine.client)
    held = ledger.read(hold_for=lambda user: 3600).allocations[0]
    assert held.state == HELD and held.docker_status == "exited" and held.finished_at
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    assert ledger.read(lambda user: 3600, now=later).allocations[0].state == EXPIRED
    assert ledger.read(lambda user: 0).allocations[0].state == EXPIRED


def test_created_but_never_started(engine, gpusim, base_image):
    inv = inventory.read("file", topology_file=gpusim.state_path)
    choice = choose(inv, [], limits(), Request("cy", mig_profile="2g.20gb"))
    labelset = labels.encode(
        hub="t",
        user="cy",
        server="",
        profile="p",
        created_at=datetime.now(timezone.utc),
        slots=choice.slots,
        uuids=choice.uuids,
        equivalents=choice.equivalents,
    )
    make(
        engine,
        base_image,
        "in-flight",
        labelset=labelset,
        device_ids=list(choice.uuids),
        start=False,
    )
    ledger = Ledger(engine.client, start_timeout=120)
    assert ledger.read().allocations[0].state == CREATED
    late = datetime.now(timezone.utc) + timedelta(minutes=5)
    assert ledger.read(now=late).allocations[0].state == FAILED


def test_a_container_created_now_with_old_labels_is_a_spawn_in_flight(
    engine, gpusim, base_image
):
    """A place-holder carries its container's labels, creation time included (days ago):
    whether a created container is a spawn in flight is Docker's Created, never the label."""
    inv = inventory.read("file", topology_file=gpusim.state_path)
    choice = choose(inv, [], limits(), Request("cy", mig_profile="2g.20gb"))
    labelset = labels.encode(
        hub="t", user="cy", server="", profile="p",
        created_at=datetime.now(timezone.utc) - timedelta(days=3),
        slots=choice.slots, uuids=choice.uuids, equivalents=choice.equivalents,
    )
    make(engine, base_image, "place-holder", labelset=labelset,
         device_ids=list(choice.uuids), start=False)
    assert Ledger(engine.client, start_timeout=120).read().allocations[0].state == CREATED


def test_hand_edited_labels_fall_back_to_device_requests(engine, gpusim, base_image):
    inv = inventory.read("file", topology_file=gpusim.state_path)
    real = inv.migs[0].uuid
    make(
        engine,
        base_image,
        "edited",
        device_ids=[real],
        labelset={
            "ds01.managed": "true",
            "ds01.user": "dan",
            "ds01.gpu.uuids": "garbage!",
            "ds01.gpu.allocated": "x.y",
            "ds01.gpu.equivalents": "-3",
        },
    )
    got = Ledger(engine.client).read().allocations[0]
    assert got.user == "dan" and got.uuids == (real,)
    assert any("ds01.gpu.uuids" in p for p in got.label_problems)
    assert any("ds01.gpu.allocated" in p for p in got.label_problems)


def test_steady_state_read_is_one_api_call(engine, gpusim, base_image):
    inv = inventory.read("file", topology_file=gpusim.state_path)
    spawn_like(engine, base_image, inv, "ann", mig_profile="1g.10gb")
    cid, _ = spawn_like(engine, base_image, inv, "bo", mig_profile="3g.40gb")
    engine.client.api.stop(cid, timeout=0)
    make(engine, base_image, "outside", count=1)
    make(engine, base_image, "plain")
    ledger = Ledger(engine.client)
    first = ledger.read(lambda user: 600)
    assert first.api_calls > 1  # inspects: the stopped one's finish time, the unlabelled ones
    again = ledger.read(lambda user: 600)
    assert again.api_calls == 1 and again.allocations == first.allocations
    # A restart of the stopped container invalidates what was cached of its finish time.
    # Docker's list has no finish time, only "Exited (0) 3 seconds ago": enough to notice.
    time.sleep(3)
    engine.client.api.start(cid)
    engine.client.api.stop(cid, timeout=0)
    after = {a.container_id: a for a in ledger.read(lambda user: 600).allocations}
    before = {a.container_id: a for a in first.allocations}
    assert after[cid].finished_at > before[cid].finished_at + timedelta(seconds=2)


def test_a_live_only_read_without_an_anchor_filters_by_state_and_forgets_nothing(
    engine, gpusim, base_image
):
    """The race rule's read on a young engine (no container old enough to anchor Docker's
    ``since``): Docker filters out the stopped containers, and what the ledger learnt of
    them stays cached for the next full read."""
    inv = inventory.read("file", topology_file=gpusim.state_path)
    running, _ = spawn_like(engine, base_image, inv, "ann", mig_profile="1g.10gb")
    stopped, _ = spawn_like(engine, base_image, inv, "bo", mig_profile="3g.40gb")
    engine.client.api.stop(stopped, timeout=0)
    starting = make(engine, base_image, "starting", count=1, start=False)
    ledger = Ledger(engine.client, start_timeout=120)
    full = ledger.read(lambda user: 600)
    live = ledger.read(lambda user: 600, live=LIVE_ALL)
    assert {a.container_id for a in live.allocations} == {running, starting}
    assert live.api_calls == 1
    again = ledger.read(lambda user: 600)
    assert again.api_calls == 1 and again.allocations == full.allocations


#: A ledger whose ``since`` anchor is any container made over START seconds before a full
#: list (in production: ``start_timeout`` and a minute), and the wait that makes the
#: containers made before it old.
START = 3


def anchored(engine) -> Ledger:
    ledger = Ledger(engine.client, start_timeout=START)
    ledger.anchor_slack = 0
    return ledger


def grow_old() -> None:
    time.sleep(START + 1.2)  # Docker's list gives whole seconds


def test_a_live_only_read_lists_what_runs_and_what_was_made_lately(
    engine, gpusim, base_image, monkeypatch
):
    """The race rule's read at a lab's scale: Docker returns what runs and what was made
    after the anchor, never the old stopped containers; a created container made before
    the anchor is past its start time-out (a failed start), so it is no rival."""
    inv = inventory.read("file", topology_file=gpusim.state_path)
    api = engine.client.api
    stale = make(engine, base_image, "stale-create", count=1, start=False)
    history = [make(engine, base_image, f"history-{n}", start=False) for n in range(6)]
    for cid in history:
        api.start(cid)
        api.stop(cid, timeout=0)
    ann, _ = spawn_like(engine, base_image, inv, "ann", mig_profile="1g.10gb")
    ledger = anchored(engine)
    grow_old()
    ledger.read(lambda user: 600)  # the full list: anchors among the old containers
    starting = make(engine, base_image, "starting", count=1, start=False)
    cy, _ = spawn_like(engine, base_image, inv, "cy", mig_profile="2g.20gb",
                       taken=ledger.read().allocations)
    returned: list[int] = []
    listing = api.containers

    def counted(*args, **kwargs):
        entries = listing(*args, **kwargs)
        returned.append(len(entries))
        return entries

    monkeypatch.setattr(api, "containers", counted)
    live = ledger.read(lambda user: 600, live=LIVE_ALL)
    contenders = {a.container_id: a.state for a in live.allocations
                  if a.state in (RUNNING, CREATED)}
    assert contenders == {ann: RUNNING, starting: CREATED, cy: RUNNING}
    assert stale not in contenders
    # What Docker returned: what runs (ann, cy) and what is new (starting, cy), never the
    # engine's history of stopped containers.
    assert returned == [2, 2] and len(listing(all=True)) == 10
    assert live.api_calls == 2 + 1  # the two lists; cy, new since the last read, inspected

    # The check after a start: all that runs, however old (one list).
    returned.clear()
    running = ledger.read(lambda user: 600, live=LIVE_RUNNING)
    assert {a.container_id: a.state for a in running.allocations} == {ann: RUNNING, cy: RUNNING}
    assert returned == [2] and running.api_calls == 1


def test_a_spawns_read_lists_what_runs_and_what_is_new_and_keeps_the_older_stopped_ones(
    engine, gpusim, base_image
):
    """``stopped_max_age``: what runs and what was made after the anchor is Docker's now
    (two lists); the older stopped containers are the last full list's, with each one that
    ran then and does not now, or that this hub forgot, inspected again. Only an old
    container started and stopped again by someone else, or removed, is seen late (a
    hold). Past the age, a full list again."""
    inv = inventory.read("file", topology_file=gpusim.state_path)
    api = engine.client.api
    ann, _ = spawn_like(engine, base_image, inv, "ann", mig_profile="1g.10gb")
    bo, _ = spawn_like(engine, base_image, inv, "bo", mig_profile="3g.40gb")
    api.stop(bo, timeout=0)
    cy, _ = spawn_like(engine, base_image, inv, "cy", mig_profile="2g.20gb")
    api.stop(cy, timeout=0)
    ledger = anchored(engine)
    hold = lambda user: 600  # noqa: E731
    grow_old()
    full = ledger.read(hold)
    assert {a.container_id: a.state for a in full.allocations} == {
        ann: RUNNING, bo: HELD, cy: HELD}

    api.stop(ann, timeout=0)  # stopped by hand since the full list
    api.remove_container(cy)  # removed by hand: seen late (a hold, never a runner)
    di, _ = spawn_like(engine, base_image, inv, "di", mig_profile="1g.10gb")
    eve, _ = spawn_like(engine, base_image, inv, "eve", mig_profile="1g.10gb",
                        taken=[a for a in full.allocations if a.user == "ann"])
    api.stop(eve, timeout=0)  # made and stopped since: the since list has it
    merged = ledger.read(hold, stopped_max_age=60)
    states = {a.container_id: a for a in merged.allocations}
    assert {cid: a.state for cid, a in states.items()} == {
        ann: HELD, bo: HELD, cy: HELD, di: RUNNING, eve: HELD}
    finished = api.inspect_container(ann)["State"]["FinishedAt"]
    assert states[ann].finished_at == labels.parse_time(finished)
    # Three lists (cy, the newest old container, anchored the first since list: Docker
    # refuses it now, and the next anchor serves), one inspect (ann, stopped since), two new
    # containers (di, eve).
    assert merged.api_calls == 3 + 1 + 2

    ledger.forget(cy)  # as the spawner does after it removes a container
    again = ledger.read(hold, stopped_max_age=60)
    assert {a.container_id for a in again.allocations} == {ann, bo, di, eve}
    assert again.api_calls == 2 + 1  # the lists, the inspect of the forgotten one (gone)

    # An old stopped container started and stopped again by someone else: the view keeps
    # its old finish time until the next full list, or until this hub forgets it.
    before = states[bo].finished_at
    api.start(bo)
    api.stop(bo, timeout=0)
    kept = {a.container_id: a for a in ledger.read(hold, stopped_max_age=60).allocations}
    assert kept[bo].finished_at == before
    ledger.forget(bo)
    fresh = {a.container_id: a for a in ledger.read(hold, stopped_max_age=60).allocations}
    assert fresh[bo].finished_at > before

    time.sleep(1.1)
    late = ledger.read(hold, stopped_max_age=1)
    assert late.containers == len(api.containers(all=True))  # a full list again
    assert {a.container_id for a in late.allocations} == {ann, bo, di, eve}


def test_a_removed_anchor_moves_to_the_next_and_then_to_a_full_list(
    engine, gpusim, base_image
):
    """Docker refuses a ``since`` on a removed container: the read uses the next anchor
    (older: it lists more, never less), and with none left it lists everything and chooses
    anchors again. The reading is right on every path."""
    inv = inventory.read("file", topology_file=gpusim.state_path)
    api = engine.client.api
    old = []
    for n in range(3):
        old.append(make(engine, base_image, f"old-{n}", start=False))
        time.sleep(1.1)  # distinct seconds: the anchors' order is known
    ann, _ = spawn_like(engine, base_image, inv, "ann", mig_profile="1g.10gb")
    api.stop(ann, timeout=0)
    ledger = anchored(engine)
    hold = lambda user: 600  # noqa: E731
    grow_old()
    ledger.read(hold)
    assert ledger._anchors[:3] == (ann, old[2], old[1])
    bo, _ = spawn_like(engine, base_image, inv, "bo", mig_profile="1g.10gb",
                       taken=ledger.read().allocations)
    api.remove_container(ann)
    ledger.forget(ann)
    api.remove_container(old[2])
    reading = ledger.read(hold, stopped_max_age=60)
    assert {a.container_id: a.state for a in reading.allocations} == {bo: RUNNING}
    assert ledger._anchors == (old[1],)  # three kept: old[0] was never one
    live = ledger.read(hold, live=LIVE_ALL)
    assert {a.container_id for a in live.allocations} == {bo}
    for cid in old[:2]:
        api.remove_container(cid)
    again = ledger.read(hold, stopped_max_age=60)  # no anchor left: a full list
    assert {a.container_id: a.state for a in again.allocations} == {bo: RUNNING}
    assert again.containers == len(api.containers(all=True))
    assert ledger.view_age() is not None and ledger.view_age() < 5


def test_engine_down_is_a_clear_error():
    client = docker.APIClient(base_url="unix:///nonexistent/docker.sock", version="1.41")
    with pytest.raises(LedgerError, match="did not answer a container list.*dockerd is running"):
        Ledger(client).read()
