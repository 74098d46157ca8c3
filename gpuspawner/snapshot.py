"""The world as one value: inventory + ledger + policy, read once per decision or page.

The spawner decides on a Snapshot, the admin page renders one, the CLI prints one. There is
no second way of reading Docker or NVML: everything that wants to know who holds what asks
``take()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import allocator
from .ledger import Ledger
from .policy import Limits, Policy
from .records import Allocation, Device, Inventory, JSONRecord


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
    holders: tuple[str, ...]  # container ids
    state: str  # "free" | "running" | "held" | "created" | "unmanaged" | "mig-parent"


@dataclass(frozen=True)
class Snapshot:
    inventory: Inventory
    allocations: tuple[Allocation, ...]
    policy: Policy
    bound_ports: frozenset[int]
    taken_at: datetime

    def limits_for(self, user: str, groups: Iterable[str] = ()) -> Limits:
        return self.policy.for_user(user, groups).limits

    def usage(self, user: str, server: str | None = None) -> float:
        return allocator.usage(self.allocations, user, server)

    def free_by_profile(self) -> dict[str, tuple[int, int]]:
        return allocator.free_by_profile(self.inventory, self.allocations)

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

    def reserved_ports(self) -> frozenset[int]:
        """Ports in use now, plus those promised to servers that still hold their slot."""
        promised = {port for a in self.allocations if a.holds for _, port in a.ports}
        return self.bound_ports | promised

    def devices(self) -> tuple[DeviceView, ...]:
        taken = allocator.Taken(self.inventory, self.allocations)
        rows: list[DeviceView] = []
        everything: list[Device] = [*self.inventory.gpus, *self.inventory.migs]
        for device in everything:
            blockers = taken.blockers(device)
            own = taken.by_uuid.get(device.uuid, [])
            if not blockers:
                state = "free"
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
                )
            )
        return tuple(rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at.isoformat().replace("+00:00", "Z"),
            "inventory": self.inventory.to_json(),
            "allocations": [a.to_json() for a in self.allocations],
            "devices": [d.to_json() for d in self.devices()],
            "free": {k: {"free": f, "total": t} for k, (f, t) in self.free_by_profile().items()},
        }


def take(
    read_inventory: Callable[[], Inventory],
    ledger: Ledger,
    policy: Policy,
    now: datetime | None = None,
) -> Snapshot:
    """Read the world once: the inventory, then Docker (holds counted with ``policy``)."""
    inventory = read_inventory()
    reading = ledger.read(policy.hold_seconds, now)
    return Snapshot(inventory, reading.allocations, policy, reading.bound_ports, reading.read_at)
