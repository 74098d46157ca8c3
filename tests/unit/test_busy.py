"""Zombies are not handed out: a device no running container holds, with compute processes
on it or more memory in use than ``busy_memory_mib``, is ``busy`` (issue "GPU activity",
item 2). Tested as data: inventories with activity, allocations, and what the allocator,
the snapshot, the form counts and ``doctor`` say of them."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

from gpuspawner import allocator, health
from gpuspawner.allocator import Choice, Refusal, choose, free_by_profile
from gpuspawner.policy import Policy
from gpuspawner.records import HELD, GpuProcess, Inventory
from gpuspawner.snapshot import ProcessView, Snapshot

from .hosts import Request, holding, host, limits, stopped

A100 = host(["1g.10gb"] * 7, ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"], None, None)
ZOMBIE = (GpuProcess(4242, 8090),)


def with_activity(inventory: Inventory, uuids, processes=ZOMBIE, used: int | None = None):
    """``inventory`` where each of ``uuids`` has ``processes`` and ``used`` MiB in use
    (default: what the processes use)."""
    mib = sum(p.used_mib for p in processes) if used is None else used
    return replace(
        inventory,
        gpus=tuple(replace(g, processes=tuple(processes), memory_used_mib=mib)
                   if g.uuid in uuids else g for g in inventory.gpus),
        migs=tuple(replace(m, processes=tuple(processes), memory_used_mib=mib)
                   if m.uuid in uuids else m for m in inventory.migs),
    )


def snap(inventory: Inventory, allocations=(), busy_memory_mib: int = 0) -> Snapshot:
    return Snapshot(inventory, tuple(allocations), Policy(), frozenset(),
                    datetime.now(timezone.utc), "test-hub", busy_memory_mib)


def first_1g(inventory: Inventory):
    return next(m for m in inventory.migs if m.profile == "1g.10gb")


def test_a_slice_with_a_process_and_no_container_is_skipped_and_shown_busy():
    zombie = first_1g(A100)
    inv = with_activity(A100, {zombie.uuid})
    choice = choose(inv, [], limits(), Request("ann", mig_profile="1g.10gb"))
    assert isinstance(choice, Choice) and choice.uuids[0] != zombie.uuid
    view = {v.uuid: v for v in snap(inv).devices()}[zombie.uuid]
    assert view.state == "busy"
    assert view.reason == "busy: 1 process, 7.9 GiB in use, no running container holds it"
    assert view.processes == (ProcessView(4242, 8090),) and view.memory_used_mib == 8090
    assert view.processes[0].owner_words() == "no container"
    assert free_by_profile(inv, [])["1g.10gb"] == (8, 9)  # in the total, never free


def test_memory_in_use_without_a_process_counts_above_the_threshold_only():
    slice_ = first_1g(A100)
    small = with_activity(A100, {slice_.uuid}, processes=(), used=13)  # the driver's own
    assert snap(small).busy() == {}
    leaked = with_activity(A100, {slice_.uuid}, processes=(), used=3000)
    assert snap(leaked).busy() == {
        slice_.uuid: "busy: 2.9 GiB in use, no running container holds it"}
    assert snap(leaked, busy_memory_mib=4096).busy() == {}  # the admin's threshold
    wanted = Request("ann", mig_profile="1g.10gb", busy_memory_mib=4096)
    assert choose(leaked, [], limits(), wanted).uuids[0] == slice_.uuid


def test_a_running_holders_own_processes_are_its_work_not_a_zombie():
    first = choose(A100, [], limits(), Request("ann", mig_profile="1g.10gb"))
    running = holding(first, "ann")
    inv = with_activity(A100, set(first.uuids))
    assert snap(inv, [running]).busy() == {}
    assert {v.uuid: v.state for v in snap(inv, [running]).devices()}[first.uuids[0]] == "running"
    # Once the holder stopped, processes still on the slice are zombies, held or not.
    assert first.uuids[0] in snap(inv, [stopped(running, HELD)]).busy()


def test_a_held_slice_with_zombies_is_not_preempted_onto():
    first = choose(A100, [], limits(), Request("low", mig_profile="3g.40gb"))
    held = stopped(holding(first, "low", priority=0), HELD)
    clean = choose(A100, [held], limits(priority=5), Request("high", mig_profile="3g.40gb"))
    assert isinstance(clean, Choice) and clean.preempts == (held.container_id,)
    inv = with_activity(A100, set(first.uuids))
    refusal = choose(inv, [held], limits(priority=5), Request("high", mig_profile="3g.40gb"))
    assert isinstance(refusal, Refusal) and refusal.code == allocator.FULL
    assert "1 of them busy with processes or memory no running server owns" in refusal.message


def test_busy_whole_gpus_are_not_chosen():
    whole = [g for g in A100.gpus if not g.mig_enabled]
    inv = with_activity(A100, {whole[0].uuid})
    one = choose(inv, [], limits(), Request("ann", gpus=1))
    assert isinstance(one, Choice) and one.uuids == (whole[1].uuid,)
    two = choose(inv, [], limits(), Request("ann", gpus=2))
    assert isinstance(two, Refusal) and "1 of them busy" in two.message


def test_doctor_fails_on_a_busy_device_naming_the_pids():
    zombie = first_1g(A100)
    check = health.busy_check(snap(with_activity(A100, {zombie.uuid})))
    assert check.status == health.FAIL
    assert zombie.uuid in check.message and "pids: 4242" in check.message
    assert health.busy_check(snap(A100)).status == health.OK


def test_the_servers_whose_devices_run_processes_are_the_active_ones():
    """Activity for the Hub: this hub's running servers with a compute process on a device
    they hold; not a stopped one, not another hub's, not one whose device is idle."""
    from gpuspawner.admin.activity import active_servers

    one = choose(A100, [], limits(), Request("ann", mig_profile="1g.10gb"))
    ann = holding(one, "ann")
    two = choose(A100, [ann], limits(), Request("bo", mig_profile="1g.10gb"))
    bo = holding(two, "bo", server="train")
    three = choose(A100, [ann, bo], limits(), Request("cy", mig_profile="1g.10gb"))
    cy = replace(holding(three, "cy"), hub="another-hub")
    four = choose(A100, [ann, bo, cy], limits(), Request("di", mig_profile="1g.10gb"))
    di = holding(four, "di")  # holds an idle slice
    busy = set(one.uuids) | set(two.uuids) | set(three.uuids)
    inv = with_activity(A100, busy)
    world = [ann, bo, cy, di]
    assert active_servers(replace(snap(inv, world), hub_id=ann.hub)) == {
        "ann": {""}, "bo": {"train"}}
    later = [stopped(ann, HELD), bo, cy, di]
    assert active_servers(replace(snap(inv, later), hub_id=ann.hub)) == {"bo": {"train"}}


def test_idle_stops_count_from_the_last_gpu_work_and_follow_the_policy():
    """``gpu_idle_timeout`` from the policy (per group); a server computing restarts the
    clock; one first seen starts counting then; a container gone is forgotten."""
    from gpuspawner.admin.activity import idle_stops
    from gpuspawner.policy import parse_policy

    policy = parse_policy("defaults: {gpu_idle_timeout: 1h}\n"
                          "groups: {thesis: {gpu_idle_timeout: null}}\n", "p.yaml")
    one = choose(A100, [], limits(), Request("ann", mig_profile="1g.10gb"))
    ann = holding(one, "ann")
    two = choose(A100, [ann], limits(), Request("bo", mig_profile="1g.10gb"))
    bo = holding(two, "bo")
    world = replace(snap(A100, [ann, bo]), policy=policy, hub_id=ann.hub)
    last: dict[str, float] = {}
    groups = {"bo": ["thesis"]}
    assert idle_stops(world, last, 0.0, groups) == []  # first seen: counting starts
    assert idle_stops(world, last, 3600.0, groups) == []  # exactly the limit: not past it
    computing = replace(world, inventory=with_activity(A100, set(one.uuids)))
    assert idle_stops(computing, last, 3000.0, groups) == []  # ann works: clock restarts
    [stop] = idle_stops(world, last, 6601.0, groups)
    assert (stop.user, stop.server, stop.container_id) == ("ann", "", ann.container_id)
    assert (stop.idle, stop.timeout) == (3601.0, 3600.0)  # bo's group: never
    gone = replace(world, allocations=(bo,))
    assert idle_stops(gone, last, 9000.0, groups) == [] and ann.container_id not in last


T0 = datetime(2026, 11, 29, 9, 0, tzinfo=timezone.utc)


class OneSlice:
    """ann holds one 1g.10gb slice of A100, whose devices all report activity: nothing runs
    (``quiet``) or a process runs on ann's slice (``working``); ``bo`` holds that same slice
    after her. ``read(minutes, ...)`` is a snapshot taken that many minutes after ``T0``."""

    def __init__(self) -> None:
        one = choose(A100, [], limits(), Request("ann", mig_profile="1g.10gb"))
        self.ann = holding(one, "ann")
        self.uuid = one.uuids[0]
        self.quiet = with_activity(
            A100, {m.uuid for m in A100.migs} | {g.uuid for g in A100.gpus},
            processes=(), used=0)
        self.working = with_activity(self.quiet, {self.uuid})
        two = choose(A100, [], limits(), Request("bo", mig_profile="1g.10gb"))
        assert two.uuids[0] == self.uuid  # the same slice, bo's once ann is gone
        self.bo = holding(two, "bo")

    def read(self, minutes: float, inventory=None, allocations=None) -> Snapshot:
        return replace(snap(self.quiet if inventory is None else inventory,
                            (self.ann,) if allocations is None else allocations),
                       taken_at=T0 + timedelta(minutes=minutes))


def test_the_idle_clock_counts_from_the_last_work_and_restarts_with_a_new_holder():
    """``note_work``: a device's idle time runs from the last read that listed a compute
    process on it; a device first seen counts from that read; a new holder starts its own
    clock; an older read arriving late changes nothing; NVML silent: no clock."""
    from gpuspawner.admin.activity import note_work

    scene = OneSlice()
    uuid, at = scene.uuid, scene.read
    seen: dict = {}
    assert note_work(at(0), seen)[uuid] == T0  # first seen: counts from this read
    assert note_work(at(10, scene.working), seen)[uuid] == T0 + timedelta(minutes=10)
    later = at(70)
    assert note_work(later, seen)[uuid] == T0 + timedelta(minutes=10)
    views = {v.uuid: v for v in replace(later, work_since=note_work(later, seen)).devices()}
    assert views[uuid].idle_seconds == 60 * 60
    assert note_work(at(5), seen)[uuid] == T0 + timedelta(minutes=10)  # late, older read
    assert note_work(at(80, allocations=(scene.bo,)), seen)[uuid] == T0 + timedelta(minutes=80)
    assert uuid not in note_work(at(90, A100, (scene.bo,)), seen)  # NVML silent: no clock
    assert uuid not in seen


def test_work_read_by_an_earlier_probe_counts_from_the_probe_never_from_the_read():
    """``note_work(..., at)``: a remote host's activity comes from a probe that may be older
    than the read it serves. A process it listed counts from the probe's moment; an older
    probe reused by later reads never moves the clock back; a new holder still counts from
    the read that first shows it (its own time, not the probe's)."""
    from gpuspawner.admin.activity import note_work

    scene = OneSlice()
    uuid, read, working = scene.uuid, scene.read, scene.working
    seen: dict = {}
    assert note_work(read(0), seen)[uuid] == T0
    probed = T0 + timedelta(minutes=9)
    assert note_work(read(10, working), seen, at=probed)[uuid] == probed
    assert note_work(read(11, working), seen, at=probed)[uuid] == probed  # the same probe
    assert note_work(read(12, working), seen,
                     at=T0 + timedelta(minutes=8))[uuid] == probed  # never back
    bo = (scene.bo,)
    assert note_work(read(20, working, bo), seen, at=probed)[uuid] == T0 + timedelta(
        minutes=20)  # a new holder: from the read that shows it
    assert note_work(read(30, working, bo), seen,
                     at=T0 + timedelta(minutes=40))[uuid] == T0 + timedelta(minutes=30)


def test_the_next_spawn_page_says_why_the_server_was_stopped():
    from gpuspawner import events

    log = [
        {"event": "container.start", "user": "ann", "server": ""},
        {"event": "gpu.idle-stop", "user": "ann", "server": "", "idle": 3700, "timeout": 3600},
        {"event": "gpu.idle-stop", "user": "ann", "server": "x", "idle": 1, "timeout": 1},
    ]
    assert events.idle_stopped(log, "ann", "")["idle"] == 3700
    assert events.idle_stopped(log, "bo", "") is None
    again = [*log, {"event": "container.start", "user": "ann", "server": ""}]
    assert events.idle_stopped(again, "ann", "") is None  # told once: it started since


def test_a_process_is_its_containers_and_says_when_that_container_does_not_hold_the_device():
    """Whose a process is, from its container (the kernel's word) and Docker's device
    requests: the slice's holder, the holder of the slice's whole GPU, or a container that
    holds neither (a runtime handing GPUs out by environment)."""
    one = choose(A100, [], limits(), Request("ann", mig_profile="1g.10gb"))
    ann = holding(one, "ann", server="train")
    slice_ = next(m for m in A100.migs if m.uuid == one.uuids[0])
    whole = replace(holding(one, "bo"), uuids=(slice_.parent_uuid,), slots=("0",))
    other = choose(A100, [ann], limits(), Request("cy", mig_profile="1g.10gb"))
    cy = holding(other, "cy")
    processes = (GpuProcess(10, 1000, ann.container_id), GpuProcess(11, 1000, whole.container_id),
                 GpuProcess(12, 1000, cy.container_id), GpuProcess(13, 1000, "f" * 64))
    inv = with_activity(A100, {slice_.uuid}, processes=processes)
    [view] = [v for v in snap(inv, [ann, whole, cy]).devices() if v.uuid == slice_.uuid]
    assert [(p.pid, p.user, p.holder, p.owner_words()) for p in view.processes] == [
        (10, "ann", True, "ann/train"),
        (11, "bo", True, "bo"),
        (12, "cy", False, "cy (not its holder)"),
        (13, None, False, f"container {'f' * 12} (not its holder)"),
    ]
