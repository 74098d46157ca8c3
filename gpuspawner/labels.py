"""The ``ds01.*`` container label schema (version 1), in one place.

Labels are the allocation record: other tools on the same host read them, so the keys are
exactly those of DESIGN.md and never renamed. Decoding is forgiving (a label edited by hand
into nonsense is reported, not fatal) because a crash here would hide every other container
from the ledger.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from .records import JSONRecord

SCHEMA_VERSION = "1"

MANAGED = "ds01.managed"
SCHEMA = "ds01.schema"
INTERFACE = "ds01.interface"
HUB = "ds01.hub"
USER = "ds01.user"
SERVER = "ds01.server"
PROFILE = "ds01.profile"
CREATED_AT = "ds01.created_at"
GPU_ALLOCATED = "ds01.gpu.allocated"
GPU_UUID = "ds01.gpu.uuid"
GPU_UUIDS = "ds01.gpu.uuids"
GPU_PARENT_UUIDS = "ds01.gpu.parent_uuids"
GPU_GI = "ds01.gpu.gi"
GPU_PROFILE = "ds01.gpu.profile"
GPU_EQUIVALENTS = "ds01.gpu.equivalents"
GPU_ALLOCATED_AT = "ds01.gpu.allocated_at"
GPU_PRIORITY = "ds01.gpu.priority"
#: The host (of the hub's ``hosts``) the container was made on; absent on a one-host hub.
HOST = "ds01.host"
PORT_PREFIX = "ds01.port."

#: Older DS01 spellings that readers still accept.
LEGACY_USER = "aime.mlc.USER"

INTERFACE_JUPYTERHUB = "jupyterhub"

_SLOT = re.compile(r"^\d+(\.\d+)?$")
_UUID = re.compile(r"^(GPU|MIG)-[0-9A-Za-z-]+(/\d+/\d+)?$")
_PORT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")


@dataclass(frozen=True)
class LabelRecord(JSONRecord):
    """What a container's labels say, decoded; ``problems`` lists what did not make sense."""

    managed: bool
    user: str | None = None
    server: str = ""
    profile: str | None = None
    hub: str | None = None
    interface: str | None = None
    schema: str | None = None
    slots: tuple[str, ...] = ()
    uuids: tuple[str, ...] = ()
    parent_uuids: tuple[str, ...] = ()
    gis: tuple[int, ...] = ()
    gpu_profile: str | None = None
    equivalents: float = 0.0
    priority: int = 0
    ports: tuple[tuple[str, int], ...] = ()
    created_at: datetime | None = None
    allocated_at: datetime | None = None
    problems: tuple[str, ...] = ()
    host: str | None = None


def utc_iso(moment: datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, the one timestamp spelling the labels use."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(text: str | None) -> datetime | None:
    """Parse Docker's and our timestamps (nanosecond fractions included); None when unset."""
    if not text or text.startswith("0001-01-01"):
        return None
    text = text.strip().replace("Z", "+00:00")
    # Docker writes nanoseconds; Python takes at most microseconds.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def port_label(name: str) -> str:
    if not _PORT_NAME.match(name):
        raise ValueError(
            f"port name {name!r} is not usable in a label: use lower-case letters, digits, - or _"
        )
    return PORT_PREFIX + name


def encode(
    *,
    hub: str,
    user: str,
    server: str,
    profile: str,
    created_at: datetime,
    slots: Sequence[str] = (),
    uuids: Sequence[str] = (),
    parent_uuids: Sequence[str] = (),
    gis: Sequence[int | None] = (),
    gpu_profile: str | None = None,
    equivalents: float = 0.0,
    priority: int = 0,
    ports: Mapping[str, int] | None = None,
    host: str | None = None,
) -> dict[str, str]:
    """The labels of a new container. Values are strings, as Docker stores them. ``host``
    only on a hub of several hosts: a one-host hub's labels stay as they always were."""
    stamp = utc_iso(created_at)
    labels = {
        MANAGED: "true",
        SCHEMA: SCHEMA_VERSION,
        INTERFACE: INTERFACE_JUPYTERHUB,
        HUB: hub,
        USER: user,
        SERVER: server,
        PROFILE: profile,
        CREATED_AT: stamp,
        GPU_ALLOCATED: ",".join(slots),
        GPU_UUIDS: ",".join(uuids),
        GPU_PARENT_UUIDS: ",".join(parent_uuids),
        GPU_GI: ",".join("" if gi is None else str(gi) for gi in gis),
        GPU_PROFILE: gpu_profile or "",
        GPU_EQUIVALENTS: f"{equivalents:.4f}",
        GPU_PRIORITY: str(int(priority)),
    }
    if len(uuids) == 1:
        labels[GPU_UUID] = uuids[0]
    if uuids:
        labels[GPU_ALLOCATED_AT] = stamp
    for name, port in (ports or {}).items():
        labels[port_label(name)] = str(int(port))
    if host:
        labels[HOST] = host
    return labels


def _split(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(part.strip() for part in value.split(",") if part.strip())


def is_managed(labels: Mapping[str, str] | None) -> bool:
    """True for containers made by gpuspawner or by DS01's scripts (older spellings too)."""
    if not labels:
        return False
    if labels.get(MANAGED, "").lower() == "true":
        return True
    return bool(labels.get(GPU_UUID) or labels.get(LEGACY_USER))


def decode(labels: Mapping[str, str] | None) -> LabelRecord:
    """Read the schema back. Never raises: a bad value is dropped and named in ``problems``."""
    labels = dict(labels or {})
    if not is_managed(labels):
        return LabelRecord(managed=False)
    problems: list[str] = []

    def bad(key: str, why: str) -> None:
        problems.append(f"label {key}={labels.get(key)!r} {why}")

    schema = labels.get(SCHEMA)
    if schema and schema != SCHEMA_VERSION:
        bad(SCHEMA, f"is a schema this version does not know (reads {SCHEMA_VERSION})")

    user = labels.get(USER) or labels.get(LEGACY_USER) or None

    slots = _split(labels.get(GPU_ALLOCATED))
    for slot in slots:
        if not _SLOT.match(slot):
            bad(GPU_ALLOCATED, f"holds {slot!r}, which is not a slot id like '1' or '1.2'")
            slots = ()
            break

    uuids = _split(labels.get(GPU_UUIDS))
    single = labels.get(GPU_UUID, "").strip()
    if not uuids and single:
        uuids = (single,)
    elif single and single not in uuids:
        bad(GPU_UUID, f"disagrees with {GPU_UUIDS}")
    good_uuids = tuple(u for u in uuids if _UUID.match(u))
    if len(good_uuids) != len(uuids):
        bad(GPU_UUIDS, "holds a value that is not a GPU-… or MIG-… UUID")
        uuids = good_uuids

    parents = _split(labels.get(GPU_PARENT_UUIDS))
    if any(not p.startswith("GPU-") for p in parents):
        bad(GPU_PARENT_UUIDS, "holds a value that is not a GPU-… UUID")
        parents = tuple(p for p in parents if p.startswith("GPU-"))

    gis: list[int] = []
    for part in _split(labels.get(GPU_GI)):
        if part.isdigit():
            gis.append(int(part))
        else:
            bad(GPU_GI, "holds a value that is not a GPU-instance id")
            gis = []
            break

    equivalents = 0.0
    raw = labels.get(GPU_EQUIVALENTS)
    if raw:
        try:
            equivalents = float(raw)
            if not math.isfinite(equivalents) or equivalents < 0:
                raise ValueError
        except ValueError:
            bad(GPU_EQUIVALENTS, "is not a non-negative number")
            equivalents = 0.0

    priority = 0
    raw = labels.get(GPU_PRIORITY)
    if raw:
        try:
            priority = int(raw)
        except ValueError:
            bad(GPU_PRIORITY, "is not an integer")

    ports: list[tuple[str, int]] = []
    for key, value in sorted(labels.items()):
        if not key.startswith(PORT_PREFIX):
            continue
        name = key[len(PORT_PREFIX) :]
        if not value:
            continue  # blanked when the container was saved to an image (ledger.save)
        if value.isdigit() and 0 < int(value) < 65536:
            ports.append((name, int(value)))
        else:
            bad(key, "is not a port number")

    def when(key: str) -> datetime | None:
        try:
            return parse_time(labels.get(key))
        except ValueError:
            bad(key, "is not an ISO 8601 time")
            return None

    return LabelRecord(
        managed=True,
        user=user,
        server=labels.get(SERVER, ""),
        profile=labels.get(PROFILE) or None,
        hub=labels.get(HUB) or None,
        interface=labels.get(INTERFACE) or None,
        schema=schema,
        slots=slots,
        uuids=uuids,
        parent_uuids=parents,
        gis=tuple(gis),
        gpu_profile=labels.get(GPU_PROFILE) or None,
        equivalents=equivalents,
        priority=priority,
        ports=tuple(ports),
        created_at=when(CREATED_AT),
        allocated_at=when(GPU_ALLOCATED_AT),
        problems=tuple(problems),
        host=labels.get(HOST) or None,
    )
