"""The pure allocation decision: (inventory, allocations, limits, request) -> Choice | Refusal.

No I/O here: the spawner hands in one snapshot of the world and gets back what to write
into the new container's labels and device request, or a sentence the student can act on.
That keeps every rule testable exhaustively without a GPU or an engine.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .records import GPU, HELD, RUNNING, Allocation, Device, Inventory, JSONRecord, MigDevice

PACK = "pack"
SPREAD = "spread"
STRATEGIES = (PACK, SPREAD)
_EPSILON = 1e-9


class LimitsLike(Protocol):
    """What the allocator needs of a user's policy (``policy.Limits`` provides it)."""

    max_gpu_equivalents: float | None
    max_gpu_slots_per_container: int | None
    allow_full_gpu: bool
    priority: int
    max_servers: int | None

    def allows_profile(self, slug: str, mig_profile: str | None = None) -> bool: ...


@dataclass(frozen=True)
class Request(JSONRecord):
    """What a spawn asks for. ``mig_profile`` or ``gpus`` or neither (a CPU-only server)."""

    user: str
    server: str = ""
    profile: str = ""  # the spawner profile slug, for policy and messages
    mig_profile: str | None = None
    gpus: int = 0
    #: Devices to keep if still free (a restart), then GPUs to prefer (same parent GPU).
    prefer_uuids: tuple[str, ...] = ()
    prefer_parents: tuple[str, ...] = ()
    strategy: str = PACK
    #: The asking hub's id: only its own containers count against the user's limits or may
    #: be preempted.
    hub: str | None = None
    #: The server's own existing container (this hub's, this user's, this server's), whose
    #: devices it may keep: the only container not counted as someone else's.
    own_container: str | None = None
    #: Memory in use (MiB) above which a device no running container holds is ``busy``.
    busy_memory_mib: int = 0  # 0: BUSY_MEMORY_MIB


@dataclass(frozen=True)
class Choice(JSONRecord):
    """The devices to give, and the held containers of lower priority that must make way."""

    devices: tuple[Device, ...] = ()
    preempts: tuple[str, ...] = ()  # container ids whose hold is taken over
    equivalents: float = 0.0
    kept: bool = False  # every device is one the request preferred (same as before)

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(d.uuid for d in self.devices)

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(d.slot for d in self.devices)

    @property
    def parent_uuids(self) -> tuple[str, ...]:
        return tuple(d.parent_uuid if isinstance(d, MigDevice) else d.uuid for d in self.devices)

    @property
    def gis(self) -> tuple[int | None, ...]:
        return tuple(d.gi for d in self.devices if isinstance(d, MigDevice))

    @property
    def gpu_profile(self) -> str | None:
        if not self.devices:
            return None
        first = self.devices[0]
        return first.profile if isinstance(first, MigDevice) else first.name

    def describe(self) -> str:
        if not self.devices:
            return "no GPU (CPU only)"
        first = self.devices[0]
        if isinstance(first, MigDevice):
            return f"MIG {first.profile} slice {first.slot} on GPU {first.gpu_index}"
        return f"GPU {', '.join(self.slots)} ({first.name})"


@dataclass(frozen=True)
class Holder(JSONRecord):
    """Who holds a device, for the admin's side of a refusal."""

    user: str | None
    server: str
    container: str
    slot: str
    state: str
    managed: bool


@dataclass(frozen=True)
class Refusal(JSONRecord):
    """Why not: a stable ``code`` for metrics, a ``message`` a student understands."""

    code: str
    message: str
    holders: tuple[Holder, ...] = ()


# Refusal codes (stable: metrics and tests use them).
FORBIDDEN = "forbidden"
NO_SUCH_PROFILE = "no-such-profile"
NO_GPUS = "no-gpus"
QUOTA = "quota"
TOO_MANY_SERVERS = "too-many-servers"
TOO_MANY_DEVICES = "too-many-devices"
FULL = "full"
#: Every device of the profile that exists is unavailable (NVML failed on its GPU).
UNAVAILABLE = "unavailable"



def _no_gpus(inventory: Inventory) -> Refusal:
    why = f" ({inventory.problems[0]})" if inventory.problems else ""
    return Refusal(
        NO_GPUS, f"this server has no NVIDIA GPUs available{why}: choose a CPU profile"
    )


class Taken:
    """Which devices the holding allocations occupy, resolved against the inventory.

    A whole GPU taken takes its MIG devices with it; a MIG device taken keeps its parent GPU
    from being given whole. Unmanaged ``count=N`` requests take the first N GPUs, ``-1`` all.
    """

    def __init__(self, inventory: Inventory, allocations: Iterable[Allocation]) -> None:
        self.inventory = inventory
        self.by_uuid: dict[str, list[Allocation]] = defaultdict(list)
        self.missing: dict[str, list[Allocation]] = defaultdict(list)
        devices = inventory.by_uuid()
        slots: dict[str, Device] = {g.slot: g for g in inventory.gpus}
        slots.update({m.slot: m for m in inventory.migs})
        ordered = sorted(inventory.gpus, key=lambda g: g.index)
        for allocation in allocations:
            if not allocation.holds:
                continue
            uuids = set(allocation.uuids)
            if not uuids:
                uuids.update(slots[s].uuid for s in allocation.slots if s in slots)
            uuids.update(slots[s].uuid for s in allocation.slot_requests if s in slots)
            if allocation.gpu_count < 0:
                uuids.update(g.uuid for g in ordered)
            elif allocation.gpu_count > 0:
                uuids.update(g.uuid for g in ordered[: allocation.gpu_count])
            for uuid in uuids:
                if uuid in devices:
                    self.by_uuid[uuid].append(allocation)
                else:
                    self.missing[uuid].append(allocation)
        self._children: dict[str, tuple[MigDevice, ...]] = {
            g.uuid: inventory.migs_of(g) for g in inventory.gpus
        }

    def blockers(self, device: Device) -> list[Allocation]:
        """Every allocation that keeps ``device`` from being given away."""
        found = list(self.by_uuid.get(device.uuid, ()))
        if isinstance(device, MigDevice):
            found.extend(self.by_uuid.get(device.parent_uuid, ()))
        else:
            for mig in self._children.get(device.uuid, ()):
                found.extend(self.by_uuid.get(mig.uuid, ()))
        unique = {a.container_id: a for a in found}
        return list(unique.values())

    def used_on(self, gpu_uuid: str) -> int:
        """Slices of a GPU in use: the packing order's measure."""
        return sum(
            m.slices for m in self._children.get(gpu_uuid, ()) if self.by_uuid.get(m.uuid)
        )


def _same_server(allocation: Allocation, request: Request) -> bool:
    """The one container a (re)start may take the devices of: its own, by id. Any other
    container, even of the same user and server name (a stray, another hub's), is someone
    else's: what it holds stays taken."""
    return request.own_container is not None and allocation.container_id == request.own_container


def charged(inventory: Inventory, allocation: Allocation) -> float:
    """GPU-equivalents a container is charged: the devices Docker gives it, priced from the
    inventory (never the label's own figure); a device the inventory no longer has (MIG
    re-created) is charged as its labels said when it was given."""
    held = Taken(inventory, [allocation])  # what "holds a device" means, written once
    if held.by_uuid:
        devices = inventory.by_uuid()
        return sum(devices[uuid].equivalents for uuid in held.by_uuid)
    return float(allocation.equivalents) if held.missing else 0.0


def _counted(allocations: Iterable[Allocation], hub: str | None, user: str) -> list[Allocation]:
    """A user's holding containers of this hub: what limits count."""
    return [a for a in allocations if a.holds and a.is_ours(hub) and a.user == user]


def usage(
    inventory: Inventory, allocations: Iterable[Allocation], hub: str | None, user: str
) -> float:
    """GPU-equivalents a user holds on this hub (the caller leaves out the server being
    (re)started). Containers of other hubs, other tools or made by hand are never charged
    to a user, whatever their labels say."""
    return round(sum(charged(inventory, a) for a in _counted(allocations, hub, user)) + 0.0, 6)


def servers_in_use(
    allocations: Iterable[Allocation], hub: str | None, user: str, server: str | None = None
) -> int:
    """Servers of a user holding something on this hub, other than ``server``."""
    return len({a.server for a in _counted(allocations, hub, user) if a.server != server})


def _fmt(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _holders(taken: Taken, devices: Iterable[Device]) -> tuple[Holder, ...]:
    found = []
    for device in devices:
        for allocation in taken.blockers(device):
            found.append(
                Holder(
                    allocation.user,
                    allocation.server,
                    allocation.container_name,
                    device.slot,
                    allocation.state,
                    allocation.managed,
                )
            )
    return tuple(found)


class Free(tuple):
    """``(free, total)`` of one profile, a plain pair to every reader, that also says how many
    of its devices are unavailable (NVML failed on their GPU; counted in neither number) and
    why (the first one's reason), so the form can tell "unavailable" from "full"."""

    unavailable: int
    reason: str | None

    def __new__(
        cls, free: int, total: int, unavailable: int = 0, reason: str | None = None
    ) -> Free:
        pair = super().__new__(cls, (free, total))
        pair.unavailable = unavailable
        pair.reason = reason
        return pair

    def __getnewargs__(self) -> tuple[int, int, int, str | None]:  # copy and pickle
        return (self[0], self[1], self.unavailable, self.reason)


def summed(frees: Iterable[Mapping[str, tuple[int, int]]]) -> dict[str, Free]:
    """``free_by_profile`` of several hosts as one: what a hub of several hosts offers per
    profile (the form). Unavailable devices add up too; the first reason stands."""
    out: dict[str, Free] = {}
    for free in frees:
        for key, pair in free.items():
            have = out.get(key, Free(0, 0))
            down = getattr(pair, "unavailable", 0)
            out[key] = Free(have[0] + pair[0], have[1] + pair[1], have.unavailable + down,
                            have.reason or (getattr(pair, "reason", None) if down else None))
    return out


#: A device no running container holds is ``busy`` when NVML shows compute processes on it,
#: or more memory in use than this many MiB: a process that outlived its container, or memory
#: it leaked. A slice nobody uses shows a few MiB (the driver's own), far below this.
BUSY_MEMORY_MIB = 1024
BUSY = "busy"


def busy(device: Device, taken: Taken, memory_mib: int = 0) -> str | None:
    """Why ``device`` is in use though no running container holds it (compute processes,
    memory over ``memory_mib``, default ``BUSY_MEMORY_MIB``), in words; None when it is not.
    Such a device is never given out: its memory is not there for the next user."""
    limit = memory_mib or BUSY_MEMORY_MIB
    used = device.memory_used_mib or 0
    if not device.processes and used <= limit:
        return None
    if any(a.state == RUNNING for a in taken.blockers(device)):
        return None  # its holder's own work
    count = len(device.processes)
    what = f"{count} process{'' if count == 1 else 'es'}, " if count else ""
    return f"busy: {what}{used / 1024:.1f} GiB in use, no running container holds it"


def unavailable(inventory: Inventory, device: Device) -> str | None:
    """Why ``device`` cannot be given out now (it or its GPU is unavailable), or None."""
    if device.unavailable:
        return device.unavailable
    if isinstance(device, MigDevice):
        for gpu in inventory.gpus:
            if gpu.uuid == device.parent_uuid and gpu.unavailable:
                return gpu.unavailable
    return None


def free_by_profile(
    inventory: Inventory, allocations: Sequence[Allocation], busy_memory_mib: int = 0
) -> dict[str, Free]:
    """MIG profile (and ``"gpu"`` for whole GPUs) -> (free, total) of the devices that can be
    given out; the form shows these. Unavailable devices are counted apart (``Free``); a
    ``busy`` device counts in the total, never as free."""
    taken = Taken(inventory, allocations)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    reasons: dict[str, str] = {}
    enabled = {g.uuid for g in inventory.gpus if g.mig_enabled}
    devices: list[tuple[str, Device]] = [
        (m.profile, m) for m in inventory.migs if m.parent_uuid in enabled]
    devices += [("gpu", g) for g in inventory.gpus if not g.mig_enabled]
    for key, device in devices:
        why = unavailable(inventory, device)
        if why:
            counts[key][2] += 1
            reasons.setdefault(key, why)
            continue
        counts[key][1] += 1
        if not taken.blockers(device) and not busy(device, taken, busy_memory_mib):
            counts[key][0] += 1
    return {k: Free(v[0], v[1], v[2], reasons.get(k)) for k, v in sorted(counts.items())}


def choose(
    inventory: Inventory,
    allocations: Sequence[Allocation],
    limits: LimitsLike,
    request: Request,
) -> Choice | Refusal:
    """Decide. Never hands out a held device, never exceeds a limit, one MIG slice at most."""
    if request.mig_profile and request.gpus:
        return Refusal(FORBIDDEN, "a server gets either one MIG slice or whole GPUs, not both")
    if not limits.allows_profile(request.profile, request.mig_profile):
        return Refusal(
            FORBIDDEN,
            f"your policy does not allow the profile {request.profile or request.mig_profile!r}",
        )
    if limits.max_servers is not None:
        running = servers_in_use(allocations, request.hub, request.user, request.server)
        if running >= limits.max_servers:
            return Refusal(
                TOO_MANY_SERVERS,
                f"you already have {running} server(s) holding resources, your limit is "
                f"{limits.max_servers}: stop one (or let its hold end) and start again",
            )
    if not request.mig_profile and not request.gpus:
        return Choice()
    others = [a for a in allocations if not _same_server(a, request)]
    taken = Taken(inventory, others)
    if request.mig_profile:
        return _choose_mig(inventory, others, taken, limits, request)
    return _choose_gpus(inventory, others, taken, limits, request)


def _quota(
    inventory: Inventory,
    limits: LimitsLike,
    allocations: Sequence[Allocation],
    request: Request,
    want: float,
):
    if limits.max_gpu_equivalents is None:
        return None
    have = usage(inventory, allocations, request.hub, request.user)
    if have + want > limits.max_gpu_equivalents + _EPSILON:
        return Refusal(
            QUOTA,
            f"this needs {_fmt(want)} GPU-equivalents and you already hold {_fmt(have)} of your "
            f"{_fmt(limits.max_gpu_equivalents)}: stop another server or pick a smaller profile",
        )
    return None


def _preemptible(blockers: list[Allocation], limits: LimitsLike, request: Request) -> bool:
    """Only this hub's own held containers of lower priority make way: another hub's or
    another tool's container is never removed, whatever priority its labels claim."""
    return bool(blockers) and all(
        a.is_ours(request.hub)
        and a.state == HELD
        and a.priority < limits.priority
        and a.user != request.user
        for a in blockers
    )


def _order(
    devices: list[Device], taken: Taken, request: Request
) -> list[Device]:
    keep = set(request.prefer_uuids)
    parents = list(request.prefer_parents)

    def parent(d: Device) -> str:
        return d.parent_uuid if isinstance(d, MigDevice) else d.uuid

    def index(d: Device) -> int:
        return d.gpu_index if isinstance(d, MigDevice) else d.index

    def key(d: Device) -> tuple:
        used = taken.used_on(parent(d))
        packing = -used if request.strategy == PACK else used
        preferred = parents.index(parent(d)) if parent(d) in parents else len(parents)
        return (d.uuid not in keep, preferred, packing, index(d), d.slot)

    return sorted(devices, key=key)


def _choose_mig(
    inventory: Inventory,
    allocations: Sequence[Allocation],
    taken: Taken,
    limits: LimitsLike,
    request: Request,
) -> Choice | Refusal:
    enabled = {g.uuid for g in inventory.gpus if g.mig_enabled}
    existing: list[Device] = [
        m for m in inventory.migs if m.profile == request.mig_profile and m.parent_uuid in enabled
    ]
    candidates = [m for m in existing if not unavailable(inventory, m)]
    if existing and not candidates:
        return _unavailable(inventory, existing, f"{request.mig_profile} slices")
    if not candidates:
        here = ", ".join(inventory.mig_profiles()) or "none"
        if not inventory.gpus:
            return _no_gpus(inventory)
        return Refusal(
            NO_SUCH_PROFILE,
            f"this host has no {request.mig_profile} MIG slices (MIG profiles here: {here}); "
            "choose another profile or ask an admin",
        )
    equivalents = candidates[0].equivalents
    refusal = _quota(inventory, limits, allocations, request, equivalents)
    if refusal:
        return refusal
    ordered = [d for d in _order(candidates, taken, request)
               if not busy(d, taken, request.busy_memory_mib)]
    for device in ordered:
        if not taken.blockers(device):
            return Choice((device,), (), equivalents, device.uuid in request.prefer_uuids)
    for device in ordered:
        blockers = taken.blockers(device)
        if _preemptible(blockers, limits, request):
            return Choice(
                (device,), tuple(a.container_id for a in blockers), equivalents, False
            )
    return Refusal(
        FULL,
        f"all {len(candidates)} {request.mig_profile} slices are in use "
        f"({len(candidates)}/{len(candidates)})"
        + _busy_words(candidates, ordered)
        + _alternatives(inventory, allocations, limits, request, request.busy_memory_mib)
        + "; try again later or pick another profile",
        _holders(taken, candidates),
    )


def _unavailable(inventory: Inventory, devices: Sequence[Device], what: str) -> Refusal:
    reason = unavailable(inventory, devices[0])
    return Refusal(
        UNAVAILABLE,
        f"all {len(devices)} {what} of this host are unavailable now ({reason}); try again "
        "later or pick another profile",
    )


def _busy_words(candidates: Sequence[Device], usable: Sequence[Device]) -> str:
    count = len(candidates) - len(usable)
    if not count:
        return ""
    return (f", {count} of them busy with processes or memory no running server owns (an "
            "admin sees which on the admin page)")


def _alternatives(
    inventory: Inventory, allocations: Sequence[Allocation], limits: LimitsLike, request: Request,
    busy_memory_mib: int = 0,
) -> str:
    parts = []
    for profile, (free, _total) in free_by_profile(
            inventory, allocations, busy_memory_mib).items():
        if profile == request.mig_profile or free == 0 or profile == "gpu":
            continue
        if limits.allows_profile("", profile) or limits.allows_profile(request.profile, profile):
            parts.append(f"{profile} has {free} free")
    return "; " + ", ".join(parts) if parts else ""


def _choose_gpus(
    inventory: Inventory,
    allocations: Sequence[Allocation],
    taken: Taken,
    limits: LimitsLike,
    request: Request,
) -> Choice | Refusal:
    if not limits.allow_full_gpu:
        return Refusal(
            FORBIDDEN,
            "your policy does not allow whole GPUs: choose a MIG profile or ask an admin",
        )
    most = limits.max_gpu_slots_per_container
    if most is not None and request.gpus > most:
        return Refusal(
            TOO_MANY_DEVICES,
            f"this profile asks for {request.gpus} GPUs and your limit is {most} per server",
        )
    existing: list[Device] = [g for g in inventory.gpus if not g.mig_enabled]
    candidates = [g for g in existing if not unavailable(inventory, g)]
    if not inventory.gpus:
        return _no_gpus(inventory)
    if len(existing) < request.gpus:
        return Refusal(
            NO_SUCH_PROFILE,
            f"this host has {len(existing)} whole GPU(s) with MIG off and this profile needs "
            f"{request.gpus}: choose a smaller profile or ask an admin",
        )
    if len(candidates) < request.gpus:
        down = [g for g in existing if unavailable(inventory, g)]
        return Refusal(
            UNAVAILABLE,
            f"{len(down)} of this host's {len(existing)} whole GPUs are unavailable now "
            f"({unavailable(inventory, down[0])}) and this profile needs {request.gpus}; try "
            "again later or pick a smaller profile",
        )
    equivalents = float(request.gpus)
    refusal = _quota(inventory, limits, allocations, request, equivalents)
    if refusal:
        return refusal
    ordered = [d for d in _order(candidates, taken, request)
               if not busy(d, taken, request.busy_memory_mib)]
    free = [d for d in ordered if not taken.blockers(d)]
    chosen: list[Device] = free[: request.gpus]
    preempts: list[str] = []
    if len(chosen) < request.gpus:
        for device in ordered:
            if len(chosen) == request.gpus:
                break
            blockers = taken.blockers(device)
            if device not in chosen and _preemptible(blockers, limits, request):
                chosen.append(device)
                preempts.extend(a.container_id for a in blockers)
    if len(chosen) < request.gpus:
        return Refusal(
            FULL,
            f"{len(free)} of {len(candidates)} whole GPUs are free and this profile needs "
            f"{request.gpus}" + _busy_words(candidates, ordered)
            + _alternatives(inventory, allocations, limits, request, request.busy_memory_mib)
            + "; try again later or pick another profile",
            _holders(taken, candidates),
        )
    kept = all(d.uuid in request.prefer_uuids for d in chosen)
    chosen.sort(key=lambda d: d.index if isinstance(d, GPU) else 0)
    return Choice(tuple(chosen), tuple(dict.fromkeys(preempts)), equivalents, kept)
