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
from gpuspawner.ledger import Ledger, LedgerError
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


def test_a_container_made_and_stopped_since_the_full_list_is_seen_once_forgotten(
    engine, gpusim, base_image
):
    """A server's own container, made after the last full list and stopped a moment after
    its start, is in neither the live list nor the kept view: once the spawner forgets it
    (as it does after a start and before each plan), the next read inspects and shows it."""
    inv = inventory.read("file", topology_file=gpusim.state_path)
    ledger = Ledger(engine.client, start_timeout=120)
    hold = lambda user: 600  # noqa: E731
    ledger.read(hold)  # the full list: nothing yet
    cid, _ = spawn_like(engine, base_image, inv, "eve", mig_profile="1g.10gb")
    engine.client.api.stop(cid, timeout=0)
    unseen = ledger.read(hold, stopped_max_age=60)
    assert cid not in {a.container_id for a in unseen.allocations}  # the documented lateness
    ledger.forget(cid)
    seen = {a.container_id: a for a in ledger.read(hold, stopped_max_age=60).allocations}
    assert seen[cid].state == HELD and seen[cid].user == "eve"
    again = {a.container_id for a in ledger.read(hold, stopped_max_age=60).allocations}
    assert cid in again  # kept in the view from then on


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


def test_a_live_only_read_lists_what_runs_or_starts_and_forgets_nothing(
    engine, gpusim, base_image
):
    """The race rule's read: Docker filters out the stopped containers (a lab's hundreds),
    and what the ledger learnt of them stays cached for the next full read."""
    inv = inventory.read("file", topology_file=gpusim.state_path)
    running, _ = spawn_like(engine, base_image, inv, "ann", mig_profile="1g.10gb")
    stopped, _ = spawn_like(engine, base_image, inv, "bo", mig_profile="3g.40gb")
    engine.client.api.stop(stopped, timeout=0)
    starting = make(engine, base_image, "starting", count=1, start=False)
    ledger = Ledger(engine.client, start_timeout=120)
    full = ledger.read(lambda user: 600)
    live = ledger.read(lambda user: 600, live_only=True)
    assert {a.container_id for a in live.allocations} == {running, starting}
    assert live.api_calls == 1
    again = ledger.read(lambda user: 600)
    assert again.api_calls == 1 and again.allocations == full.allocations


def test_a_spawns_read_lists_the_live_and_keeps_the_stopped_from_the_last_full_list(
    engine, gpusim, base_image
):
    """``stopped_max_age``: what runs or starts is Docker's now (one filtered list); the
    stopped containers are the last full list's, with each one that stopped since, or that
    this hub forgot (stopped, removed), inspected again. Past the age, a full list again."""
    inv = inventory.read("file", topology_file=gpusim.state_path)
    api = engine.client.api
    ann, _ = spawn_like(engine, base_image, inv, "ann", mig_profile="1g.10gb")
    bo, _ = spawn_like(engine, base_image, inv, "bo", mig_profile="3g.40gb")
    api.stop(bo, timeout=0)
    cy, _ = spawn_like(engine, base_image, inv, "cy", mig_profile="2g.20gb")
    api.stop(cy, timeout=0)
    ledger = Ledger(engine.client, start_timeout=120)
    hold = lambda user: 600  # noqa: E731
    full = ledger.read(hold)
    assert {a.container_id: a.state for a in full.allocations} == {
        ann: RUNNING, bo: HELD, cy: HELD}

    api.stop(ann, timeout=0)  # stopped by hand since the full list
    api.remove_container(cy)  # removed by hand: seen late (a hold, never a runner)
    di, _ = spawn_like(engine, base_image, inv, "di", mig_profile="1g.10gb")
    merged = ledger.read(hold, stopped_max_age=60)
    states = {a.container_id: a for a in merged.allocations}
    assert {cid: a.state for cid, a in states.items()} == {
        ann: HELD, bo: HELD, cy: HELD, di: RUNNING}
    finished = api.inspect_container(ann)["State"]["FinishedAt"]
    assert states[ann].finished_at == labels.parse_time(finished)
    assert merged.api_calls == 2 + 1  # the filtered list, one inspect (ann), one new (di)

    ledger.forget(cy)  # as the spawner does after it removes a container
    again = ledger.read(hold, stopped_max_age=60)
    assert {a.container_id for a in again.allocations} == {ann, bo, di}
    assert again.api_calls == 2  # the list, the inspect of the forgotten one (gone)

    time.sleep(1.1)
    late = ledger.read(hold, stopped_max_age=1)
    assert late.containers == len(api.containers(all=True))  # a full list again
    assert {a.container_id for a in late.allocations} == {ann, bo, di}


def test_engine_down_is_a_clear_error():
    client = docker.APIClient(base_url="unix:///nonexistent/docker.sock", version="1.41")
    with pytest.raises(LedgerError, match="did not answer a container list.*dockerd is running"):
        Ledger(client).read()
