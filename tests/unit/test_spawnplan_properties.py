"""Property tests of the spawn planner over random histories of one Docker engine.

The engine is modelled as plain boxes (one per container: its labels, its device requests,
Docker's status and times). Each step is something that happens on a shared host: a spawn by
this hub ("lab"), a container made by another hub ("other"), by DS01's tools (legacy labels,
no hub), by hand (no labels: an unmanaged holder, or a DockerSpawner leftover with a server's
name), a container of this hub whose labels and device requests disagree, a stop, a start by
someone else, time passing (holds end, spawns in flight fail) and a reboot (MIG devices come
back with new UUIDs).

At each spawn, ``spawnplan.plan`` decides on a Snapshot read from the boxes, and the plan is
carried out on the boxes the way the spawner's executor does. The oracle is written here from
DESIGN.md's rules ("Ours", "What taken means", "Spawn", "Restart of a stopped server"); it
calls nothing of the allocator or the planner.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta
from functools import cached_property

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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

from .hosts import NOW, host, limits

HUB = "lab"
OTHER_HUB = "other"
START_TIMEOUT = 120  # the ledger's default start_timeout, seconds
PORT_RANGE = (40000, 40007)
USERS = ["ann", "bo", "cy"]
SPAWNERS = USERS[:2]  # who spawns on this hub (few, so servers restart often)
SERVERS = ["", "a"]
#: MIG layouts an A100-80GB can hold; the scarce ones twice, so slices are fought over.
LAYOUTS = [
    ["1g.10gb"] * 7,
    ["3g.40gb", "3g.40gb"],
    ["7g.80gb"],
    ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"],
    ["3g.40gb", "3g.40gb"],
    ["7g.80gb"],
]
PROFILES = ["1g.10gb", "2g.20gb", "3g.40gb", "7g.80gb"]
PORT_NAMES = ["ssh", "tb"]
_TOLERANCE = 1e-4  # labels round equivalents to 4 places; the oracle uses exact fractions


# --------------------------------------------------------------------------- the engine


@dataclass
class Box:
    """One container as Docker has it."""

    cid: str
    name: str
    kind: str  # "lab" | "other" | "ds01" | "outside" | "leftover" (how it was made)
    labelset: dict[str, str]
    docker_uuids: tuple[str, ...] = ()  # its device requests
    count: int = 0  # count=N device request (outside holders): first N GPUs, -1 all
    status: str = "running"  # Docker's: running | exited | created
    created: int = 0  # clock seconds
    finished: int | None = None
    published: tuple[int, ...] = ()  # host ports bound while it runs

    @cached_property  # labels never change after create
    def record(self) -> labels.LabelRecord:
        return labels.decode(self.labelset)

    @property
    def managed(self) -> bool:
        return self.record.managed

    @property
    def label_uuids(self) -> tuple[str, ...]:
        return self.record.uuids


@dataclass
class World:
    inventory: Inventory
    hold: dict[str, float]  # user -> gpu_hold_after_stop
    host_busy: frozenset[int]  # host ports something outside Docker listens on
    boxes: list[Box] = field(default_factory=list)
    clock: int = 0
    serial: int = 0

    def new_id(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial:05d}"

    def by_name(self, name: str) -> Box | None:
        return next((b for b in self.boxes if b.name == name), None)

    def by_id(self, cid: str) -> Box | None:
        return next((b for b in self.boxes if b.cid == cid), None)


# --------------------------------------------------------------------------- the rules (oracle)


def state_of(box: Box, world: World) -> str:
    """DESIGN.md "What taken means", from Docker's facts."""
    if box.status == "running":
        return RUNNING
    if box.status == "created":
        return CREATED if world.clock - box.created < START_TIMEOUT else FAILED
    if box.managed and box.finished is not None and (
            world.clock < box.finished + world.hold.get(box.record.user or "", 0.0)):
        return HELD
    return EXPIRED


def takes(box: Box, world: World) -> bool:
    return state_of(box, world) in (RUNNING, HELD, CREATED)


def devices_of(box: Box, world: World) -> set[str]:
    """What a container holds: its device requests and (managed) its labels, the union;
    count=N is the first N GPUs by index, -1 all of them."""
    held = set(box.docker_uuids)
    if box.managed:
        held |= set(box.label_uuids)
    gpus = sorted(world.inventory.gpus, key=lambda g: g.index)
    if box.count < 0:
        held |= {g.uuid for g in gpus}
    elif box.count > 0:
        held |= {g.uuid for g in gpus[: box.count]}
    return held


def parent_of(uuid: str, inventory: Inventory) -> str | None:
    return next((m.parent_uuid for m in inventory.migs if m.uuid == uuid), None)


def overlap(a: str, b: str, inventory: Inventory) -> bool:
    """Same device, or a whole GPU and one of its slices."""
    return a == b or parent_of(a, inventory) == b or parent_of(b, inventory) == a


def is_ours(box: Box) -> bool:
    """DESIGN.md "Ours": hub label is this hub, interface jupyterhub, schema present."""
    got = box.labelset
    return (got.get("ds01.hub") == HUB and got.get("ds01.interface") == "jupyterhub"
            and bool(got.get("ds01.schema")))


def is_foreign(box: Box) -> bool:
    """Another hub's or DS01's: managed (labelled) but not ours."""
    return box.managed and not is_ours(box)


def equivalents(uuid: str, inventory: Inventory) -> float:
    """Whole GPU 1.0, MIG slice its compute slices over the GPU's total; a device the
    inventory no longer has is occupying nothing."""
    for gpu in inventory.gpus:
        if gpu.uuid == uuid:
            return 1.0
    for mig in inventory.migs:
        if mig.uuid == uuid:
            return mig.slices / mig.total_slices
    return 0.0


def usage(world: World, user: str) -> float:
    return sum(
        equivalents(u, world.inventory)
        for b in world.boxes
        if is_ours(b) and b.record.user == user and takes(b, world)
        for u in devices_of(b, world)
    )


def reserved_ports(world: World, exclude: set[str]) -> set[int]:
    """Host ports bound by running containers or promised (labels) to holding ones."""
    found: set[int] = set()
    for b in world.boxes:
        if b.cid in exclude:
            continue
        if b.status == "running":
            found.update(b.published)
        if takes(b, world):
            found.update(p for _, p in b.record.ports)
    return found


def port_free(world: World):
    """The host's bind probe: something outside Docker, or a running container, listens."""
    bound = {p for b in world.boxes if b.status == "running" for p in b.published}
    return lambda port: port not in world.host_busy and port not in bound


# --------------------------------------------------------------------------- reading Docker


def read(world: World) -> Snapshot:
    """The snapshot the ledger would give this hub (Allocations built from the boxes)."""
    allocations = []
    now = NOW + timedelta(seconds=world.clock)
    for b in world.boxes:
        record = b.record
        if not record.managed and not b.docker_uuids and not b.count:
            continue  # the ledger lists only containers with devices or labels
        disagreement = ""
        if record.managed and (set(b.docker_uuids) != set(record.uuids) or b.count):
            disagreement = (f"labels name {', '.join(record.uuids) or 'no device'} but "
                            f"Docker gives the container {', '.join(b.docker_uuids) or b.count}"
                            "; it holds both")
        uuids = (tuple(dict.fromkeys((*record.uuids, *b.docker_uuids))) if record.managed
                 else b.docker_uuids)
        allocations.append(Allocation(
            container_id=b.cid, container_name=b.name, managed=record.managed,
            state=state_of(b, world), docker_status=b.status, user=record.user,
            server=record.server, profile=record.profile, hub=record.hub,
            interface=record.interface, schema=record.schema, uuids=uuids,
            slots=record.slots, parent_uuids=record.parent_uuids, gis=record.gis,
            gpu_profile=record.gpu_profile, equivalents=record.equivalents,
            priority=record.priority, ports=record.ports, gpu_count=b.count,
            created_at=NOW + timedelta(seconds=b.created),
            finished_at=None if b.finished is None else NOW + timedelta(seconds=b.finished),
            published=b.published if b.status == "running" else (),
            disagreement=disagreement))
    bound = frozenset(p for b in world.boxes if b.status == "running" for p in b.published)
    return Snapshot(world.inventory, tuple(allocations), Policy.default(), bound, now, HUB)


def server_name(user: str, server: str) -> str:
    return f"jupyter-{user}{'-' + server if server else ''}"


def hub_labels(hub: str, user: str, server: str, profile: str, devices, world: World,
               priority: int, ports: dict[str, int]) -> dict[str, str]:
    return labels.encode(
        hub=hub, user=user, server=server, profile=profile,
        created_at=NOW + timedelta(seconds=world.clock), slots=[d.slot for d in devices],
        uuids=[d.uuid for d in devices],
        parent_uuids=[d.parent_uuid if isinstance(d, MigDevice) else d.uuid for d in devices],
        gis=[d.gi for d in devices if isinstance(d, MigDevice)],
        equivalents=sum(d.equivalents for d in devices), priority=priority, ports=ports)


# --------------------------------------------------------------------------- steps


def reboot(world: World, seed: int) -> None:
    """Every container stops; MIG devices come back with new UUIDs (same layout)."""
    world.inventory = replace(world.inventory, migs=tuple(
        replace(m, uuid=f"MIG-r{seed:04d}{world.serial:05d}{i:03d}-0000-0000-000000000000")
        for i, m in enumerate(world.inventory.migs)))
    world.serial += 1
    for b in world.boxes:
        if b.status == "running":
            b.status, b.finished = "exited", world.clock


def pick(world: World, picks: list[int]) -> list:
    everything = [*world.inventory.gpus, *world.inventory.migs]
    return list(dict.fromkeys(everything[p % len(everything)] for p in picks)) if everything \
        else []


def inject(world: World, step) -> None:
    """A container someone else makes (or this hub made once, with labels that lie)."""
    (_, kind, user, server, clash, label_picks, docker_picks, count, status, priority,
     port) = step
    labelled = pick(world, label_picks)
    requested = [d.uuid for d in pick(world, docker_picks)]
    ports = {"ssh": port} if port else {}
    name = server_name(user, server)
    if kind == "lab":  # this hub's, from before: labels name one set, Docker holds another
        labelset = hub_labels(HUB, user, server, "mig-1g.10gb", labelled, world, priority,
                              ports)
    elif kind == "other":
        labelset = hub_labels(OTHER_HUB, user, server, "mig-1g.10gb", labelled, world,
                              priority, ports)
        name = name if clash else f"other-{name}"
        requested = requested or [d.uuid for d in labelled]
    elif kind == "ds01":
        labelset = {labels.LEGACY_USER: user, labels.GPU_PRIORITY: str(priority)}
        if labelled:
            labelset[labels.GPU_UUID] = labelled[0].uuid
        name = name if clash else f"ds01-{user}-{world.serial}"
        requested = requested or [d.uuid for d in labelled]
    elif kind == "leftover":  # DockerSpawner's, before gpuspawner: the server's name
        labelset, count = {}, 0
    else:  # outside: docker run --gpus ...
        labelset, name = {}, f"outside-{world.serial}"
    if kind != "outside":
        count = 0
    if world.by_name(name) is not None:
        return  # Docker keeps names unique
    created = world.clock - (1000 if status == "created-old" else 0)
    world.boxes.append(Box(
        cid=world.new_id("x"), name=name, kind=kind, labelset=labelset,
        docker_uuids=tuple(requested), count=count,
        status={"created-old": "created"}.get(status, status), created=created,
        finished=world.clock if status == "exited" else None,
        published=(port,) if port else ()))


def carry_out(world: World, req: SpawnRequest, result: Plan, starts: bool) -> None:
    """What the executor does with a plan: remove, replace, reuse or create, then start."""
    for removal in result.removals:
        world.boxes.remove(world.by_id(removal.container_id))
    if result.replaced is not None:
        world.boxes.remove(world.by_id(result.replaced.container_id))
    if result.action == spawnplan.REUSE:
        box = world.by_id(result.existing)
        if starts and box.status != "running":
            box.status, box.finished = "running", None
            box.published = tuple(p for _, p in box.record.ports)
        return
    assert world.by_name(req.container_name) is None, (
        f"{req.container_name} still exists: the create would fail", result)
    world.boxes.append(Box(
        cid=world.new_id("c"), name=req.container_name, kind="lab",
        labelset=dict(result.labels), docker_uuids=tuple(result.device_ids),
        status="running" if starts else "created", created=world.clock,
        published=tuple(result.host_ports.values()) if starts else ()))


# --------------------------------------------------------------------------- the checks


def check(world: World, req: SpawnRequest, lim, result, props: set[str]) -> None:
    existing = world.by_name(req.container_name)
    inv = world.inventory

    # (d) a name that belongs to another hub or DS01 is refused, never planned on
    if "d" in props:
        if existing is not None and is_foreign(existing):
            assert isinstance(result, Refusal) and result.code == spawnplan.NAME_CLASH, result
        if isinstance(result, Refusal) and result.code == spawnplan.NAME_CLASH:
            assert existing is not None and (
                is_foreign(existing)
                or (not existing.managed and existing.status == "running")), result
    if isinstance(result, Refusal):
        return

    removed = {r.container_id for r in result.removals}
    if result.replaced is not None:
        removed.add(result.replaced.container_id)

    # (b) only this hub's containers are removed or replaced (a stopped DockerSpawner
    # leftover of the server's own name is the one documented exception)
    if "b" in props:
        for removal in [*result.removals, *filter(None, [result.replaced])]:
            box = world.by_id(removal.container_id)
            assert box is not None, removal
            if box.kind == "leftover" or (not box.managed and box is existing):
                assert box is existing and removal.reason in (spawnplan.UNLABELLED,
                                                              spawnplan.FRESH), removal
                assert box.status != "running", removal
                continue
            assert is_ours(box), (removal, box.labelset)
            if removal.reason == spawnplan.PREEMPTED:
                assert state_of(box, world) == HELD, (removal, state_of(box, world))
                assert box.record.priority < lim.priority, removal
                assert box.record.user != req.user, removal
            else:
                assert box is existing, removal
        if result.replaced is not None:
            assert result.replaced.container_id == existing.cid
        if existing is not None and is_ours(existing):
            assert (result.action in (spawnplan.REUSE, spawnplan.REPLACE)
                    and result.existing == existing.cid) or existing.cid in removed, result

    # (c) nothing a user made is lost: every removal but remove=True's is saved
    if "c" in props:
        for removal in result.removals:
            if removal.reason == spawnplan.FRESH:
                assert req.remove and not removal.save, removal
            else:
                assert removal.save, removal
        if result.replaced is not None:
            assert result.replaced.save is (req.replace_with == "commit"), result.replaced

    # (a) no device (or its parent GPU / a child slice) held by anyone else is given
    if "a" in props:
        if result.action == spawnplan.REUSE:
            given = devices_of(existing, world)
            others = [b for b in world.boxes if b is not existing and b.cid not in removed]
        else:
            given = set(result.device_ids)
            others = [b for b in world.boxes if b.cid not in removed]
        for b in others:
            if not takes(b, world):
                continue
            for held in devices_of(b, world):
                for device in given:
                    assert not overlap(device, held, inv), (
                        f"{device} given while {b.name} ({b.kind}, {state_of(b, world)}) "
                        f"holds {held}", result)

    # (f) the container sees exactly its devices, or none
    if "f" in props and result.action != spawnplan.REUSE:
        env = dict(result.environment)
        if req.mig_profile or req.gpus:
            assert result.device_ids and env["NVIDIA_VISIBLE_DEVICES"].split(",") == list(
                result.device_ids), result
            assert len(result.device_ids) == (1 if req.mig_profile else req.gpus)
        else:
            assert result.device_ids == () and env["NVIDIA_VISIBLE_DEVICES"] == "void"
        got = dict(result.labels)
        assert got["ds01.hub"] == HUB and got["ds01.user"] == req.user
        assert got["ds01.server"] == req.server
        assert got["ds01.gpu.uuids"] == ",".join(result.device_ids)

    # ports: from the range, free, not promised to anyone else; kept when still free
    if "p" in props:
        mine = {existing.cid} if existing is not None else set()
        others = reserved_ports(world, removed | mine)
        free = port_free(world)
        # remove=True: a fresh container every start, nothing of the old one is kept
        previous = dict(existing.record.ports) if existing is not None and is_ours(
            existing) and not req.remove else {}
        own_bound = set(existing.published) if existing is not None and (
            existing.status == "running") else set()
        if result.action == spawnplan.REUSE:
            for name, port in previous.items():
                assert port not in others, (f"reused with {name} {port}, promised or bound "
                                            "elsewhere", result)
        else:
            chosen = result.host_ports
            assert set(chosen) == {n for n, _ in req.ports}
            assert len(set(chosen.values())) == len(chosen)
            for name, port in chosen.items():
                assert PORT_RANGE[0] <= port <= PORT_RANGE[1]
                assert port not in others, (name, port, "promised or bound elsewhere")
                assert free(port) or port in own_bound, (name, port, "busy on the host")
            reserved_all = reserved_ports(world, mine)
            for name, port in previous.items():
                if (name in chosen and PORT_RANGE[0] <= port <= PORT_RANGE[1]
                        and port not in reserved_all and (free(port) or port in own_bound)):
                    assert chosen[name] == port, (f"{name} {port} was free and not kept",
                                                  result)


def check_quota(world: World, req: SpawnRequest, lim, result, before: float) -> None:
    """(e) after the plan is carried out, the user's containers of this hub hold at most
    their limit (a plan that gives no device may not add any)."""
    if lim.max_gpu_equivalents is None or isinstance(result, Refusal):
        return
    after = usage(world, req.user)
    if result.choice.uuids:
        assert after <= lim.max_gpu_equivalents + _TOLERANCE, (after, lim, result)
    else:
        assert after <= before + _TOLERANCE, (before, after, result)


# --------------------------------------------------------------------------- strategies

user_limits = st.builds(
    limits,
    max_gpu_equivalents=st.sampled_from([None, None, None, 0.15, 0.3, 0.5, 1.0, 2.0]),
    max_gpu_slots_per_container=st.sampled_from([None, 1, 2]),
    allow_full_gpu=st.sampled_from([True, True, False]),
    priority=st.integers(0, 2),
    gpu_hold_after_stop=st.sampled_from([0.0, 600.0, 3600.0, 3600.0]),
)
asks = st.one_of(
    st.tuples(st.just("mig"), st.integers(0, 3)),  # the k-th MIG profile this host has
    st.tuples(st.just("mig"), st.integers(0, 3)),
    st.tuples(st.just("mig"), st.just(0)),
    st.tuples(st.just("mig-any"), st.sampled_from(PROFILES)),  # maybe one it has not
    st.tuples(st.just("gpus"), st.sampled_from([1, 1, 1, 2])),
    st.tuples(st.just("cpu"), st.none()),
)
spawn = st.tuples(
    st.just("spawn"), st.sampled_from(SPAWNERS), st.sampled_from(SERVERS), asks,
    st.sets(st.sampled_from(PORT_NAMES)),
    st.sampled_from([False] * 3 + [True]),  # remove=True
    st.sampled_from(["reallocate"] * 3 + ["fail"]),
    st.sampled_from(["commit", "commit", "remove"]),
    st.sampled_from(["pack", "spread"]),
    st.sampled_from([True] * 5 + [False]),  # the start succeeds
    st.sampled_from([True, True, False]),  # same profile and ports as last time
    st.sampled_from([True] * 4 + [False]),  # the server was stopped first (the usual way)
    st.sampled_from([0, 0, 100, 700, 4000]),  # seconds since then
)
foreign = st.tuples(
    st.just("inject"),
    st.sampled_from(["lab", "other", "other", "ds01", "ds01", "outside", "leftover",
                     "leftover"]),
    st.sampled_from(USERS), st.sampled_from(SERVERS),
    st.booleans(),  # another hub's / DS01's container takes the server's name
    st.lists(st.integers(0, 40), max_size=2),  # devices its labels name
    st.lists(st.integers(0, 40), max_size=2),  # devices Docker holds for it
    st.sampled_from([0, 0, 0, 1, -1]),  # outside: count=N
    st.sampled_from(["running", "running", "exited", "exited", "created", "created-old"]),
    st.integers(0, 5),  # the priority its labels claim
    st.sampled_from([None, None, 40000, 40001, 40003]),
)
steps = st.one_of(
    spawn, spawn, spawn, spawn, spawn, foreign, foreign,
    st.tuples(st.just("stop"), st.integers(0, 60)),
    st.tuples(st.just("stop-server"), st.sampled_from(SPAWNERS), st.sampled_from(SERVERS)),
    st.tuples(st.just("stop-server"), st.sampled_from(SPAWNERS), st.sampled_from(SERVERS)),
    st.tuples(st.just("start"), st.integers(0, 60)),
    st.tuples(st.just("wait"), st.sampled_from([30, 100, 300, 700, 4000])),
    st.tuples(st.just("reboot"), st.integers(0, 999)),
)
histories = st.fixed_dictionaries({
    # a MIG GPU, and maybe a whole one (MIG off)
    "layout": st.tuples(st.sampled_from(LAYOUTS),
                        st.sampled_from(["absent", None, None, *LAYOUTS])).map(
        lambda two: [g for g in two if g != "absent"]),
    "policies": st.fixed_dictionaries({u: user_limits for u in USERS}),
    "host_busy": st.sets(st.sampled_from(range(PORT_RANGE[0], PORT_RANGE[1] + 1)),
                         max_size=2),
    "steps": st.lists(steps, min_size=8, max_size=40),
})

#: A scarce host and two users of this hub who stop and come back: holds end, slots and host
#: ports pass from one to the other, higher priorities take over lower ones' holds.
contention = st.fixed_dictionaries({
    "layout": st.sampled_from([[["7g.80gb"]], [["3g.40gb", "3g.40gb"]], [["7g.80gb"], None]]),
    "policies": st.fixed_dictionaries({u: st.builds(
        limits, max_gpu_equivalents=st.sampled_from([None, 1.0]),
        priority=st.integers(0, 2),
        gpu_hold_after_stop=st.sampled_from([0.0, 600.0, 3600.0])) for u in USERS}),
    "host_busy": st.just(frozenset()),
    "steps": st.lists(st.one_of(
        st.tuples(
            st.just("spawn"), st.sampled_from(SPAWNERS), st.just(""),
            st.one_of(st.tuples(st.just("mig"), st.integers(0, 1)),
                      st.tuples(st.just("gpus"), st.just(1))),
            st.just({"ssh"}), st.just(False),
            st.just("reallocate"), st.sampled_from(["commit", "remove"]), st.just("pack"),
            st.just(True), st.sampled_from([True, True, False]), st.just(True),
            st.sampled_from([0, 0, 700, 4000])),
        st.tuples(st.just("stop-server"), st.sampled_from(SPAWNERS), st.just("")),
        st.tuples(st.just("wait"), st.sampled_from([100, 700, 4000])),
    ), min_size=10, max_size=30),
})


def run(history, props: set[str]) -> None:
    policies = history["policies"]
    world = World(host(*history["layout"]),
                  {u: lim.gpu_hold_after_stop for u, lim in policies.items()},
                  frozenset(history["host_busy"]))
    last: dict[str, tuple] = {}  # server name -> (ask, port names) of its last spawn
    for step in history["steps"]:
        kind = step[0]
        if kind == "spawn":
            (_, user, server, ask, port_names, remove, on_lost, replace_with, strategy,
             starts, again, stop_first, pause) = step
            name = server_name(user, server)
            if again and name in last:
                ask, port_names = last[name]
            last[name] = (ask, port_names)
            what, arg = ask
            if what == "mig":
                here = sorted({m.profile for m in world.inventory.migs}) or PROFILES
                what, arg = "mig", here[arg % len(here)]
            elif what == "mig-any":
                what = "mig"
            box = world.by_name(name)
            if stop_first and box is not None and is_ours(box) and box.status == "running":
                box.status, box.finished = "exited", world.clock
            world.clock += pause
            lim = policies[user]
            req = SpawnRequest(
                hub_id=HUB, user=user, server=server, profile=f"{what}-{arg}",
                container_name=name, mig_profile=arg if what == "mig" else None,
                gpus=arg if what == "gpus" else 0,
                existing=None if box is None else Existing(box.cid, box.name, box.status,
                                                           box.record),
                ports=tuple((n, 22 if n == "ssh" else 6006) for n in sorted(port_names)),
                port_range=PORT_RANGE, on_gpu_lost=on_lost, replace_with=replace_with,
                remove=remove, strategy=strategy,
                now=NOW + timedelta(seconds=world.clock))
            before = usage(world, user)
            result = spawnplan.plan(read(world), req, port_free(world), lim)
            check(world, req, lim, result, props)
            if isinstance(result, Plan):
                carry_out(world, req, result, starts)
                if "e" in props:
                    check_quota(world, req, lim, result, before)
        elif kind == "stop-server":  # a user stops a server (JupyterHub's stop)
            box = world.by_name(server_name(step[1], step[2]))
            if box is not None and is_ours(box) and box.status == "running":
                box.status, box.finished = "exited", world.clock
        elif kind == "inject":
            inject(world, step)
        elif kind in ("stop", "start") and world.boxes:
            box = world.boxes[step[1] % len(world.boxes)]
            if kind == "stop" and box.status == "running":
                box.status, box.finished = "exited", world.clock
            elif kind == "start" and box.kind != "lab" and box.status != "running":
                box.status, box.finished = "running", None  # someone else's docker start
        elif kind == "wait":
            world.clock += step[1]
        elif kind == "reboot":
            reboot(world, step[1])


#: One bug shrunk at a time keeps a failing run short (shrinking several took minutes).
_SETTINGS = settings(max_examples=300, deadline=None, report_multiple_bugs=False,
                     suppress_health_check=[HealthCheck.too_slow,
                                            HealthCheck.filter_too_much])


@_SETTINGS
@given(histories)
def test_no_device_is_given_while_someone_else_holds_it(history):
    """(a) a plan never gives a device, its parent GPU or a slice of it while a container it
    does not remove holds it (running, in its hold, or starting)."""
    run(history, {"a"})


@_SETTINGS
@given(histories)
def test_only_this_hubs_containers_are_removed_and_saved(history):
    """(b) removals and replacements are this hub's containers (preemption: held, lower
    priority, another user); (c) all of them saved but remove=True's; (d) a name owned by
    another hub or DS01 is a name-clash refusal."""
    run(history, {"b", "c", "d"})


@_SETTINGS
@given(histories)
def test_the_quota_holds_after_every_plan(history):
    """(e) GPU-equivalents of the user's containers on this hub stay within the limit."""
    run(history, {"e"})


@_SETTINGS
@given(histories)
def test_new_containers_see_exactly_their_devices_and_get_free_ports(history):
    """(f) NVIDIA_VISIBLE_DEVICES lists exactly device_ids (void for CPU); host ports come
    from the range, are not promised or bound elsewhere, and are kept while free."""
    run(history, {"f", "p"})


_CONTENTION = settings(_SETTINGS, max_examples=600)


@_CONTENTION
@given(contention)
def test_contention_never_gives_a_device_twice(history):
    """(a), (b), (c) on a scarce host where holds end and higher priorities take them over."""
    run(history, {"a", "b", "c"})


@_CONTENTION
@given(contention)
def test_contention_host_ports_promised_to_a_hold_stay_promised(history):
    """Host ports pass between servers only when their holder no longer holds them."""
    run(history, {"p"})
