"""What the admin pages show, computed from one Snapshot: pure functions, no I/O.

The templates and the page's refresh script both draw from these records (the script gets
them as JSON), so a state has one name, one colour and one sentence everywhere, and the
rendering can be tested and timed on a hand-made Snapshot of any size.

Display states of a device block, in the order of the legend:
``free``, ``running``, ``starting`` (a spawn in flight), ``held`` (stopped, inside its hold),
``expired`` (stopped, hold over: labels still name the device, which is free for others),
``unmanaged`` (held by a container without gpuspawner's labels), ``conflict`` (two or more
running containers hold it, ``Snapshot.conflicts``: red, it wins over every other state) and
``missing`` (a label names a UUID the inventory no longer has: MIG re-created, GPU removed).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from .. import allocator
from ..inventory import profile_slices
from ..policy import format_duration
from ..records import (
    CREATED,
    EXPIRED,
    GPU,
    HELD,
    RUNNING,
    Allocation,
    JSONRecord,
    MigDevice,
    host_field,
)
from ..snapshot import BUSY, CONFLICT, UNAVAILABLE, DeviceView, ProcessView, Snapshot
from ..world import release_refusal
from .hubapi import HubUser

FREE, STARTING, UNMANAGED, MISSING = "free", "starting", "unmanaged", "missing"
#: Display states in legend order, with the words the legend uses.
STATES: tuple[tuple[str, str], ...] = (
    (FREE, "free"),
    (RUNNING, "running"),
    (STARTING, "starting"),
    (HELD, "held after stop"),
    (EXPIRED, "hold expired"),
    (UNMANAGED, "unmanaged holder"),
    (CONFLICT, "two running holders"),
    (UNAVAILABLE, "unavailable (NVML fails on it)"),
    (BUSY, "busy (processes, no container)"),
    (MISSING, "UUID gone"),
)
_FROM_DEVICE_STATE = {RUNNING: RUNNING, HELD: HELD, CREATED: STARTING, UNMANAGED: UNMANAGED,
                      CONFLICT: CONFLICT, UNAVAILABLE: UNAVAILABLE, BUSY: BUSY}
_DOCKER_RUNNING = frozenset({"running", "paused", "restarting"})


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def _short(moment: datetime | None) -> str:
    return "" if moment is None else moment.strftime("%Y-%m-%d %H:%M UTC")


def hold_until(snap: Snapshot, allocation: Allocation) -> datetime | None:
    """When a stopped managed container's hold ends (or ended); None while it runs."""
    if not allocation.managed or allocation.finished_at is None:
        return None
    if allocation.state not in (HELD, EXPIRED):
        return None
    seconds = snap.policy.hold_seconds(allocation.user or "")
    return allocation.finished_at + timedelta(seconds=seconds)


@dataclass(frozen=True)
class Holder(JSONRecord):
    """A container on a block, with what the tooltip and the detail panel say about it."""

    container_id: str
    container: str
    managed: bool
    state: str
    user: str | None
    server: str
    profile: str | None
    since: str | None
    until: str | None
    ports: str
    can_release: bool
    can_stop: bool
    #: The host (of the hub's ``hosts``) the container is on; "" on a one-host hub.
    host: str = ""


@dataclass(frozen=True)
class Block(JSONRecord):
    """One device (MIG slice or whole GPU) on a card."""

    slot: str
    uuid: str
    profile: str
    state: str
    label: str
    slices: int
    title: str
    holders: tuple[Holder, ...] = ()
    #: When the hold of a held block ends (ISO 8601 UTC), shown on the block itself.
    until: str | None = None
    #: What runs on it, as NVML said: "7.9/10.0 GiB · 2 processes"; "" where NVML does not
    #: say. ``memory_percent`` draws the bar (None: no bar).
    activity: str = ""
    memory_percent: int | None = None


@dataclass(frozen=True)
class Card(JSONRecord):
    """One GPU and its devices; ``index`` None for the card of devices that are gone."""

    index: int | None
    uuid: str
    name: str
    memory_gib: float
    mig: bool
    used: int
    total: int
    note: str
    blocks: tuple[Block, ...]
    #: The host (of the hub's ``hosts``) the GPU is in; "" on a one-host hub.
    host: str = ""


@dataclass(frozen=True)
class Total(JSONRecord):
    profile: str
    free: int
    used: int
    total: int


@dataclass(frozen=True)
class Overview(JSONRecord):
    taken_at: str
    cards: tuple[Card, ...]
    totals: tuple[Total, ...]
    counts: tuple[tuple[str, str, int], ...]  # (state, words, count) in legend order
    problems: tuple[str, ...]
    source: str


def can_release(allocation: Allocation, hub_id: str | None = None) -> bool:
    """Only this hub's containers, stopped for good (``world.release_refusal``, which
    ``World.release`` checks again on a fresh read), get the button."""
    return release_refusal(allocation, hub_id) is None


def can_stop(allocation: Allocation, hub_id: str | None = None) -> bool:
    """A running server of this hub (``Allocation.is_ours``) can be stopped through the Hub
    API; another hub's server is that hub's to stop."""
    return (
        allocation.is_ours(hub_id)
        and bool(allocation.user)
        and allocation.docker_status in _DOCKER_RUNNING
    )


def _ports(allocation: Allocation) -> str:
    return " ".join(f"{name}={port}" for name, port in allocation.ports)


def holder(snap: Snapshot, allocation: Allocation, hub_id: str | None = None) -> Holder:
    until = hold_until(snap, allocation)
    return Holder(
        container_id=allocation.container_id,
        container=allocation.container_name,
        managed=allocation.managed,
        state=allocation.state,
        user=allocation.user,
        server=allocation.server,
        profile=allocation.profile,
        since=_iso(allocation.allocated_at or allocation.created_at),
        until=_iso(until),
        ports=_ports(allocation),
        can_release=can_release(allocation, hub_id),
        can_stop=can_stop(allocation, hub_id),
    )


def _who(allocation: Allocation) -> str:
    if not allocation.managed:
        return allocation.container_name
    if allocation.server:
        return f"{allocation.user}/{allocation.server}"
    return allocation.user or allocation.container_name


def _title(kind: str, slot: str, uuid: str, state: str, holders: Sequence[Allocation],
           snap: Snapshot) -> str:
    lines = [f"{kind} {slot}  {uuid}", dict(STATES).get(state, state)]
    for a in holders:
        owner = f"user {a.user}, server {a.server or '(default)'}" if a.managed else (
            f"unmanaged container {a.container_name}")
        lines.append(owner)
        if a.profile:
            lines.append(f"profile {a.profile}")
        since = a.allocated_at or a.created_at
        if since:
            lines.append(f"since {_short(since)}")
        until = hold_until(snap, a)
        if until is not None:
            lines.append(f"{'held until' if a.state == HELD else 'hold ended'} {_short(until)}")
        if a.ports:
            lines.append(f"ports {_ports(a)}")
        lines.append(f"container {a.container_name}")
    return "\n".join(lines)


def _block(
    snap: Snapshot,
    view: DeviceView,
    state: str,
    holders: Sequence[Allocation],
    slices: int,
    hub_id: str | None,
) -> Block:
    if state == FREE:
        label = "free"
    elif state == UNAVAILABLE:
        label = f"unavailable: {view.reason}"
    elif state == BUSY:
        label = view.reason or "busy"
    elif state == MISSING:
        label = _who(holders[0]) if holders else "gone"
    else:
        label = ", ".join(dict.fromkeys(_who(a) for a in holders)) or "in use"
    kind = "MIG slice" if view.kind == "mig" else "GPU"
    ends = [hold_until(snap, a) for a in holders if a.state == HELD]
    until = min((e for e in ends if e is not None), default=None)
    return Block(
        slot=view.slot,
        uuid=view.uuid,
        profile=view.profile if view.kind == "mig" else "whole GPU",
        state=state,
        label=label,
        slices=max(1, slices),
        title=_title(kind, view.slot, view.uuid, state, holders, snap)
        + (f"\n{view.reason}" if state == BUSY and view.reason else
           f"\nunavailable: {view.reason}" if view.reason else "")
        + (f"\n{activity(view)}" if activity(view) else "")
        + "".join(f"\n{process_words(p)}" for p in top_processes(view)),
        holders=tuple(holder(snap, a, hub_id) for a in holders),
        until=_iso(until),
        activity=activity(view),
        memory_percent=(None if view.memory_used_mib is None or not view.memory_mib else
                        min(100, round(100 * view.memory_used_mib / view.memory_mib))),
    )


def activity(view: DeviceView) -> str:
    """A device's activity in words: memory in use of total, compute processes (their pids
    and owners in the tooltip), utilization of a whole GPU, and for a held device with no
    process how long it has been idle; "" where NVML did not say. Shown on the block (cut to
    its width) and in full in its tooltip and detail."""
    parts = []
    memory = view.memory_words()
    if memory:
        parts.append(memory)
    if view.processes:
        count = len(view.processes)
        parts.append(f"{count} process{'' if count == 1 else 'es'}")
    if view.utilization is not None:
        parts.append(f"{view.utilization}% utilization")
    elif view.kind == "mig" and memory:  # NVML has none per MIG device; dcgm-exporter may
        parts.append("utilization n/a")
    if not view.processes and view.holders and view.idle_seconds is not None:
        parts.append(f"idle {idle_words(view.idle_seconds)}")
    return " · ".join(parts)


#: Processes listed per device in its tooltip and detail, largest memory first.
TOP_PROCESSES = 8


def top_processes(view: DeviceView) -> tuple[ProcessView, ...]:
    return tuple(sorted(view.processes, key=lambda p: (-p.used_mib, p.pid))[:TOP_PROCESSES])


def process_words(process: ProcessView) -> str:
    """One process for people: "pid 4242 · ann · 2.0 GiB"."""
    return f"pid {process.pid} · {process.owner_words()} · {process.used_mib / 1024:.1f} GiB"


def idle_words(seconds: float) -> str:
    """An idle time, to the minute past the first one: "45s", "12m", "2h5m"."""
    whole = int(max(0.0, seconds))
    return format_duration(whole if whole < 60 else whole // 60 * 60)


def overview(snap: Snapshot, hub_id: str | None = None) -> Overview:
    """One card per GPU, one block per device, coloured by display state; totals per profile."""
    by_id = {a.container_id: a for a in snap.allocations}
    views = {v.uuid: v for v in snap.devices()}
    expired: dict[str, list[Allocation]] = defaultdict(list)
    for a in snap.allocations:
        if a.managed and a.state == EXPIRED:
            for uuid in a.uuids:
                expired[uuid].append(a)
    inv = snap.inventory

    def display(view: DeviceView, parent: DeviceView | None) -> tuple[str, list[Allocation]]:
        own = [by_id[c] for c in view.holders if c in by_id]
        if view.state == "mig-parent":
            # Taken through its parent (a whole-GPU or count=N holder) or its children.
            through = [by_id[c] for c in (parent.holders if parent else ()) if c in by_id]
            if through:
                if any(not a.managed for a in through):
                    return UNMANAGED, through
                return _FROM_DEVICE_STATE.get(through[0].state, RUNNING), through
            return RUNNING, own
        if view.state == "free":
            stale = expired.get(view.uuid)
            return (EXPIRED, stale) if stale else (FREE, [])
        return _FROM_DEVICE_STATE.get(view.state, RUNNING), own

    cards: list[Card] = []
    placed_missing: set[str] = set()
    missing = snap.missing_uuids()
    missing_by_parent: dict[str, list[tuple[str, tuple[Allocation, ...]]]] = defaultdict(list)
    known_gpus = {g.uuid for g in inv.gpus}
    for uuid, gone in missing.items():
        parent = next((p for a in gone for p in a.parent_uuids if p in known_gpus), "")
        missing_by_parent[parent].append((uuid, gone))

    for gpu in sorted(inv.gpus, key=lambda g: g.index):
        gpu_view = views.get(gpu.uuid)
        blocks: list[Block] = []
        if gpu.mig_enabled:
            migs: Sequence[MigDevice] = inv.migs_of(gpu)
            for mig in migs:
                view = views.get(mig.uuid)
                if view is None:
                    continue
                state, shown = display(view, gpu_view)
                blocks.append(_block(snap, view, state, shown, mig.slices, hub_id))
            note = "" if migs else "MIG enabled, no MIG devices: nothing can be allocated here"
        elif gpu_view is not None:
            state, shown = display(gpu_view, None)
            blocks.append(_block(snap, gpu_view, state, shown, gpu.total_slices or 7, hub_id))
            note = ""
        else:
            note = ""
        for uuid, gone in missing_by_parent.get(gpu.uuid, ()):
            blocks.append(_missing_block(snap, uuid, gone, hub_id))
            placed_missing.add(uuid)
        cards.append(_card(gpu, blocks, note))

    rest = [(u, h) for u, h in missing.items() if u not in placed_missing]
    if rest:
        blocks = [_missing_block(snap, uuid, gone, hub_id) for uuid, gone in rest]
        cards.append(Card(index=None, uuid="", name="Devices that no longer exist",
                          memory_gib=0.0, mig=False, used=0, total=0,
                          note="labels name these UUIDs; their servers re-allocate on restart",
                          blocks=tuple(blocks)))

    counts: dict[str, int] = defaultdict(int)
    for card in cards:
        for block in card.blocks:
            counts[block.state] += 1
    totals = tuple(
        Total(profile=p, free=f, used=t - f, total=t)
        for p, (f, t) in snap.free_by_profile().items()
    )
    return Overview(
        taken_at=_iso(snap.taken_at) or "",
        cards=tuple(cards),
        totals=totals,
        counts=tuple((s, words, counts.get(s, 0)) for s, words in STATES),
        problems=tuple(inv.problems) + tuple(
            f"container {a.container_name} ({a.user or 'no user'}): {a.disagreement}"
            for a in snap.disagreements()
        ),
        source=inv.source,
    )


def across_hosts(
    parts: Sequence[tuple[str, Snapshot | None, str]], hub_id: str | None = None,
    acts_on: str | None = None,
) -> Overview:
    """The overview of a hub of several hosts: each host's cards in the order of ``hosts``,
    each card saying its host; totals and counts summed; a host down is a problem with its
    reason. ``parts``: (host, its snapshot or None, why it is down). Stop goes through the
    Hub, which stops a server on its own host; a release removes a container through its
    host's engine, so the holders of a host other than the service's own (``acts_on``)
    name their host, and the release form sends it."""
    cards: list[Card] = []
    counts: dict[str, int] = defaultdict(int)
    problems: list[str] = []
    taken: list[str] = []
    for name, snap, down in parts:
        if snap is None:
            problems.append(down or f"host {name} does not answer")
            continue
        one = overview(snap, hub_id)
        for card in one.cards:
            if name != acts_on:  # released through that host's engine
                card = replace(card, blocks=tuple(
                    replace(b, holders=tuple(replace(h, host=name) for h in b.holders))
                    for b in card.blocks))
            cards.append(replace(card, host=name))
        for state, _words, count in one.counts:
            counts[state] += count
        problems.extend(f"host {name}: {p}" for p in one.problems)
        taken.append(one.taken_at)
    return Overview(
        taken_at=min(taken) if taken else "",
        cards=tuple(cards),
        totals=tuple(Total(profile=p, free=f, used=t - f, total=t) for p, (f, t) in
                     allocator.summed(snap.free_by_profile() for _name, snap, _down in parts
                                      if snap is not None).items()),
        counts=tuple((s, words, counts.get(s, 0)) for s, words in STATES),
        problems=tuple(problems),
        source="hosts",
    )


def _missing_block(
    snap: Snapshot, uuid: str, holders: Sequence[Allocation], hub_id: str | None
) -> Block:
    first = holders[0]
    slot = "?"
    if uuid in first.uuids and len(first.slots) == len(first.uuids):
        slot = first.slots[first.uuids.index(uuid)]
    profile = first.gpu_profile or "?"
    view = DeviceView(slot=slot, uuid=uuid, kind="mig" if uuid.startswith("MIG-") else "gpu",
                      profile=profile, gpu_index=-1, parent_uuid="", equivalents=0.0,
                      holders=(), state=MISSING)
    return _block(snap, view, MISSING, holders, profile_slices(profile) or 1, hub_id)


def _card(gpu: GPU, blocks: list[Block], note: str) -> Card:
    present = [b for b in blocks if b.state != MISSING]
    return Card(
        index=gpu.index,
        uuid=gpu.uuid,
        name=gpu.name.removeprefix("NVIDIA "),
        memory_gib=round(gpu.memory_mib / 1024, 1),
        mig=gpu.mig_enabled,
        used=sum(1 for b in present if b.state not in (FREE, EXPIRED)),
        total=len(present),
        note=note,
        blocks=tuple(blocks),
    )


# --------------------------------------------------------------------------- tables


def allocation_rows(
    snap: Snapshot,
    hub_users: Mapping[str, HubUser] | None = None,
    hub_id: str | None = None,
    host: str | None = None,
) -> list[dict[str, Any]]:
    """``Allocation.to_json()`` of every container (the CLI's records), plus what the page adds:
    ``hold_until``, ``last_activity`` (from the Hub) and the actions allowed on it; on a hub
    of several hosts, the ``host`` it is on (the release form sends it)."""
    users = hub_users or {}
    rows = []
    for a in snap.allocations:
        row = a.to_json()
        hub_user = users.get(a.user or "") if a.managed else None
        row["hold_until"] = _iso(hold_until(snap, a))
        row["last_activity"] = _iso(hub_user.activity(a.server)) if hub_user else None
        row["can_release"] = can_release(a, hub_id)
        row["can_stop"] = can_stop(a, hub_id)
        rows.append({**row, **host_field(host)})
    return rows


def allocation_rows_across(
    parts: Sequence[tuple[str | None, Snapshot | None]],
    hub_users: Mapping[str, HubUser] | None = None,
    hub_id: str | None = None,
) -> list[dict[str, Any]]:
    """``allocation_rows`` of every host that answers (``parts``: host, or None on a
    one-host hub; snapshot, or None for a host that does not answer), each row naming its
    host."""
    return [row for host, snap in parts if snap is not None
            for row in allocation_rows(snap, hub_users, hub_id, host=host)]


def user_rows(
    parts: Sequence[tuple[str | None, Snapshot | None]],
    hub_users: Mapping[str, HubUser] | None = None,
    idle_after: float = 3600.0,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Per user with containers, over every host that answers (``parts``: host, or None on
    a one-host hub; snapshot, or None for a host that does not answer): GPU-equivalents in
    use, summed over the hosts as the policy's limits count them, against the limit; each
    server naming its host; and idleness.

    A user is idle when they hold a device and the Hub's last activity (of the holding
    server while it runs, else of the user) is older than ``idle_after``; a held (stopped)
    server counts from when it stopped if the Hub knows nothing newer.
    """
    snaps = [(host, snap) for host, snap in parts if snap is not None]
    if not snaps:
        return []
    first = snaps[0][1]
    now = now or first.taken_at or datetime.now(timezone.utc)
    users = hub_users or {}
    mine: dict[str, list[tuple[str | None, Allocation]]] = defaultdict(list)
    for host, snap in snaps:
        for a in snap.allocations:
            if a.managed and a.user:
                mine[a.user].append((host, a))
    rows = []
    for name in sorted(mine):
        allocations = mine[name]
        hub_user = users.get(name)
        policy = first.policy.for_user(name, hub_user.groups if hub_user else ())
        limit = policy.limits.max_gpu_equivalents
        used = sum(snap.usage(name) for _host, snap in snaps)
        holding = [a for _host, a in allocations
                   if a.holds and (a.uuids or a.slots or a.gpu_count)]
        seen: list[datetime] = []
        for a in holding:
            when = hub_user.activity(a.server) if hub_user else None
            if a.state == HELD and a.finished_at is not None:
                when = max(when, a.finished_at) if when else a.finished_at
            if when is not None:
                seen.append(when)
        last = max(seen) if seen else (hub_user.last_activity if hub_user else None)
        idle_for = (now - last).total_seconds() if (holding and last is not None) else None
        rows.append({
            "user": name,
            "equivalents": used,
            "limit": limit,
            "share": (used / limit) if limit else None,
            "limits": policy.limits.to_json(),
            "policy_sources": list(policy.sources),
            "groups": list(hub_user.groups) if hub_user else [],
            "holding": len(holding),
            "last_activity": _iso(last),
            "idle": idle_for is not None and idle_for > idle_after,
            "idle_for": None if idle_for is None else format_duration(max(0, int(idle_for))),
            "servers": [
                {"server": a.server, "state": a.state, "profile": a.profile,
                 "slots": list(a.slots), "equivalents": a.equivalents,
                 "container_id": a.container_id, "container": a.container_name,
                 **host_field(host)}
                for host, a in allocations
            ],
        })
    return rows


def available(snap: Snapshot, profile: str | None = None) -> dict[str, dict[str, int]]:
    """``gpuspawner available --json``: free / total per MIG profile and ``gpu``."""
    free = snap.free_by_profile()
    if profile:
        free = {profile: free[profile]} if profile in free else {}
    return {k: {"free": f, "total": t} for k, (f, t) in free.items()}


def event_rows(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Operation-log entries, newest first, with the fields a table shows in columns and the
    rest as one ``details`` text (``key=value``)."""
    shown = ("time", "event", "user", "server", "by")
    rows = []
    for entry in reversed(entries):
        rest = {k: v for k, v in entry.items() if k not in shown}
        details = " ".join(
            f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
            for k, v in rest.items()
        )
        row = {k: entry.get(k) for k in shown}
        row["time"] = str(entry.get("time") or "")
        row["event"] = str(entry.get("event") or "?")
        row["details"] = details
        rows.append(row)
    return rows
