"""Property tests: random hosts, users, policies and histories never break the rules.

Each history is a sequence of spawns, stops, hold expiries, removals, MIG re-creations
("reboots") and outside ``docker run``s. After every step we check, by brute force over the
plain data, that no device is held twice, that no limit is exceeded, and that every refusal
was justified: a free, permitted device really did not exist.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuspawner import allocator
from gpuspawner.allocator import Choice, Refusal, Taken, choose
from gpuspawner.records import EXPIRED, HELD, RUNNING, Allocation, Inventory, MigDevice

from .hosts import Request, holding, host, limits, unmanaged

#: MIG layouts an A100-80GB can really hold (slices add up to at most 7).
LAYOUTS = [
    ["1g.10gb"] * 7,
    ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"],
    ["3g.40gb", "3g.40gb"],
    ["4g.40gb", "2g.20gb", "1g.10gb"],
    ["7g.80gb"],
    ["2g.20gb", "2g.20gb", "2g.20gb", "1g.10gb"],
    [],  # MIG enabled, no instances yet
]
PROFILES = ["1g.10gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb", "1g.5gb"]
USERS = ["ann", "bo", "cy", "di", "ed"]

hosts = st.lists(st.one_of(st.none(), st.sampled_from(LAYOUTS)), min_size=1, max_size=3)
user_limits = st.builds(
    limits,
    max_gpu_equivalents=st.sampled_from([None, None, 0.15, 0.3, 0.5, 1.0, 2.0]),
    max_gpu_slots_per_container=st.sampled_from([None, 1, 2]),
    allow_full_gpu=st.sampled_from([True, True, False]),
    priority=st.integers(0, 3),
    max_servers=st.sampled_from([None, 1, 2]),
)
requests = st.one_of(
    st.builds(lambda p: ("mig", p), st.sampled_from(PROFILES)),
    st.builds(lambda p: ("mig", p), st.sampled_from(PROFILES[:3])),
    st.builds(lambda p: ("mig", p), st.sampled_from(PROFILES[:1])),
    st.builds(lambda n: ("gpus", n), st.integers(1, 3)),
    st.just(("cpu", None)),
)
spawn = st.tuples(
    st.just("spawn"),
    st.sampled_from(USERS),
    st.sampled_from(["", "a", "b"]),
    requests,
    st.sampled_from(["pack", "spread"]),
)
steps = st.one_of(
    spawn,
    spawn,
    spawn,
    st.tuples(st.just("stop"), st.integers(0, 50)),
    st.tuples(st.just("expire"), st.integers(0, 50)),
    st.tuples(st.just("remove"), st.integers(0, 50)),
    st.tuples(st.just("reboot"), st.integers(0, 1000)),
    st.tuples(st.just("outside"), st.integers(0, 50), st.integers(-1, 2)),
)


def reboot(inventory: Inventory, seed: int) -> Inventory:
    """MIG devices come back with new UUIDs, same profiles and positions."""
    migs = tuple(
        replace(m, uuid=f"MIG-r{seed:05d}{i:04d}-0000-0000-0000-000000000000")
        for i, m in enumerate(inventory.migs)
    )
    return replace(inventory, migs=migs)


def atoms(taken: Taken, allocation: Allocation) -> set[tuple[str, str]]:
    """What an allocation occupies: a whole GPU claims itself and its slices; a slice claims
    itself and a share ("part") of its parent, which conflicts only with the whole GPU."""
    inv = taken.inventory
    direct = {u for u, holders in taken.by_uuid.items() if allocation in holders}
    found: set[tuple[str, str]] = set()
    for gpu in inv.gpus:
        if gpu.uuid in direct:
            found.add(("gpu", gpu.uuid))
            found.update(("mig", m.uuid) for m in inv.migs_of(gpu))
    for mig in inv.migs:
        if mig.uuid in direct:
            found.update({("mig", mig.uuid), ("part", mig.parent_uuid)})
    return found


def conflict(a: set[tuple[str, str]], b: set[tuple[str, str]]) -> set:
    clash = {x for x in a & b if x[0] != "part"}
    clash |= {x for x in a if x[0] == "part" and ("gpu", x[1]) in b}
    clash |= {x for x in b if x[0] == "part" and ("gpu", x[1]) in a}
    return clash


def check_no_double_holding(inventory: Inventory, allocations: list[Allocation], order: dict):
    taken = Taken(inventory, allocations)
    holders = sorted((a for a in allocations if a.holds), key=lambda x: order[x.container_id])
    for i, first in enumerate(holders):
        for second in holders[i + 1 :]:
            # An outside holder that came later is the outside world's doing, not ours.
            if not second.managed:
                continue
            clash = conflict(atoms(taken, first), atoms(taken, second))
            assert not clash, (first, second, clash)


def justified(inventory, allocations, lim, request, refusal: Refusal):
    others = [a for a in allocations if a.container_id != request.own_container]
    taken = Taken(inventory, others)
    if refusal.code == allocator.FULL:
        enabled = {g.uuid for g in inventory.gpus if g.mig_enabled}
        if request.mig_profile:
            pool = [
                m
                for m in inventory.migs
                if m.profile == request.mig_profile and m.parent_uuid in enabled
            ]
            for device in pool:
                blockers = taken.blockers(device)
                assert blockers, f"{device.slot} was free"
                assert not allocator._preemptible(blockers, lim, request)
        else:
            pool = [g for g in inventory.gpus if not g.mig_enabled]
            usable = [
                g
                for g in pool
                if not taken.blockers(g)
                or allocator._preemptible(taken.blockers(g), lim, request)
            ]
            assert len(usable) < request.gpus
    elif refusal.code == allocator.QUOTA:
        want = request.gpus or next(
            m.equivalents for m in inventory.migs if m.profile == request.mig_profile
        )
        have = allocator.usage(inventory, others, request.hub, request.user)
        assert have + want > lim.max_gpu_equivalents + 1e-9
    elif refusal.code == allocator.TOO_MANY_SERVERS:
        assert (
            allocator.servers_in_use(allocations, request.hub, request.user, request.server)
            >= lim.max_servers
        )
    elif refusal.code == allocator.NO_SUCH_PROFILE:
        if request.mig_profile:
            assert request.mig_profile not in {
                m.profile
                for m in inventory.migs
                if any(g.uuid == m.parent_uuid and g.mig_enabled for g in inventory.gpus)
            }
        else:
            assert len([g for g in inventory.gpus if not g.mig_enabled]) < request.gpus
    elif refusal.code == allocator.NO_GPUS:
        assert not inventory.gpus
    elif refusal.code == allocator.FORBIDDEN:
        assert request.gpus and not lim.allow_full_gpu
    elif refusal.code == allocator.TOO_MANY_DEVICES:
        assert request.gpus > lim.max_gpu_slots_per_container
    else:  # pragma: no cover
        raise AssertionError(refusal)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=hosts,
    policies=st.fixed_dictionaries({u: user_limits for u in USERS}),
    history=st.lists(steps, min_size=5, max_size=60),
)
def test_histories_never_break_the_rules(layout, policies, history):
    inventory = host(*layout)
    allocations: list[Allocation] = []
    order: dict[str, int] = {}
    clock = 0
    for step in history:
        clock += 1
        kind = step[0]
        if kind == "spawn":
            _, user, server, (what, arg), strategy = step
            lim = policies[user]
            own = [a for a in allocations if a.managed and a.user == user and a.server == server]
            request = Request(
                user,
                server,
                profile=f"{what}-{arg}",
                mig_profile=arg if what == "mig" else None,
                gpus=arg if what == "gpus" else 0,
                prefer_uuids=tuple(u for a in own for u in a.uuids),
                own_container=own[0].container_id if own else None,
                strategy=strategy,
            )
            result = choose(inventory, allocations, lim, request)
            if isinstance(result, Refusal):
                justified(inventory, allocations, lim, request, result)
                continue
            assert isinstance(result, Choice)
            # limits hold for what is granted
            assert len(result.devices) == (1 if what == "mig" else arg if what == "gpus" else 0)
            assert sum(isinstance(d, MigDevice) for d in result.devices) <= 1
            if what == "gpus":
                assert lim.allow_full_gpu
                assert lim.max_gpu_slots_per_container is None or (
                    arg <= lim.max_gpu_slots_per_container
                )
                assert all(not g.mig_enabled for g in result.devices)
            # the spawner removes pre-empted holds and the replaced container of this server
            gone = set(result.preempts) | {a.container_id for a in own}
            for a in allocations:
                if a.container_id in result.preempts:
                    assert a.state == HELD and a.priority < lim.priority and a.user != user
            allocations = [a for a in allocations if a.container_id not in gone]
            new = holding(result, user, server, priority=lim.priority)
            order[new.container_id] = clock
            allocations.append(new)
            mine = [a for a in allocations if a.user == user and a.holds]
            if lim.max_gpu_equivalents is not None:
                assert sum(a.equivalents for a in mine) <= lim.max_gpu_equivalents + 1e-6
            if lim.max_servers is not None:
                assert len({a.server for a in mine}) <= lim.max_servers
        elif kind in ("stop", "expire", "remove") and allocations:
            target = allocations[step[1] % len(allocations)]
            if kind == "remove":
                allocations.remove(target)
            elif target.managed:
                state = HELD if kind == "stop" and target.state == RUNNING else EXPIRED
                allocations[allocations.index(target)] = replace(target, state=state)
        elif kind == "reboot":
            inventory = reboot(inventory, step[1])
            # every container stops at a reboot and comes back held
            allocations = [
                replace(a, state=HELD) if a.managed and a.holds else a
                for a in allocations
                if a.managed
            ]
        elif kind == "outside":
            _, pick, count = step
            everything = [*inventory.gpus, *inventory.migs]
            if count == 0 and everything:
                outside = unmanaged(uuids=[everything[pick % len(everything)].uuid])
            else:
                outside = unmanaged(count=count)
            order[outside.container_id] = clock
            allocations.append(outside)
        check_no_double_holding(inventory, allocations, order)


@settings(max_examples=300, deadline=None)
@given(
    priorities=st.fixed_dictionaries({u: st.integers(0, 2) for u in USERS}),
    history=st.lists(
        st.one_of(
            st.tuples(
                st.just("spawn"), st.sampled_from(USERS), st.sampled_from(["3g.40gb", "gpu"])
            ),
            st.tuples(st.just("stop"), st.integers(0, 20)),
            st.tuples(st.just("expire"), st.integers(0, 20)),
        ),
        min_size=10,
        max_size=50,
    ),
)
def test_contention_and_preemption(priorities, history):
    """A scarce host (two 3g slices, one whole GPU) and five users of mixed priority: slots
    are fought over, held slots are taken by higher priorities, running ones never."""
    inventory = host(["3g.40gb", "3g.40gb"], None)
    allocations: list[Allocation] = []
    order: dict[str, int] = {}
    for clock, step in enumerate(history):
        if step[0] == "spawn":
            user, what = step[1], step[2]
            lim = limits(priority=priorities[user], max_gpu_equivalents=None)
            own = [a for a in allocations if a.user == user and a.server == ""]
            request = Request(
                user,
                "",
                what,
                mig_profile=None if what == "gpu" else what,
                gpus=1 if what == "gpu" else 0,
                own_container=own[0].container_id if own else None,
            )
            result = choose(inventory, allocations, lim, request)
            if isinstance(result, Refusal):
                justified(inventory, allocations, lim, request, result)
                continue
            for a in allocations:
                if a.container_id in result.preempts:
                    assert a.state == HELD and a.priority < lim.priority
            gone = set(result.preempts) | {
                a.container_id for a in allocations if a.user == user and a.server == ""
            }
            allocations = [a for a in allocations if a.container_id not in gone]
            new = holding(result, user, priority=lim.priority)
            order[new.container_id] = clock
            allocations.append(new)
        elif allocations:
            target = allocations[step[1] % len(allocations)]
            state = HELD if step[0] == "stop" and target.state == RUNNING else EXPIRED
            allocations[allocations.index(target)] = replace(target, state=state)
        check_no_double_holding(inventory, allocations, order)
