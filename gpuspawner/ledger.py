"""What Docker says is taken: one pass over the engine gives the Allocation records.

Docker is the only record of who holds what. The ledger lists every container once per read
(labels, state and published ports come with the list) and inspects only what the list
cannot tell: the device requests of containers without labels (cached for good: a container's
device requests never change) and the finish time of stopped managed containers (cached
while the container stays stopped). In steady state a read is one API call.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import docker
import docker.errors
import requests.exceptions

from . import labels as L
from .records import (
    CREATED,
    EXPIRED,
    FAILED,
    HELD,
    RUNNING,
    Allocation,
    JSONRecord,
)

log = logging.getLogger(__name__)

_RUNNING_STATES = frozenset({"running", "paused", "restarting"})
_STOPPED_STATES = frozenset({"exited", "dead", "removing"})


class LedgerError(RuntimeError):
    """Docker could not be read; the message says what to check."""


def classify(
    docker_status: str,
    *,
    managed: bool,
    created_at: datetime | None,
    finished_at: datetime | None,
    hold_seconds: float,
    start_timeout: float,
    now: datetime,
) -> str:
    """The allocation state of DESIGN.md's "what taken means", from Docker's facts (pure)."""
    if docker_status in _RUNNING_STATES:
        return RUNNING
    if docker_status == "created":
        if created_at is not None and (now - created_at).total_seconds() < start_timeout:
            return CREATED
        return FAILED
    if not managed:
        return EXPIRED  # an unmanaged holder holds its devices only while it runs
    if finished_at is not None and now < finished_at + timedelta(seconds=hold_seconds):
        return HELD
    return EXPIRED


@dataclass(frozen=True)
class DeviceFacts(JSONRecord):
    """What a container's HostConfig says about NVIDIA devices (never changes after create)."""

    ids: tuple[str, ...] = ()  # device ids as given: UUIDs, indexes "0", MIG "0:1"
    count: int = 0  # count=N: "the first N GPUs"; -1: all


def device_facts(attrs: Mapping[str, Any]) -> DeviceFacts:
    """NVIDIA devices from an inspect result: DeviceRequests, or the legacy runtime's env."""
    host = attrs.get("HostConfig") or {}
    ids: list[str] = []
    count = 0
    for request in host.get("DeviceRequests") or []:
        capabilities = {c for group in request.get("Capabilities") or [] for c in group}
        if request.get("Driver") != "nvidia" and "gpu" not in capabilities:
            continue
        if capabilities and capabilities <= {"utility"}:
            continue  # NVML / nvidia-smi only (a hub reading the GPUs): runs nothing on them
        ids.extend(request.get("DeviceIDs") or [])
        wanted = request.get("Count") or 0
        if wanted < 0 or count < 0:
            count = -1
        else:
            count = max(count, wanted)
    if not ids and not count and host.get("Runtime") == "nvidia":
        for entry in (attrs.get("Config") or {}).get("Env") or []:
            if entry.startswith("NVIDIA_VISIBLE_DEVICES="):
                value = entry.split("=", 1)[1].strip()
                if value == "all":
                    count = -1
                elif value not in ("", "none", "void"):
                    ids.extend(v.strip() for v in value.split(",") if v.strip())
    return DeviceFacts(tuple(ids), count)


_AGO = re.compile(
    r"(Less than a second|About a minute|About an hour"
    r"|(\d+) (second|minute|hour|day|week|month|year)s?) ago"
)
_UNIT = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 604800,
         "month": 2592000, "year": 31536000}


def ago_bounds(status_text: str) -> tuple[float, float] | None:
    """The range of seconds since a stop that Docker's "Exited (0) 5 minutes ago" allows.

    Docker's list carries no finish time, only this human text; it is enough to notice that a
    cached finish time no longer fits (the container was started and stopped again).
    """
    match = _AGO.search(status_text or "")
    if not match:
        return None
    phrase = match.group(1)
    if phrase == "Less than a second":
        return (0.0, 1.0)
    if phrase == "About a minute":
        return (60.0, 120.0)
    if phrase == "About an hour":
        return (3600.0, 5400.0)
    count, unit = int(match.group(2)), _UNIT[match.group(3)]
    if unit == 3600:  # Docker rounds hours
        return (3600 * (count - 0.5), 3600 * (count + 0.5))
    return (float(count * unit), float((count + 1) * unit))


def _split_ids(ids: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Device ids -> (UUIDs, slot ids); Docker accepts both, we compare on both."""
    uuids, slots = [], []
    for device in ids:
        if device.startswith(("GPU-", "MIG-")):
            uuids.append(device)
        else:
            slots.append(device.replace(":", "."))
    return tuple(uuids), tuple(slots)


@dataclass(frozen=True)
class Reading(JSONRecord):
    """One pass over the engine."""

    allocations: tuple[Allocation, ...]
    #: Host ports published by running containers, whoever made them.
    bound_ports: frozenset[int]
    containers: int
    api_calls: int
    read_at: datetime


class Ledger:
    """Reads allocations from a Docker engine; safe to share between threads."""

    def __init__(
        self,
        client: docker.DockerClient | docker.APIClient,
        *,
        start_timeout: float = 120.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.api: docker.APIClient = getattr(client, "api", client)
        self.start_timeout = start_timeout
        self.log = logger or log
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceFacts] = {}
        self._finished: dict[str, datetime | None] = {}

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except docker.errors.NotFound:
            raise
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise LedgerError(
                f"the Docker engine at {self.api.base_url} did not answer {what} ({exc}); "
                "check that dockerd is running and this user may use its socket"
            ) from exc

    def forget(self, container_id: str) -> None:
        """Drop what is cached of a container (the spawner calls it after start/stop/remove)."""
        with self._lock:
            self._finished.pop(container_id, None)

    def read(
        self,
        hold_for: Callable[[str | None], float] = lambda user: 0.0,
        now: datetime | None = None,
    ) -> Reading:
        now = now or datetime.now(timezone.utc)
        listed = self._call("a container list", self.api.containers, all=True)
        calls = 1
        allocations: list[Allocation] = []
        bound: set[int] = set()
        seen: set[str] = set()
        for entry in listed:
            cid = entry["Id"]
            seen.add(cid)
            status = entry.get("State") or "unknown"
            if status in _RUNNING_STATES:
                published = entry.get("Ports") or []
                bound.update(p["PublicPort"] for p in published if p.get("PublicPort"))
            try:
                allocation, used = self._allocation(entry, status, hold_for, now)
            except docker.errors.NotFound:
                continue  # removed between the list and the inspect
            calls += used
            if allocation is not None:
                allocations.append(allocation)
        with self._lock:
            for cid in set(self._devices) - seen:
                del self._devices[cid]
            for cid in set(self._finished) - seen:
                del self._finished[cid]
        allocations.sort(key=lambda a: (a.user or "", a.server, a.container_name))
        return Reading(tuple(allocations), frozenset(bound), len(listed), calls, now)

    def _inspect(self, cid: str) -> dict[str, Any]:
        return self._call(f"an inspect of {cid[:12]}", self.api.inspect_container, cid)

    def _facts(self, cid: str) -> tuple[DeviceFacts, int]:
        with self._lock:
            cached = self._devices.get(cid)
        if cached is not None:
            return cached, 0
        facts = device_facts(self._inspect(cid))
        with self._lock:
            self._devices[cid] = facts
        return facts, 1

    def _finished_at(self, cid: str, status: str, status_text: str) -> tuple[datetime | None, int]:
        with self._lock:
            known = cid in self._finished
            cached = self._finished.get(cid)
        if known and cached is None:
            return None, 0
        if cached is not None:
            bounds = ago_bounds(status_text)
            slack = 1.5  # the engine's clock and the rounding of its text
            if bounds is None:
                return cached, 0
            # The text is relative to the engine's clock now, whatever ``now`` the caller judges by.
            age = (datetime.now(timezone.utc) - cached).total_seconds()
            if bounds[0] - slack <= age <= bounds[1] + slack:
                return cached, 0
        attrs = self._inspect(cid)
        with self._lock:
            self._devices.setdefault(cid, device_facts(attrs))
        state = attrs.get("State") or {}
        finished = L.parse_time(state.get("FinishedAt"))
        if (state.get("Status") or status) in _STOPPED_STATES:
            with self._lock:
                self._finished[cid] = finished
        return finished, 1

    def _allocation(
        self,
        entry: Mapping[str, Any],
        status: str,
        hold_for: Callable[[str | None], float],
        now: datetime,
    ) -> tuple[Allocation | None, int]:
        cid = entry["Id"]
        name = ((entry.get("Names") or ["/" + cid[:12]])[0]).lstrip("/")
        created = datetime.fromtimestamp(entry.get("Created") or 0, timezone.utc)
        with self._lock:
            if status not in _STOPPED_STATES:
                self._finished.pop(cid, None)
        record = L.decode(entry.get("Labels"))
        calls = 0
        if not record.managed:
            facts, calls = self._facts(cid)
            if not facts.ids and not facts.count:
                return None, calls
            uuids, slots = _split_ids(facts.ids)
            state = classify(
                status,
                managed=False,
                created_at=created,
                finished_at=None,
                hold_seconds=0,
                start_timeout=self.start_timeout,
                now=now,
            )
            return (
                Allocation(
                    container_id=cid,
                    container_name=name,
                    managed=False,
                    state=state,
                    docker_status=status,
                    uuids=uuids,
                    slots=slots,
                    gpu_count=facts.count,
                    created_at=created,
                ),
                calls,
            )
        finished = None
        if status in _STOPPED_STATES:
            finished, calls = self._finished_at(cid, status, entry.get("Status") or "")
        allocation = Allocation(
            container_id=cid,
            container_name=name,
            managed=True,
            state=classify(
                status,
                managed=True,
                created_at=record.created_at or created,
                finished_at=finished,
                hold_seconds=hold_for(record.user),
                start_timeout=self.start_timeout,
                now=now,
            ),
            docker_status=status,
            user=record.user,
            server=record.server,
            profile=record.profile,
            hub=record.hub,
            uuids=record.uuids,
            slots=record.slots,
            parent_uuids=record.parent_uuids,
            gis=record.gis,
            gpu_profile=record.gpu_profile,
            equivalents=record.equivalents,
            priority=record.priority,
            ports=record.ports,
            created_at=record.created_at or created,
            allocated_at=record.allocated_at,
            finished_at=finished,
            label_problems=record.problems,
        )
        if record.problems or (record.slots and not record.uuids):
            # Labels we cannot trust: Docker's device requests say what the container holds.
            facts, used = self._facts(cid)
            calls += used
            uuids, slots = _split_ids(facts.ids)
            allocation = replace(
                allocation,
                uuids=uuids or allocation.uuids,
                slots=allocation.slots if allocation.uuids == uuids else slots,
                gpu_count=facts.count,
            )
        return allocation, calls


def connect(base_url: str | None = None, timeout: float = 30.0) -> docker.DockerClient:
    """A Docker client for ``base_url`` (or DOCKER_HOST / the default socket)."""
    try:
        if base_url:
            return docker.DockerClient(base_url=base_url, timeout=timeout)
        return docker.from_env(timeout=timeout)
    except docker.errors.DockerException as exc:
        raise LedgerError(
            f"cannot reach the Docker engine ({exc}); check that dockerd is running and "
            "DOCKER_HOST points at it"
        ) from exc


def remove_stopped(client: docker.DockerClient | docker.APIClient, container_id: str) -> None:
    """Remove a stopped container, keeping its volumes: the one write gpuspawner makes to
    Docker outside a spawn (an admin releasing a hold early)."""
    api = getattr(client, "api", client)
    state = (api.inspect_container(container_id).get("State") or {}).get("Status")
    if state in _RUNNING_STATES:
        raise LedgerError(
            f"container {container_id[:12]} is {state}; stop the server before releasing its hold"
        )
    api.remove_container(container_id, v=False)
