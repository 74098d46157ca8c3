"""The spawn path as a pure decision: ``plan(snapshot, request) -> Plan | Refusal``.

Everything a spawn decides is decided here, on one Snapshot, with no I/O: whether the
server's existing container is started again, replaced or refused; which devices and host
ports a new container gets; which containers must go first and why; the labels, device ids
and environment of the new container; what the spawn page and the operation log say. The
spawner's executor then carries the plan out and decides nothing. So the two promises (no
device used twice, nothing a user made lost) can be tested as data, over random histories.

``race_loser`` is the one rule every path applies right before and right after a start:
another running holder wins; between two running ones the earlier start wins; otherwise the
earlier Docker ``Created`` wins.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from . import allocator, labels, ports
from .allocator import Choice, Refusal, Request
from .labels import LabelRecord
from .records import (
    CREATED,
    EVENT_BUFFER,
    LIVE_ACTIONS,
    RUNNING,
    Allocation,
    Changes,
    JSONRecord,
    made_by,
)
from .snapshot import Snapshot

# Actions.
CREATE = "create"  # no container of this server (or it was removed for ``remove=True``)
REUSE = "reuse"  # start the server's stopped container as it is
REPLACE = "replace"  # a new container in place of the server's own, without loss

# Why a container is removed (stable: the operation log and tests read them).
GPU_GONE = "gpu-gone"  # its device no longer exists (MIG re-created, GPU removed)
GPU_GIVEN_AWAY = "gpu-given-away"  # its device went to someone else after the hold
GPU_UNAVAILABLE = "gpu-unavailable"  # NVML fails on its GPU (lost, no permission, ...)
PROFILE_CHANGED = "profile-changed"
IMAGE_CHANGED = "image-changed"
PORTS_CHANGED = "ports-changed"
PORT_TAKEN = "port-taken"
UNLABELLED = "unlabelled"  # made before gpuspawner (a lab switching from DockerSpawner)
DEVICES_DISAGREE = "devices-disagree"  # its labels and Docker's device requests differ
PREEMPTED = "preempted"  # a lower-priority hold taken over
FRESH = "fresh"  # DockerSpawner's ``remove=True``: a fresh container every start
# ... and why the executor removes the container its own spawn made.
START_FAILED = "start-failed"  # it could not start: it must not sit on its device
RACE_LOST = "race-lost"  # another container took the same device at the same moment

#: Refusal codes of the planner (the allocator's are passed through).
NAME_CLASH = "name-clash"
GPU_LOST = "gpu-lost"
PORTS = "ports"
BUSY = "busy"  # the server's own container runs already and holds what another needs
#: A hub of several hosts: the host a spawn needs (its server's, or every one) is down.
HOST_DOWN = "host-down"

#: Reasons the user's own container must be replaced because of its GPU.
_GPU_REASONS = frozenset({GPU_GONE, GPU_GIVEN_AWAY, GPU_UNAVAILABLE})

_SAVE = "commit"
_DROP = "remove"
_DOCKER_RUNNING = frozenset({"running", "paused", "restarting"})


@dataclass(frozen=True)
class Existing(JSONRecord):
    """The container that already carries this server's name, as Docker shows it."""

    container_id: str
    name: str
    docker_status: str
    labels: LabelRecord
    #: The image the user chose for it (``GPUSPAWNER_IMAGE`` in its environment); None for
    #: a container made before gpuspawner wrote it, or by another spawner.
    image: str | None = None


@dataclass(frozen=True)
class SpawnRequest(JSONRecord):
    """Everything the planner needs besides the snapshot: plain data from the spawner."""

    hub_id: str
    user: str
    server: str
    profile: str
    container_name: str
    mig_profile: str | None = None
    gpus: int = 0
    groups: tuple[str, ...] = ()
    existing: Existing | None = None
    #: name -> container port, to publish on a host port each.
    ports: tuple[tuple[str, int], ...] = ()
    port_range: tuple[int, int] = (40000, 40999)
    on_gpu_lost: str = "reallocate"  # or "fail"
    replace_with: str = _SAVE  # "commit": keep the old container's files; "remove"
    remove: bool = False  # DockerSpawner's remove=True
    strategy: str = allocator.PACK
    #: A saved image of this server's last container (committed when it was removed).
    saved_image: str | None = None
    now: datetime | None = None
    #: The image the profile and the user's choices give (a saved copy is not this).
    image: str | None = None
    #: Host ports Docker recently refused to bind ("port is already allocated"): something
    #: the hub cannot see (from a container's network namespace) uses them.
    avoid_ports: tuple[int, ...] = ()
    #: The host (of the hub's ``hosts``) this spawn is planned on; None on a one-host hub.
    host: str | None = None


@dataclass(frozen=True)
class Removal(JSONRecord):
    """A container the executor removes, and whether it is committed to an image first."""

    container_id: str
    container_name: str
    reason: str
    user: str | None
    save: bool
    #: The server it belongs to (a saved image is labelled with it, for that server's next
    #: start).
    server: str = ""
    #: A replaced container: the new one is made from its saved copy. False when the user
    #: chose another image: the copy is kept (``gpuspawner-kept/…``), not started from.
    carried: bool = True


@dataclass(frozen=True)
class Event(JSONRecord):
    """One line of the operation log the executor writes when the plan is carried out."""

    name: str
    fields: tuple[tuple[str, Any], ...]

    def data(self) -> dict[str, Any]:
        return dict(self.fields)


@dataclass(frozen=True)
class Plan(JSONRecord):
    action: str  # CREATE | REUSE | REPLACE
    choice: Choice
    #: The server's own container that is started (REUSE) or replaced (REPLACE).
    existing: str | None = None
    #: Removed before the new container is created, each committed first when ``save``.
    removals: tuple[Removal, ...] = ()
    #: REPLACE: the old container, committed (``save``) and removed after the new exists.
    replaced: Removal | None = None
    #: The image of the new container when it is not the profile's (a saved image).
    image: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    device_ids: tuple[str, ...] = ()
    #: (name, container port, host port)
    ports: tuple[tuple[str, int, int], ...] = ()
    environment: tuple[tuple[str, str], ...] = ()
    progress: tuple[tuple[int, str], ...] = ()
    events: tuple[Event, ...] = ()

    @property
    def creates(self) -> bool:
        return self.action in (CREATE, REPLACE)

    @property
    def host_ports(self) -> dict[str, int]:
        return {name: host for name, _, host in self.ports}


def docker_kwargs(plan: Plan, host_ip: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the plan adds to DockerSpawner's create call: (create kwargs, host config).

    Labels; the extra ports exposed and published on ``host_ip`` in docker-py's dict forms
    (a list of ``"6006/tcp"`` strings would be read as ``6006/tcp/tcp`` and never published);
    the NVIDIA device request by UUID, never ``count``.
    """
    create: dict[str, Any] = {
        "labels": dict(plan.labels),
        "ports": {f"{container}/tcp": None for _, container, _ in plan.ports},
    }
    host: dict[str, Any] = {
        "port_bindings": {container: (host_ip, host_port)
                          for _, container, host_port in plan.ports},
    }
    if plan.device_ids:  # docker-py makes a DeviceRequest of these keyword arguments
        host["device_requests"] = [{"driver": "nvidia", "device_ids": list(plan.device_ids),
                                    "capabilities": [["gpu"]]}]
    return create, host


def merge(admin: Mapping[str, Any] | None, ours: Mapping[str, Any]) -> dict[str, Any]:
    """The admin's ``extra_create_kwargs``/``extra_host_config`` with the plan's added: dicts
    are merged key by key, lists extended; the admin's other keys are kept."""
    value = dict(admin or {})
    for key, extra in ours.items():
        if isinstance(extra, dict):
            value[key] = {**(value.get(key) or {}), **extra}
        else:
            value[key] = [*(value.get(key) or []), *extra]
    return value


def environment(uuids: Sequence[str], host_ports: Mapping[str, int], profile: str,
                slots: Sequence[str], image: str | None = None) -> tuple[tuple[str, str], ...]:
    """The variables every new container gets. ``NVIDIA_VISIBLE_DEVICES`` is exactly its
    devices, or ``void`` for a CPU server: on a host whose default runtime is ``nvidia``, or
    with an image that sets ``all``, anything else would let a CPU server see every GPU.
    ``GPUSPAWNER_IMAGE`` is the image the user chose (read back by ``chosen_image``)."""
    env = [("NVIDIA_VISIBLE_DEVICES", ",".join(uuids) or "void"),
           ("GPUSPAWNER_PROFILE", profile), ("GPUSPAWNER_GPU", ",".join(slots))]
    if image:
        env.append(("GPUSPAWNER_IMAGE", image))
    env += [(f"GPUSPAWNER_PORT_{name.upper().replace('-', '_')}", str(port))
            for name, port in sorted(host_ports.items())]
    return tuple(env)


def whose(record: LabelRecord, hub_id: str | None = None) -> str:
    """Whose a container is, in words, from its labels (for refusals)."""
    if record.hub and record.hub == hub_id:
        return f"user {record.user!r} (server {record.server!r}) of this hub"
    if record.hub:
        return f"hub {record.hub!r}"
    if record.managed:
        return "DS01's tools" + (f" (user {record.user})" if record.user else "")
    return "someone else (it has no gpuspawner labels)"


def _own_allocation(snap: Snapshot, existing: Existing | None) -> Allocation | None:
    if existing is None:
        return None
    return next((a for a in snap.allocations if a.container_id == existing.container_id), None)


def plan(
    snap: Snapshot,
    req: SpawnRequest,
    port_free: Callable[[int], bool] = lambda port: True,
    limits: Any = None,
) -> Plan | Refusal:
    """Decide a spawn. ``port_free`` probes the host for a port (the one question only the
    host can answer); ``limits`` defaults to the snapshot's policy for the user."""
    limits = limits if limits is not None else snap.limits_for(req.user, req.groups)
    existing = req.existing
    own = _own_allocation(snap, existing)
    record = existing.labels if existing else None
    ours = own.is_ours(req.hub_id) if own is not None else record is not None and made_by(
        req.hub_id, record.managed, record.hub, record.interface, record.schema)
    # The server's own container: this hub's, made for this very user and server.
    ours = ours and record is not None and (record.user, record.server) == (req.user, req.server)
    progress: list[tuple[int, str]] = []
    events: list[Event] = []
    removals: list[Removal] = []

    if existing is not None and record is not None and not ours and record.managed:
        return Refusal(
            NAME_CLASH,
            f"a container named {existing.name} already exists and belongs to "
            f"{whose(record, req.hub_id)}; gpuspawner never touches another's container: an "
            "admin can rename or remove it, or give this hub its own DockerSpawner.prefix",
        )
    unlabelled = existing is not None and record is not None and not record.managed
    if unlabelled and existing.docker_status in _DOCKER_RUNNING:
        return Refusal(
            NAME_CLASH,
            f"a container named {existing.name} is running and has no gpuspawner labels; "
            "stop it (docker stop) and start again: it is then kept, files and all",
        )
    if existing is not None and req.remove:
        removals.append(Removal(existing.container_id, existing.name, FRESH, req.user, False,
                                req.server))
        existing, own, record, unlabelled = None, None, None, False

    request = Request(
        user=req.user,
        server=req.server,
        profile=req.profile,
        mig_profile=req.mig_profile,
        gpus=req.gpus,
        prefer_uuids=own.uuids if own and ours else (),
        prefer_parents=(record.parent_uuids if record and ours else ()),
        strategy=req.strategy,
        hub=req.hub_id,
        own_container=own.container_id if own and ours else None,
        busy_memory_mib=snap.busy_memory_mib,
    )
    choice = allocator.choose(snap.inventory, snap.allocations, limits, request)
    if isinstance(choice, Refusal):
        return choice
    for container_id in choice.preempts:
        victim = next(a for a in snap.allocations if a.container_id == container_id)
        removals.append(Removal(container_id, victim.container_name, PREEMPTED, victim.user,
                                True, victim.server))
        events.append(Event("gpu.preempt", (("holder", victim.user),
                                             ("container", victim.container_name),
                                             ("devices", list(victim.uuids)))))

    wanted = dict(req.ports)
    if existing is not None and ours and own is not None:
        why = _cannot_reuse(snap, own, existing, req, choice, wanted, port_free)
        if why is None:
            progress.append((40, f"Keeping {choice.describe()} (same as before)"))
            events.append(Event("gpu.keep", (("container", existing.name),
                                              ("devices", list(choice.uuids)),
                                              ("slots", list(choice.slots)))))
            return Plan(REUSE, choice, existing=existing.container_id,
                        removals=tuple(removals), progress=tuple(progress),
                        events=tuple(events))
        reason, words = why
        if reason in _GPU_REASONS and req.on_gpu_lost == "fail":
            return Refusal(
                GPU_LOST,
                f"{words}. Your server was not started; its files are safe. Ask an admin, or "
                "set up a fresh server (it will get another device)",
            )
        if existing.docker_status in _DOCKER_RUNNING:
            return Refusal(
                BUSY,
                f"your server's container {existing.name} is still running but must be "
                f"replaced ({words}); stop the server and start it again",
            )
        progress.append((35, f"{words}: replacing the container; your files are kept"))
        if reason in _GPU_REASONS:
            events.append(Event("gpu.reallocate", (
                ("container", existing.name), ("old", list(own.uuids)),
                ("new", list(choice.uuids)), ("reason", words))))
        replaced = Removal(existing.container_id, existing.name, reason, req.user,
                           req.replace_with == _SAVE, req.server,
                           carried=not _image_changed(existing, req))
    elif unlabelled:
        words = "the old container was made before gpuspawner"
        progress.append((35, f"{words}: replacing the container; your files are kept"))
        replaced = Removal(existing.container_id, existing.name, UNLABELLED, req.user,
                           req.replace_with == _SAVE, req.server)
    else:
        replaced = None

    previous = dict(own.ports) if own is not None and ours else {}
    try:
        chosen = ports.choose(wanted, tuple(req.port_range), _others_ports(snap, own, req),
                              previous, port_free)
    except ports.PortsExhausted as exc:
        return Refusal(PORTS, str(exc))

    assert req.now is not None, "SpawnRequest.now is set by the spawner"
    labelset = labels.encode(
        hub=req.hub_id, user=req.user, server=req.server, profile=req.profile,
        created_at=req.now, slots=choice.slots, uuids=choice.uuids,
        parent_uuids=choice.parent_uuids, gis=choice.gis, gpu_profile=choice.gpu_profile,
        equivalents=choice.equivalents, priority=limits.priority, ports=chosen,
        host=req.host,
    )
    events.append(Event("gpu.allocate", (
        ("profile", req.profile), ("devices", list(choice.uuids)), ("slots", list(choice.slots)),
        ("gpu_profile", choice.gpu_profile), ("equivalents", choice.equivalents))))
    progress.append((40, f"Device chosen: {choice.describe()}"))
    if chosen:
        shown = ", ".join(f"{k} {v}" for k, v in sorted(chosen.items()))
        events.append(Event("port.allocate", (("ports", dict(sorted(chosen.items()))),)))
        progress.append((50, f"Host ports: {shown}"))
    image = req.saved_image if replaced is None and req.saved_image else None
    if image:
        progress.append((45, "Starting from the saved copy of your last container"))
    return Plan(
        REPLACE if replaced is not None else CREATE,
        choice,
        existing=existing.container_id if replaced is not None else None,
        removals=tuple(removals),
        replaced=replaced,
        image=image,
        labels=tuple(sorted(labelset.items())),
        device_ids=choice.uuids,
        ports=tuple((name, wanted[name], port) for name, port in sorted(chosen.items())),
        environment=environment(choice.uuids, chosen, req.profile, choice.slots,
                                req.image),
        progress=tuple(progress),
        events=tuple(events),
    )


def _image_changed(existing: Existing, req: SpawnRequest) -> bool:
    return bool(req.image and existing.image and existing.image != req.image)


def chosen_image(env: Sequence[str] | None) -> str | None:
    """The image a container's user chose, from its ``GPUSPAWNER_IMAGE`` (Docker's
    ``Config.Env``; ``Config.Image`` names the saved copy it may have been made from)."""
    for line in env or ():
        if line.startswith("GPUSPAWNER_IMAGE="):
            return line.split("=", 1)[1] or None
    return None


def _others_ports(snap: Snapshot, own: Allocation | None, req: SpawnRequest) -> frozenset[int]:
    """Host ports someone else uses or was promised (all but the server's own container's),
    and those Docker lately refused to bind."""
    avoid = frozenset(req.avoid_ports)
    if own is None:
        return snap.reserved_ports() | avoid
    return (snap.reserved_ports(excluding=own.container_id) | avoid) - set(own.published)


_PORT_TAKEN = re.compile(
    r"(?:Bind for \S*?:(\d+) failed: port is already allocated"
    r"|listen tcp[46]? \S*?:(\d+): bind: address already in use)")


def taken_port(message: str) -> int | None:
    """The host port in Docker's refusal to publish it (another container has it, or a host
    process listens on it), or None when the message is about something else."""
    found = _PORT_TAKEN.search(message)
    return int(found.group(1) or found.group(2)) if found else None


def _cannot_reuse(
    snap: Snapshot,
    own: Allocation,
    existing: Existing,
    req: SpawnRequest,
    choice: Choice,
    wanted: Mapping[str, int],
    port_free: Callable[[int], bool],
) -> tuple[str, str] | None:
    """Why the server's own container cannot simply start again: (reason, words), or None."""
    if own.profile != req.profile:
        return PROFILE_CHANGED, f"Profile changed from {own.profile} to {req.profile}"
    if _image_changed(existing, req):
        return IMAGE_CHANGED, f"Image changed from {existing.image} to {req.image}"
    if set(own.uuids) != set(choice.uuids):
        present = snap.inventory.by_uuid()
        gone = [u for u in own.uuids if u not in present]
        if gone:
            return GPU_GONE, (f"Your previous GPU device {gone[0]} no longer exists (the GPU "
                              "was re-partitioned or the host rebooted)")
        for uuid in own.uuids:
            why = allocator.unavailable(snap.inventory, present[uuid])
            if why:
                return GPU_UNAVAILABLE, f"Your previous GPU device {uuid} is unavailable ({why})"
        if own.disagrees:
            return DEVICES_DISAGREE, "Your container's devices differ from its labels"
        return GPU_GIVEN_AWAY, ("Your previous GPU slot was given to someone else after your "
                                "hold ended")
    if own.disagrees:
        return DEVICES_DISAGREE, "Your container's devices differ from its labels"
    if set(dict(own.ports)) != set(wanted):
        return PORTS_CHANGED, "The published ports changed"
    others = _others_ports(snap, own, req)
    for name, port in own.ports:
        # A port the container itself publishes (it runs) is not someone else's.
        if port in others or (port not in own.published and not port_free(port)):
            return PORT_TAKEN, f"Host port {port} ({name}) is now used by something else"
    return None


def nanotime(stamp: str) -> str:
    """Docker's RFC 3339 ``Created`` with its fraction padded to nine digits (Go trims
    trailing zeros, which would make text order differ from time order): the race rule's
    clock, one engine's own."""
    head, _, rest = stamp.partition(".")
    digits = "".join(ch for ch in rest if ch.isdigit())
    return f"{head.rstrip('Z')}.{digits.ljust(9, '0')[:9]}"


def rivals(mine: Allocation, snap: Snapshot) -> tuple[Allocation, ...]:
    """Other containers, running or starting (created, within the start time-out), that hold
    one of ``mine``'s devices (a whole GPU and its slices overlap)."""
    others = [a for a in snap.allocations
              if a.container_id != mine.container_id and a.state in (RUNNING, CREATED)]
    taken = allocator.Taken(snap.inventory, others)
    devices = snap.inventory.by_uuid()
    found = {rival.container_id: rival for uuid in mine.uuids if uuid in devices
             for rival in taken.blockers(devices[uuid])}
    return tuple(found.values())


@dataclass(frozen=True)
class Clock:
    """A container's Docker ``Created`` and ``State.StartedAt`` (``nanotime``): the race
    rule's clock, one engine's own. ``NEVER`` for a container gone since the read."""

    created: str
    started: str


NEVER = Clock("9999", "9999")


def race_loser(
    mine: Allocation,
    snap: Snapshot,
    clocks: Mapping[str, Clock],
    running: bool,
) -> tuple[str, ...]:
    """The devices ``mine`` must give up: the one rule before and after every start.

    Against each of its ``rivals`` (``running``: whether ``mine`` runs):

    - a running rival wins over a container that is not running yet;
    - both running: the one that *started* first wins. The later starter checks after its
      own start, when the earlier one already shows as running, so it always sees the
      pair; the earlier one may have checked before, and keeps its device. (``Created``
      would not do: a stopped container started again is old and would beat a new one
      that finished its checks long ago, and both would stay.)
    - neither running: the earlier ``Created`` wins. (A stopped container is in no one's
      check, so before it is started again it races through a new place-holder container
      with its devices: the spawner's ``_hold_place``.)

    The container id breaks a tie. Every creator on every hub applies the same rule, so
    exactly one stays.
    """
    own = clocks.get(mine.container_id, NEVER)
    devices = snap.inventory.by_uuid()
    lost: set[str] = set()
    for rival in rivals(mine, snap):
        theirs = clocks.get(rival.container_id, NEVER)
        rival_running = rival.state == RUNNING
        if rival_running != running:
            beaten = rival_running
        elif running:
            beaten = (theirs.started, rival.container_id) < (own.started, mine.container_id)
        else:
            beaten = (theirs.created, rival.container_id) < (own.created, mine.container_id)
        if beaten:
            taken = allocator.Taken(snap.inventory, [rival])
            lost.update(u for u in mine.uuids if u in devices and taken.blockers(devices[u]))
    return tuple(sorted(lost))


@dataclass(frozen=True)
class Newcomers(JSONRecord):
    """What Docker's event buffer proves about the containers that became live since a
    plan's read (``newcomers``)."""

    #: The buffer covered the whole window: every container made or started in it is in
    #: ``suspects`` (or is this spawn's own).
    proven: bool
    #: Why it did not, for the log ("" when proven).
    reason: str = ""
    suspects: tuple[str, ...] = ()
    #: The engine's clock minus the hub's, bounded from below by this spawn's own event.
    skew_ns: int | None = None


def newcomers(changes: Changes, racer: str, expect: str, own: frozenset[str],
              planned_ns: int, checked_ns: int) -> Newcomers:
    """The containers other than this spawn's ``own`` made or started since the plan's read
    began (``planned_ns``, the hub's clock), when the buffer proves it saw them all (pure).

    The plan's read showed every container that was live then, and none of them on this
    spawn's devices; a rival must therefore have become live since, which Docker logs as an
    event. The buffer proves the window only when

    - it returned fewer than ``EVENT_BUFFER`` events (dockerd keeps that many: with fewer,
      none of the window was dropped), and no ``daemon`` event (a reload);
    - it holds the ``racer``'s own ``expect`` event (``create`` before the start, ``start``
      after it): the window reached the check's moment, and the engine did not restart and
      empty the buffer since that event;
    - it began no later than the plan's read on the engine's clock: the own event happened
      before ``checked_ns``, so ``event - checked_ns`` is a lower bound of the engine's
      clock minus the hub's, and ``since`` must not be later than ``planned_ns`` plus it.
    """
    if changes.events >= EVENT_BUFFER:
        return Newcomers(False, f"{changes.events} events in the window: the engine's buffer "
                                "may have dropped some")
    if changes.daemon:
        return Newcomers(False, "the engine reloaded its configuration in the window")
    mine = [c.time_ns for c in changes.changes if c.container_id == racer and c.action == expect]
    if not mine:
        return Newcomers(False, f"this spawn's own {expect} event is not in the window")
    skew = max(mine) - checked_ns
    if changes.since_ns > planned_ns + skew:
        return Newcomers(False, "the window began after the plan's read on the engine's clock",
                         skew_ns=skew)
    suspects = sorted({c.container_id for c in changes.changes
                       if c.action in LIVE_ACTIONS and c.container_id not in own})
    return Newcomers(True, suspects=tuple(suspects), skew_ns=skew)


def kept_on_host(mounts: Sequence[Mapping[str, Any]] | None) -> tuple[str, ...]:
    """What keeps a server's files on its host (pure, from Docker's ``Mounts``): each volume
    (by name) and bind mount (by host path). A saved image carries only what is in the
    container itself, so a server with any of these is never moved to another host."""
    found = []
    for mount in mounts or ():
        kind = mount.get("Type")
        if kind == "volume":
            found.append(f"volume {mount.get('Name') or mount.get('Source')}")
        elif kind == "bind":
            found.append(f"bind mount {mount.get('Source')}")
    return tuple(found)


def with_starting(snap: Snapshot, starting: Mapping[str, Allocation]) -> Snapshot:
    """The snapshot as this hub's planner must see it while its own spawns start stopped
    containers again (``starting``: container id -> its allocation when planned): such a
    container shows as stopped in Docker until its start, yet its devices are spoken for,
    so it counts as a spawn in flight (``CREATED``)."""
    if not starting:
        return snap
    seen = {a.container_id for a in snap.allocations}
    allocations = [
        a if a.container_id not in starting or a.state in (RUNNING, CREATED)
        else replace(a, state=CREATED)
        for a in snap.allocations
    ] + [replace(a, state=CREATED) for cid, a in starting.items() if cid not in seen]
    return replace(snap, allocations=tuple(allocations))


# ---------------------------------------------------------------- several hosts


def with_elsewhere(snap: Snapshot, elsewhere: Sequence[Allocation]) -> Snapshot:
    """One host's snapshot with what the user holds on the hub's other hosts: policy limits
    (GPU-equivalents, servers, devices) count across all hosts. Those containers' devices
    are not this host's (a UUID names one device in the world), so they never block one of
    its devices; they are only charged, by their labels, to their users."""
    if not elsewhere:
        return snap
    return replace(snap, allocations=snap.allocations + tuple(elsewhere))


def held_elsewhere(views: Mapping[str, Snapshot], host: str, hub: str | None,
                   user: str, server: str | None = None) -> tuple[Allocation, ...]:
    """The containers of ``user`` on this hub that hold something on hosts other than
    ``host``: what ``with_elsewhere`` adds to ``host``'s snapshot. The planning server's
    own container elsewhere (``server``) is not counted: it is the one that moves to
    ``host``, removed once the server runs there."""
    return tuple(a for name, snap in views.items() if name != host
                 for a in snap.allocations if a.holds and a.is_ours(hub) and a.user == user
                 and (server is None or a.server != server))


def host_load(snap: Snapshot, wants_gpu: bool, pending: float = 0.0) -> float:
    """How busy a host is, for the choice of a host: for a GPU spawn, the share of its GPUs
    held (GPU-equivalents of the devices its holding containers occupy, plus ``pending``
    ones this hub's spawns are about to take there, over its GPUs); for a CPU server, its
    running containers of this hub plus ``pending`` servers on their way."""
    if not wants_gpu:
        return pending + float(sum(1 for a in snap.allocations
                                   if a.state == RUNNING and a.is_ours(snap.hub_id)))
    if not snap.inventory.gpus:
        return 0.0
    devices = snap.inventory.by_uuid()
    taken = allocator.Taken(snap.inventory, snap.allocations)
    held = sum(devices[uuid].equivalents for uuid in taken.by_uuid)
    return (held + pending) / len(snap.inventory.gpus)


def order_hosts(fits: Sequence[tuple[str, float]], strategy: str) -> tuple[str, ...]:
    """The hosts a spawn fits on (name, ``host_load``), in the order they are tried:
    ``pack`` the busiest first (whole hosts stay free), ``spread`` the emptiest first; a tie
    keeps the order of the hub's ``hosts``."""
    sign = -1.0 if strategy == allocator.PACK else 1.0
    ranked = sorted(enumerate(fits), key=lambda item: (sign * item[1][1], item[0]))
    return tuple(name for _index, (name, _load) in ranked)
