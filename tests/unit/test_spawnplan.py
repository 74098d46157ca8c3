"""The spawn planner (``spawnplan.plan`` and the race rule), one behaviour per test.

Snapshots are built here as plain data: an inventory from ``hosts.host`` and Allocations the
way the ledger reads them back from Docker (labels and device requests, the union held).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from gpuspawner import labels, spawnplan
from gpuspawner.allocator import Refusal
from gpuspawner.policy import Policy
from gpuspawner.records import (
    CREATED,
    EXPIRED,
    FAILED,
    HELD,
    RUNNING,
    Allocation,
    Inventory,
    MigDevice,
)
from gpuspawner.snapshot import Snapshot
from gpuspawner.spawnplan import Existing, Plan, SpawnRequest

from .hosts import HUB, NOW, host, limits

#: GPU 0: seven 1g slices (MIG on); GPU 1: whole (MIG off).
INV = host(["1g.10gb"] * 7, None)
SLICE = INV.migs  # 0.0 .. 0.6
GPU1 = INV.gpus[1]
_DOCKER = {RUNNING: "running", HELD: "exited", EXPIRED: "exited", CREATED: "created",
           FAILED: "created"}


def reboot(inventory: Inventory, tag: str = "r") -> Inventory:
    """MIG devices re-created: same layout, new UUIDs."""
    return replace(inventory, migs=tuple(
        replace(m, uuid=f"MIG-{tag}{i:07d}-0000-0000-0000-000000000000")
        for i, m in enumerate(inventory.migs)))


def container(
    cid: str,
    *,
    user: str = "ann",
    server: str = "",
    hub: str | None = HUB,
    name: str | None = None,
    profile: str = "mig-1g",
    devices=(),
    docker_uuids=None,
    state: str = RUNNING,
    priority: int = 0,
    ports: dict[str, int] | None = None,
    kind: str = "hub",  # "hub" (gpuspawner labels), "ds01" (aime.mlc.USER), "none" (no labels)
    inventory: Inventory = INV,
) -> tuple[Allocation, dict[str, str]]:
    """A container as the ledger reads it (Allocation) and its labels as Docker stores them.

    ``devices`` are what its labels name; ``docker_uuids`` what its device request holds
    (default: the same). The Allocation holds the union, as DESIGN.md says."""
    devices = tuple(devices)
    label_uuids = tuple(d.uuid for d in devices)
    held = label_uuids if docker_uuids is None else tuple(docker_uuids)
    name = name or f"jupyter-{user}{'-' + server if server else ''}"
    if kind == "hub":
        labelset = labels.encode(
            hub=hub, user=user, server=server, profile=profile, created_at=NOW,
            slots=[d.slot for d in devices], uuids=list(label_uuids),
            parent_uuids=[d.parent_uuid if isinstance(d, MigDevice) else d.uuid
                          for d in devices],
            gis=[d.gi for d in devices if isinstance(d, MigDevice)],
            gpu_profile=None, equivalents=sum(d.equivalents for d in devices),
            priority=priority, ports=ports or {})
    elif kind == "ds01":
        labelset = {labels.LEGACY_USER: user}
        if label_uuids:
            labelset[labels.GPU_UUID] = label_uuids[0]
    else:
        labelset = {}
    record = labels.decode(labelset)
    disagreement = ""
    if set(held) != set(label_uuids) and record.managed:
        disagreement = (f"labels name {', '.join(label_uuids) or 'no device'} but Docker "
                        f"gives the container {', '.join(held) or 'no device'}; it holds both")
    union = tuple(dict.fromkeys((*label_uuids, *held))) if record.managed else held
    finished = NOW - timedelta(minutes=5) if _DOCKER[state] == "exited" else None
    allocation = Allocation(
        container_id=cid, container_name=name, managed=record.managed, state=state,
        docker_status=_DOCKER[state], user=record.user, server=record.server,
        profile=record.profile, hub=record.hub, interface=record.interface,
        schema=record.schema, uuids=union, slots=tuple(d.slot for d in devices),
        parent_uuids=record.parent_uuids, gis=record.gis, equivalents=record.equivalents,
        priority=record.priority, ports=record.ports, created_at=NOW - timedelta(hours=1),
        finished_at=finished, disagreement=disagreement)
    return allocation, labelset


def existing(allocation: Allocation, labelset: dict[str, str]) -> Existing:
    return Existing(allocation.container_id, allocation.container_name,
                    allocation.docker_status, labels.decode(labelset))


def snap(*allocations: Allocation, inventory: Inventory = INV, bound=()) -> Snapshot:
    return Snapshot(inventory, tuple(allocations), Policy.default(), frozenset(bound), NOW,
                    HUB)


def request(**overrides) -> SpawnRequest:
    base = dict(hub_id=HUB, user="ann", server="", profile="mig-1g",
                container_name="jupyter-ann", mig_profile="1g.10gb", now=NOW)
    base.update(overrides)
    return SpawnRequest(**base)


def plan(snapshot: Snapshot, req: SpawnRequest, port_free=lambda port: True, lim=None):
    return spawnplan.plan(snapshot, req, port_free, lim or limits())


def env(result: Plan) -> dict[str, str]:
    return dict(result.environment)


def taken_by(allocations, inventory: Inventory = INV) -> set[str]:
    """Every UUID the holding allocations occupy, with whole GPUs and their slices both ways."""
    parent = {m.uuid: m.parent_uuid for m in inventory.migs}
    out: set[str] = set()
    for a in allocations:
        if a.state not in (RUNNING, HELD, CREATED):
            continue
        for uuid in a.uuids:
            out.add(uuid)
            if uuid in parent:
                out.add(parent[uuid])
            out.update(m for m, p in parent.items() if p == uuid)
    return out


# ---------------------------------------------------------------- a fresh container


def test_fresh_create_gets_the_label_schema_with_this_hubs_id():
    result = plan(snap(), request(hub_id="lab", server="big", container_name="jupyter-ann-big"))
    assert isinstance(result, Plan) and result.action == spawnplan.CREATE
    got = dict(result.labels)
    assert got[labels.MANAGED] == "true"
    assert got[labels.SCHEMA] == labels.SCHEMA_VERSION
    assert got[labels.INTERFACE] == "jupyterhub"
    assert got[labels.HUB] == "lab"
    assert got[labels.USER] == "ann" and got[labels.SERVER] == "big"
    assert got[labels.PROFILE] == "mig-1g"
    assert got[labels.GPU_UUIDS] == ",".join(result.device_ids)
    assert got[labels.GPU_UUID] == result.device_ids[0]
    assert got[labels.GPU_ALLOCATED] == ",".join(result.choice.slots)
    assert set(got) <= {k for k in got if k.startswith("ds01.")}
    assert result.removals == () and result.replaced is None


def test_fresh_create_labels_name_the_requesting_hub():
    result = plan(snap(), request(hub_id="physics"))
    assert dict(result.labels)[labels.HUB] == "physics"
    assert labels.decode(dict(result.labels)).hub == "physics"


def test_device_ids_are_the_chosen_uuids_and_nvidia_visible_devices_exactly_those():
    result = plan(snap(), request())
    assert result.device_ids == result.choice.uuids
    assert len(result.device_ids) == 1 and result.device_ids[0].startswith("MIG-")
    assert env(result)["NVIDIA_VISIBLE_DEVICES"] == result.device_ids[0]


def test_whole_gpus_visible_devices_lists_every_chosen_gpu():
    inventory = host(None, None, None)
    result = plan(snap(inventory=inventory),
                  request(profile="gpu-2", mig_profile=None, gpus=2))
    assert len(result.device_ids) == 2
    assert set(result.device_ids) <= {g.uuid for g in inventory.gpus}
    assert env(result)["NVIDIA_VISIBLE_DEVICES"].split(",") == list(result.device_ids)


def test_cpu_server_gets_no_device_and_sees_void():
    result = plan(snap(), request(profile="cpu", mig_profile=None))
    assert result.action == spawnplan.CREATE
    assert result.device_ids == ()
    assert env(result)["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert dict(result.labels)[labels.GPU_UUIDS] == ""


# ---------------------------------------------------------------- restart of a stopped server


@pytest.mark.parametrize("state", [EXPIRED, HELD])
def test_own_stopped_container_is_reused_when_its_device_is_still_valid(state):
    own, labelset = container("c-own", devices=[SLICE[3]], state=state)
    result = plan(snap(own), request(existing=existing(own, labelset)))
    assert isinstance(result, Plan) and result.action == spawnplan.REUSE
    assert result.existing == "c-own"
    assert result.choice.uuids == (SLICE[3].uuid,)
    assert result.removals == () and result.replaced is None


def test_own_cpu_container_is_reused():
    own, labelset = container("c-own", profile="cpu", state=EXPIRED)
    result = plan(snap(own), request(profile="cpu", mig_profile=None,
                                     existing=existing(own, labelset)))
    assert result.action == spawnplan.REUSE and result.existing == "c-own"


@pytest.mark.parametrize("replace_with, save", [("commit", True), ("remove", False)])
def test_replace_when_the_mig_uuid_is_gone(replace_with, save):
    own, labelset = container("c-own", devices=[SLICE[2]], state=EXPIRED)
    rebooted = reboot(INV)
    result = plan(snap(own, inventory=rebooted),
                  request(existing=existing(own, labelset), replace_with=replace_with))
    assert isinstance(result, Plan) and result.action == spawnplan.REPLACE
    assert result.existing == "c-own"
    assert result.replaced.container_id == "c-own"
    assert result.replaced.reason == spawnplan.GPU_GONE
    assert result.replaced.save is save
    assert result.device_ids[0] in {m.uuid for m in rebooted.migs}
    # prefers the same parent GPU
    assert result.choice.parent_uuids == (SLICE[2].parent_uuid,)


@pytest.mark.parametrize("replace_with, save", [("commit", True), ("remove", False)])
def test_replace_when_the_profile_changed(replace_with, save):
    own, labelset = container("c-own", devices=[SLICE[0]], state=EXPIRED, profile="mig-1g")
    result = plan(snap(own), request(profile="gpu-1", mig_profile=None, gpus=1,
                                     existing=existing(own, labelset),
                                     replace_with=replace_with))
    assert result.action == spawnplan.REPLACE
    assert result.replaced.reason == spawnplan.PROFILE_CHANGED
    assert result.replaced.save is save
    assert result.device_ids == (GPU1.uuid,)


def test_a_new_image_choice_replaces_the_container_and_keeps_a_copy():
    """The user chose another image for the same profile: a new container from that image
    (not from the old container's saved copy), the old one committed first and kept."""
    own, labelset = container("c-own", devices=[SLICE[0]], state=EXPIRED)
    mine = replace(existing(own, labelset), image="lab/tf:2")
    result = plan(snap(own), request(existing=mine, image="lab/pytorch:2"))
    assert result.action == spawnplan.REPLACE
    assert result.replaced.reason == spawnplan.IMAGE_CHANGED
    assert result.replaced.save is True and result.replaced.carried is False
    assert env(result)["GPUSPAWNER_IMAGE"] == "lab/pytorch:2"
    assert result.device_ids == (SLICE[0].uuid,)  # the same slice: it was still its own
    # The same image: reused as it is. No image on record (an older container): reused.
    same = plan(snap(own), request(existing=mine, image="lab/tf:2"))
    assert same.action == spawnplan.REUSE
    unknown = plan(snap(own), request(existing=existing(own, labelset), image="lab/x:1"))
    assert unknown.action == spawnplan.REUSE
    # Another reason to replace, same image: started from the saved copy, as before.
    moved = plan(snap(own, inventory=reboot(INV)), request(existing=mine, image="lab/tf:2"))
    assert moved.replaced.reason == spawnplan.GPU_GONE and moved.replaced.carried is True


def test_a_restart_on_a_gpu_nvml_fails_on_moves_with_the_reason():
    """NVML fails on the slice's GPU: the device is still listed (not "gone"), but it is not
    given out, so a restart is moved to another device, and the words say why."""
    two = host(["1g.10gb"] * 2, ["1g.10gb"] * 2)
    first, second = two.gpus
    lost = replace(two, gpus=(replace(first, unavailable="GPU is lost"), second))
    mine, other = two.migs_of(first)
    own, labelset = container("c-own", devices=[mine], state=EXPIRED)
    result = plan(snap(own, inventory=lost), request(existing=existing(own, labelset)))
    assert result.action == spawnplan.REPLACE
    assert result.replaced.reason == spawnplan.GPU_UNAVAILABLE
    assert "is unavailable (GPU is lost)" in dict(result.progress)[35]
    assert result.choice.parent_uuids == (second.uuid,)
    refused = plan(snap(own, inventory=lost),
                   request(existing=existing(own, labelset), on_gpu_lost="fail"))
    assert isinstance(refused, Refusal) and refused.code == spawnplan.GPU_LOST
    views = {v.uuid: v for v in snap(inventory=lost).devices()}
    assert (views[other.uuid].state, views[other.uuid].reason) == ("unavailable", "GPU is lost")
    assert views[two.migs_of(second)[0].uuid].state == "free"


def test_the_chosen_image_is_read_back_from_the_environment():
    assert spawnplan.chosen_image(["A=1", "GPUSPAWNER_IMAGE=lab/tf:2"]) == "lab/tf:2"
    assert spawnplan.chosen_image(["GPUSPAWNER_IMAGE="]) is None
    assert spawnplan.chosen_image(None) is None


def test_a_port_docker_refused_is_avoided_on_create_and_on_reuse():
    """The hub may not see a host process (from a container's network namespace): a port
    Docker refused to bind is treated as taken, by a new container and by the own one."""
    fresh = plan(snap(), request(ports=(("ssh", 22),), port_range=(40000, 40009),
                                 avoid_ports=(40000, 40001)))
    assert fresh.host_ports["ssh"] == 40002
    own, labelset = container("c-own", devices=[SLICE[0]], state=EXPIRED,
                              ports={"ssh": 40003})
    again = plan(snap(own), request(existing=existing(own, labelset), ports=(("ssh", 22),),
                                    avoid_ports=(40003,)))
    assert again.action == spawnplan.REPLACE
    assert again.replaced.reason == spawnplan.PORT_TAKEN
    assert again.host_ports["ssh"] != 40003


@pytest.mark.parametrize("replace_with, save", [("commit", True), ("remove", False)])
def test_replace_when_the_ports_changed(replace_with, save):
    own, labelset = container("c-own", devices=[SLICE[0]], state=EXPIRED,
                              ports={"ssh": 40003})
    result = plan(snap(own), request(existing=existing(own, labelset),
                                     ports=(("ssh", 22), ("tb", 6006)),
                                     replace_with=replace_with))
    assert result.action == spawnplan.REPLACE
    assert result.replaced.reason == spawnplan.PORTS_CHANGED
    assert result.replaced.save is save
    assert result.host_ports["ssh"] == 40003  # kept
    assert result.host_ports["tb"] != 40003


@pytest.mark.parametrize("replace_with, save", [("commit", True), ("remove", False)])
def test_replace_a_dockerspawner_leftover_without_labels(replace_with, save):
    leftover, labelset = container("c-old", kind="none", state=EXPIRED)
    assert labelset == {}
    result = plan(snap(), request(existing=existing(leftover, labelset),
                                  replace_with=replace_with))
    assert isinstance(result, Plan) and result.action == spawnplan.REPLACE
    assert result.replaced.container_id == "c-old"
    assert result.replaced.reason == spawnplan.UNLABELLED
    assert result.replaced.save is save
    assert result.removals == ()


def test_running_leftover_without_labels_is_a_name_clash():
    leftover, labelset = container("c-old", kind="none", state=RUNNING)
    result = plan(snap(), request(existing=existing(leftover, labelset)))
    assert isinstance(result, Refusal) and result.code == spawnplan.NAME_CLASH


def test_leftover_without_labels_with_remove_true_is_planned_not_crashed():
    """remove=True and a stopped DockerSpawner leftover of the same name: a plan (or a
    refusal), removing the leftover at most once; never an exception."""
    leftover, labelset = container("c-old", kind="none", state=EXPIRED)
    result = plan(snap(), request(existing=existing(leftover, labelset), remove=True))
    if isinstance(result, Plan):
        gone = [r.container_id for r in result.removals]
        gone += [result.replaced.container_id] if result.replaced else []
        assert gone == ["c-old"]


def test_replace_when_the_slot_was_given_away_after_the_hold():
    own, labelset = container("c-own", devices=[SLICE[0]], state=EXPIRED)
    taker, _ = container("c-bo", user="bo", devices=[SLICE[0]], state=RUNNING)
    result = plan(snap(own, taker), request(existing=existing(own, labelset)))
    assert result.action == spawnplan.REPLACE
    assert result.replaced.reason == spawnplan.GPU_GIVEN_AWAY
    assert SLICE[0].uuid not in result.device_ids
    assert [r.container_id for r in result.removals] == []


def test_on_gpu_lost_fail_refuses_and_removes_nothing():
    own, labelset = container("c-own", devices=[SLICE[2]], state=EXPIRED)
    result = plan(snap(own, inventory=reboot(INV)),
                  request(existing=existing(own, labelset), on_gpu_lost="fail"))
    assert isinstance(result, Refusal) and result.code == spawnplan.GPU_LOST
    assert "files are safe" in result.message


def test_own_running_container_that_must_be_replaced_is_busy():
    own, labelset = container("c-own", devices=[SLICE[0]], state=RUNNING, profile="mig-1g")
    result = plan(snap(own), request(profile="cpu", mig_profile=None,
                                     existing=existing(own, labelset)))
    assert isinstance(result, Refusal) and result.code == spawnplan.BUSY


# ---------------------------------------------------------------- whose container it is


def test_name_clash_with_another_hubs_container():
    theirs, labelset = container("c-x", hub="other", devices=[SLICE[0]], state=EXPIRED)
    result = plan(snap(theirs), request(existing=existing(theirs, labelset)))
    assert isinstance(result, Refusal) and result.code == spawnplan.NAME_CLASH
    assert "hub 'other'" in result.message


def test_name_clash_with_a_ds01_container():
    theirs, labelset = container("c-x", kind="ds01", devices=[SLICE[0]], state=EXPIRED)
    assert theirs.managed and theirs.hub is None
    result = plan(snap(theirs), request(existing=existing(theirs, labelset)))
    assert isinstance(result, Refusal) and result.code == spawnplan.NAME_CLASH
    assert "DS01" in result.message


@pytest.mark.parametrize("remove", [False, True])
def test_name_clash_never_removes_the_other_container(remove):
    theirs, labelset = container("c-x", hub="other", state=EXPIRED)
    result = plan(snap(theirs), request(existing=existing(theirs, labelset), remove=remove,
                                        profile="cpu", mig_profile=None))
    assert isinstance(result, Refusal) and result.code == spawnplan.NAME_CLASH


@pytest.mark.parametrize("state", [RUNNING, HELD, CREATED])
def test_another_hubs_container_of_the_same_user_and_server_is_not_ours(state):
    theirs, _ = container("c-x", hub="other", name="other-jupyter-ann",
                          devices=[SLICE[0]], state=state)
    result = plan(snap(theirs), request(), lim=limits(priority=5))
    assert isinstance(result, Plan) and result.action == spawnplan.CREATE
    assert result.existing is None and result.replaced is None and result.removals == ()
    assert SLICE[0].uuid not in result.device_ids


def test_another_hubs_containers_do_not_count_against_the_quota():
    theirs, _ = container("c-x", hub="other", name="other-jupyter-ann",
                          devices=[SLICE[0]], state=RUNNING)
    result = plan(snap(theirs), request(), lim=limits(max_gpu_equivalents=0.15))
    assert isinstance(result, Plan)


def test_own_container_of_another_server_counts_against_the_quota():
    mine, _ = container("c-a", server="a", devices=[SLICE[0]], state=RUNNING)
    result = plan(snap(mine), request(), lim=limits(max_gpu_equivalents=0.15))
    assert isinstance(result, Refusal) and result.code == "quota"


def test_existing_container_of_this_hub_labelled_for_another_user_is_not_taken_over():
    """A name that maps to another user's container of this hub (say a name_template that
    collides) must not start or commit that user's container for this one."""
    theirs, labelset = container("c-bo", user="bo", name="jupyter-ann", devices=[SLICE[0]],
                                 state=EXPIRED)
    result = plan(snap(theirs), request(existing=existing(theirs, labelset)))
    assert not (isinstance(result, Plan) and result.action in (spawnplan.REUSE,
                                                               spawnplan.REPLACE)), result


# ---------------------------------------------------------------- preemption


def scarce() -> Inventory:
    return host(["3g.40gb", "3g.40gb"])


def test_preemption_removes_only_this_hubs_held_lower_priority_container_and_saves_it():
    inv = scarce()
    ours, _ = container("c-bo", user="bo", devices=[inv.migs[0]], state=HELD, priority=0,
                        inventory=inv)
    theirs, _ = container("c-x", user="cy", hub="other", devices=[inv.migs[1]], state=HELD,
                          priority=0, inventory=inv)
    result = plan(snap(ours, theirs, inventory=inv),
                  request(profile="mig-3g", mig_profile="3g.40gb"), lim=limits(priority=2))
    assert isinstance(result, Plan)
    assert [(r.container_id, r.reason, r.save, r.user) for r in result.removals] == [
        ("c-bo", spawnplan.PREEMPTED, True, "bo")]
    assert result.device_ids == (inv.migs[0].uuid,)


@pytest.mark.parametrize("kind, hub", [("hub", "other"), ("ds01", None)])
def test_preemption_never_takes_another_hubs_or_ds01s_hold(kind, hub):
    inv = host(["7g.80gb"])
    theirs, _ = container("c-x", user="cy", hub=hub, kind=kind, devices=[inv.migs[0]],
                          state=HELD, priority=0, inventory=inv)
    result = plan(snap(theirs, inventory=inv), request(profile="mig-7g", mig_profile="7g.80gb"),
                  lim=limits(priority=9))
    assert isinstance(result, Refusal) and result.code == "full"


def test_preemption_never_takes_a_running_container():
    inv = host(["7g.80gb"])
    ours, _ = container("c-bo", user="bo", devices=[inv.migs[0]], state=RUNNING, priority=0,
                        inventory=inv)
    result = plan(snap(ours, inventory=inv), request(profile="mig-7g", mig_profile="7g.80gb"),
                  lim=limits(priority=9))
    assert isinstance(result, Refusal) and result.code == "full"


def test_a_restart_that_preempts_removes_the_preempted_hold():
    """Bo's hold ended and his slice went to Ann, who stopped (held, lower priority). Bo
    (higher priority) restarts: the allocator keeps his slice by preempting Ann's hold, so
    the plan must remove Ann's container, whether it reuses Bo's or replaces it."""
    inv = host(["7g.80gb"])
    bo, labelset = container("c-bo", user="bo", name="jupyter-bo", profile="mig-7g",
                             devices=[inv.migs[0]], state=EXPIRED, inventory=inv)
    ann, _ = container("c-ann", user="ann", profile="mig-7g", devices=[inv.migs[0]],
                       state=HELD, priority=0, inventory=inv)
    result = plan(snap(bo, ann, inventory=inv),
                  request(user="bo", container_name="jupyter-bo", profile="mig-7g",
                          mig_profile="7g.80gb", existing=existing(bo, labelset)),
                  lim=limits(priority=1))
    assert isinstance(result, Plan)
    assert result.choice.preempts == ("c-ann",)
    assert [(r.container_id, r.reason, r.save) for r in result.removals] == [
        ("c-ann", spawnplan.PREEMPTED, True)]


def test_remove_true_gives_a_fresh_removal_without_save():
    own, labelset = container("c-own", devices=[SLICE[1]], state=EXPIRED)
    result = plan(snap(own), request(existing=existing(own, labelset), remove=True))
    assert isinstance(result, Plan) and result.action == spawnplan.CREATE
    assert [(r.container_id, r.reason, r.save) for r in result.removals] == [
        ("c-own", spawnplan.FRESH, False)]
    assert result.replaced is None


# ---------------------------------------------------------------- host ports


def test_ports_come_from_the_range_avoiding_reserved_and_busy_ports():
    held, _ = container("c-bo", user="bo", state=HELD, ports={"ssh": 40001})
    result = plan(snap(held, bound={40000}), request(ports=(("ssh", 22),),
                                                     port_range=(40000, 40005)),
                  port_free=lambda port: port != 40002)
    assert result.host_ports == {"ssh": 40003}
    assert result.ports == (("ssh", 22, 40003),)
    assert dict(result.labels)["ds01.port.ssh"] == "40003"
    assert env(result)["GPUSPAWNER_PORT_SSH"] == "40003"


def test_ports_exhausted_is_a_refusal():
    result = plan(snap(bound={40000, 40001}),
                  request(ports=(("ssh", 22),), port_range=(40000, 40001)))
    assert isinstance(result, Refusal) and result.code == spawnplan.PORTS


def test_ports_are_kept_across_a_restart_when_free():
    own, labelset = container("c-own", devices=[SLICE[0]], state=EXPIRED,
                              ports={"ssh": 40004})
    reused = plan(snap(own), request(existing=existing(own, labelset), ports=(("ssh", 22),),
                                     port_range=(40000, 40009)))
    assert reused.action == spawnplan.REUSE
    replaced = plan(snap(own), request(existing=existing(own, labelset), ports=(("ssh", 22),),
                                       port_range=(40000, 40009), profile="cpu",
                                       mig_profile=None))
    assert replaced.action == spawnplan.REPLACE and replaced.host_ports == {"ssh": 40004}


def test_a_port_bound_by_something_else_is_not_kept():
    own, labelset = container("c-own", devices=[SLICE[0]], state=EXPIRED,
                              ports={"ssh": 40004})
    result = plan(snap(own), request(existing=existing(own, labelset), ports=(("ssh", 22),),
                                     port_range=(40000, 40009)),
                  port_free=lambda port: port != 40004)
    assert result.action == spawnplan.REPLACE
    assert result.replaced.reason == spawnplan.PORT_TAKEN
    assert result.host_ports["ssh"] != 40004


def test_a_port_bound_by_the_servers_own_running_container_is_not_someone_elses():
    """The host probe says busy for a port the server's own running container publishes:
    that is not "used by something else" (without ports the same container is reused)."""
    own, labelset = container("c-own", devices=[SLICE[0]], state=RUNNING,
                              ports={"ssh": 40004})
    own = replace(own, published=(40004,))
    result = plan(snap(own, bound={40004}),
                  request(existing=existing(own, labelset), ports=(("ssh", 22),),
                          port_range=(40000, 40009)),
                  port_free=lambda port: port != 40004)
    assert isinstance(result, Plan) and result.action == spawnplan.REUSE, result


def test_a_port_promised_to_another_held_server_is_not_kept():
    """Ann's hold ended, so her port 40004 went to Bo, who stopped and still holds it: Ann's
    restart must not take it back (reserved_ports: promised to servers still holding)."""
    own, labelset = container("c-own", devices=[SLICE[0]], state=EXPIRED,
                              ports={"ssh": 40004})
    bo, _ = container("c-bo", user="bo", devices=[SLICE[1]], state=HELD, ports={"ssh": 40004})
    result = plan(snap(own, bo), request(existing=existing(own, labelset),
                                         ports=(("ssh", 22),), port_range=(40000, 40009)))
    assert isinstance(result, Plan)
    assert result.action != spawnplan.REUSE
    assert result.host_ports.get("ssh") != 40004


# ---------------------------------------------------------------- labels that lie


def test_a_label_that_lies_keeps_both_devices_taken():
    inv = host(["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"])
    b, c = inv.migs[2], inv.migs[3]  # the two 1g slices
    liar, _ = container("c-liar", user="bo", devices=[c], docker_uuids=[b.uuid], state=RUNNING,
                        inventory=inv)
    assert set(liar.uuids) == {b.uuid, c.uuid}
    result = plan(snap(liar, inventory=inv), request(user="cy", container_name="jupyter-cy"))
    assert isinstance(result, Refusal) and result.code == "full"


def test_a_label_that_lies_keeps_both_devices_taken_the_next_user_gets_a_third():
    liar, _ = container("c-liar", user="bo", devices=[SLICE[0]], docker_uuids=[SLICE[1].uuid],
                        state=HELD)
    result = plan(snap(liar), request())
    assert result.device_ids[0] not in {SLICE[0].uuid, SLICE[1].uuid}


def test_own_container_whose_labels_lie_is_replaced():
    own, labelset = container("c-own", devices=[SLICE[0]], docker_uuids=[SLICE[1].uuid],
                              state=EXPIRED)
    result = plan(snap(own), request(existing=existing(own, labelset)))
    assert result.action == spawnplan.REPLACE
    assert result.replaced.reason == spawnplan.DEVICES_DISAGREE
    assert len(result.device_ids) == 1


# ---------------------------------------------------------------- a second container


def test_a_running_container_of_the_same_server_under_another_name_keeps_its_device():
    """Not the server's container (another name, e.g. before a name_template change), yet
    running on a slice: a new container of the same server must not share that slice."""
    inv = host(["7g.80gb"])
    stray, _ = container("c-stray", name="jupyter-ann-old", devices=[inv.migs[0]],
                         state=RUNNING, inventory=inv)
    result = plan(snap(stray, inventory=inv), request(profile="mig-7g", mig_profile="7g.80gb"))
    assert not (isinstance(result, Plan) and inv.migs[0].uuid in result.device_ids), result


# ---------------------------------------------------------------- the race rule


def racer(cid: str, device, state: str, user: str = "ann", hub: str = HUB) -> Allocation:
    return container(cid, user=user, hub=hub, devices=[device], state=state)[0]


def clocks(created: dict[str, str]) -> dict[str, spawnplan.Clock]:
    """Created times, each container started (where it runs) in the same order."""
    return {cid: spawnplan.Clock(t, t) for cid, t in created.items()}


def test_a_running_rival_beats_a_container_not_yet_running():
    mine = racer("c-mine", SLICE[0], CREATED)
    rival = racer("c-rival", SLICE[0], RUNNING, user="bo", hub="other")
    created = clocks({"c-mine": "2026-11-24T12:00:00.000000001",
                      "c-rival": "2026-11-24T12:00:00.5"})
    assert spawnplan.race_loser(mine, snap(mine, rival), created, running=False) == (
        SLICE[0].uuid,)


def test_a_container_that_runs_is_not_beaten_by_a_rival_still_starting():
    mine = racer("c-mine", SLICE[0], RUNNING)
    rival = racer("c-rival", SLICE[0], CREATED, user="bo")
    created = clocks({"c-mine": "2026-11-24T12:00:01", "c-rival": "2026-11-24T12:00:00"})
    assert spawnplan.race_loser(mine, snap(mine, rival), created, running=True) == ()


def test_between_two_not_running_yet_the_earlier_created_wins():
    first = racer("c-first", SLICE[0], CREATED)
    second = racer("c-second", SLICE[0], CREATED, user="bo", hub="other")
    world = snap(first, second)
    created = clocks({"c-first": "2026-11-24T12:00:00.000000100",
                      "c-second": "2026-11-24T12:00:00.000000200"})
    assert spawnplan.race_loser(first, world, created, False) == ()
    assert spawnplan.race_loser(second, world, created, False) == (SLICE[0].uuid,)


def test_between_two_running_the_earlier_start_wins_whatever_their_age():
    """A stopped container started again is old: by Created it would beat a new container
    that finished its checks before it started, and both would keep the device. The later
    starter checks after its start, so it is the one that sees the pair and gives way."""
    old = racer("c-old", SLICE[0], RUNNING)
    new = racer("c-new", SLICE[0], RUNNING, user="bo")
    world = snap(old, new)
    times = {"c-old": spawnplan.Clock("2026-11-20T09:00:00.000000000",
                                      "2026-11-24T12:00:01.000000000"),
             "c-new": spawnplan.Clock("2026-11-24T12:00:00.000000000",
                                      "2026-11-24T12:00:00.500000000")}
    assert spawnplan.race_loser(new, world, times, running=True) == ()
    assert spawnplan.race_loser(old, world, times, running=True) == (SLICE[0].uuid,)


def test_the_container_id_breaks_a_tie_so_exactly_one_loses():
    first = racer("c-a", SLICE[0], CREATED)
    second = racer("c-b", SLICE[0], CREATED, user="bo")
    world = snap(first, second)
    created = clocks({"c-a": "2026-11-24T12:00:00", "c-b": "2026-11-24T12:00:00"})
    losses = [spawnplan.race_loser(a, world, created, False) for a in (first, second)]
    assert sorted(map(bool, losses)) == [False, True]


def test_a_container_without_rivals_loses_nothing():
    mine = racer("c-mine", SLICE[0], CREATED)
    elsewhere = racer("c-else", SLICE[1], RUNNING, user="bo")
    held = racer("c-held", SLICE[0], HELD, user="cy")  # stopped: not racing
    failed = racer("c-failed", SLICE[0], FAILED, user="di")  # never started: holds nothing
    created = clocks({"c-mine": "2", "c-else": "1", "c-held": "1", "c-failed": "1"})
    assert spawnplan.race_loser(mine, snap(mine, elsewhere, held, failed), created,
                                running=False) == ()
    assert spawnplan.rivals(mine, snap(mine, elsewhere, held, failed)) == ()


def test_a_whole_gpu_and_its_slice_are_rivals_both_ways():
    inv = host(["1g.10gb"] * 7)
    whole = container("c-whole", devices=[inv.gpus[0]], state=CREATED, inventory=inv)[0]
    piece = container("c-piece", user="bo", devices=[inv.migs[4]], state=RUNNING,
                      inventory=inv)[0]
    world = snap(whole, piece, inventory=inv)
    assert [r.container_id for r in spawnplan.rivals(whole, world)] == ["c-piece"]
    assert [r.container_id for r in spawnplan.rivals(piece, world)] == ["c-whole"]
    created = clocks({"c-whole": "1", "c-piece": "2"})
    # the running slice wins over the whole GPU still starting, though created later
    assert spawnplan.race_loser(whole, world, created, running=False) == (inv.gpus[0].uuid,)
    assert spawnplan.race_loser(piece, world, created, running=True) == ()


def test_two_slices_of_one_gpu_are_not_rivals():
    mine = racer("c-mine", SLICE[0], CREATED)
    other = racer("c-other", SLICE[1], RUNNING, user="bo")
    assert spawnplan.rivals(mine, snap(mine, other)) == ()


def test_a_label_that_lies_makes_a_rival_of_the_device_docker_holds():
    mine = racer("c-mine", SLICE[1], CREATED)
    liar = container("c-liar", user="bo", devices=[SLICE[0]], docker_uuids=[SLICE[1].uuid],
                     state=RUNNING)[0]
    created = clocks({"c-mine": "1", "c-liar": "2"})
    assert spawnplan.race_loser(mine, snap(mine, liar), created, running=False) == (
        SLICE[1].uuid,)


def test_a_stopped_container_being_started_again_is_not_given_to_another():
    """Between this hub's plan to start a stopped container again and its start, Docker
    still shows it stopped: the planner counts it as a spawn in flight."""
    inv = host(["7g.80gb"])
    stopped, _ = container("c-ann", devices=[inv.migs[0]], state=EXPIRED, inventory=inv)
    world = snap(stopped, inventory=inv)
    wanted = request(user="bo", container_name="jupyter-bo", profile="mig-7g",
                     mig_profile="7g.80gb")
    assert isinstance(plan(world, wanted), Plan)  # free while nobody starts it
    starting = spawnplan.with_starting(world, {"c-ann": stopped})
    result = plan(starting, wanted)
    assert isinstance(result, Refusal), result
    assert [a.state for a in starting.allocations] == [CREATED]
    assert spawnplan.with_starting(world, {}) is world


def test_docker_kwargs_publish_the_extra_ports_and_request_devices_by_uuid():
    """What the plan adds to DockerSpawner's create call, as data: docker-py's dict forms
    (a list of "6006/tcp" strings is read as "6006/tcp/tcp" and never published)."""
    result = plan(snap(), request(ports=(("ssh", 22), ("web", 6006))))
    assert isinstance(result, Plan)
    create, host_config = spawnplan.docker_kwargs(result, "127.0.0.1")
    ports = result.host_ports
    assert create["ports"] == {"22/tcp": None, "6006/tcp": None}
    assert host_config["port_bindings"] == {22: ("127.0.0.1", ports["ssh"]),
                                            6006: ("127.0.0.1", ports["web"])}
    assert host_config["device_requests"] == [{"driver": "nvidia",
                                               "device_ids": list(result.device_ids),
                                               "capabilities": [["gpu"]]}]
    assert create["labels"]["ds01.gpu.uuids"] == ",".join(result.device_ids)
    cpu = plan(snap(), request(profile="cpu", mig_profile=None))
    assert "device_requests" not in spawnplan.docker_kwargs(cpu, "127.0.0.1")[1]


def test_the_plans_docker_kwargs_keep_the_admins_own():
    admin = {"labels": {"lab.team": "vision"}, "device_requests": [{"driver": "other"}],
             "shm_size": "1g"}
    ours = {"labels": {"ds01.user": "ann"}, "device_requests": [{"driver": "nvidia"}]}
    assert spawnplan.merge(admin, ours) == {
        "labels": {"lab.team": "vision", "ds01.user": "ann"},
        "device_requests": [{"driver": "other"}, {"driver": "nvidia"}], "shm_size": "1g"}
    assert spawnplan.merge(None, ours) == ours
