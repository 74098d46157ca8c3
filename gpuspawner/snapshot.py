"""The world as one value: inventory + ledger + policy, read once per decision or page.

The spawner decides on a Snapshot, the admin page renders one, the CLI prints one. There is
no second way of reading Docker or NVML: everything that wants to know who holds what asks
``take()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import allocator
from .ledger import Ledger
from .policy import Limits, Policy
from .records import (
    RUNNING,
    Allocation,
    Device,
    GpuProcess,
    Inventory,
    JSONRecord,
    MigDevice,
)

#: A device that two or more running containers hold (DESIGN.md "What taken means"); it wins
#: over every other state, since only a person can settle it.
CONFLICT = "conflict"
UNAVAILABLE = "unavailable"  # a device no one holds that NVML fails on: never given out
BUSY = allocator.BUSY  # a device no running container holds, with processes or memory in use
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class ProcessView(JSONRecord):
    """A compute process on a device, and whose it is: the container the kernel puts it in
    (``procs``) and that container's labels. ``holder``: that container holds this device,
    or the whole GPU of this MIG device (Docker's device requests); False for a process
    outside any container, or in one that does not hold the device (a runtime that hands
    GPUs out by environment)."""

    pid: int
    used_mib: int
    container_id: str | None = None
    container: str | None = None
    user: str | None = None
    server: str | None = None
    hub: str | None = None
    holder: bool = False

    def owner_words(self) -> str:
        """Whose it is, for people: "ann", "ann/train", "container x (not its holder)",
        "no container"."""
        if self.container_id is None:
            return "no container"
        name = self.container or self.container_id[:12]
        who = (f"{self.user}/{self.server}" if self.server else self.user) if self.user \
            else f"container {name}"
        return who if self.holder else f"{who} (not its holder)"


@dataclass(frozen=True)
class DeviceView(JSONRecord):
    """One device and who holds it, as the admin page and ``gpuspawner gpus`` show it."""

    slot: str
    uuid: str
    kind: str  # "gpu" | "mig"
    profile: str
    gpu_index: int
    parent_uuid: str
    equivalents: float
    #: Container ids: those that hold the device itself; for a conflict, every running
    #: container on it (a whole-GPU holder of a MIG slice's parent included).
    holders: tuple[str, ...]
    #: "free" | "running" | "held" | "created" | "unmanaged" | "mig-parent" | "conflict" |
    #: "unavailable" (no holder, and NVML fails on it: never given out) | "busy" (no holder,
    #: yet processes or memory in use: never given out)
    state: str
    #: Why it is unavailable (``allocator.unavailable``), whatever its state; or, when busy,
    #: the words of ``allocator.busy``.
    reason: str | None = None
    #: Activity as NVML reported it (None: not reported): memory in use and total, compute
    #: processes (pid, MiB), utilization in percent (whole GPUs only).
    memory_used_mib: int | None = None
    memory_mib: int = 0
    processes: tuple[ProcessView, ...] = ()
    utilization: int | None = None
    #: Seconds since a compute process last ran on it, as the reader that keeps the clock saw
    #: (``Snapshot.work_since``); 0 while one runs; None without a clock.
    idle_seconds: float | None = None

    def memory_words(self) -> str | None:
        """Memory in use of total, for people ("7.9/9.5 GiB"); None where NVML did not say.
        The one spelling the admin page and ``gpuspawner gpus`` share."""
        if self.memory_used_mib is None:
            return None
        return f"{self.memory_used_mib / 1024:.1f}/{self.memory_mib / 1024:.1f} GiB"


@dataclass(frozen=True)
class Snapshot:
    inventory: Inventory
    allocations: tuple[Allocation, ...]
    policy: Policy
    bound_ports: frozenset[int]
    taken_at: datetime
    #: Whose view this is: the hub whose containers count against its users' limits.
    hub_id: str | None = None
    #: Memory in use (MiB) above which a device no running container holds is busy (0: the
    #: default, ``allocator.BUSY_MEMORY_MIB``).
    busy_memory_mib: int = 0
    #: Device UUID -> since when it has run no compute process, as a long-running reader
    #: (the admin service, ``activity.note_work``) keeps it; empty for a one-off read.
    work_since: Mapping[str, datetime] = field(default_factory=dict)

    def limits_for(self, user: str, groups: Iterable[str] = ()) -> Limits:
        return self.policy.for_user(user, groups).limits

    def usage(self, user: str) -> float:
        return allocator.usage(self.inventory, self.allocations, self.hub_id, user)

    def free_by_profile(self) -> dict[str, tuple[int, int]]:
        return allocator.free_by_profile(self.inventory, self.allocations, self.busy_memory_mib)

    def free_json(self) -> dict[str, dict[str, int]]:
        """``free_by_profile`` as the JSON API, the CLI and its host view give it."""
        return {k: {"free": f, "total": t} for k, (f, t) in self.free_by_profile().items()}

    def choose(
        self, request: allocator.Request, groups: Iterable[str] = ()
    ) -> allocator.Choice | allocator.Refusal:
        return allocator.choose(
            self.inventory, self.allocations, self.limits_for(request.user, groups), request
        )

    def of(self, user: str, server: str | None = None) -> tuple[Allocation, ...]:
        return tuple(
            a
            for a in self.allocations
            if a.managed and a.user == user and (server is None or a.server == server)
        )

    def unmanaged(self) -> tuple[Allocation, ...]:
        return tuple(a for a in self.allocations if not a.managed and a.holds)

    def missing_uuids(self) -> dict[str, tuple[Allocation, ...]]:
        """Labelled UUIDs the inventory no longer has (MIG re-created, GPU removed)."""
        missing = allocator.Taken(self.inventory, self.allocations).missing
        present = self.inventory.by_uuid()
        for allocation in self.allocations:
            if allocation.managed and not allocation.holds:
                for uuid in allocation.uuids:
                    if uuid not in present:
                        missing.setdefault(uuid, []).append(allocation)
        return {uuid: tuple(found) for uuid, found in missing.items()}

    def conflicts(self) -> dict[str, tuple[Allocation, ...]]:
        """Devices that two or more *running* containers hold, whoever made them, with those
        containers (oldest first): the one place the conflict rule is written.

        The real NVIDIA runtime lets two containers share a device, so nothing but this
        rule notices. A MIG slice is also held by a running holder of its parent GPU (a
        whole-GPU container sees every slice), so a whole-GPU holder and a slice holder of
        the same GPU conflict on that slice; two holders of two different slices of one GPU
        do not conflict, which is why a whole GPU counts only its own holders.
        """
        running = [a for a in self.allocations if a.state == RUNNING]
        if len(running) < 2:
            return {}
        taken = allocator.Taken(self.inventory, running)
        found: dict[str, tuple[Allocation, ...]] = {}
        everything: list[Device] = [*self.inventory.gpus, *self.inventory.migs]
        for device in everything:
            if isinstance(device, MigDevice):
                holders = taken.blockers(device)  # its own holders and its parent's
            else:
                holders = list(taken.by_uuid.get(device.uuid, ()))
            if len(holders) >= 2:
                found[device.uuid] = tuple(sorted(
                    holders, key=lambda a: (a.created_at or _EPOCH, a.container_name)))
        return found

    def busy(self) -> dict[str, str]:
        """Devices no running container holds that have compute processes or memory in use
        (``allocator.busy``: never given out), with the words that say so."""
        taken = allocator.Taken(self.inventory, self.allocations)
        found = {}
        for device in (*self.inventory.gpus, *self.inventory.migs):
            why = allocator.busy(device, taken, self.busy_memory_mib)
            if why:
                found[device.uuid] = why
        return found

    def disagreements(self) -> tuple[Allocation, ...]:
        """Containers whose labels name other devices than Docker gives them (they hold both;
        ``Allocation.disagreement`` says which): shown, checked and logged, never trusted."""
        return tuple(a for a in self.allocations if a.disagrees)

    def reserved_ports(self, excluding: str | None = None) -> frozenset[int]:
        """Ports in use now, plus those promised to servers that still hold their slot; not
        counting the promises of container ``excluding`` (a server's own, restarting)."""
        promised = {port for a in self.allocations
                    if a.holds and a.container_id != excluding for _, port in a.ports}
        return self.bound_ports | promised

    def devices(self) -> tuple[DeviceView, ...]:
        taken = allocator.Taken(self.inventory, self.allocations)
        conflicts = self.conflicts()
        by_id = {a.container_id: a for a in self.allocations}
        rows: list[DeviceView] = []
        everything: list[Device] = [*self.inventory.gpus, *self.inventory.migs]
        for device in everything:
            blockers = taken.blockers(device)
            own = taken.by_uuid.get(device.uuid, [])
            clash = conflicts.get(device.uuid)
            if clash:
                state, own = CONFLICT, list(clash)
            elif not blockers:
                state = UNAVAILABLE if allocator.unavailable(self.inventory, device) else "free"
                if state == "free" and allocator.busy(device, taken, self.busy_memory_mib):
                    state = BUSY
            elif not own:
                state = "mig-parent"  # taken only through its parent or children
            elif any(not a.managed for a in own):
                state = "unmanaged"
            else:
                state = own[0].state
            is_mig = hasattr(device, "parent_uuid")
            rows.append(
                DeviceView(
                    slot=device.slot,
                    uuid=device.uuid,
                    kind="mig" if is_mig else "gpu",
                    profile=device.profile if is_mig else device.name,  # type: ignore[union-attr]
                    gpu_index=device.gpu_index if is_mig else device.index,  # type: ignore[union-attr]
                    parent_uuid=device.parent_uuid if is_mig else device.uuid,  # type: ignore[union-attr]
                    equivalents=device.equivalents,
                    holders=tuple(a.container_id for a in own),
                    state=state,
                    reason=allocator.unavailable(self.inventory, device) or (
                        allocator.busy(device, taken, self.busy_memory_mib)
                        if state == BUSY else None),
                    memory_used_mib=device.memory_used_mib,
                    memory_mib=device.memory_mib,
                    # A process's container holds the device itself or, for a MIG device,
                    # its whole GPU: both are Docker's word that it may run there.
                    processes=tuple(self._process_view(p, blockers, by_id)
                                    for p in device.processes),
                    utilization=getattr(device, "utilization", None),
                    idle_seconds=self._idle(device),
                )
            )
        return tuple(rows)

    @staticmethod
    def _process_view(
        process: GpuProcess, holders: Iterable[Allocation], by_id: Mapping[str, Allocation]
    ) -> ProcessView:
        if process.container_id is None:
            return ProcessView(process.pid, process.used_mib)
        found = by_id.get(process.container_id)
        return ProcessView(
            process.pid, process.used_mib, process.container_id,
            container=found.container_name if found else None,
            user=found.user if found else None,
            server=found.server if found else None,
            hub=found.hub if found else None,
            holder=any(a.container_id == process.container_id for a in holders),
        )

    def _idle(self, device: Device) -> float | None:
        if device.processes:
            return 0.0
        since = self.work_since.get(device.uuid)
        if since is None:
            return None
        return max(0.0, (self.taken_at - since).total_seconds())

    def to_json(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at.isoformat().replace("+00:00", "Z"),
            "inventory": self.inventory.to_json(),
            "allocations": [a.to_json() for a in self.allocations],
            "devices": [d.to_json() for d in self.devices()],
            "conflicts": {u: [a.container_id for a in found]
                          for u, found in self.conflicts().items()},
            "free": self.free_json(),
        }


def take(
    read_inventory: Callable[[], Inventory],
    ledger: Ledger,
    policy: Policy,
    now: datetime | None = None,
    hub_id: str | None = None,
    live: str = "",
    stopped_max_age: float = 0.0,
    busy_memory_mib: int = 0,
) -> Snapshot:
    """Read the world once: Docker (holds counted with ``policy``), then the inventory, as
    hub ``hub_id`` sees it. ``live``: only containers that run or start (``Ledger.read``: enough
    for the race rule, not for a plan); ``stopped_max_age``: stopped containers as the last
    full list showed them, at most that old (``Ledger.read``). A caller that starts the
    inventory's read first (``inventory.Reader.begin``) has NVML and Docker answer at once."""
    reading = ledger.read(policy.hold_seconds, now, live=live,
                          stopped_max_age=stopped_max_age)
    inventory = read_inventory()
    return Snapshot(inventory, reading.allocations, policy, reading.bound_ports, reading.read_at,
                    hub_id, busy_memory_mib)
