"""The records every part of gpuspawner passes around.

They are frozen dataclasses so a snapshot of the world can be shared between the spawner,
the admin page and the CLI without anyone changing it under the others' feet, and each has
a ``to_json()`` so the CLI's ``--json``, the admin API and the event log print the same thing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_json() if hasattr(value, "to_json") else dataclasses.asdict(value)
    return value


class JSONRecord:
    """Mixin: a plain-dict view of a frozen dataclass, datetimes in ISO 8601 UTC."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class GpuProcess(JSONRecord):
    """A compute process NVML reports on a device: host pid and the memory it uses, and the
    Docker container it runs in as the kernel says (``procs.container_of``; None: in none,
    or not visible from where it was read)."""

    pid: int
    used_mib: int
    container_id: str | None = None


@dataclass(frozen=True)
class GPU(JSONRecord):
    """A physical GPU as the driver reports it."""

    index: int
    uuid: str
    name: str
    memory_mib: int
    mig_enabled: bool = False
    #: The MIG mode the GPU will have after its next reset, when it differs from the current one.
    mig_pending: bool | None = None
    #: Compute slices a MIG-capable GPU is cut into (7 on A100/H100); 0 when MIG is unsupported.
    total_slices: int = 0
    #: Why the GPU cannot be given out now (NVML failed on it: lost, refused, changing), or
    #: None. An unavailable GPU stays listed, so a container holding it is not told its GPU is
    #: gone, but the allocator never chooses it nor counts it free.
    unavailable: str | None = None
    #: Activity, as NVML reported it at this read (None: not reported, "n/a"): memory in use,
    #: compute processes, and utilization in percent. A MIG-enabled GPU's own figures are its
    #: MIG devices' (and need root); NVML gives no utilization per MIG device.
    memory_used_mib: int | None = None
    processes: tuple[GpuProcess, ...] = ()
    utilization: int | None = None

    @property
    def slot(self) -> str:
        return str(self.index)

    @property
    def equivalents(self) -> float:
        return 1.0


@dataclass(frozen=True)
class MigDevice(JSONRecord):
    """One MIG device (a GPU instance with its compute instance) on a GPU whose MIG mode is on."""

    slot: str  # "N.M": GPU index N, position M in NVML's MIG handle enumeration
    uuid: str
    parent_uuid: str
    gpu_index: int
    gi: int | None  # GPU-instance id (stable across re-creation of the same layout)
    ci: int | None  # compute-instance id
    profile: str  # "1g.10gb"
    memory_mib: int
    slices: int  # compute slices of this GPU instance
    total_slices: int  # compute slices of the parent GPU
    #: Why the device cannot be given out now (its GPU is unavailable), or None; see GPU.
    unavailable: str | None = None
    #: Activity, as NVML reported it at this read; see GPU. Utilization only where a
    #: dcgm-exporter says (``dcgm``): NVML has none per MIG device.
    memory_used_mib: int | None = None
    processes: tuple[GpuProcess, ...] = ()
    utilization: int | None = None

    @property
    def equivalents(self) -> float:
        """GPU-equivalents charged for this slice: its share of the parent's compute slices."""
        if self.total_slices <= 0:
            return 1.0
        return round(self.slices / self.total_slices, 4)


Device = GPU | MigDevice


@dataclass(frozen=True)
class Inventory(JSONRecord):
    """What hardware exists, and how we know it."""

    gpus: tuple[GPU, ...] = ()
    migs: tuple[MigDevice, ...] = ()
    source: str = "none"  # "nvml" | "nvidia-smi" | "file" | "none"
    driver_version: str | None = None
    cuda_version: str | None = None
    #: Things an admin should know: MIG enabled without instances, a pending MIG change,
    #: a driver NVML could not load. Reported, never hidden.
    problems: tuple[str, ...] = ()
    #: NVML answered as a non-root user: what it refused and what reading as root would add
    #: (exact MIG profile names, the total memory of MIG-enabled GPUs); None otherwise.
    #: Also one of ``problems``.
    unprivileged: str | None = None

    def by_uuid(self) -> dict[str, Device]:
        found: dict[str, Device] = {g.uuid: g for g in self.gpus}
        found.update({m.uuid: m for m in self.migs})
        return found

    def migs_of(self, gpu: GPU) -> tuple[MigDevice, ...]:
        return tuple(m for m in self.migs if m.parent_uuid == gpu.uuid)

    def mig_profiles(self) -> tuple[str, ...]:
        return tuple(sorted({m.profile for m in self.migs}))


#: Docker-side states an allocation can be in, after the hold rules of DESIGN.md are applied.
RUNNING = "running"  # the container runs (or is paused/restarting): it holds its devices
HELD = "held"  # stopped, still inside its hold: it holds its devices
EXPIRED = "expired"  # stopped, hold over: labels remain, devices are free for others
CREATED = "created"  # created, not started, younger than the start time-out: a spawn in flight
FAILED = "failed"  # created, never started, older than the start time-out: holds nothing
HOLDING_STATES = frozenset({RUNNING, HELD, CREATED})


def made_by(
    hub_id: str | None, managed: bool, hub: str | None, interface: str | None,
    schema: str | None,
) -> bool:
    """Whether hub ``hub_id`` made a container with these labels: the one rule (DESIGN.md
    "Ours") every path that reuses, stops, removes, replaces or preempts a container checks
    first."""
    return managed and bool(hub_id) and hub == hub_id and interface == "jupyterhub" and bool(
        schema)


@dataclass(frozen=True)
class Allocation(JSONRecord):
    """One container that holds, or held, GPU devices; read from Docker, never stored elsewhere."""

    container_id: str
    container_name: str
    managed: bool
    state: str
    docker_status: str  # Docker's own: running, exited, created, paused, restarting, dead
    user: str | None = None
    server: str = ""
    profile: str | None = None  # the spawner profile slug
    hub: str | None = None
    #: ``ds01.interface`` and ``ds01.schema`` as labelled: with ``hub`` they say whose it is.
    interface: str | None = None
    schema: str | None = None
    #: Every device UUID it holds: its device requests' and its labels' (the union).
    uuids: tuple[str, ...] = ()
    #: Slot ids for people: the labelled ones, or the requested ones where labels disagree.
    slots: tuple[str, ...] = ()
    #: Devices Docker was asked for by index (``"0"``, ``"0:1"`` as ``"0.1"``), not by UUID:
    #: held as they resolve against today's inventory.
    slot_requests: tuple[str, ...] = ()
    parent_uuids: tuple[str, ...] = ()
    gis: tuple[int, ...] = ()
    gpu_profile: str | None = None  # MIG profile or GPU model
    equivalents: float = 0.0
    priority: int = 0
    ports: tuple[tuple[str, int], ...] = ()
    #: Unmanaged holders may ask Docker for "the first N GPUs" (count=N) or all (count=-1)
    #: instead of naming devices; such a request is resolved against the inventory.
    gpu_count: int = 0
    created_at: datetime | None = None
    allocated_at: datetime | None = None
    finished_at: datetime | None = None
    #: Where its labels name other devices than Docker's device requests give it (it holds
    #: both): the sentence that says so; empty when they agree.
    disagreement: str = ""
    #: Host ports Docker really publishes for it while it runs (whoever asked for them).
    published: tuple[int, ...] = ()
    #: Labels that were present but did not make sense (edited by hand, another tool).
    label_problems: tuple[str, ...] = field(default=())

    @property
    def holds(self) -> bool:
        return self.state in HOLDING_STATES

    def is_ours(self, hub_id: str | None) -> bool:
        """Whether this hub made the container (``made_by``)."""
        return made_by(hub_id, self.managed, self.hub, self.interface, self.schema)

    @property
    def disagrees(self) -> bool:
        return bool(self.disagreement)

    @property
    def port_map(self) -> dict[str, int]:
        return dict(self.ports)


# ------------------------------------------------------------- the engine's event buffer

#: How many of its latest events dockerd keeps to answer a ``since`` query (moby's
#: ``eventsLimit``): a reading that returns this many may have lost older ones.
EVENT_BUFFER = 256

#: The container events after which a container runs or may start: the only ones that can
#: make it a rival of a spawn (``spawnplan.newcomers``).
LIVE_ACTIONS = frozenset({"create", "start", "restart", "unpause"})


@dataclass(frozen=True)
class Change(JSONRecord):
    """One container event from Docker's buffer, on the engine's clock."""

    container_id: str
    action: str
    time_ns: int


@dataclass(frozen=True)
class Changes(JSONRecord):
    """What Docker's event buffer held between ``since_ns`` and ``until_ns`` (the engine's
    clock, as the reader asked): the container events, and what tells whether the buffer
    covered the whole window."""

    changes: tuple[Change, ...]
    #: Every event returned, of any type: ``EVENT_BUFFER`` of them may mean some were lost.
    events: int
    #: The engine reloaded its configuration in the window (a ``daemon`` event).
    daemon: bool
    since_ns: int
    until_ns: int


def host_field(host: str | None) -> dict[str, str]:
    """``{"host": name}`` for a record or log line about a host of a hub of several hosts;
    nothing on a one-host hub (no name): its records and lines stay as they always were."""
    return {"host": host} if host else {}
