"""GPU-aware activity: a server whose devices run compute processes is in use, whether or
not anyone has its browser tab open.

JupyterHub (and jupyterhub-idle-culler, which reads the Hub's ``last_activity``) knows only
what the proxy and the single-user server report: HTTP traffic and kernel activity. A
three-day training run started from a terminal, with the browser closed, looks idle, and the
culler stops it. The admin service already reads NVML and Docker; every
``activity_interval`` it tells the Hub that such servers are active
(``POST /hub/api/users/{name}/activity``, scope ``users:activity``).

With ``gpu_idle_timeout`` in the policy (off by default), the same round stops a GPU server
whose devices have run no compute process for that long, through the Hub API: its hold then
starts as after any stop, and its user's next spawn page says why.

Which servers: this hub's running containers holding a device on which NVML lists a compute
process. A MIG device or a whole GPU is seen only by the containers that hold it, so a
process on it is that server's work (no pid-to-container mapping is needed for this).

How long each device has been idle (the admin page, ``gpuspawner_device_idle_seconds``) is
kept by :func:`note_work` on every read the service makes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from ..allocator import Taken
from ..records import RUNNING, Allocation, JSONRecord
from ..snapshot import Snapshot


def _running_ours(snap: Snapshot) -> tuple[list[Allocation], Taken]:
    """This hub's running containers, and what they hold (Docker's word), read once."""
    ours = [a for a in snap.allocations
            if a.state == RUNNING and a.user and a.is_ours(snap.hub_id)]
    return ours, Taken(snap.inventory, ours)


def active_servers(snap: Snapshot) -> dict[str, set[str]]:
    """User -> names of their servers (``""``: the default one) that run compute processes
    on a device they hold: this hub's running containers only (another hub reports its own)."""
    _ours, taken = _running_ours(snap)
    devices = snap.inventory.by_uuid()
    found: dict[str, set[str]] = defaultdict(set)
    for uuid, holders in taken.by_uuid.items():
        if devices[uuid].processes:
            for allocation in holders:
                found[allocation.user or ""].add(allocation.server)
    return dict(found)


@dataclass(frozen=True)
class IdleStop(JSONRecord):
    """A GPU server to stop: its devices have run no compute process for ``idle`` seconds,
    more than its user's ``gpu_idle_timeout``."""

    user: str
    server: str
    container_id: str
    container: str
    idle: float
    timeout: float
    #: The host it runs on, on a hub of several hosts (set by the caller, which read it).
    host: str = ""


def idle_stops(
    snap: Snapshot,
    last_work: dict[str, float],
    now: float,
    groups: Mapping[str, Iterable[str]],
) -> list[IdleStop]:
    """Update ``last_work`` (container id -> when its devices last ran a compute process,
    on any clock; a container first seen counts from ``now``, so a restarted service never
    stops anything early) and say which servers idled past their ``gpu_idle_timeout``
    (policy, per user and hub ``groups``; None: never). Only this hub's running containers
    holding a device; entries of containers gone are dropped."""
    active = active_servers(snap)
    _ours, taken = _running_ours(snap)
    running: dict[str, Allocation] = {
        a.container_id: a for holders in taken.by_uuid.values() for a in holders}
    for cid in set(last_work) - set(running):
        del last_work[cid]
    found = []
    for cid, a in sorted(running.items()):
        user = a.user or ""
        if a.server in active.get(user, set()) or cid not in last_work:
            last_work[cid] = now
        timeout = snap.limits_for(user, groups.get(user, ())).gpu_idle_timeout
        idle = now - last_work[cid]
        if timeout is not None and idle > timeout:
            found.append(IdleStop(user, a.server, cid, a.container_name, idle, timeout))
    return found


#: Per device UUID: when NVML last listed a compute process on it, and the running
#: containers that held it then (``note_work``).
WorkSeen = dict[str, tuple[datetime, tuple[str, ...]]]


def note_work(snap: Snapshot, seen: WorkSeen, at: datetime | None = None) -> dict[str, datetime]:
    """Update ``seen`` from one read and return, per device NVML reports activity for, the
    moment since which it has run no compute process: the read's time while one runs.

    ``at``: when the activity itself was read, where that is earlier than the snapshot (a
    remote host's probe, kept for a while between reads); a process seen then counts from
    then, never from the later read.

    The clock starts again when the running containers holding a device change (a new
    holder's idle time is its own, not its predecessor's), and a device first seen idle
    counts from this read: a restarted service under-states idleness, never over-states it.
    Devices NVML gives no activity for (memory unknown) have no clock.
    """
    now = snap.taken_at
    worked = now if at is None else min(at, now)
    running = [a for a in snap.allocations if a.state == RUNNING]
    holders = Taken(snap.inventory, running).by_uuid
    since: dict[str, datetime] = {}
    for uuid, device in snap.inventory.by_uuid().items():
        if device.memory_used_mib is None and not device.processes:
            seen.pop(uuid, None)
            continue
        ids = tuple(sorted(a.container_id for a in holders.get(uuid, ())))
        last = seen.get(uuid)
        if last is not None and last[0] > now:  # an older read, finished late: nothing new
            since[uuid] = last[0]
            continue
        if last is None or last[1] != ids:  # first seen, or a new holder: from this read
            seen[uuid] = (now, ids)
        elif device.processes:
            seen[uuid] = (max(last[0], worked), ids)
        since[uuid] = seen[uuid][0]
    for uuid in set(seen) - set(since):
        del seen[uuid]
    return since
