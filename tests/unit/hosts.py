"""Plain-data hosts and allocations for the pure-core tests (no simulator, no engine)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import datetime, timezone

from gpuspawner import allocator
from gpuspawner.allocator import Choice
from gpuspawner.policy import Limits
from gpuspawner.records import GPU, HELD, RUNNING, Allocation, Inventory, MigDevice

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=timezone.utc)
#: The hub the pure-core tests decide for: ``holding`` makes its containers.
HUB = "lab"


def Request(*args, hub: str | None = HUB, **kwargs) -> allocator.Request:  # noqa: N802
    """``allocator.Request`` asked by this hub (HUB), unless the test says otherwise."""
    return allocator.Request(*args, hub=hub, **kwargs)
_ids = itertools.count()

PROFILE_MEMORY = {
    "1g.10gb": 9728,
    "2g.20gb": 19968,
    "3g.40gb": 40192,
    "4g.40gb": 40192,
    "7g.80gb": 80384,
}


def host(*layouts: list[str] | None) -> Inventory:
    """One GPU per layout: a list of MIG profiles (MIG on), or None (MIG off)."""
    gpus, migs = [], []
    for index, layout in enumerate(layouts):
        uuid = f"GPU-{index:08x}-0000-0000-0000-000000000000"
        gpus.append(GPU(index, uuid, "NVIDIA A100-SXM4-80GB", 81920, layout is not None, None, 7))
        for position, profile in enumerate(layout or []):
            migs.append(
                MigDevice(
                    slot=f"{index}.{position}",
                    uuid=f"MIG-{index:04x}{position:04x}-0000-0000-0000-000000000000",
                    parent_uuid=uuid,
                    gpu_index=index,
                    gi=position + 1,
                    ci=0,
                    profile=profile,
                    memory_mib=PROFILE_MEMORY.get(profile, 9728),
                    slices=int(profile[0]),
                    total_slices=7,
                )
            )
    return Inventory(tuple(gpus), tuple(migs), "file")


def limits(**overrides) -> Limits:
    base = dict(
        max_gpu_equivalents=None,
        max_gpu_slots_per_container=8,
        allow_full_gpu=True,
        allowed_profiles=None,
        priority=0,
        gpu_hold_after_stop=0.0,
        max_servers=None,
    )
    base.update(overrides)
    return Limits(**base)


def holding(
    choice: Choice, user: str, server: str = "", state: str = RUNNING, priority: int = 0
) -> Allocation:
    """The allocation a container made from ``choice`` would be read back as."""
    n = next(_ids)
    return Allocation(
        container_id=f"c{n:06d}",
        container_name=f"jupyter-{user}{'-' + server if server else ''}-{n}",
        managed=True,
        state=state,
        docker_status="running" if state == RUNNING else "exited",
        user=user,
        server=server,
        profile="p",
        hub=HUB,
        interface="jupyterhub",
        schema="1",
        uuids=choice.uuids,
        slots=choice.slots,
        parent_uuids=choice.parent_uuids,
        equivalents=choice.equivalents,
        priority=priority,
        created_at=NOW,
    )


def unmanaged(uuids=(), count: int = 0, state: str = RUNNING) -> Allocation:
    n = next(_ids)
    return Allocation(
        container_id=f"u{n:06d}",
        container_name=f"outside-{n}",
        managed=False,
        state=state,
        docker_status="running",
        uuids=tuple(uuids),
        gpu_count=count,
        created_at=NOW,
    )


def stopped(allocation: Allocation, state: str = HELD) -> Allocation:
    return replace(allocation, state=state, docker_status="exited")
